"""A store wrapper that retries transient failures with exponential backoff and jitter."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from dbre.storage.base import AlreadyExists, Conflict, NotFound, PermanentError, Store, TransientError

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

    A conditional put (``if_absent=True``) can find *its own* earlier write: an attempt may reach
    the store and lose its answer (a connection reset after the PUT), and the next attempt, ours
    or the backend's own (the S3 client retries inside, unseen here), then meets the key. So on
    ``AlreadyExists`` this wrapper reads the key back (at most ``len(data) + 1`` bytes): if it holds
    exactly ``data`` the put succeeded and returns; only other content is a conflict.

    Backends may retry inside too (the S3 client makes up to 3 attempts per call): the
    attempts multiply. Time is bounded all the same: no attempt of an operation starts later than
    ``budget`` seconds after its first one began (the one then running is bounded by the backend's
    own timeouts), so a run against a failing store ends with one error instead of waiting on.
    """

    def __init__(
        self,
        store: Store,
        attempts: int = 5,
        base_delay: float = 0.2,
        *,
        max_delay: float = 10.0,
        budget: float = 120.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.store = store
        self.url = store.url
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.budget = budget
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"RetryingStore({self.store!r}, attempts={self.attempts})"

    def _delay(self, failures: int) -> float:
        delay = min(self.max_delay, self.base_delay * 2 ** (failures - 1))
        return random.uniform(delay / 2, delay)

    def _wait_or_give_up(self, failures: int, err: TransientError, began: float) -> None:
        """Sleep before the next attempt, or raise once ``failures`` uses up every attempt or the next
        attempt would start past the time budget of the operation begun at ``began`` (monotonic)."""
        delay = self._delay(failures)
        spent = time.monotonic() - began
        if failures >= self.attempts or spent + delay > self.budget:
            raise TransientError(f"{err.message} (gave up after {failures} attempts in {spent:.0f} s)",
                                 err.hint) from err
        log.info("%s; retrying in %.1f s (attempt %d of %d)", err.message, delay, failures + 1, self.attempts)
        self._sleep(delay)

    def _call(self, op: Callable[[], T]) -> T:
        failures, began = 0, time.monotonic()
        while True:
            try:
                return op()
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err, began)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        failures, began = 0, time.monotonic()
        while True:
            try:
                self.store.put(key, data, if_absent=if_absent)
                return
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err, began)
            except AlreadyExists:
                try:
                    there = self.get_range(key, 0, len(data) + 1)
                except NotFound:
                    there = None  # deleted since: still not this put's write
                if there == data:  # this put's own earlier attempt, its answer lost
                    log.info("put %s: found its own earlier write (an answer lost); done", key)
                    return
                raise

    def replace(self, key: str, data: bytes, *, expected: bytes) -> None:
        """The inner store's ``replace`` (``ReplacingStore``), retried on ``TransientError``. As with a
        conditional put, an attempt whose answer was lost makes the next one meet a ``Conflict``: the
        key is read back, and holding exactly ``data`` it was this replace's own write."""
        inner = getattr(self.store, "replace", None)
        if inner is None:
            raise PermanentError(f"replace {key}: {self.url} cannot replace an object only if unchanged")
        failures, began = 0, time.monotonic()
        while True:
            try:
                inner(key, data, expected=expected)
                return
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err, began)
            except Conflict:
                try:
                    there = self.get_range(key, 0, len(data) + 1)
                except NotFound:
                    there = None
                if there == data:
                    log.info("replace %s: found its own earlier write (an answer lost); done", key)
                    return
                raise

    def get(self, key: str) -> bytes:
        return self._call(lambda: self.store.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call(lambda: self.store.get_range(key, offset, length))

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        seen: set[str] = set()
        failures, began = 0, time.monotonic()
        while True:
            try:
                for key in self.store.list(prefix, start_after=start_after, limit=limit):
                    if key not in seen:
                        seen.add(key)
                        yield key
                        began = time.monotonic()  # the budget counts from the last progress, not the caller's work
                return
            except TransientError as err:
                failures += 1
                self._wait_or_give_up(failures, err, began)

    def modified(self, key: str) -> float:
        return self._call(lambda: self.store.modified(key))

    def delete(self, key: str) -> None:
        self._call(lambda: self.store.delete(key))

    def exists(self, key: str) -> bool:
        return self._call(lambda: self.store.exists(key))
