"""`python -m learner --config JOB`: run a job's offline stages (sft, dpo) on this node,
without Ray.

Reads the config first; then trains the offline stages with the DeepSpeed engine and exports a
Hugging Face checkpoint to --out (RL stages need rollout workers: use `nebula run`).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m learner", description=__doc__)
    ap.add_argument("--config", required=True, help="job config (YAML/JSON)")
    ap.add_argument("--out", required=True, help="directory for the exported checkpoint")
    args = ap.parse_args(argv)
    from nebula.algo import algorithm
    from nebula.config.job import JobConfig
    from nebula.config.load import load_file_or_exit

    cfg = load_file_or_exit(JobConfig, args.config)
    stages = [(i, s) for i, s in enumerate(cfg.stages) if not algorithm(s, cfg).online]
    if not stages:
        print("error: the job has no offline (sft, dpo) stage", file=sys.stderr)
        return 2
    if cfg.model.toy is not None:
        from nebula.toy_model import ensure_toy_model

        ensure_toy_model(cfg.model)
    from learner.worker import LearnerWorker

    worker = LearnerWorker(cfg.model_dump(by_alias=True), f"{cfg.name}-sft", None, None)
    worker.setup()
    for i, stage in stages:
        print(json.dumps(worker.run_offline(i, stage.model_dump())))
    worker.engine.export_hf(args.out)
    print(json.dumps({"export": args.out}))
    worker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
