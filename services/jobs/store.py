"""Job records, their events and logs in Redis (the service's only state, so an API restart
loses nothing). A record is a hash: `id`, `tenant`, `name`, `state` as plain strings (the Lua
scripts compare them), every other field JSON. Creation and state changes are Lua scripts, so
a record is written whole or not at all and a state never leaves a terminal state.

Each tenant's queue is also a sorted set (id scored by priority, then queue seq) that the
same scripts keep in step with the state, so a queue position is one ZRANK, whatever the
number of active jobs."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import redis

from services.jobs.keys import ACTIVE, TERMINAL, ApiKeys, RecordKeys

PLAIN = frozenset({"id", "tenant", "name", "state"})
# The fields admission, reconciliation and the queue need (never the config).
SLIM = ("id", "tenant", "state", "priority", "seq", "qseq", "cpus", "gpus", "ray_job_id",
        "attempt", "submit_retry")
# Every field of a JobView but the config (the config goes out as stored).
VIEW_FIELDS = ("id", "name", "tenant", "state", "priority", "stage", "step", "total_steps",
               "checkpoints", "evals", "created_at", "started_at", "finished_at", "error",
               "attempt", "seq")

# A queue entry's score: priority first (higher first), then queue seq. Priorities are
# clamped to +-PRIORITY_MAX, so every score is an integer below 2**53 (exact as a double)
# while queue seqs stay below QSEQ_SPAN.
PRIORITY_MAX = 1000
QSEQ_SPAN = 10_000_000_000
_SCORE = f"""
local function qscore(rec)
  local p = tonumber(redis.call('HGET', rec, 'priority')) or 0
  if p > {PRIORITY_MAX} then p = {PRIORITY_MAX} end
  if p < -{PRIORITY_MAX} then p = -{PRIORITY_MAX} end
  local q = tonumber(redis.call('HGET', rec, 'qseq')) or 0
  return string.format('%.0f', ({PRIORITY_MAX} - p) * {QSEQ_SPAN} + q)
end
"""
EVENTS_MAXLEN = 20_000
LOGS_MAXLEN = 50_000

# KEYS: idempotency, record, all index, tenant index, active set, seq counter, tenant queue.
# ARGV: use_idem, id, body hash, idem ttl, field/value pairs...
_CREATE = _SCORE + """
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
redis.call('ZADD', KEYS[7], qscore(KEYS[2]), ARGV[2])
local val = ARGV[2] .. '|' .. ARGV[3]
if use_idem then redis.call('SET', KEYS[1], val, 'EX', tonumber(ARGV[4])) end
return {1, val}
"""

# KEYS: record, active set, seq counter. ARGV: id, from states (comma list), to state,
# still active ('1'/'0'), requeue ('1': new queue seq), tenant key prefix, field/value pairs...
# (The tenant's queue key is made from the record's tenant: one Redis, not a cluster.)
_TRANSITION = _SCORE + """
local cur = redis.call('HGET', KEYS[1], 'state')
if not cur then return -1 end
local ok = false
for s in string.gmatch(ARGV[2], '[^,]+') do
  if s == cur then ok = true end
end
if not ok then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3])
if #ARGV >= 7 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'qseq', redis.call('INCR', KEYS[3])) end
if ARGV[4] == '1' then redis.call('SADD', KEYS[2], ARGV[1])
else redis.call('SREM', KEYS[2], ARGV[1]) end
local qkey = ARGV[6] .. redis.call('HGET', KEYS[1], 'tenant') .. ':queue'
if ARGV[3] == 'queued' then redis.call('ZADD', qkey, qscore(KEYS[1]), ARGV[1])
else redis.call('ZREM', qkey, ARGV[1]) end
return 1
"""

# The queues from the active set (an API start: records written before the queues existed).
# ARGV: record key prefix, tenant key prefix.
_REBUILD_QUEUES = _SCORE + """
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local rec = ARGV[1] .. id
  local state = redis.call('HGET', rec, 'state')
  local tenant = redis.call('HGET', rec, 'tenant')
  if tenant then
    local qkey = ARGV[2] .. tenant .. ':queue'
    if state == 'queued' then
      redis.call('ZADD', qkey, qscore(rec), id)
      n = n + 1
    else
      redis.call('ZREM', qkey, id)
    end
  end
