"""Data curation throughput: exact dedup, MinHash LSH dedup and n-gram decontamination
(`nebula.curation`) on synthetic prompts, against a naive all-pairs Jaccard baseline.

The data (seeded): templated sentences (two clauses drawn from slot-heavy templates, ~25
words, ~140 characters, no 8 fixed words in a row); ~10% of rows repeat an earlier row with
its case, punctuation and spacing changed (exact duplicates after normalisation), ~5% repeat
an earlier row with one word replaced (near duplicates); 1% of rows embed one of 1,000 eval
prompts (contamination), and copies of such rows are contaminated too. Measured side by side
in one run, on the same rows:

* exact dedup (normalised-text hash), MinHash dedup (char 5-grams, 128 permutations,
  threshold 0.8, datasketch LSH) and decontamination (Tülu 3: 8-grams, > 50% of an eval
  item's tokens), rows/s over all rows, with what each found against what was planted;
* the naive baseline on the first 2,000 rows: every pair's exact Jaccard similarity of the
  same shingle sets (O(n^2)), its rows/s and the time it would take on all rows, and MinHash
  on those same rows with its recall of the pairs the baseline finds.

Last line: `data exact_rows_per_s=<n> minhash_rows_per_s=<n> decontam_rows_per_s=<n>`.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nebula.curation.decontam import build_index, decontaminate  # noqa: E402
from nebula.curation.dedup import MinHashParams, exact_dedup, near_dedup  # noqa: E402
from nebula.curation.text import normalize  # noqa: E402

TEMPLATES = [
    "{name} asked {name2} to {verb} the {adj} {noun} near the {place} before {time}",
    "after {time} the {adj} {noun} of {name} was {n} steps from the {place}",
    "please {verb} {n} {adj} {noun}s for {name} and {name2} at the {place}",
    "why would {name} {verb} a {adj} {noun} in the {place} every {time}",
    "in the {place} {name} found {n} {adj} {noun}s and chose to {verb} them",
    "{name2} told {name} that the {noun} by the {place} looked {adj} at {time}",
]
WORDS = {
    "name": [f"{a}{b}" for a in ("al", "bo", "ca", "de", "el", "fi", "go", "ha", "iv", "jo",
                                 "ka", "le", "mo", "ni", "os", "pe", "qu", "ra", "si", "tu")
             for b in ("na", "ric", "bel", "van", "mir", "dor", "lin", "sa", "to", "xen")],
    "verb": ["paint", "carry", "measure", "clean", "repair", "count", "sell", "hide", "find",
             "build", "draw", "weigh", "sort", "wrap", "test", "open", "close", "move", "fold",
             "lift", "stack", "polish", "label", "inspect", "borrow", "return", "copy"],
    "adj": ["red", "small", "heavy", "old", "shiny", "broken", "wooden", "tiny", "green",
            "quiet", "bright", "round", "sharp", "soft", "plain", "rare", "odd", "warm",
            "cold", "new", "dusty", "golden", "striped", "hollow", "narrow", "bent"],
    "noun": ["box", "lamp", "chair", "stone", "book", "clock", "key", "map", "cup", "rope",
             "coin", "shell", "bottle", "basket", "drum", "kite", "ring", "brush", "ladder",
             "wheel", "candle", "mirror", "pencil", "blanket", "jar", "bell", "feather"],
    "place": ["market", "harbor", "garden", "library", "station", "bridge", "kitchen",
              "tower", "forest", "museum", "bakery", "school", "square", "farm", "cellar"],
    "time": ["dawn", "noon", "dusk", "midnight", "lunch", "supper", "sunrise", "sunset"],
}


def sentence(rng: random.Random) -> str:
    parts = []
    for _ in range(2):
        t = rng.choice(TEMPLATES)
        slots = {k: rng.choice(v) for k, v in WORDS.items()}
        slots["name2"] = rng.choice(WORDS["name"])
        slots["n"] = str(rng.randrange(2, 1000))
        parts.append(t.format(**slots))
    return (parts[0].capitalize() + ", and " + parts[1] + ".")


def noisy_copy(text: str, rng: random.Random) -> str:
    """The same normalised text: case, punctuation and spacing changed."""
    kind = rng.randrange(3)
    if kind == 0:
        return text.upper()
    if kind == 1:
        return "  " + text.replace(" ", "  ").replace(".", "!") + " "
    return text.replace(",", "").replace(".", "?!")


def one_word_edit(text: str, rng: random.Random) -> str:
    ws = text.split()
    i = rng.randrange(1, len(ws) - 1)
    ws[i] = rng.choice(WORDS["noun"] + WORDS["adj"] + WORDS["verb"])
    return " ".join(ws)


def make_rows(n: int, eval_prompts: list[str], seed: int) -> tuple[list[str], dict[str, int]]:
    """Rows and what was planted. Ground truth follows copies: a copy of a contaminated row is
    contaminated too, and rows embedding the same eval prompt are exact duplicates."""
    rng = random.Random(seed)
    texts: list[str] = []
    origin: list[object] = []    # rows with equal origin have equal normalised text
    contaminated: list[bool] = []
    planted = {"exact_copies": 0, "edits": 0, "eval_embeds": 0}
    for i in range(n):
        r = rng.random()
        if i > 10 and r < 0.15:
            j = rng.randrange(len(texts))
            if r < 0.10:
                text, org = noisy_copy(texts[j], rng), origin[j]
                planted["exact_copies"] += 1
            else:
                text = one_word_edit(texts[j], rng)
                org = origin[j] if normalize(text) == normalize(texts[j]) else i
                planted["edits"] += 1
            contaminated.append(contaminated[j])
        elif r < 0.16:
            k = rng.randrange(len(eval_prompts))
            text, org = f"Solve this: {eval_prompts[k]} Show your work.", ("eval", k)
            contaminated.append(True)
            planted["eval_embeds"] += 1
        else:
            text, org = sentence(rng), i
            contaminated.append(False)
        texts.append(text)
        origin.append(org)
    planted["exact_dups"] = n - len(set(origin))
    planted["contaminated"] = sum(contaminated)
    return texts, planted


def shingle_set(text: str, k: int) -> set[str]:
    s = normalize(text)
    return {s[i:i + k] for i in range(max(1, len(s) - k + 1))} if s else set()


def pairwise_dedup(texts: list[str], threshold: float, k: int
                   ) -> tuple[list[int], set[tuple[int, int]]]:
    """Naive baseline: exact Jaccard of every pair; a row is removed when it is similar to an
    earlier kept row. Returns (kept, all similar pairs)."""
    sets = [shingle_set(t, k) for t in texts]
    pairs: set[tuple[int, int]] = set()
    for i in range(len(sets)):
        a = sets[i]
        for j in range(i):
            b = sets[j]
            inter = len(a & b)
            if inter and inter / (len(a) + len(b) - inter) >= threshold:
                pairs.add((j, i))
    removed: set[int] = set()
    for j, i in sorted(pairs, key=lambda p: (p[1], p[0])):
        if j not in removed:
            removed.add(i)
    return [i for i in range(len(texts)) if i not in removed], pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--pairwise-rows", type=int, default=2_000)
    ap.add_argument("--eval-rows", type=int, default=1_000)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    erng = random.Random(args.seed + 1)
    eval_prompts = [sentence(erng) for _ in range(args.eval_rows)]
    t0 = time.perf_counter()
    texts, planted = make_rows(args.rows, eval_prompts, args.seed)
    rows = [{"prompt": t} for t in texts]
    print(f"{len(texts):,} rows generated in {time.perf_counter() - t0:.1f}s (seed {args.seed}, "
          f"mean {sum(map(len, texts)) / len(texts):.0f} chars): {planted['exact_copies']:,} "
          f"noisy copies, {planted['edits']:,} one-word edits, {planted['eval_embeds']:,} rows "
          f"embedding one of {len(eval_prompts):,} eval prompts; true exact dups "
          f"{planted['exact_dups']:,}, contaminated rows (copies included) "
          f"{planted['contaminated']:,}")
    params = MinHashParams(threshold=args.threshold)

    t0 = time.perf_counter()
    keep, clusters = exact_dedup(texts)
    t_exact = time.perf_counter() - t0
    print(f"exact dedup:   {len(texts) - len(keep):>7,} removed in {t_exact:6.2f}s = "
          f"{len(texts) / t_exact:>9,.0f} rows/s  (true exact dups {planted['exact_dups']:,})")

    t0 = time.perf_counter()
    keep_n, _ = near_dedup(texts, params)
    t_near = time.perf_counter() - t0
    print(f"MinHash dedup: {len(texts) - len(keep_n):>7,} removed in {t_near:6.2f}s = "
          f"{len(texts) / t_near:>9,.0f} rows/s  (exact dups + edits: "
          f"{planted['exact_dups'] + planted['edits']:,}; {params.shingle} "
          f"{params.shingle_size}-grams, "
          f"{params.num_perm} perms, J >= {params.threshold})")

    t0 = time.perf_counter()
    index = build_index([("eval", eval_prompts)])
    t_index = time.perf_counter() - t0
    res = decontaminate(rows, index)
    t_dc = time.perf_counter() - t0
    print(f"decontaminate: {len(res.contaminated):>7,} removed in {t_dc:6.2f}s = "
          f"{len(texts) / t_dc:>9,.0f} rows/s  (truth {planted['contaminated']:,}; index of "
          f"{len(eval_prompts):,} eval prompts built in {t_index * 1000:.0f} ms)")

    m = min(args.pairwise_rows, len(texts))
    sample = texts[:m]
    t0 = time.perf_counter()
    keep_p, pairs = pairwise_dedup(sample, args.threshold, params.shingle_size)
    t_pair = time.perf_counter() - t0
    t0 = time.perf_counter()
    keep_s, clusters_s = near_dedup(sample, params)
    t_sample = time.perf_counter() - t0
    removed_p = set(range(m)) - set(keep_p)
    removed_s = set(range(m)) - set(keep_s)
    agree = len(removed_p & removed_s)
    extrapolated = t_pair * (len(texts) / m) ** 2
    print(f"naive all-pairs Jaccard on the first {m:,} rows: {m * (m - 1) // 2:,} pairs in "
          f"{t_pair:.1f}s = {m / t_pair:,.0f} rows/s, {m - len(keep_p)} removed; O(n^2): "
          f"~{extrapolated / 3600:.1f} h for {len(texts):,} rows")
    print(f"MinHash on the same {m:,} rows: {t_sample:.3f}s = {m / t_sample:,.0f} rows/s, "
          f"{len(removed_s)} removed, {agree} of them among the baseline's {len(removed_p)} "
          f"(recall {agree / max(1, len(removed_p)):.3f}, {len(removed_s) - agree} extra); "
          f"{t_pair / t_sample:,.0f}x faster")
    print(f"data exact_rows_per_s={len(texts) / t_exact:.0f} "
          f"minhash_rows_per_s={len(texts) / t_near:.0f} "
          f"decontam_rows_per_s={len(texts) / t_dc:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
