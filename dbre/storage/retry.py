"""A store wrapper that retries transient failures with exponential backoff and jitter."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from dbre.storage.base import AlreadyExists, Store, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RetryingStore:
    """Any ``Store``, with each operation tried up to ``attempts`` times on ``TransientError``.

    Only ``TransientError`` is retried; ``NotFound``, ``AlreadyExists`` and ``PermanentError``
    pass through at once, since another try cannot change them. Attempt ``n`` waits about
    ``base_delay * 2**(n-1)`` seconds (at most ``max_delay``), randomised between half and all of
    it so that many clients do not retry in step. When every attempt fails, the last
    ``TransientError`` is raised, saying how many attempts were made.

    A put resends the whole body, so it is safe to repeat. ``list`` restarts from the beginning
    after a failure and skips the keys it has already yielded.

    A conditional put (``if_absent=True``) retried after a transient error can find *its own*
    earlier write: the failed attempt may have reached the store before its connection broke.
    So ``AlreadyExists`` after a retry does not prove that another writer won. This wrapper says
    so in the error's message; the caller must read the key back and compare it with what it
    wrote before treating the key as someone else's.

    Backends may retry inside too (the S3 client makes up to 3 attempts per call): the
    attempts multiply.
    """

    def __init__(
        self,
        store: Store,
        attempts: int = 5,
        base_delay: float = 0.2,
        *,
        max_delay: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.store = store
        self.url = store.url
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"RetryingStore({self.store!r}, attempts={self.attempts})"

    def _delay(self, failures: int) -> float:
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return random.uniform(delay / 2, delay)

    def _wait_or_give_up(self, failures: int, err: TransientError) -> None:
        """Sleep before the next attempt, or raise once ``failures`` uses up every attempt."""
        if failures >= self.attempts:
            raise TransientError(f"{err.message} (gave up after {failures} attempts)", err.hint) from err
        delay = self._delay(failures)
        log.info("%s; retrying in %.1f s (attempt %d of %d)", err.message, delay, failures + 1, self.attempts)
        self._sleep(delay)

    def _call(self, op: Callable[[], T]) -> T:
        failures = 0
        while True:
            try:
                return op()
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        failures = 0
        while True:
            try:
                self.store.put(key, data, if_absent=if_absent)
                return
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err)
            except AlreadyExists as err:
                if not failures:
                    raise
                raise AlreadyExists(
                    f"{err.message} (after {failures} failed attempt(s): maybe this put's own earlier write)",
                    "read the key back and compare it with the data written",
                ) from err

    def get(self, key: str) -> bytes:
        return self._call(lambda: self.store.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call(lambda: self.store.get_range(key, offset, length))

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        seen: set[str] = set()
        failures = 0
        while True:
            try:
                for key in self.store.list(prefix, start_after=start_after, limit=limit):
                    if key not in seen:
                        seen.add(key)
                        yield key
                return
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err)

    def modified(self, key: str) -> float:
        return self._call(lambda: self.store.modified(key))

    def delete(self, key: str) -> None:
        self._call(lambda: self.store.delete(key))

    def exists(self, key: str) -> bool:
        return self._call(lambda: self.store.exists(key))
