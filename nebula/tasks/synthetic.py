"""Synthetic verifiable tasks: 2-digit addition and string reversal.

Rows: {"prompt", "answer", "domain"}; the answer is scored with the `exact` verifier.
Train and eval sets are disjoint. Tasks `addition_pref` / `reversal_pref` are the same splits
as preference pairs (+ "chosen": the answer, "rejected": a near miss) for DPO.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path


def addition_rows(seed: int = 0) -> list[dict[str, str]]:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b), "domain": "add"} for a, b in pairs]


def reversal_rows(n: int = 4000, seed: int = 0, min_len: int = 3, max_len: int = 6
                  ) -> list[dict[str, str]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        word = "".join(rng.choice(string.ascii_lowercase)
                       for _ in range(rng.randint(min_len, max_len)))
        if word not in seen:
            seen.add(word)
            rows.append({"prompt": f"rev {word}=", "answer": word[::-1], "domain": "rev"})
    return rows


def preference_rows(rows: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs from task rows: the right answer is chosen, a near miss rejected (two
    neighbouring characters swapped, or for a palindrome-ish answer the last one changed), so
    the pair differs in the few tokens that make the answer right."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        ans = r["answer"]
        wrong = ans
        if len(set(ans)) > 1:
            while wrong == ans:
                i = rng.randrange(len(ans) - 1)
                wrong = ans[:i] + ans[i + 1] + ans[i] + ans[i + 2:]
        else:
            wrong = ans[:-1] + ("0" if ans[-1] != "0" else "1")
        out.append({**r, "chosen": ans, "rejected": wrong})
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a crash never leaves half a dataset


def make_split(task: str, out_dir: str | Path, eval_size: int = 500, seed: int = 0
               ) -> tuple[Path, Path]:
    """Write out_dir/{task}_train.jsonl and {task}_eval.jsonl (disjoint); returns their paths."""
    base = task.removesuffix("_pref")
    rows = addition_rows(seed) if base == "addition" else reversal_rows(seed=seed)
    if task.endswith("_pref"):  # the same split as `base`, as preference pairs
        rows = preference_rows(rows, seed)
    out = Path(out_dir)
    train, held = out / f"{task}_train.jsonl", out / f"{task}_eval.jsonl"
    if not (train.exists() and held.exists()):
        write_jsonl(held, rows[:eval_size])
        write_jsonl(train, rows[eval_size:])
    return train, held
