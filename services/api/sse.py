"""Live events of one job as Server-Sent Events, read from three Redis streams at once: the
job's events (state, eval), the learner's metrics and the job's logs.

An event's id is the three stream positions "events,metrics,logs", so a reconnecting client
(Last-Event-ID) resumes exactly where it stopped; a new one gets the history first. The
stream ends with an `end` event once the job is terminal and everything is sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
from redis.exceptions import TimeoutError as RedisTimeout

from services.jobs.keys import TERMINAL, RecordKeys
from services.jobs.store import JobStore, metric_point, valid_stream_id

KEEPALIVE_S = 15.0
_ID = re.compile(r"^\d+-\d+$")


def parse_last_id(value: str | None) -> list[str]:
    parts = (value or "").split(",")
    if len(parts) == 3 and all(p == "0" or (_ID.match(p) and valid_stream_id(p)) for p in parts):
        return parts
    return ["0", "0", "0"]


def frame(kind: str, data: Any, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str)}\n\n"


async def job_events(store: JobStore, aredis: Any, job_id: str, last_id: str | None,
                     keepalive_s: float = KEEPALIVE_S) -> AsyncIterator[str]:
    keys = RecordKeys(job_id)
    names = [keys.events, keys.metrics, keys.logs]
    pos = parse_last_id(last_id)
    yield "retry: 2000\n\n"
    rec = await anyio.to_thread.run_sync(store.get, job_id)
    if rec is not None:  # the current state first, whatever the client saw before
        yield frame("state", await anyio.to_thread.run_sync(store.view, rec), ",".join(pos))
    while True:
        got = await aredis.xread(dict(zip(names, pos)), count=500)
        if not got:
            state = await aredis.hget(keys.record, "state")
            if state is None or state in TERMINAL:
                # Terminal and drained: the terminal state is written before its own event,
                # so one more read catches anything that raced with the check.
                got = await aredis.xread(dict(zip(names, pos)), count=500)
                if not got:
                    rec = await anyio.to_thread.run_sync(store.get, job_id)
                    view = await anyio.to_thread.run_sync(store.view, rec) if rec else {}
                    yield frame("end", view or {"id": job_id}, ",".join(pos))
                    return
            else:
                try:
                    got = await aredis.xread(dict(zip(names, pos)), count=500,
                                             block=int(keepalive_s * 1000))
                except RedisTimeout:  # the client's socket timeout is above the block
                    got = None  # time (app.py); should it still fire, the stream goes on
                if not got:
                    yield ": keep-alive\n\n"
                    continue
        for name, entries in got:
            i = names.index(name)
            for entry_id, fields in entries:
                pos[i] = entry_id
                eid = ",".join(pos)
                if i == 0:
                    yield f"id: {eid}\nevent: {fields.get('type', 'state')}\ndata: " \
                          f"{fields.get('data', '{}')}\n\n"
                elif i == 1:
                    yield frame("metrics", metric_point(entry_id, fields), eid)
                else:
                    yield frame("log", {"line": fields.get("line", "")}, eid)
