"""Supervised services and the clients that ride out their restarts, with real processes:
a killed verifier, teacher or redis-server comes back on the same address, a call issued
while it is down (or in flight when it died) is answered after the restart as before, and a
Redis restarted from its AOF has every acknowledged and pending entry. Ticket reservation
and group publishing are idempotent under retries.

Kills are by PID from the test's own thread; what follows waits on conditions (the
supervisor's record of the death, the retried call's answer), never on a sleep."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from nebula.supervisor import Supervisor
from nebula.transport.pacing import JobKeys, StalenessPacer
from nebula.transport.redis_client import connect
from nebula.transport.redis_server import EmbeddedRedis


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill_and_wait_death(sup: Supervisor) -> int:
    """SIGKILL the supervised child; return once the supervisor has recorded its death."""
    pid, seen = sup.pid, len(sup.restarts)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: len(sup.restarts) > seen, 15, "recorded death")
    assert sup.restarts[-1].pid == pid and sup.restarts[-1].signal == "SIGKILL"
    return pid


# -- the supervisor itself ---------------------------------------------------------------------


def test_supervisor_gives_up_after_max_restarts_in_a_row() -> None:
    import subprocess

    spawned: list[int] = []

    def spawn() -> subprocess.Popen:
        p = subprocess.Popen(["/bin/sh", "-c", "exit 3"])
        spawned.append(p.pid)
        return p

    sup = Supervisor("exits-at-once", spawn, max_restarts=2, backoff_s=0.01)
    sup.start()
    try:
        wait_until(lambda: sup.failed, 20, "give-up")
    finally:
        sup.stop()
    assert len(spawned) == 3 and len(sup.restarts) == 2
    assert [r.returncode for r in sup.restarts] == [3, 3] and sup.restarts[0].signal is None
    assert [r.delay_s for r in sup.restarts] == [0.01, 0.02]  # doubling backoff


# -- verifier ----------------------------------------------------------------------------------


EVIL = {"pattern": r"^(a+)+$"}  # backtracks forever on "a"*40 + "!": holds a pool worker
DEADLINE_S = 2.5  # per item: how long the hostile item keeps a call in flight


def test_killed_verifier_is_restarted_and_calls_are_retried(tmp_path: Path) -> None:
    from nebula.clients.verifier import Item, VerifierClient
    from verifier.launch import verifier_process

    items = [Item("math", "so \\boxed{\\frac{1}{2}}", "0.5", id="m"),
             Item("exact", "hello", "hello", id="e"),
             Item("regex", "a" * 40 + "!", metadata=EVIL, id="slow")]

    def answer(res: list[Any]) -> list[tuple]:
        return [(r.id, r.status, r.reward, r.passed, r.reason) for r in res]

    # 4 pool workers: after the restart the retried call and the new one run at once, 6 items
    # of which 2 hostile ones hold a worker each until the deadline; with 2 workers a fast item
    # could queue behind both and miss its deadline, depending on dispatch order.
    with verifier_process(tmp_path, {"port": 0, "workers": 4, "metrics_port": None},
                          supervise={"backoff_s": 1.0}) as srv:
        sup, address = srv["supervisor"], srv["address"]
        with VerifierClient(address, timeout_s=30, retry_s=60) as client:
            before = answer(client.verify(items, item_timeout_s=DEADLINE_S))
            assert [s for _, s, *_ in before] == ["ok", "ok", "timeout"]
            assert before[0][2] == 1.0 and before[1][2] == 1.0

            # A call in flight when the service dies: wait until a pool worker is busy on
            # its hostile item (its CPU time grows), then kill the service.
            workers = psutil.Process(sup.pid).children(recursive=True)
            base = {w.pid: w.cpu_times().user for w in workers}
            inflight: dict[str, Any] = {}

            def call() -> None:
                try:
                    inflight["res"] = answer(client.verify(items, item_timeout_s=DEADLINE_S))
                except BaseException as e:  # noqa: BLE001 - reported by the assert below
                    inflight["err"] = e

            th = threading.Thread(target=call)
            th.start()

            def busy() -> list[int]:
                out = []
                for w in workers:
                    try:
                        if w.cpu_times().user - base[w.pid] > 0.2:
                            out.append(w.pid)
                    except psutil.NoSuchProcess:
                        pass
                return out

            wait_until(lambda: bool(busy()) or bool(inflight), 15, "busy pool worker")
            burning = busy()
            assert not inflight, "the call ended before the kill (machine too slow?)"
            pid = kill_and_wait_death(sup)
            # And a call issued while the service is down (the backoff is 1 s).
            retries = client.stats["retries"]
            after = answer(client.verify(items, item_timeout_s=DEADLINE_S))
            th.join(timeout=60)
            assert not th.is_alive() and "err" not in inflight, inflight.get("err")
            assert after == before and inflight["res"] == before
            assert client.stats["retries"] > retries and client.stats["outages"] >= 1
        assert sup.generation == 2 and len(sup.restarts) == 1
        assert sup.pid != pid and srv["address"] == address
        # The dead service's pool worker, stuck on the hostile item, died with it.
        wait_until(lambda: all(gone(p) for p in burning), 10, "end of the orphaned worker")
    assert gone(sup.restarts[-1].pid)


# -- teacher -----------------------------------------------------------------------------------


def test_killed_teacher_is_restarted_and_calls_are_retried(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from nebula.clients.teacher import TeacherClient, teacher_process
    from nebula.config.job import ToyModelConfig
    from nebula.toy_model import build_toy_model

    model = build_toy_model(tmp_path / "model", ToyModelConfig(
        hidden_size=64, layers=1, heads=2, intermediate_size=64, max_position=64, seed=3))
    cfg = {"teachers": [{"name": "t", "path": str(model), "device": "cpu"}],
           "batch_wait_ms": 1, "cache_entries": 0}
    seqs = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10])]
    with teacher_process(tmp_path / "svc", cfg, supervise={"backoff_s": 1.0}) as srv:
        sup = srv["supervisor"]
        with TeacherClient(srv["address"], timeout_s=30, retry_s=90) as client:
            before = client.logprobs("t", seqs, top_k=2)
            pid = kill_and_wait_death(sup)
            after = client.logprobs("t", seqs, top_k=2)  # issued while it is down
            assert client.stats["outages"] == 1 and client.stats["retries"] >= 1
        assert sup.pid != pid and sup.generation == 2
    assert after.teacher_version == before.teacher_version
    for a, b in zip(after, before):
        assert a.logprobs == b.logprobs and a.top_ids == b.top_ids


# -- redis -------------------------------------------------------------------------------------


def test_redis_restarted_from_its_aof_keeps_acked_and_pending_entries(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, persist=True, fsync="always",
                       supervise={"backoff_s": 0.2}) as srv:
        r = connect(srv.url, outage_s=30)  # made before the kill, used after it
        stream, group = "s", "learner"
        r.xgroup_create(stream, group, id="0", mkstream=True)
        ids = [r.xadd(stream, {b"g": f"group-{i}".encode()}) for i in range(10)]
        got = r.xreadgroup(group, "learner-0", {stream: ">"}, count=6)[0][1]
        assert [e[0] for e in got] == ids[:6]
        assert r.xack(stream, group, *ids[:3]) == 3
        r.set("tickets", 42)
        assert r.xpending(stream, group)["pending"] == 3

        pid = kill_and_wait_death(srv.supervisor)
        assert r.xpending(stream, group)["pending"] == 3  # waits out the restart
        assert srv.proc.pid != pid
        assert r.xlen(stream) == 10 and int(r.get("tickets")) == 42
        pending = r.xpending_range(stream, group, "-", "+", 10)
        assert [p["message_id"] for p in pending] == ids[3:6]
        assert all(p["consumer"] == b"learner-0" for p in pending)
        # The consumer's own pending entries replay, then the undelivered ones follow.
        replay = r.xreadgroup(group, "learner-0", {stream: "0"}, count=10)[0][1]
        assert [e[0] for e in replay] == ids[3:6]
        rest = r.xreadgroup(group, "learner-0", {stream: ">"}, count=10)[0][1]
        assert [e[0] for e in rest] == ids[6:]
        assert r.xadd(stream, {b"g": b"new"}) > ids[-1]
        # the client can answer before the supervisor's readiness probe has counted the start
        srv.supervisor.wait_generation(2, timeout_s=30)
        assert srv.supervisor.generation == 2 and len(srv.supervisor.restarts) == 1


def test_redis_client_gives_up_after_its_outage_budget() -> None:
    from nebula.service_process import free_port
    from redis.exceptions import ConnectionError

    r = connect(f"redis://127.0.0.1:{free_port()}/0", outage_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        r.ping()
    assert time.monotonic() - t0 < 5  # one budget, although redis-py nests two retries


# -- idempotent reservation and publishing -------------------------------------------------------


def test_reservation_is_idempotent_per_request_and_records_inflight(redis_url: str) -> None:
    from nebula.transport.pacing import _RESERVE

    keys = JobKeys(uuid.uuid4().hex)
    pacer = StalenessPacer(redis_url, keys, max_staleness=1, groups_per_step=4)
    script = pacer.r.register_script(_RESERVE)
    w = "rollout-0"
    wkeys = [keys.tickets, keys.steps_published, keys.last_reservation(w), keys.inflight(w)]

    def reserve(want: int, nonce: str, limit: int = -1) -> list[int]:
        return [int(x) for x in script(keys=wkeys, args=[want, 4, 1, nonce, limit])]

    assert reserve(3, "a") == [0, 3]
    assert reserve(3, "a") == [0, 3]  # the retry of a call whose reply was lost
    assert reserve(3, "b") == [3, 3]
    assert reserve(3, "b") == [3, 3]
    assert reserve(3, "c", limit=7) == [6, 2]  # the bound: steps 0 and 1 only
    assert reserve(3, "d") == [8, 0]  # nothing open: nothing recorded
    assert reserve(3, "c", limit=7) == [6, 2]
    inflight = sorted(int(t) for t in pacer.r.hkeys(keys.inflight(w)))
    assert inflight == [0, 1, 2, 3, 4, 5, 6]  # ticket 7 is past the stage's limit
    assert int(pacer.r.get(keys.tickets)) == 8

    # The public API: granted tickets are in the worker's inflight hash on return.
    pacer.step_published(1)
    got = pacer.reserve(2, worker="rollout-1", timeout_s=5)
    assert got == [8, 9] and sorted(pacer.r.hkeys(keys.inflight("rollout-1"))) == [b"8", b"9"]
    assert pacer.try_reserve(5) == [10, 11]  # without a worker: as before, nothing recorded
    with pytest.raises(TimeoutError, match="published 2 steps"):
        pacer.reserve(1, worker="rollout-1", timeout_s=0.05, poll_s=0.01)


def test_publish_is_idempotent_and_ends_the_reservations(redis_url: str) -> None:
    from nebula.transport.pacing import _PUBLISH
    from nebula.transport.stream import RedisTrajectoryStream
    from nebula.v1.trajectory_pb2 import TrajectoryGroup

    keys = JobKeys(uuid.uuid4().hex)
    pacer = StalenessPacer(redis_url, keys, max_staleness=0, groups_per_step=2)
    stream = RedisTrajectoryStream(redis_url, keys.stream)
    w = "rollout-0"
    assert pacer.reserve(2, worker=w, limit=2, timeout_s=5) == [0, 1]
    groups = [TrajectoryGroup(group_id=f"g{t}", ticket=t) for t in (0, 1)]
    script = pacer.r.register_script(_PUBLISH)
    args: list[object] = ["n1"]
    for g in groups:
        args += [g.ticket, g.SerializeToString()]
    wkeys = [keys.stream, keys.inflight(w), keys.last_publish(w)]
    first = script(keys=wkeys, args=args)
    assert script(keys=wkeys, args=args) == first  # retried: nothing written again
    assert stream.length() == 2 and pacer.r.hlen(keys.inflight(w)) == 0
    got = stream.read("learner-0", 10, block_ms=10)
    assert [d.group.group_id for d in got] == ["g0", "g1"]
    assert [d.entry_id.encode() for d in got] == first
    # The public API.
    ids = pacer.publish(w, keys.stream, [(5, TrajectoryGroup(group_id="g5").SerializeToString())])
    assert len(ids) == 1 and stream.length() == 3


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
