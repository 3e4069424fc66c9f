"""Exact and near-duplicate removal; the first occurrence of every cluster is kept.

* Exact: rows whose normalised text (`nebula.curation.text.normalize`: lowercase,
  punctuation -> space, whitespace collapsed) has the same 128-bit BLAKE2b hash.
* Near: MinHash signatures of the normalised text's shingles, candidates from datasketch's
  `MinHashLSH` (banding tuned for recall at the threshold, `LSH_WEIGHTS`), confirmed by the
  exact Jaccard similarity of the two rows' shingle sets >= threshold. Shingles are
  character n-grams of the normalised text (`shingle="char"`, default 5 characters, spaces
  included) or word n-grams of its word tokens (`shingle="word"`); a text shorter than one
  shingle is one shingle. Rows are visited in order; a row joins the cluster of the most
  similar earlier *kept* row (ties: the earliest), else it is kept and indexed.

Signatures are computed in numpy for a whole batch of rows at once: each shingle is hashed to
32 bits, then mixed and permuted exactly as datasketch's default `affine32` MinHash does
(MurmurHash3 finalizer, then h -> a*h + b mod 2^32 with datasketch's seeded (a, b)), so a row's
signature equals `MinHash(num_perm, seed, hashfunc=lambda x: x)` updated with its shingle
hashes (`shingle_hashes`), and they go into the LSH index as `LeanMinHash`es.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from nebula.curation.text import field_texts, normalize, words

Shingle = Literal["char", "word"]
MAX_SHINGLE = 64


@dataclass
class Cluster:
    """One kept row and the later rows removed as its duplicates (row indices from 0)."""

    kept: int
    removed: list[int]

    def to_json(self) -> dict[str, Any]:
        return {"kept": self.kept, "removed": self.removed}


@dataclass(frozen=True)
class MinHashParams:
    threshold: float = 0.8       # estimated Jaccard similarity at or above which rows are dups
    num_perm: int = 128          # permutations (signature length)
    shingle: Shingle = "char"    # character or word n-grams
    shingle_size: int = 5        # n of the shingles
    seed: int = 1                # datasketch's permutation seed

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be at least 2, got {self.num_perm}")
        if self.shingle not in ("char", "word"):
            raise ValueError(f"shingle must be 'char' or 'word', got {self.shingle!r}")
        if not 1 <= self.shingle_size <= MAX_SHINGLE:
            raise ValueError(f"shingle_size must be in 1..{MAX_SHINGLE}, got {self.shingle_size}")

    def to_json(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "num_perm": self.num_perm,
                "shingle": self.shingle, "shingle_size": self.shingle_size, "seed": self.seed}


@dataclass
class DedupResult:
    rows: int
    keep: list[int]                                  # kept row indices, in order
    exact: list[Cluster] = field(default_factory=list)
    near: list[Cluster] = field(default_factory=list)
    params: MinHashParams | None = None              # None: no near-dup pass

    @property
    def exact_removed(self) -> int:
        return sum(len(c.removed) for c in self.exact)

    @property
    def near_removed(self) -> int:
        return sum(len(c.removed) for c in self.near)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rows": self.rows, "kept": len(self.keep), "removed": self.rows - len(self.keep),
            "exact": {"removed": self.exact_removed,
                      "clusters": [c.to_json() for c in self.exact]}}
        if self.params is not None:
            out["near"] = {"removed": self.near_removed, **self.params.to_json(),
                           "clusters": [c.to_json() for c in self.near]}
        return out


# -- exact --------------------------------------------------------------------------------

def text_key(text: str) -> bytes:
    """128-bit BLAKE2b of the normalised text."""
    return hashlib.blake2b(normalize(text).encode(), digest_size=16).digest()


def exact_dedup(texts: Sequence[str], ids: Sequence[int] | None = None
                ) -> tuple[list[int], list[Cluster]]:
    """(kept ids, clusters) of exact duplicates after normalisation; ids default to
    0..n-1."""
    ids = range(len(texts)) if ids is None else ids
    first: dict[bytes, int] = {}
    dups: dict[int, list[int]] = {}
    keep: list[int] = []
    for i, text in zip(ids, texts):
        j = first.setdefault(text_key(text), i)
        if j == i:
            keep.append(i)
        else:
            dups.setdefault(j, []).append(i)
    return keep, [Cluster(k, v) for k, v in sorted(dups.items())]


# -- MinHash signatures -------------------------------------------------------------------

# Odd multipliers of the window positions (a shingle's hash is sum_j unit[j] * MULT[j]).
_MULT = np.random.RandomState(20240601).randint(0, 1 << 62, MAX_SHINGLE, dtype=np.uint64) * \
    np.uint64(2) + np.uint64(1)


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class _WordIds:
    """Stable 64-bit ids of words (BLAKE2b), cached."""

    def __init__(self) -> None:
        self.cache: dict[str, int] = {}

    def __call__(self, ws: list[str]) -> list[int]:
        cache = self.cache
        out = []
        for w in ws:
            v = cache.get(w)
            if v is None:
                v = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8)
                                              .digest(), "little") | 1
            out.append(v)
        return out


def _units(texts: Sequence[str], p: MinHashParams, word_ids: _WordIds
           ) -> tuple[np.ndarray, np.ndarray]:
    """(all rows' units concatenated as uint64, units per row): characters of the normalised
    text or ids of its words, each non-empty row padded with zeros to one shingle."""
    k = p.shingle_size
    if p.shingle == "char":
        norm = [normalize(t) for t in texts]
        lens = np.array([len(s) if not s else max(len(s), k) for s in norm], dtype=np.int64)
        joined = "".join(s.ljust(k, "\0") if s else "" for s in norm)
        units = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        return units, lens
    seqs = []
    for t in texts:
        ids = word_ids(words(t))
        if ids and len(ids) < k:
            ids += [0] * (k - len(ids))
        seqs.append(ids)
    lens = np.array([len(s) for s in seqs], dtype=np.int64)
    flat = [v for s in seqs for v in s]
    return np.array(flat, dtype=np.uint64), lens


def _shingles(units: np.ndarray, lens: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(32-bit shingle hashes of all rows concatenated, shingles per row)."""
    counts = np.where(lens > 0, lens - k + 1, 0)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint32), counts
    row_start = np.concatenate(([0], np.cumsum(lens)[:-1]))
    seg_start = np.concatenate(([0], np.cumsum(counts)[:-1]))
    starts = np.repeat(row_start - seg_start, counts) + np.arange(total)
    with np.errstate(over="ignore"):
        h = units[starts] * _MULT[0]
        for j in range(1, k):
            h += units[starts + j] * _MULT[j]
        h = _fmix64(h)
    return ((h >> np.uint64(32)) ^ (h & np.uint64(0xFFFFFFFF))).astype(np.uint32), counts


