"""Starting pass rates of a real small model on reasoning-gym tasks (picks the real recipe).

For each probe (task, task kwargs, system prompt, instruction) it builds held-out rows exactly
as `nebula.tasks.reasoning_gym` writes them, formats them as a job would (chat template +
dataset.system_prompt, `nebula.prompts.format_prompt`), generates greedy and T=1 samples with
the project's vLLM engine (bf16, in-process) and scores every completion with the
`reasoning_gym` verifier under each answer extractor. Reports pass rates, the fraction of
prompts whose samples disagree (GRPO groups with a learning signal), completion lengths and
truncation at max_tokens, and keeps a few completions per probe for reading.

    .venv/bin/python bench/real_task_probe.py --model /tmp/smollm2-hf --only legs_tags \
        --prompts 64 --samples 4 --max-tokens 128 --out /tmp/probe

The model folder is a Hugging Face copy of SmolLM2-135M-Instruct (see nebula.model_import).
Sized for a shared 2-core machine: 64 prompts x (1 + 4) samples is ~1-6 minutes a probe
(25-500 tok/s, depending on what else runs).

Measured (SmolLM2-135M-Instruct Q4_1 dequantised, bf16, seed 0 eval rows, default extractor;
sampled at T=1 unless noted; "mixed" = prompts whose 4 samples disagree):

    probe          max_tok greedy sampled mixed  len  trunc
    calc1_direct     128    42.2   20.7   54.7  52.0  13.7
    calc1_direct      64    42.2   21.9   56.2  36.8  27.7
    calc1_direct  64 T=0.7  42.2   30.5   50.0  30.7  15.2
    calc1_helpful    128    43.8   15.6   46.9  80.1  30.5
    calc1_default     64    39.1   14.8   43.8  49.4  49.6
    sum1_default     128    40.6   14.5   39.1  44.6  10.5
    sum1_default 128 T=0.7  40.6   30.5   45.3  24.3   1.2
    sum1_helpful     128    35.9   13.7   39.1  53.9  14.1
    sum1_direct      128    15.6    9.4   29.7  33.9   5.9
    sum1to3_helpful  128    20.3    9.4   28.1  58.1  18.4
    sum1_tags        128     0.0    0.0    0.0  32.5   7.0   (tags only; 11.7 by last number)
    legs_tags        128     0.0    0.0    0.0  56.0  16.4
    legs_helpful     128     1.6    2.3    7.8  83.1  36.3

Recommendation for the real GRPO recipe: calc1_direct - basic_arithmetic ARITH1 (242 distinct
questions: eval 64, train the rest), system prompt DIRECT, no instruction, the default answer
extraction (last number; <answer> tags win if present), max_tokens 64, 8 samples per prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nebula.config.job import DatasetConfig  # noqa: E402
from nebula.prompts import format_prompt  # noqa: E402
from nebula.tasks.reasoning_gym import build_rows  # noqa: E402
from verifier.api import VerifyInput  # noqa: E402
from verifier.builtin.reasoning_gym import (  # noqa: E402
    DEFAULT_FORMAT,
    EXTRACTORS,
    ReasoningGymVerifier,
)

HELPFUL = "You are a helpful assistant."
DIRECT = "You are a helpful assistant. Answer with the result only, like 'The answer is 7.'"
TAGS_SYS = ("Answer the question directly. Give only the final answer between <answer> and "
            "</answer> tags, for example <answer>42</answer>.")
TAGS_INSTR = "Give only the final answer between <answer> and </answer> tags."
ADD1 = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
ADD1_3 = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
ADD2 = {"min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2}
LEGS = {"min_animals": 1, "max_animals": 2, "max_instances": 3}
SCREEN_TAGS_INSTR = "Give the final answer between <answer> and </answer> tags."
ANSWER_IS = "You are a helpful assistant. Solve the problem and end with 'The answer is N.'"
ARITH1 = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1,
          "operators": ["+", "-"], "allow_parentheses": False, "allow_negation": False}


@dataclass
class Probe:
    name: str
    task: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    system: str | None = None  # None: the chat template's default system prompt
    instruction: str = ""
    answer_format: str = DEFAULT_FORMAT  # the extractor this prompt format is scored with


# Full probes (64 prompts x 4 samples + greedy). The screen probes below ran with
# `--prompts 16 (or 32) --samples 2 --max-tokens 64`; they ruled the other tasks out.
PROBES = [
    Probe("sum1_helpful", "chain_sum", ADD1, HELPFUL),
    Probe("sum1_default", "chain_sum", ADD1, None),
    Probe("sum1_direct", "chain_sum", ADD1, DIRECT),
    Probe("sum1_tags", "chain_sum", ADD1, TAGS_SYS, TAGS_INSTR, "tags"),
    Probe("sum1to3_helpful", "chain_sum", ADD1_3, HELPFUL),
    Probe("calc1_helpful", "basic_arithmetic", ARITH1, HELPFUL),
    Probe("calc1_direct", "basic_arithmetic", ARITH1, DIRECT),
    Probe("calc1_default", "basic_arithmetic", ARITH1, None),
    Probe("legs_tags", "leg_counting", LEGS, TAGS_SYS, TAGS_INSTR, "tags"),
    Probe("legs_helpful", "leg_counting", LEGS, HELPFUL),
    # screen probes
    Probe("add1_helpful", "basic_arithmetic", {**ARITH1, "operators": ["+"]}, HELPFUL),
    Probe("letters_helpful", "letter_counting", {"min_words": 3, "max_words": 5}, HELPFUL),
    Probe("spell_tags", "spell_backward", {"min_word_len": 3, "max_word_len": 4}, HELPFUL,
          SCREEN_TAGS_INSTR),
    Probe("wordrev_tags", "word_sequence_reversal", {"min_words": 2, "max_words": 3}, HELPFUL,
          SCREEN_TAGS_INSTR),
    Probe("prod1_helpful", "products", {"min_digits": 1, "max_digits": 1}, HELPFUL),
    Probe("prod12_helpful", "products", {"min_digits": 1, "max_digits": 2}, HELPFUL),
    Probe("sum2_default", "chain_sum", ADD2, None),
    Probe("sum2_helpful", "chain_sum", ADD2, HELPFUL),
    Probe("sum2_answer_is", "chain_sum", ADD2, ANSWER_IS),
    Probe("sum2_short", "chain_sum", ADD2, HELPFUL, "Answer in one short sentence."),
    Probe("sum12_helpful", "chain_sum", {**ADD2, "min_digits": 1}, HELPFUL),
    Probe("calc12_helpful", "basic_arithmetic", {**ARITH1, "max_digits": 2}, HELPFUL),
]


def score(v: ReasoningGymVerifier, row: dict[str, str], text: str, fmt: str) -> bool:
    md = {"task": row["task"], "entry": row["entry"], "task_kwargs": row["task_kwargs"],
          "answer_format": fmt}
    return v.verify(VerifyInput(text, row["answer"], md)).passed


def run_probe(engine: Any, tok: Any, v: ReasoningGymVerifier, p: Probe, n_prompts: int,
              samples: int, max_tokens: int, seed: int, stop: list[str],
              temperature: float = 1.0) -> dict[str, Any]:
    _, rows = build_rows(p.task, 0, n_prompts, seed, p.kwargs, p.instruction)
    cfg = DatasetConfig(path="-", system_prompt=p.system)
    ids = [format_prompt(r["prompt"], tok, cfg, p.name)[1] for r in rows]
    t0 = time.time()
    greedy = [o[0] for o in engine.generate(ids, 1, 0.0, 1.0, max_tokens, stop)]
    sampled = engine.generate(ids, samples, temperature, 1.0, max_tokens, stop)
    secs = time.time() - t0
    n_tok = sum(len(s.completion_ids) for s in greedy) + sum(
        len(s.completion_ids) for g in sampled for s in g)

    res: dict[str, Any] = {"probe": p.name, "task": p.task, "kwargs": p.kwargs,
                           "system": p.system, "instruction": p.instruction,
                           "answer_format": p.answer_format, "prompts": len(rows),
                           "samples": samples, "temperature": temperature,
                           "max_tokens": max_tokens,
                           "prompt_tokens_mean": statistics.mean(map(len, ids)),
                           "gen_s": round(secs, 1), "tok_per_s": round(n_tok / secs, 1)}
    flat = [s for g in sampled for s in g]
    res["len_mean"] = statistics.mean(len(s.completion_ids) for s in flat)
    res["greedy_len_mean"] = statistics.mean(len(s.completion_ids) for s in greedy)
    res["trunc"] = sum(s.finish_reason == "length" for s in flat) / len(flat)
    res["over_64"] = sum(len(s.completion_ids) > 64 for s in flat) / len(flat)  # max_tokens 64?
    for fmt in EXTRACTORS:  # the same completions under every extractor
        g = [score(v, r, s.text, fmt) for r, s in zip(rows, greedy)]
        per_prompt = [[score(v, r, s.text, fmt) for s in grp] for r, grp in zip(rows, sampled)]
        res[f"greedy_{fmt}"] = sum(g) / len(g)
        res[f"sampled_{fmt}"] = sum(map(sum, per_prompt)) / (len(rows) * samples)
        # GRPO learns only from groups whose samples disagree.
        res[f"mixed_{fmt}"] = sum(0 < sum(pp) < samples for pp in per_prompt) / len(rows)
    res["examples"] = [{"prompt": r["prompt"][-160:], "answer": r["answer"],
                        "greedy": s.text, "sample": grp[0].text}
                       for r, s, grp in list(zip(rows, greedy, sampled))[:6]]
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="/tmp/smollm2-hf")
    ap.add_argument("--only", default="", help="comma-separated probe names (default: all)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (eval rows drawn from it)")
    ap.add_argument("--temperature", type=float, default=1.0, help="of the sampled runs")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--out", default="/tmp/real_task_probe")
    a = ap.parse_args()
    wanted = [s for s in a.only.split(",") if s]
    probes = [p for p in PROBES if not wanted or p.name in wanted]
    if wanted and len(probes) != len(wanted):
        ap.error(f"unknown probe in {wanted}; known: {[p.name for p in PROBES]}")

    from transformers import AutoTokenizer

    from rollout.engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(a.model)
    engine = VLLMEngine(a.model, dtype="bfloat16", max_model_len=1024, multiprocessing=False)
    v = ReasoningGymVerifier()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in probes:
        res = run_probe(engine, tok, v, p, a.prompts, a.samples, a.max_tokens, a.seed, a.stop,
                        a.temperature)
        (out / f"{p.name}.json").write_text(json.dumps(res, indent=1))
        f = p.answer_format
        print(f"{p.name:14s} {p.task:22s} greedy {res[f'greedy_{f}']:6.1%} "
              f"sampled {res[f'sampled_{f}']:6.1%} mixed {res[f'mixed_{f}']:6.1%} "
              f"len {res['len_mean']:5.1f} trunc {res['trunc']:5.1%} "
              f"({f}; tags_or_last_number sampled {res['sampled_tags_or_last_number']:.1%}; "
              f"{res['tok_per_s']} tok/s, {res['gen_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
