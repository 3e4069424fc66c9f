"""Redis key names of the job service (records, indexes, events, logs). The per-job keys the
training stack itself writes (metrics stream, policy version) come from JobKeys."""

from __future__ import annotations

from nebula.transport.pacing import JobKeys

PREFIX = "nebula:api"
STATES = ("queued", "starting", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"queued", "starting", "running"})
LAUNCHED = frozenset({"starting", "running"})  # count against quota


class ApiKeys:
    all_jobs = f"{PREFIX}:jobs"  # zset id -> creation seq (newest first listing)
    active = f"{PREFIX}:active"  # set of ids not yet terminal (scheduler, reconciliation)
    seq = f"{PREFIX}:seq"  # counter: creation and queue order

    tenant_prefix = f"{PREFIX}:tenant:"
    record_prefix = f"{PREFIX}:job:"

    @staticmethod
    def tenant_jobs(tenant: str) -> str:
        return f"{PREFIX}:tenant:{tenant}:jobs"

    @staticmethod
    def tenant_queue(tenant: str) -> str:
        """zset of the tenant's queued ids, by (-priority, queue seq): ZRANK is the position.
        The store's Lua scripts build this name from tenant_prefix: keep them in step."""
        return f"{PREFIX}:tenant:{tenant}:queue"

    @staticmethod
    def idempotency(tenant: str, key_hash: str) -> str:
        return f"{PREFIX}:idem:{tenant}:{key_hash}"


class RecordKeys:
    """Keys of one job record."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.record = f"{ApiKeys.record_prefix}{job_id}"  # hash of string fields
        self.events = f"{self.record}:events"  # stream: type, data (state/eval events)
        self.logs = f"{self.record}:logs"  # stream: line
        stack = JobKeys(job_id)
        self.metrics = stack.metrics  # stream written by the learner: m = JSON row
        self.policy_version = stack.version
        # Pacing keys of the job's RL stages: the runner names them `<job id>-<stage index>`.
        self.stage_prefix = f"{stack.base}-"