def shingle_hashes(text: str, params: MinHashParams) -> list[int]:
    """The 32-bit shingle hashes of one text (what its signature is the MinHash of)."""
    units, lens = _units([text], params, _WordIds())
    return [int(v) for v in _shingles(units, lens, params.shingle_size)[0]]


@functools.cache
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's (a, b) of its affine32 scheme for (num_perm, seed)."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return a.astype(np.uint32), b.astype(np.uint32)


def signatures(texts: Sequence[str], params: MinHashParams, batch_shingles: int = 1 << 18,
               keep_shingles: bool = False
               ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """(uint32 MinHash signatures [rows, num_perm], bool mask of rows with no shingles (their
    signature is all 0xFFFFFFFF), and with `keep_shingles` each row's sorted distinct shingle
    hashes). Vectorised over a batch of rows, one permutation at a time (a 1-D
    `minimum.reduceat` over the rows' shingle segments is ~40x faster than a 2-D one)."""
    a, b = _permutations(params.num_perm, params.seed)
    n = len(texts)
    sig_t = np.full((params.num_perm, n), 0xFFFFFFFF, dtype=np.uint32)
    word_ids = _WordIds()
    empty = np.zeros(n, dtype=bool)
    sets: list[np.ndarray] | None = [] if keep_shingles else None
    start, step = 0, 1024
    while start < n:
        stop = min(n, start + step)
        units, lens = _units(texts[start:stop], params, word_ids)
        hv, counts = _shingles(units, lens, params.shingle_size)
        empty[start:stop] = counts == 0
        if sets is not None:
            sets.extend(np.unique(part) for part in np.split(hv, np.cumsum(counts)[:-1]))
        if hv.size:
            hv = _fmix32(hv)
            nz = np.nonzero(counts)[0]
            offs = np.concatenate(([0], np.cumsum(counts[nz])[:-1]))
            cols = start + nz
            tmp = np.empty_like(hv)
            with np.errstate(over="ignore"):
                for j in range(params.num_perm):
                    np.multiply(hv, a[j], out=tmp)
                    tmp += b[j]
                    sig_t[j, cols] = np.minimum.reduceat(tmp, offs)
        per_row = max(1.0, hv.size / max(1, stop - start))
        step = int(max(16, min(65536, batch_shingles / per_row)))
        start = stop
    return np.ascontiguousarray(sig_t.T), empty, sets


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of distinct values."""
    if not a.size or not b.size:
        return 0.0
    idx = np.searchsorted(b, a)
    idx[idx == b.size] = 0
    inter = int(np.count_nonzero(b[idx] == a))
    return inter / (a.size + b.size - inter)


# -- near ---------------------------------------------------------------------------------

# LSH banding: datasketch's optimal (bands, rows) for the threshold with these weights of
# false positives / false negatives. Recall matters more than candidates (which cost one
# exact Jaccard each): a pair at exactly the threshold becomes a candidate with probability
# ~0.95, one 0.05 above it with ~0.99 (with 128 permutations; equal weights give ~0.4 / ~0.7).
LSH_WEIGHTS = (0.05, 0.95)


def near_dedup(texts: Sequence[str], params: MinHashParams, ids: Sequence[int] | None = None
               ) -> tuple[list[int], list[Cluster]]:
    """(kept ids, clusters) of near duplicates (module doc); ids default to 0..n-1.
    Candidates from the LSH index are confirmed by the exact Jaccard similarity of the two
    rows' shingle sets, so the threshold is exact; only the banding is probabilistic."""
    from datasketch import LeanMinHash, MinHashLSH

    ids = list(range(len(texts))) if ids is None else list(ids)
    sig, empty, sets = signatures(texts, params, keep_shingles=True)
    assert sets is not None
    lsh = MinHashLSH(threshold=params.threshold, num_perm=params.num_perm, weights=LSH_WEIGHTS)
    keep: list[int] = []
    dups: dict[int, list[int]] = {}
    threshold = params.threshold
    for pos in range(len(ids)):
        if empty[pos]:
            keep.append(ids[pos])
            continue
        m = LeanMinHash(seed=params.seed, hashvalues=sig[pos], scheme="affine32")
        best, best_sim = -1, -1.0
        for cand in lsh.query(m):
            sim = jaccard(sets[pos], sets[cand])
            if sim >= threshold and (sim > best_sim or (sim == best_sim and cand < best)):
                best, best_sim = cand, sim
        if best >= 0:
            dups.setdefault(ids[best], []).append(ids[pos])
        else:
            keep.append(ids[pos])
            lsh.insert(pos, m, check_duplication=False)
    return keep, [Cluster(k, v) for k, v in sorted(dups.items())]


def dedup(rows: Iterable[dict[str, Any]], field: str = "prompt",
          mode: Literal["exact", "near", "both"] = "both",
          params: MinHashParams | None = None, source: str = "rows") -> DedupResult:
    """Deduplicate rows on the text of `field`: exact first, then near duplicates among the
    rows left (mode "both"), or one of the two."""
    texts = field_texts(rows, field, source)
    keep: list[int] = list(range(len(texts)))
    exact: list[Cluster] = []
    near: list[Cluster] = []
    if mode in ("exact", "both"):
        keep, exact = exact_dedup(texts)
    if mode in ("near", "both"):
        params = params or MinHashParams()
        keep, near = near_dedup([texts[i] for i in keep], params, keep)
    else:
        params = None
    return DedupResult(rows=len(texts), keep=keep, exact=exact, near=near, params=params)