end
return n
"""


def _encode(fields: dict[str, Any]) -> list[str]:
    flat: list[str] = []
    for k, v in fields.items():
        flat += [k, v if k in PLAIN else json.dumps(v, default=str)]
    return flat


def _decode(raw: dict[str, str]) -> dict[str, Any]:
    return {k: v if k in PLAIN else json.loads(v) for k, v in raw.items()}


def _decode_fields(names: tuple[str, ...], values: list[str | None]) -> dict[str, Any]:
    return {k: v if k in PLAIN else json.loads(v) for k, v in zip(names, values) if v is not None}


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), default=str)


class JobStore:
    def __init__(self, r: redis.Redis) -> None:
        self.r = r  # decode_responses=True
        self._create = r.register_script(_CREATE)
        self._transition = r.register_script(_TRANSITION)
        self._rebuild = r.register_script(_REBUILD_QUEUES)

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
                  ApiKeys.active, ApiKeys.seq, ApiKeys.tenant_queue(tenant)],
            args=["1" if idem_key else "0", job_id, body_hash, idem_ttl_s, *_encode(record)])
        found_id, _, found_hash = str(val).partition("|")
        return bool(created), found_id, found_hash

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hgetall(RecordKeys(job_id).record)
        return _decode(raw) if raw else None

    def tenant_of(self, job_id: str) -> str | None:
        return self.r.hget(RecordKeys(job_id).record, "tenant")

    def get_many(self, ids: list[str]) -> list[dict[str, Any]]:
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(RecordKeys(i).record)
        return [_decode(raw) for raw in pipe.execute() if raw]

    def get_slim(self, ids: list[str], fields: tuple[str, ...] = SLIM) -> list[dict[str, Any]]:
        """Only `fields` of each record (one pipelined HMGET each; never the config)."""
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(RecordKeys(i).record, list(fields))
        return [_decode_fields(fields, vals) for vals in pipe.execute()
                if vals and vals[0] is not None]

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
                  "1" if requeue else "0", ApiKeys.tenant_prefix, *_encode(fields)])
        if ok == 1:
            self.emit_state(job_id)
        return ok == 1

    def rebuild_queues(self) -> int:
        """Put every queued active record into its tenant's queue (and nothing else there);
        idempotent. Returns the number of queued jobs."""
        return int(self._rebuild(keys=[ApiKeys.active],
                                 args=[ApiKeys.record_prefix, ApiKeys.tenant_prefix]))

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

    def latest_metrics(self, job_id: str) -> dict[str, Any]:
        last = self.r.xrevrange(RecordKeys(job_id).metrics, count=1)
        return metric_point(*last[0]) if last else {}

    # -- views ----------------------------------------------------------------------------

    def view(self, rec: dict[str, Any]) -> dict[str, Any]:
        """The JobView of a record: its fields plus the training stack's live keys."""
        return self.views([rec])[0]

    def views(self, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """JobViews of decoded records: one pipelined round trip for the live keys and the
        queue positions (ZRANK in the tenant's queue), whatever the number of active jobs."""
        out = []
        for rec, (last, version, rank) in zip(recs, self._live(recs)):
            view = _view(rec, last, version, rank)
            view["config"] = rec.get("config") or {}
            out.append(view)
        return out

    def _live(self, recs: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
        pipe = self.r.pipeline(transaction=False)
        for rec in recs:
            k = RecordKeys(rec["id"])
            pipe.xrevrange(k.metrics, count=1)
            pipe.get(k.policy_version)
            if rec["state"] == "queued":
                pipe.zrank(ApiKeys.tenant_queue(rec["tenant"]), rec["id"])
        got = iter(pipe.execute() if recs else [])
        return [(next(got), next(got), next(got) if rec["state"] == "queued" else None)
                for rec in recs]

    def view_json(self, job_id: str, tenant: str | None) -> str | None:
        """The JobView as JSON, if `tenant` may see the job (None: an admin sees all). The
        config goes out as stored (never decoded); one round trip (two for a queued job seen
        by an admin)."""
        k = RecordKeys(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(k.record)
        pipe.xrevrange(k.metrics, count=1)
        pipe.get(k.policy_version)
        if tenant is not None:
            pipe.zrank(ApiKeys.tenant_queue(tenant), job_id)
        raw, last, version, *rank = pipe.execute()
        if not raw or (tenant is not None and raw.get("tenant") != tenant):
            return None
        rec, config = _split(raw)
        if rec["state"] != "queued":
            rank = [None]
        elif tenant is None:
            rank = [self.r.zrank(ApiKeys.tenant_queue(rec["tenant"]), job_id)]
        return _with_config(_view(rec, last, version, rank[0]), config)

    def views_json(self, ids: list[str]) -> list[str]:
        """JobViews as JSON of existing records, in order (configs as stored): two pipelined
        round trips (records, then live keys and queue positions)."""
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(RecordKeys(i).record)
        parts = [_split(raw) for raw in pipe.execute() if raw]
        recs = [rec for rec, _ in parts]
        return [_with_config(_view(rec, *live), config)
                for (rec, config), live in zip(parts, self._live(recs))]

    def active_records(self) -> list[dict[str, Any]]:
        """The slim fields (SLIM) of every active record: admission and reconciliation."""
        return self.get_slim(sorted(self.r.smembers(ApiKeys.active)))

    def queue_positions(self) -> dict[str, int]:
        from services.jobs.queue import positions

        return positions(self.active_records())

    # -- listing --------------------------------------------------------------------------

    def list_ids(self, tenant: str | None, state: str | None, limit: int,
                 before_seq: int | None) -> tuple[list[str], int | None]:
        """Ids newest first (by creation seq) below `before_seq`, of records in `state` (if
        given); the next cursor seq. Reads only the states of the candidates."""
        key = ApiKeys.tenant_jobs(tenant) if tenant else ApiKeys.all_jobs
        top = f"({before_seq}" if before_seq is not None else "+inf"
        found: list[tuple[str, int]] = []
        batch = max(limit, 50) if state else limit
        while len(found) < limit:
            page = self.r.zrevrangebyscore(key, top, "-inf", start=0, num=batch, withscores=True)
            if not page:
                return [i for i, _ in found], None
            if state is None:
                keep = page
            else:
                pipe = self.r.pipeline(transaction=False)
                for i, _ in page:
                    pipe.hget(RecordKeys(i).record, "state")
                keep = [p for p, st in zip(page, pipe.execute()) if st == state]
            found += [(i, int(sc)) for i, sc in keep][:limit - len(found)]
            top = f"({int(page[-1][1])}"
            if len(page) < batch and len(found) < limit:
                return [i for i, _ in found], None
        last = found[-1][1]
        more = self.r.zrevrangebyscore(key, f"({last}", "-inf", start=0, num=1)
        return [i for i, _ in found], (last if more else None)


def _split(raw: dict[str, str]) -> tuple[dict[str, Any], str]:
    """A raw record decoded but for its config, and the config's stored JSON."""
    return ({k: v if k in PLAIN else json.loads(v) for k, v in raw.items() if k != "config"},
            raw.get("config") or "{}")


def _view(rec: dict[str, Any], last: list[Any], version: str | None, rank: int | None
          ) -> dict[str, Any]:
    """A JobView without its config."""
    latest = metric_point(*last[0]) if last else {}
    return {
        "id": rec["id"], "name": rec.get("name", ""), "tenant": rec["tenant"],
        "state": rec["state"], "priority": rec.get("priority", 0),
        "queue_position": rank + 1 if rank is not None and rec["state"] == "queued" else None,
        "stage": rec.get("stage") or latest.get("stage"),
        "step": rec.get("step") or 0, "total_steps": rec.get("total_steps"),
        "policy_version": int(version) if version is not None else None,
        "latest_metrics": latest, "checkpoints": rec.get("checkpoints") or [],
        "evals": rec.get("evals") or [], "created_at": rec.get("created_at"),
        "started_at": rec.get("started_at"), "finished_at": rec.get("finished_at"),
        "error": rec.get("error"), "attempt": rec.get("attempt", 0),
    }


def _with_config(view: dict[str, Any], config_json: str) -> str:
    """The view as JSON with the stored config JSON spliced in (not decoded, not re-encoded)."""
    return f'{_compact(view)[:-1]},"config":{config_json}}}'


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
