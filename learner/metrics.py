"""Per-step metrics sinks: JSONL, TensorBoard event files, and the job's Redis stream
(read by the REST API and the dashboard)."""

from __future__ import annotations

from nebula.transport.redis_client import connect

import json
import time
from pathlib import Path
from typing import Any


REDIS_ROWS = 1000  # metrics rows a job keeps in Redis


class MetricsSink:
    def __init__(self, out_dir: str | Path, redis_url: str | None = None,
                 redis_key: str | None = None) -> None:
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
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(f"{stage}/{k}", v, step)
        self._tb.flush()
        if self._redis is not None:
            # Capped: the API serves the recent rows; the whole history is metrics.jsonl.
            self._redis.xadd(self._key, {b"m": json.dumps(row, default=float)},
                             maxlen=REDIS_ROWS, approximate=True)

    def close(self) -> None:
        self._jsonl.close()
        self._tb.close()
