"""Job records, their events and logs in Redis (the service's only state, so an API restart
loses nothing). A record is a hash: `id`, `tenant`, `name`, `state` as plain strings (the Lua
scripts compare them), every other field JSON. Creation and state changes are Lua scripts, so
a record is written whole or not at all and a state never leaves a terminal state."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import redis

from services.jobs.keys import ACTIVE, TERMINAL, ApiKeys, RecordKeys

PLAIN = frozenset({"id", "tenant", "name", "state"})
EVENTS_MAXLEN = 20_000
LOGS_MAXLEN = 50_000

# KEYS: idempotency, record, all index, tenant index, active set, seq counter.
# ARGV: use_idem, id, body hash, idem ttl, field/value pairs...
_CREATE = """
local use_idem = ARGV[1] == '1'
if use_idem then
  local prev = redis.call('GET', KEYS[1])
  if prev then return {0, prev} end
end
local seq = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[2], 'seq', seq, 'qseq', seq, unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], seq, ARGV[2])
redis.call('ZADD', KEYS[4], seq, ARGV[2])
redis.call('SADD', KEYS[5], ARGV[2])
local val = ARGV[2] .. '|' .. ARGV[3]
if use_idem then redis.call('SET', KEYS[1], val, 'EX', tonumber(ARGV[4])) end
return {1, val}
"""

# KEYS: record, active set, seq counter. ARGV: id, from states (comma list), to state,
# still active ('1'/'0'), requeue ('1': new queue seq), field/value pairs...
_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == cur then ok = true end
end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
if #ARGV >= 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 6)) end
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'qseq', redis.call('INCR', KEYS[3])) end
if ARGV[4] == '1' then redis.call('SADD', KEYS[2], ARGV[1])
else redis.call('SREM', KEYS[2], ARGV[1]) end
return 1
"""


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for k, v in fields.items():
        flat += [k, v if k in PLAIN else json.dumps(v, default=str)]
    return flat


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    return {k: v if k in PLAIN else json.loads(v) for k, v in raw.items()}


