"""`python -m rollout --config JOB`: check a node's rollout engine on a job's prompts.

Loads the job config first (a bad config fails fast, naming the field), then builds the
configured engine (vLLM or hf), samples n completions for a few training prompts and
prints them with their behaviour log-probs. In a job, rollout workers run as Ray actors
started by the job runner (`nebula run`); this entry is for checking a node or an engine.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rollout", description=__doc__)
    ap.add_argument("--config", required=True, help="job config (YAML/JSON)")
    ap.add_argument("--prompts", type=int, default=4, help="training prompts to sample")
    ap.add_argument("--n", type=int, default=None, help="samples per prompt (default: job's)")
    args = ap.parse_args(argv)
    from nebula.config.job import JobConfig
    from nebula.config.load import load_file_or_exit

    cfg = load_file_or_exit(JobConfig, args.config)
    if cfg.model.toy is not None:
        from nebula.toy_model import ensure_toy_model

        ensure_toy_model(cfg.model)
    from transformers import AutoTokenizer

    from rollout.factory import make_engine
    from nebula.prompts import load_prompt_rows

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    rows = load_prompt_rows(cfg.datasets.train[0], tok)[:args.prompts]
    engine = make_engine(cfg, seed=cfg.seed)
    rc = cfg.rollout
    outs = engine.generate([r.prompt_ids for r in rows], args.n or rc.samples_per_prompt,
                           rc.temperature, rc.top_p, rc.max_tokens)
    for r, group in zip(rows, outs):
        for s in group:
            print(json.dumps({"prompt": r.prompt_text, "reference": r.reference,
                              "completion": s.text, "finish_reason": s.finish_reason,
                              "logprobs": [round(x, 4) for x in s.logprobs]}))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
