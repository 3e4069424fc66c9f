"""Trajectory streams: rollout workers publish finished groups; the learner consumes them
through a consumer group and acknowledges each only after the optimizer step that used it.

`RedisTrajectoryStream` is the production transport. `MemoryTrajectoryStream` implements
the same interface in-process, for unit tests of the code around it only.
"""

from __future__ import annotations

from nebula.transport.redis_client import connect

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from nebula.v1.trajectory_pb2 import TrajectoryGroup


@dataclass
class Delivery:
    entry_id: str
    group: TrajectoryGroup
    redelivered: bool = False  # a pending entry read again after a consumer restart


class TrajectoryStream(ABC):
    @abstractmethod
    def publish(self, group: TrajectoryGroup) -> str:
        """Append a finished group; returns its entry id."""

    @abstractmethod
    def read(self, consumer: str, count: int, block_ms: int = 1000) -> list[Delivery]:
        """Up to `count` entries for `consumer`: first its own unacknowledged ones (after a
        restart), then entries abandoned by dead consumers, then new ones, in stream order."""

    @abstractmethod
    def ack(self, entry_ids: list[str]) -> None:
        """Mark entries consumed; they are never delivered again."""

    @abstractmethod
    def pending(self) -> int:
        """Entries delivered but not acknowledged."""

    @abstractmethod
    def length(self) -> int:
        """Entries in the stream (acknowledged ones included until trimmed)."""

    def trim(self) -> int:
        """Remove acknowledged entries, never a pending or undelivered one; returns how many
        went. Kept by default (the in-process stand-in)."""
        return 0


class RedisTrajectoryStream(TrajectoryStream):
    """One Redis Stream per job, one consumer group for the learner(s)."""

    def __init__(self, redis_url: str, stream: str, group: str = "learner",
                 claim_idle_ms: int = 60_000) -> None:
        import redis

        self.r = connect(redis_url)
        self.stream, self.group = stream, group
        self.claim_idle_ms = claim_idle_ms
        # Per consumer, the last own-pending entry replayed after a restart; absent once the
        # replay is over (then only abandoned and new entries are read).
        self._replay_from: dict[str, str] = {}
        self._replayed: set[str] = set()
        try:
            self.r.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def publish(self, group: TrajectoryGroup) -> str:
        return self.r.xadd(self.stream, {b"g": group.SerializeToString()}).decode()

    def _decode(self, entries: list, redelivered: bool) -> list[Delivery]:
        out = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                self.r.xack(self.stream, self.group, entry_id)
                continue
            out.append(Delivery(entry_id.decode(), TrajectoryGroup.FromString(fields[b"g"]),
                                redelivered))
        return out

    def read(self, consumer: str, count: int, block_ms: int = 1000) -> list[Delivery]:
        out: list[Delivery] = []
        if consumer not in self._replayed:
            # Our own entries delivered before a restart and never acknowledged, in order.
            start = self._replay_from.get(consumer, "0")
            resp = self.r.xreadgroup(self.group, consumer, {self.stream: start}, count=count)
            got = self._decode(resp[0][1], True) if resp else []
            if got:
                self._replay_from[consumer] = got[-1].entry_id
            if len(got) < count:
                self._replayed.add(consumer)
            out += got
        if len(out) < count:
            # Redis 6.2 answers [cursor, entries], 7.x adds the deleted ids.
            resp = self.r.xautoclaim(self.stream, self.group, consumer, self.claim_idle_ms,
                                     "0-0", count=count - len(out))
            out += self._decode(resp[1], True)
        if len(out) < count:
            resp = self.r.xreadgroup(self.group, consumer, {self.stream: ">"},
                                     count=count - len(out), block=None if out else block_ms)
            out += self._decode(resp[0][1], False) if resp else []
        return out

    def ack(self, entry_ids: list[str]) -> None:
        if entry_ids:
            self.r.xack(self.stream, self.group, *entry_ids)

    def pending(self) -> int:
        return int(self.r.xpending(self.stream, self.group)["pending"])

    def length(self) -> int:
        return int(self.r.xlen(self.stream))

    def trim(self) -> int:
        """XTRIM MINID to the oldest entry still needed: the oldest pending one, else the one
        after the group's last delivered entry (entries after it are not delivered yet)."""
        group = next((g for g in self.r.xinfo_groups(self.stream)
                      if _text(g["name"]) == self.group), None)
        if group is None:
            return 0
        ms, seq = _text(group["last-delivered-id"]).split("-")
        keep_from = f"{ms}-{int(seq) + 1}"
        pending = self.r.xpending(self.stream, self.group)
        if pending["pending"]:
            keep_from = min(keep_from, _text(pending["min"]), key=_id_key)
        return int(self.r.xtrim(self.stream, minid=keep_from, approximate=False))


def _text(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


class MemoryTrajectoryStream(TrajectoryStream):
    """In-process stand-in with the same delivery semantics; for unit tests only."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, TrajectoryGroup]] = []
        self._pending: dict[str, str] = {}  # entry id -> consumer
        self._acked: set[str] = set()
        self._next = 0
        self._replayed: set[str] = set()
        self._cv = threading.Condition()

    def publish(self, group: TrajectoryGroup) -> str:
        with self._cv:
            entry_id = f"{len(self._entries) + 1}-0"
            self._entries.append((entry_id, group))
            self._cv.notify_all()
            return entry_id

    def read(self, consumer: str, count: int, block_ms: int = 1000) -> list[Delivery]:
        with self._cv:
            out = []
            if consumer not in self._replayed:
                self._replayed.add(consumer)
                out = [Delivery(i, g, True) for i, g in self._entries
                       if self._pending.get(i) == consumer]
            if not out and self._next >= len(self._entries):
                self._cv.wait(block_ms / 1000)
            while len(out) < count and self._next < len(self._entries):
                entry_id, group = self._entries[self._next]
                self._next += 1
                self._pending[entry_id] = consumer
                out.append(Delivery(entry_id, group))
            return out

    def ack(self, entry_ids: list[str]) -> None:
        with self._cv:
            for i in entry_ids:
                self._pending.pop(i, None)
                self._acked.add(i)

    def pending(self) -> int:
        return len(self._pending)

    def length(self) -> int:
        return len(self._entries)
