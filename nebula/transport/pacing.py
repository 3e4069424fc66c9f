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

import logging
import time
import uuid
from collections.abc import Callable

log = logging.getLogger(__name__)

# KEYS: ticket cursor, published-steps counter, and for a worker's reservation also its
# last-reservation hash and its inflight hash. ARGV: want, G, max_staleness, and for a worker
# also the request id (nonce) and the stage's ticket limit (-1: none).
# Grants the next tickets whose step is at most published + max_staleness. For a worker, the
# granted tickets below the limit go into its inflight hash and the grant is recorded with
# the nonce, in the same atomic step: a call retried with the same nonce (the reply was lost
# to a dropped connection or a Redis restart) gets the recorded grant, never a second range.
_RESERVE = """
if #KEYS >= 4 then
  local last = redis.call('HMGET', KEYS[3], 'nonce', 'first', 'n')
  if last[1] == ARGV[4] then return {tonumber(last[2]), tonumber(last[3])} end
end
local cursor = tonumber(redis.call('GET', KEYS[1]) or '0')
local done = tonumber(redis.call('GET', KEYS[2]) or '0')
local limit = (done + tonumber(ARGV[3]) + 1) * tonumber(ARGV[2])
local grant = math.min(tonumber(ARGV[1]), limit - cursor)
if grant <= 0 then return {cursor, 0} end
redis.call('SET', KEYS[1], cursor + grant)
if #KEYS >= 4 then
  local stop = cursor + grant
  local last_ticket = tonumber(ARGV[5])
  if last_ticket >= 0 and last_ticket < stop then stop = last_ticket end
  for t = cursor, stop - 1 do redis.call('HSET', KEYS[4], t, 1) end
  redis.call('HSET', KEYS[3], 'nonce', ARGV[4], 'first', cursor, 'n', grant)
end
return {cursor, grant}
"""

# KEYS: stream, the worker's inflight hash, its last-publish hash. ARGV: nonce, then
# ticket, payload pairs. XADDs each payload (field "g", as RedisTrajectoryStream writes) and
# ends its ticket's reservation, atomically; a retry with the same nonce writes nothing
# again and answers the entry ids of the first application.
_PUBLISH = """
if redis.call('HGET', KEYS[3], 'nonce') == ARGV[1] then
  return cjson.decode(redis.call('HGET', KEYS[3], 'ids'))
end
local ids = {}
for i = 2, #ARGV, 2 do
  ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'g', ARGV[i + 1])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
redis.call('HSET', KEYS[3], 'nonce', ARGV[1], 'ids', cjson.encode(ids))
return ids
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
        # learner steps whose groups a checkpoint holds (acknowledged, maybe trimmed)
        self.acked_steps = f"{base}:acked_steps"

    def inflight(self, worker: str) -> str:
        """Hash ticket -> 1 for groups a worker has reserved but not yet written."""
        return f"{self.base}:inflight:{worker}"

    def last_reservation(self, worker: str) -> str:
        """Hash {nonce, first, n}: a worker's latest grant, answered again to a retry."""
        return f"{self.base}:reservation:{worker}"

    def last_publish(self, worker: str) -> str:
        """Hash {nonce, ids}: a worker's latest publish, answered again to a retry."""
        return f"{self.base}:published:{worker}"


def ticket_step(ticket: int, groups_per_step: int) -> int:
    return ticket // groups_per_step


class StalenessPacer:
    """Hands out tickets within the staleness bound (see the module doc).

    A rollout worker passes its name (`worker=`) and the stage's ticket count (`limit=`):
    its granted tickets below the limit are then recorded in its inflight hash in the same
    atomic step as the grant (a crash right after reserving loses no ticket: the restarted
    worker regenerates them), and the reservation is idempotent under the client's retries.
    """

    def __init__(self, redis_url: str, keys: JobKeys, max_staleness: int,
                 groups_per_step: int) -> None:
        from nebula.transport.redis_client import connect

        self.r = connect(redis_url)
        self.keys = keys
        self.max_staleness = max_staleness
        self.groups_per_step = groups_per_step
        self._reserve = self.r.register_script(_RESERVE)
        self._publish = self.r.register_script(_PUBLISH)

    def try_reserve(self, want: int, worker: str | None = None,
                    limit: int | None = None) -> list[int]:
        """Tickets granted now (maybe none), in order. With `worker`, the granted tickets
        below `limit` are in `keys.inflight(worker)` when this returns."""
        keys = [self.keys.tickets, self.keys.steps_published]
        args: list[object] = [want, self.groups_per_step, self.max_staleness]
        if worker is not None:
            # One request id per call: redis-py's retry of this call re-sends the same one.
            keys += [self.keys.last_reservation(worker), self.keys.inflight(worker)]
            args += [uuid.uuid4().hex, -1 if limit is None else limit]
        first, n = self._reserve(keys=keys, args=args)
        return list(range(int(first), int(first) + int(n)))

    def reserve(self, want: int, should_stop: Callable[[], bool] = lambda: False,
                poll_s: float = 0.02, worker: str | None = None, limit: int | None = None,
                timeout_s: float | None = None, log_every_s: float = 60.0) -> list[int]:
        """Block until at least one ticket is granted or should_stop(); returns the tickets.
        Waiting on the learner to publish weights, it logs what it waits for every
        `log_every_s`; past `timeout_s` (None: no limit) it raises TimeoutError."""
        t0 = time.monotonic()
        next_log = t0 + log_every_s
        while True:
            got = self.try_reserve(want, worker, limit)
            if got or should_stop():
                return got
            now = time.monotonic()
            if now >= next_log or (timeout_s is not None and now - t0 >= timeout_s):
                done = self.steps_done()
                what = (f"{worker or 'pacer'}: waited {now - t0:.0f} s for a ticket: the "
                        f"tickets of steps <= {done + self.max_staleness} are taken; the next "
                        f"step's open once the learner has published {done + 1} steps (now "
                        f"{done}; max staleness {self.max_staleness})")
                if timeout_s is not None and now - t0 >= timeout_s:
                    raise TimeoutError(what)
                log.info("%s", what)
                next_log = now + log_every_s
            time.sleep(poll_s)

    def publish(self, worker: str, stream: str, groups: list[tuple[int, bytes]]) -> list[str]:
        """Append finished groups (ticket, serialized TrajectoryGroup) to `stream` and end
        their reservations in the worker's inflight hash, atomically and once: a call
        retried after Redis applied it (the reply was lost) writes nothing again. Returns the
        entry ids. The entries are what RedisTrajectoryStream.publish writes."""
        args: list[object] = [uuid.uuid4().hex]
        for ticket, payload in groups:
            args += [ticket, payload]
        ids = self._publish(keys=[stream, self.keys.inflight(worker),
                                  self.keys.last_publish(worker)], args=args)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def step_published(self, steps_done: int) -> None:
        """The learner finished `steps_done` steps and published their weights."""
        self.r.set(self.keys.steps_published, steps_done)

    def steps_done(self) -> int:
        return int(self.r.get(self.keys.steps_published) or 0)
