"""The distillation demos end to end (CPU, nothing downloaded).

    python examples/distill/run.py opd    teacher (long SFT on string reversal) -> student
                                          (very short SFT) -> on-policy distillation from the
                                          teacher's top-k
    python examples/distill/run.py mopd   two teachers (addition, reversal) -> a student with a
                                          short SFT on both -> multi-teacher OPD, printed per
                                          domain against each teacher measured on the same
                                          held-out prompts

Teachers and students' starts are SFT-only jobs, built once and reused (delete runs/distill
to rebuild). Prints held-out greedy accuracy of teachers and student.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))


def run_job(config: str) -> dict[str, Any]:
    from nebula.config import load_file
    from nebula.config.job import JobConfig
    from services.progress import run_with_progress

    return run_with_progress(load_file(JobConfig, ROOT / config))


def built(config: str) -> dict[str, Any]:
    """Run an SFT-only job unless its export and summary are there already."""
    import yaml

    out = ROOT / yaml.safe_load((ROOT / config).read_text())["output_dir"]
    summary = out / "summary.json"
    if (out / "checkpoints" / "export").is_dir() and summary.exists():
        return json.loads(summary.read_text())
    return run_job(config)


def greedy_by_domain(model: str, eval_path: str, max_tokens: int) -> dict[str, float]:
    """A checkpoint's greedy accuracy per domain on a held-out file, in process (transformers
    engine, the `exact` verifier): the teachers measured on the very prompts the student's
    evaluation uses, so the per-domain gaps compare like with like."""
    from rollout.hf_engine import HFEngine
    from verifier.api import VerifyInput
    from verifier.builtin.simple import ExactVerifier

    rows = [json.loads(line) for line in (ROOT / eval_path).open()]
    engine = HFEngine(ROOT / model)
    tok = engine.tokenizer
    outs = engine.generate([tok(r["prompt"], add_special_tokens=False)["input_ids"]
                            for r in rows], 1, 0.0, 1.0, max_tokens)
    ok: dict[str, list[bool]] = {}
    for r, (s,) in zip(rows, outs):
        passed = ExactVerifier().verify(VerifyInput(s.text, r["answer"])).passed
        ok.setdefault(r["domain"], []).append(passed)
    return {d: sum(v) / len(v) for d, v in ok.items()}


def make_data() -> None:
    from nebula.tasks.synthetic import make_split, write_jsonl

    data = ROOT / "runs" / "data"
    splits = {t: make_split(t, data) for t in ("addition", "reversal")}
    for part, i in (("train", 0), ("eval", 1)):
        path = data / f"mixed_{part}.jsonl"
        if not path.exists():
            rows = [json.loads(line) for t in splits for line in splits[t][i].open()]
            random.Random(0).shuffle(rows)
            write_jsonl(path, rows)


def main() -> int:
    demo = sys.argv[1] if len(sys.argv) > 1 else "opd"
    if demo not in ("opd", "mopd"):
        print("usage: run.py opd|mopd", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    make_data()
    t_rev = built("examples/distill/teacher-reversal.yaml")["evals"][-1]
    if demo == "opd":
        start = built("examples/distill/student-reversal.yaml")["evals"][-1]
        s = run_job("examples/distill/opd.yaml")
        after = s["evals"][-1]
        print(f"teacher greedy {t_rev['greedy']:.1%}; student {start['greedy']:.1%} after SFT "
              f"-> {after['greedy']:.1%} after OPD ({after['greedy'] / t_rev['greedy']:.0%} of "
              f"the teacher) in {s['stages'][0]['wall_s']:.0f}s of OPD")
        return 0
    built("examples/distill/teacher-addition.yaml")
    built("examples/distill/student-mixed.yaml")
    s = run_job("examples/distill/mopd.yaml")
    before, after = s["evals"][0], s["evals"][-1]
    ev = "runs/data/mixed_eval.jsonl"  # mopd.yaml evaluates on all of it
    teacher = {d: greedy_by_domain(f"runs/distill/teacher-{name}/checkpoints/export", ev, 8)[d]
               for d, name in (("add", "addition"), ("rev", "reversal"))}
    for d in sorted(teacher):
        b, a = before["greedy_by_domain"].get(d, 0.0), after["greedy_by_domain"].get(d, 0.0)
        gap = (teacher[d] - a) * 100
        where = f"{gap:.1f} pts below" if gap > 0 else f"{-gap:.1f} pts above"
        print(f"domain {d}: teacher {teacher[d]:.1%}; student {b:.1%} -> {a:.1%} "
              f"({(a - b) * 100:+.1f} pts, {where} the teacher; within 5 pts: "
              f"{'yes' if gap <= 5 else 'NO'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
