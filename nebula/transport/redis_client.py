"""Redis clients that ride out a restart of the server.

`connect(url)` is `redis.Redis.from_url(url)` with redis-py's own retry: a command that
meets a dropped connection, a refused connect (the server is down or being restarted by its
supervisor) or a server still loading its AOF (BusyLoadingError) is sent again, with
exponential backoff (0.1 s doubling to 2 s), for up to `outage_s` (default 30 s) from its
first failure; then the error is raised. Every socket operation has a timeout, and idle
connections are health-checked before reuse.

A retried command may have been applied before the connection broke (the reply was lost):
idempotent commands (GET, SET, HSET, HDEL, XACK, XREADGROUP of pending entries) do not care;
the ticket reservation and group publishing scripts of `nebula.transport.pacing` carry a
request id so that their retry is answered from the first application.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError
from redis.retry import Retry

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ON = (ConnectionError, TimeoutError, BusyLoadingError)
DEFAULT_OUTAGE_S = 30.0


def backoff_retries(outage_s: float, base: float = 0.05, cap: float = 2.0) -> int:
    """How many retries of ExponentialBackoff(cap, base) add up to at least `outage_s`."""
    n, total = 0, 0.0
    while total < outage_s:
        n += 1
        total += min(cap, base * 2 ** n)
    return n


_tls = threading.local()


class OutageRetry(Retry):
    """redis-py's Retry, bounded by wall-clock time as well as by count.

    redis-py nests retries (a command's retry wraps the connect's own retry), so a count
    alone multiplies: N retries of a connect inside N retries of the command. Here one
    outage budget is shared by the nested calls of one thread, and one line is logged when
    an outage starts."""

    def __init__(self, outage_s: float = DEFAULT_OUTAGE_S, what: str = "redis",
                 base: float = 0.05, cap: float = 2.0) -> None:
        super().__init__(ExponentialBackoff(cap=cap, base=base),
                         backoff_retries(outage_s, base, cap), supported_errors=RETRY_ON)
        self.outage_s = outage_s
        self.what = what

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, OutageRetry) and super().__eq__(other)
                and (self.outage_s, self.what) == (other.outage_s, other.what))

    def __hash__(self) -> int:
        return hash((super().__hash__(), self.outage_s, self.what))

    @staticmethod
    def _fail(fail: Callable[..., Any], error: Exception, failures: int,
              with_failure_count: bool) -> None:
        if with_failure_count:
            fail(error, failures)
        else:
            fail(error)

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        outermost = getattr(_tls, "depth", 0) == 0
        _tls.depth = getattr(_tls, "depth", 0) + 1
        failures = 0
        try:
            while True:
                try:
                    out = do()
                except self._supported_errors as error:
                    if self._is_retryable is not None and not self._is_retryable(error):
                        self._fail(fail, error, failures + 1, with_failure_count)
                        raise
                    if is_retryable is not None and not is_retryable(error):
                        raise
                    failures += 1
                    self._fail(fail, error, failures, with_failure_count)
                    now = time.monotonic()
                    outage = getattr(_tls, "outage", None)
                    if outage is None:
                        outage = _tls.outage = now
                        log.warning("%s unreachable (%s: %s); retrying for up to %.0f s",
                                    self.what, type(error).__name__, error, self.outage_s)
                    left = outage + self.outage_s - now
                    if left <= 0 or (self._retries >= 0 and failures > self._retries):
                        if outermost:
                            log.error("%s unreachable for %.1f s; giving up: %s", self.what,
                                      now - outage, error)
                        raise error
                    time.sleep(min(self._backoff.compute(failures), left))
                    continue
                if outermost and getattr(_tls, "outage", None) is not None:
                    log.warning("%s reachable again after %.1f s", self.what,
                                time.monotonic() - _tls.outage)
                return out
        finally:
            _tls.depth -= 1
            if _tls.depth == 0:
                _tls.outage = None


def connect(url: str, *, outage_s: float = DEFAULT_OUTAGE_S, socket_timeout: float = 30.0,
            socket_connect_timeout: float = 5.0, health_check_interval: int = 10,
            **kwargs: Any) -> redis.Redis:
    """A `redis.Redis` for `url` that survives a restart of the server of up to `outage_s`.

    `socket_timeout` bounds every read: a blocking command (XREADGROUP BLOCK, BLPOP) must
    block for less than it. Other keyword arguments go to `redis.Redis.from_url`
    (e.g. decode_responses=True)."""
    host = url.split("@")[-1]
    retry = OutageRetry(outage_s, what=f"redis at {host}")
    return redis.Redis.from_url(url, retry=retry, retry_on_error=list(RETRY_ON),
                                socket_timeout=socket_timeout,
                                socket_connect_timeout=socket_connect_timeout,
                                socket_keepalive=True,
                                health_check_interval=health_check_interval, **kwargs)
