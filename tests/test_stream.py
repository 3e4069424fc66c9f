"""Redis Streams transport and staleness pacing, against a real redis-server."""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest

from nebula.transport.pacing import JobKeys, StalenessPacer, ticket_step
from nebula.transport.stream import MemoryTrajectoryStream, RedisTrajectoryStream
from nebula.v1.trajectory_pb2 import TrajectoryGroup


def group(i: int, version: int = 0) -> TrajectoryGroup:
    g = TrajectoryGroup(group_id=f"g{i}", prompt_id=str(i), min_policy_version=version,
                        max_policy_version=version)
    g.samples.add(completion_ids=[i, i + 1], reward=float(i % 2))
    return g


def new_stream(redis_url: str, **kw: object) -> RedisTrajectoryStream:
    return RedisTrajectoryStream(redis_url, f"test:{uuid.uuid4().hex}", **kw)


def test_publish_read_ack_in_order(redis_url: str) -> None:
    s = new_stream(redis_url)
    ids = [s.publish(group(i)) for i in range(5)]
    got = s.read("learner-0", 3, block_ms=10)
    assert [d.group.group_id for d in got] == ["g0", "g1", "g2"]
    assert [d.entry_id for d in got] == ids[:3] and not any(d.redelivered for d in got)
    assert s.pending() == 3
    s.ack([d.entry_id for d in got])
    assert s.pending() == 0
    assert [d.group.group_id for d in s.read("learner-0", 10, block_ms=10)] == ["g3", "g4"]
    assert s.read("learner-0", 10, block_ms=10) == []  # blocks briefly, then empty


def test_unacked_records_are_consumed_exactly_once_after_a_restart(redis_url: str) -> None:
    s = new_stream(redis_url)
    for i in range(7):
        s.publish(group(i))
    first = s.read("learner-0", 5, block_ms=10)
    s.ack([d.entry_id for d in first[:2]])  # the step that used g0, g1 finished; then a crash
    # A new learner process: same consumer name, fresh connection.
    s2 = RedisTrajectoryStream(redis_url, s.stream)
    seen: list[str] = []
    while True:
        batch = s2.read("learner-0", 2, block_ms=50)
        if not batch:
            break
        seen += [d.group.group_id for d in batch]
        s2.ack([d.entry_id for d in batch])
    assert seen == ["g2", "g3", "g4", "g5", "g6"]  # each exactly once, in stream order
    assert s2.pending() == 0


def test_entries_of_a_dead_consumer_are_claimed(redis_url: str) -> None:
    s = new_stream(redis_url, claim_idle_ms=50)
    for i in range(3):
        s.publish(group(i))
    assert len(s.read("learner-old", 2, block_ms=10)) == 2  # that consumer then dies
    time.sleep(0.1)
    other = RedisTrajectoryStream(redis_url, s.stream, claim_idle_ms=50)
    got = other.read("learner-new", 5, block_ms=10)
    assert sorted(d.group.group_id for d in got) == ["g0", "g1", "g2"]
    assert sum(d.redelivered for d in got) == 2


def test_memory_stream_has_the_same_replay_semantics() -> None:
    s = MemoryTrajectoryStream()
    for i in range(4):
        s.publish(group(i))
    first = s.read("c", 3, block_ms=1)
    s.ack([first[0].entry_id])
    s2_seen = [d.group.group_id for d in s.read("c", 10, block_ms=1)]
    assert s2_seen == ["g3"]  # same process: pending ones are not re-read


