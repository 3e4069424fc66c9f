"""Synthetic verifiable tasks: 2-digit addition and string reversal.

Rows: {"prompt", "answer", "domain"}; the answer is scored with the `exact` verifier.
Train and eval sets are disjoint. Tasks `addition_pref` / `reversal_pref` are the same splits
as preference pairs (+ "chosen": the answer, "rejected": a near miss) for DPO. Task `tooladd`
(3-digit sums) is for the tools environment (examples/toy/tools.yaml).
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


def tool_addition_rows(n: int = 6000, seed: int = 0, tool_frac: float = 0.5, digits: int = 3
                       ) -> list[dict[str, str]]:
    """3-digit sums, mostly too hard for the toy model to compute itself, for the tools
    environment.
    "target" is an SFT demonstration: in `tool_frac` of the rows a calculator call, its
    answer and the sum copied from it (the whole episode's text), else the sum written
    directly. GRPO then has to discover that calling the calculator pays."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lo, hi = 10 ** (digits - 1), 10 ** digits
        a, b = rng.randrange(lo, hi), rng.randrange(lo, hi)
        s = str(a + b)
        demo = (f"<calculator>{a}+{b}</calculator><result>{s}</result>{s}"
                if rng.random() < tool_frac else s)
        rows.append({"prompt": f"{a}+{b}=", "answer": s, "target": demo,
                     "domain": f"add{digits}"})
    return rows


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer of the kind a small model makes: two neighbouring characters swapped,
    one dropped, one doubled, or (for a reversal) the word not reversed at all."""
    while True:
        kind = rng.randrange(4)
        i = rng.randrange(len(answer))
        if kind == 0 and len(answer) > 1:
            i = min(i, len(answer) - 2)
            wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
        elif kind == 1 and len(answer) > 1:
            wrong = answer[:i] + answer[i + 1:]
        elif kind == 2:
            wrong = answer[:i] + answer[i] + answer[i:]
        else:
            wrong = answer[::-1]
        if wrong != answer:
            return wrong


def preference_rows(rows: list[dict[str, str]], seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs from task rows: the right answer is chosen, a near miss
    (`near_miss`) rejected."""
    rng = random.Random(seed)
    return [{**r, "chosen": r["answer"], "rejected": near_miss(r["answer"], rng)} for r in rows]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)  # atomic: a crash never leaves half a dataset


def make_split(task: str, out_dir: str | Path, eval_size: int = 500, seed: int = 0
               ) -> tuple[Path, Path]:
    """Write out_dir/{task}_train.jsonl and {task}_eval.jsonl (disjoint); returns their paths."""
    base = task.removesuffix("_pref")
    rows = {"addition": lambda: addition_rows(seed), "reversal": lambda: reversal_rows(seed=seed),
            "tooladd": lambda: tool_addition_rows(seed=seed)}[base]()
    if task.endswith("_pref"):  # the same split as `base`, as preference pairs
        rows = preference_rows(rows, seed)
    out = Path(out_dir)
    train, held = out / f"{task}_train.jsonl", out / f"{task}_eval.jsonl"
    if not (train.exists() and held.exists()):
        write_jsonl(held, rows[:eval_size])
        write_jsonl(train, rows[eval_size:])
    return train, held
