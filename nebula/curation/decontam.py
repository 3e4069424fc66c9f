"""N-gram decontamination of training rows against eval sets (Tülu 3's rule).

Tülu 3 (Lambert et al. 2024, "Tulu 3: Pushing Frontiers in Open Language Model
Post-Training", and allenai/open-instruct `decontamination/`): 8-gram matching; a token of an
eval item is matched by a training row when it lies in an n-gram of the eval item that also
occurs in that training row, and the pair overlaps significantly when *more than 50%* of the
eval item's tokens are matched by the *same* training row. Here every training row that
overlaps some eval item in this sense is removed:

    overlap(train, eval) = |eval tokens covered by n-grams shared with train| / |eval tokens|
    removed  iff  max over eval items of overlap > threshold      (default n=8, threshold 0.5)

`threshold=0` removes a row sharing any single n-gram with an eval item. Tokens are the words
of the normalised text (`nebula.curation.text`). The training side is the row's prompt and,
for SFT / preference rows, each response field (`response`, `completion`, `chosen`,
`rejected`) and the assistant turns of a chat `messages` row, each n-grammed on its own; the
eval side is each eval row's prompt. An eval item shorter than n tokens is matched whole: it
overlaps (1.0) a training row whose text contains its full token sequence (with n=8, a 3-word
eval prompt is found only verbatim, after normalisation).

The eval sets become one in-memory index (hash of each n-gram -> the eval items and positions
holding it); each training row costs one set intersection of its own n-gram hashes with the
index's keys, so the whole pass is linear in the data (no train x eval pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from nebula.curation.text import ngram_hashes, split_texts, words

TULU3_NGRAM = 8
TULU3_THRESHOLD = 0.5


@dataclass(frozen=True)
class EvalItem:
    file: str
    row: int
    tokens: int


@dataclass
class Match:
    item: EvalItem
    overlap: float

    def to_json(self) -> dict[str, Any]:
        return {"eval_file": self.item.file, "eval_row": self.item.row,
                "overlap": round(self.overlap, 4)}


class EvalIndex:
    """Hashed n-grams of one or more eval sets (module doc)."""

    def __init__(self, n: int = TULU3_NGRAM) -> None:
        if n < 1:
            raise ValueError(f"ngram must be at least 1, got {n}")
        self.n = n
        self.items: list[EvalItem] = []
        self.grams: dict[int, list[tuple[int, int]]] = {}  # n-gram hash -> [(item, position)]
        self.short_lengths: set[int] = set()               # lengths of items shorter than n
        self.files: list[dict[str, Any]] = []
        self._keys: set[int] | None = None

    def add(self, file: str, texts: Sequence[str]) -> None:
        """Index the eval set `file`'s prompt texts (row i of the file is texts[i])."""
        n, grams = self.n, self.grams
        short = empty = 0
        for row, text in enumerate(texts):
            toks = words(text)
            if not toks:
                empty += 1
                continue
            item = len(self.items)
            self.items.append(EvalItem(file, row, len(toks)))
            if len(toks) < n:
                short += 1
                self.short_lengths.add(len(toks))
                grams.setdefault(hash(tuple(toks)), []).append((item, 0))
                continue
            for pos, gram in enumerate(zip(*(toks[k:] for k in range(n)))):
                grams.setdefault(hash(gram), []).append((item, pos))
        self.files.append({"file": file, "rows": len(texts), "short_items": short,
                           "empty_items": empty})
        self._keys = None

    @property
    def keys(self) -> set[int]:
        if self._keys is None:
            self._keys = set(self.grams)
        return self._keys

    def row_grams(self, texts: Iterable[str]) -> set[int]:
        """Hashes of the n-grams (and of the short items' lengths' m-grams) of a training row's
        texts, each text on its own."""
        out: set[int] = set()
        for text in texts:
            toks = words(text)
            out |= ngram_hashes(toks, self.n)
            for m in self.short_lengths:
                out |= ngram_hashes(toks, m)
        return out

    def matches(self, texts: Iterable[str], threshold: float = TULU3_THRESHOLD) -> list[Match]:
        """The eval items that a training row (its texts) overlaps by more than `threshold`,
        most overlapped first."""
        hits = self.row_grams(texts) & self.keys
        if not hits:
            return []
        spans: dict[int, list[int]] = {}
        for h in hits:
            for item, pos in self.grams[h]:
                spans.setdefault(item, []).append(pos)
        out = []
        for item_id, starts in spans.items():
            item = self.items[item_id]
            width = min(self.n, item.tokens)
            covered, end = 0, 0
            for s in sorted(starts):  # size of the union of [s, s + width)
                covered += s + width - max(s, end) if s + width > end else 0
                end = max(end, s + width)
            overlap = covered / item.tokens
            if overlap > threshold:
                out.append(Match(item, overlap))
        out.sort(key=lambda m: (-m.overlap, m.item.file, m.item.row))
        return out


def build_index(eval_sets: Sequence[tuple[str, Sequence[str]]], n: int = TULU3_NGRAM
                ) -> EvalIndex:
    """An index of eval sets given as (file name, prompt texts)."""
    index = EvalIndex(n)
    for file, texts in eval_sets:
        index.add(file, texts)
    return index


@dataclass
class DecontamResult:
    rows: int
    keep: list[int]
    contaminated: list[tuple[int, list[Match]]] = field(default_factory=list)
    ngram: int = TULU3_NGRAM
    threshold: float = TULU3_THRESHOLD
    eval_files: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        per_file: dict[str, int] = {f["file"]: 0 for f in self.eval_files}
        for _, matches in self.contaminated:
            for file in {m.item.file for m in matches}:
                per_file[file] = per_file.get(file, 0) + 1
        return {
            "rows": self.rows, "kept": len(self.keep), "removed": len(self.contaminated),
            "ngram": self.ngram, "threshold": self.threshold,
            "rule": f"removed when more than {self.threshold:g} of an eval item's tokens lie in "
                    f"{self.ngram}-grams shared with the row (Tülu 3)",
            "eval": [{**f, "rows_matched": per_file.get(f["file"], 0)} for f in self.eval_files],
            "contaminated": [{"row": i, "matches": [m.to_json() for m in ms]}
                             for i, ms in self.contaminated],
        }


def decontaminate(rows: Iterable[dict[str, Any]], index: EvalIndex, field: str = "prompt",
                  response_fields: Sequence[str] = (), threshold: float = TULU3_THRESHOLD,
                  source: str = "rows", assistant_turns: bool = True) -> DecontamResult:
    """Rows that overlap no eval item of `index` (module doc); the rest are reported with
    the eval file and row they match. `response_fields` are checked besides the prompt, and
    with `assistant_turns` the assistant turns of a chat-list prompt field."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    keep: list[int] = []
    bad: list[tuple[int, list[Match]]] = []
    n = 0
    for i, row in enumerate(rows):
        n += 1
        texts = split_texts(row, field, response_fields, f"{source} row {i}", assistant_turns)
        ms = index.matches(texts, threshold)
        if ms:
            bad.append((i, ms))
        else:
            keep.append(i)
    return DecontamResult(rows=n, keep=keep, contaminated=bad, ngram=index.n,
                          threshold=threshold, eval_files=list(index.files))
