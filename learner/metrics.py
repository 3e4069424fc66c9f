"""Per-step metrics sinks: JSONL, TensorBoard event files, the job's Redis stream (read by
the REST API and the dashboard), and the experiment trackers of `logging` in the job config
(nebula.trackers: W&B, MLflow), which get the TensorBoard scalars under the same names."""

from __future__ import annotations

from nebula.transport.redis_client import connect

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nebula import trackers as tracking
from nebula.trackers import Tracker


REDIS_ROWS = 1000  # metrics rows a job keeps in Redis


class MetricsSink:
    def __init__(self, out_dir: str | Path, redis_url: str | None = None,
                 redis_key: str | None = None,
                 trackers: Sequence[Tracker] | None = None) -> None:
        """trackers: nebula.trackers.open_trackers(cfg, job_id); each gets every row's
        TensorBoard scalars and is closed by `close`."""
        self.trackers: list[Tracker] = list(trackers or ())
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (self.dir / "metrics.jsonl").open("a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._redis = None
        if redis_url and redis_key:
            import redis

            self._redis, self._key = connect(redis_url), redis_key
        self.latest: dict[str, Any] = {}

    def log(self, step: int, stage: str, values: dict[str, Any]) -> None:
        row = {"time": time.time(), "stage": stage, "step": step, **values}
        self.latest = row
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        tags = tracking.scalars(stage, values)  # {stage}/{key}: int/float values, not bools
        for tag, v in tags.items():
            self._tb.add_scalar(tag, v, step)
        self._tb.flush()
        tracking.log_to_trackers(self.trackers, step, tags)
        if self._redis is not None:
            # Capped: the API serves the recent rows; the whole history is metrics.jsonl.
            self._redis.xadd(self._key, {b"m": json.dumps(row, default=float)},
                             maxlen=REDIS_ROWS, approximate=True)

    def log_eval(self, step: int, scalars: Mapping[str, float]) -> None:
        """An eval row to the trackers only (the runner writes its TensorBoard scalars):
        nebula.evaluation.flat_scalars' `eval/...` tags at step = the policy version."""
        tracking.log_eval(self.trackers, step, scalars)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
        tracking.close_trackers(self.trackers)
        self.trackers = []
