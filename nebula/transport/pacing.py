"""Bounded staleness by pacing with tickets; the per-job keys rollout and learner share.

Every group gets a global ticket t (Redis counter). The ticket fixes both its prompt (the
t-th of the shuffled dataset) and the learner step that trains on it: step s = t // G with
G = groups_per_step; the learner's step s trains exactly tickets [s*G, (s+1)*G), buffering
any that arrive early. A worker may start ticket t only once the learner has published
the weights of step s - max_staleness, and it loads the newest weights before generating,
so every group is trained on at most max_staleness versions after the version that
generated it. max_staleness = 0 is synchronous on-policy GRPO. Nothing is ever dropped to
keep the bound: workers wait. A crashed worker's tickets stay reserved and are generated
again by its restarted self (see `inflight`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# KEYS: ticket cursor, published-steps counter. ARGV: want, G, max_staleness.
# Grants the next tickets whose step is at most published + max_staleness.
_RESERVE = """
local cursor = tonumber(redis.call('GET', KEYS[1]) or '0')
local done = tonumber(redis.call('GET', KEYS[2]) or '0')
local limit = (done + tonumber(ARGV[3]) + 1) * tonumber(ARGV[2])
local grant = math.min(tonumber(ARGV[1]), limit - cursor)
if grant <= 0 then return {cursor, 0} end
redis.call('SET', KEYS[1], cursor + grant)
return {cursor, grant}
"""


class JobKeys:
    """Redis key names of one job."""

    def __init__(self, job_id: str) -> None:
        base = f"nebula:job:{job_id}"
        self.base = base
        self.stream = f"{base}:trajectories"
        self.tickets = f"{base}:tickets"  # next ticket to hand out
        self.steps_published = f"{base}:steps_published"  # learner steps whose weights are out
        self.version = f"{base}:policy_version"
        self.metrics = f"{base}:metrics"  # per-step metrics rows (for the API, dashboards)
        self.stop = f"{base}:stop"

    def inflight(self, worker: str) -> str:
        """Hash ticket -> 1 for groups a worker has reserved but not yet written."""
        return f"{self.base}:inflight:{worker}"


def ticket_step(ticket: int, groups_per_step: int) -> int:
    return ticket // groups_per_step


class StalenessPacer:
    def __init__(self, redis_url: str, keys: JobKeys, max_staleness: int,
                 groups_per_step: int) -> None:
        import redis

        self.r = redis.Redis.from_url(redis_url)
        self.keys = keys
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self._reserve = self.r.register_script(_RESERVE)

    def try_reserve(self, want: int) -> list[int]:
        """Tickets granted now (maybe none), in order."""
        first, n = self._reserve(keys=[self.keys.tickets, self.keys.steps_published],
                                 args=[want, self.groups_per_step, self.max_staleness])
        return list(range(int(first), int(first) + int(n)))

    def reserve(self, want: int, should_stop: Callable[[], bool] = lambda: False,
                poll_s: float = 0.02) -> list[int]:
        """Block until at least one ticket is granted or should_stop(); returns the tickets."""
        while True:
            got = self.try_reserve(want)
            if got or should_stop():
                return got
            time.sleep(poll_s)

    def step_published(self, steps_done: int) -> None:
        """The learner finished `steps_done` steps and published their weights."""
        self.r.set(self.keys.steps_published, steps_done)

    def steps_done(self) -> int:
        return int(self.r.get(self.keys.steps_published) or 0)