class JobStore:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r  # decode_responses=True
        self._create = r.register_script(_CREATE)
        self._transition = r.register_script(_TRANSITION)

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # -- records --------------------------------------------------------------------------

    def create(self, record: dict[str, Any], idem_key: str | None = None,
               body_hash: str = "", idem_ttl_s: int = 86400) -> tuple[bool, str, str]:
        """Write a new record atomically, or find the job an idempotency key already made.
        Returns (created, job id, body hash of the request that made it)."""
        job_id, tenant = record["id"], record["tenant"]
        idem = ApiKeys.idempotency(tenant, idem_key) if idem_key else ApiKeys.idempotency(tenant, "-")
        created, val = self._create(
            keys=[idem, RecordKeys(job_id).record, ApiKeys.all_jobs, ApiKeys.tenant_jobs(tenant),
                  ApiKeys.active, ApiKeys.seq],
            args=["1" if idem_key else "0", job_id, body_hash, idem_ttl_s, *_encode(record)])
        found_id, _, found_hash = str(val).partition("|")
        return bool(created), found_id, found_hash

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(RecordKeys(job_id).record)
        return _decode(raw) if raw else None

    def get_many(self, ids: list[str]) -> list[dict[str, Any]]:
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(RecordKeys(i).record)
        return [_decode(raw) for raw in pipe.execute() if raw]

    def update(self, job_id: str, **fields: Any) -> None:
        """Set non-state fields of an existing record (never creates one)."""
        key = RecordKeys(job_id).record
        if fields and self.r.exists(key):
            self.r.hset(key, mapping=dict(zip(*[iter(_encode(fields))] * 2)))

    def transition(self, job_id: str, from_states: set[str] | frozenset[str], to: str,
                   requeue: bool = False, **fields: Any) -> bool:
        """Move the job to `to` if it is in one of `from_states` (atomically); set `fields`
        with it and a state event after it. False if the job was elsewhere."""
        now = time.time()
        if to in TERMINAL:
            fields.setdefault("finished_at", now)
        if to == "running":
            fields.setdefault("started_at", now)
        ok = self._transition(
            keys=[RecordKeys(job_id).record, ApiKeys.active, ApiKeys.seq],
            args=[job_id, ",".join(sorted(from_states)), to, "1" if to in ACTIVE else "0",
                  "1" if requeue else "0", *_encode(fields)])
        if ok == 1:
            self.emit_state(job_id)
        return ok == 1

    # -- events and logs ------------------------------------------------------------------

    def emit(self, job_id: str, kind: str, data: Any) -> None:
        self.r.xadd(RecordKeys(job_id).events, {"type": kind, "data": json.dumps(data, default=str)},
                    maxlen=EVENTS_MAXLEN, approximate=True)

    def emit_state(self, job_id: str) -> None:
        rec = self.get(job_id)
        if rec is not None:
            self.emit(job_id, "state", self.view(rec))

    def log(self, job_id: str, *lines: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        for line in lines:
            pipe.xadd(RecordKeys(job_id).logs, {"line": line}, maxlen=LOGS_MAXLEN,
                      approximate=True)
        pipe.execute()

    def read_logs(self, job_id: str, since: str | None, limit: int) -> tuple[list[str], str | None]:
        start = _after(since)
        rows = self.r.xrange(RecordKeys(job_id).logs, start, "+", count=limit) if start else []
        return [f["line"] for _, f in rows], (rows[-1][0] if rows else since)

    def read_metrics(self, job_id: str, since: str | None, limit: int
                     ) -> tuple[list[dict[str, Any]], str | None]:
        start = _after(since)
        rows = self.r.xrange(RecordKeys(job_id).metrics, start, "+", count=limit) if start else []
        return [metric_point(i, f) for i, f in rows], (rows[-1][0] if rows else since)

    # -- views ----------------------------------------------------------------------------

    def view(self, rec: dict[str, Any], queue_position: int | None = None) -> dict[str, Any]:
        """The JobView of a record: its fields plus the training stack's live keys."""
        return self.views([rec], {rec["id"]: queue_position} if queue_position else None)[0]

    def views(self, recs: list[dict[str, Any]], positions: dict[str, int] | None = None
              ) -> list[dict[str, Any]]:
        if positions is None:
            positions = self.queue_positions() if any(r["state"] == "queued" for r in recs) else {}
        pipe = self.r.pipeline(transaction=False)
        for rec in recs:
            k = RecordKeys(rec["id"])
            pipe.xrevrange(k.metrics, count=1)
            pipe.get(k.policy_version)
        live = pipe.execute()
        out = []
        for i, rec in enumerate(recs):
            last, version = live[2 * i], live[2 * i + 1]
            latest = metric_point(*last[0]) if last else {}
            out.append({
                "id": rec["id"], "name": rec.get("name", ""), "tenant": rec["tenant"],
                "state": rec["state"], "priority": rec.get("priority", 0),
                "queue_position": positions.get(rec["id"]) if rec["state"] == "queued" else None,
                "stage": rec.get("stage") or latest.get("stage"),
                "step": rec.get("step") or 0, "total_steps": rec.get("total_steps"),
                "policy_version": int(version) if version is not None else None,
                "latest_metrics": latest, "checkpoints": rec.get("checkpoints") or [],
                "evals": rec.get("evals") or [], "created_at": rec.get("created_at"),
                "started_at": rec.get("started_at"), "finished_at": rec.get("finished_at"),
                "error": rec.get("error"), "attempt": rec.get("attempt", 0),
                "config": rec.get("config") or {},
            })
        return out

    def active_records(self) -> list[dict[str, Any]]:
        return self.get_many(sorted(self.r.smembers(ApiKeys.active)))

    def queue_positions(self) -> dict[str, int]:
        from services.jobs.queue import positions

        return positions(self.active_records())

    # -- listing --------------------------------------------------------------------------

    def list_ids(self, tenant: str | None, state: str | None, limit: int,
                 before_seq: int | None) -> tuple[list[dict[str, Any]], int | None]:
        """Records newest first (by creation seq) below `before_seq`; the next cursor seq."""
        key = ApiKeys.tenant_jobs(tenant) if tenant else ApiKeys.all_jobs
        top = f"({before_seq}" if before_seq is not None else "+inf"
        found: list[dict[str, Any]] = []
        batch = max(limit, 50)
        while len(found) < limit:
            page = self.r.zrevrangebyscore(key, top, "-inf", start=0, num=batch, withscores=True)
            if not page:
                return found, None
            for rec in self.get_many([i for i, _ in page]):
                if state is None or rec["state"] == state:
                    found.append(rec)
                    if len(found) == limit:
                        break
            top = f"({int(page[-1][1])}"
            if len(page) < batch and len(found) < limit:
                return found, None
        last = found[-1]["seq"]
        more = self.r.zrevrangebyscore(key, f"({last}", "-inf", start=0, num=1)
        return found, (last if more else None)


U64 = (1 << 64) - 1


def valid_stream_id(value: str) -> bool:
    """A Redis stream position ("ms" or "ms-seq", each below 2**64)."""
    ms, _, seq = value.partition("-")
    return ms.isdigit() and int(ms) <= U64 and (not seq or (seq.isdigit() and int(seq) <= U64))


def _after(since: str | None) -> str | None:
    """XRANGE start just after `since`; None if nothing can come after it."""
    if not since:
        return "-"
    ms, _, seq = since.partition("-")
    if int(ms) == U64 and (not seq or int(seq) == U64):
        return None
    return f"({since}"


def metric_point(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    try:
        row = json.loads(fields.get("m", "{}"))
    except json.JSONDecodeError:
        row = {}
    if not isinstance(row, dict):
        row = {}
    # NaN/inf are not JSON: a diverged loss shows as null rather than breaking the response.
    return {"seq": entry_id, **{k: None if isinstance(v, float) and not math.isfinite(v) else v
                                for k, v in row.items()}}