def test_pacer_grants_tickets_up_to_the_staleness_bound(redis_url: str) -> None:
    keys = JobKeys(uuid.uuid4().hex)
    G = 4
    grants: list[int] = []

    def grab() -> None:
        p = StalenessPacer(redis_url, keys, max_staleness=1, groups_per_step=G)
        for _ in range(10):
            grants.extend(p.try_reserve(3))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(grants) == list(range(8))  # steps 0 and 1 only, each ticket once
    pacer = StalenessPacer(redis_url, keys, max_staleness=1, groups_per_step=G)
    pacer.step_published(1)
    assert pacer.try_reserve(10) == [8, 9, 10, 11]
    assert ticket_step(11, G) == 2


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_pacing_keeps_staleness_within_bound(redis_url: str, max_staleness: int) -> None:
    """Two rollout workers and a learner as threads over real Redis, with random timings
    and groups published out of ticket order: every trained group is at most
    max_staleness versions old."""
    keys = JobKeys(uuid.uuid4().hex)
    G, steps = 4, 12
    stream = RedisTrajectoryStream(redis_url, keys.stream)
    version = [0]
    stop = threading.Event()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        pacer = StalenessPacer(redis_url, keys, max_staleness, G)
        out = RedisTrajectoryStream(redis_url, keys.stream)
        while not stop.is_set():
            tickets = pacer.reserve(rng.randint(1, 3), should_stop=stop.is_set, poll_s=0.002)
            v = version[0]  # newest weights, loaded before generating
            rng.shuffle(tickets)
            for t in tickets:
                time.sleep(rng.uniform(0, 0.004))
                g = group(t, version=v)
                g.ticket, g.step = t, ticket_step(t, G)
                out.publish(g)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    pacer = StalenessPacer(redis_url, keys, max_staleness, G)
    buffered: dict[int, object] = {}
    staleness: list[int] = []
    try:
        for step in range(steps):
            want = set(range(step * G, (step + 1) * G))
            while not want <= buffered.keys():
                for d in stream.read("learner", 8, block_ms=100):
                    buffered[d.group.ticket] = d
            batch = [buffered.pop(t) for t in sorted(want)]
            staleness += [step - d.group.min_policy_version for d in batch]
            time.sleep(0.005)  # the optimizer step
            version[0] = step + 1  # publish weights, then open the next tickets
            pacer.step_published(step + 1)
            stream.ack([d.entry_id for d in batch])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert max(staleness) <= max_staleness, staleness
    if max_staleness > 0:
        assert max(staleness) == max_staleness  # async: rollout really ran ahead


def test_ticket_ranges_compress_runs_and_expose_repeats() -> None:
    from learner.checkpointing import ticket_ranges

    assert ticket_ranges([]) == []
    assert ticket_ranges([3, 0, 1, 2, 7, 8, 5]) == [[0, 4], [5, 6], [7, 9]]
    tickets = [0, 1, 1, 2]  # a ticket trained twice: the count exceeds what the runs cover
    covered = sum(b - a for a, b in ticket_ranges(tickets))
    assert covered == 3 and len(tickets) == 4


def test_trim_drops_only_acknowledged_entries(redis_url: str) -> None:
    """Bounded memory: trimming removes what the learner acknowledged, never a pending entry
    (a dead learner's replay source) nor one not delivered yet."""
    s = new_stream(redis_url)
    ids = [s.publish(group(i)) for i in range(10)]
    got = s.read("learner-0", 6, block_ms=10)
    s.ack([ids[0], ids[1], ids[3]])  # ids[2] stays pending: nothing at or after it may go
    assert s.trim() == 2 and s.length() == 8
    s.ack([ids[2], ids[4], ids[5]])
    assert s.trim() == 4 and s.length() == 4  # 6..9 were never delivered: they stay
    rest = s.read("learner-0", 10, block_ms=10)
    assert [d.group.group_id for d in rest] == ["g6", "g7", "g8", "g9"]
    assert s.trim() == 0 and s.pending() == 4 and len(got) == 6
    s.ack([d.entry_id for d in rest])
    assert s.trim() == 4 and s.length() == 0
    s.publish(group(10))  # the stream goes on after a full trim
    assert [d.group.group_id for d in s.read("learner-0", 5, block_ms=10)] == ["g10"]
