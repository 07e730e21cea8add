"""What `dbre replicate` costs in store requests, counted on the real S3 store against moto: at most
one segment PUT per interval less the upload time (the pacing) with commits, nothing but the periodic
lease and lock refreshes while idle, no LIST (and no GET) once started; the check before each segment
makes no request."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import dbre.replicate.lease as lease_mod
import dbre.repository.lock as lock_mod
from dbre.replicate.lease import Lease
from dbre.replicate.shipper import Replicator
from dbre.repository.lock import LockLostError
from dbre.repository.repo import Repository
from dbre.storage.local import LocalStore
from dbre.storage.s3 import S3Store
from tests.replication import check_chains, make_source, start_writer

INTERVAL = 0.5
LEASE_EVERY = 2.0  # the lease and lock refresh periods, shortened from 20 s and 120 s for the test
LOCK_EVERY = 5.0


class CountingStore:
    """Every call to the wrapped store, one request each on S3 (a listing: one per page of 1000)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.url = inner.url
        self.log: list[tuple[float, str, str]] = []
        self._mu = threading.Lock()

    def _note(self, op: str, key: str) -> None:
        with self._mu:
            self.log.append((time.monotonic(), op, key))

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self._note("PUT", key)
        self.inner.put(key, data, if_absent=if_absent)

    def get(self, key: str) -> bytes:
        self._note("GET", key)
        return bytes(self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._note("GET", key)
        return bytes(self.inner.get_range(key, offset, length))

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        self._note("LIST", prefix)
        return iter(list(self.inner.list(prefix, start_after=start_after, limit=limit)))

    def modified(self, key: str) -> float:
        self._note("HEAD", key)
        return float(self.inner.modified(key))

    def delete(self, key: str) -> None:
        self._note("DELETE", key)
        self.inner.delete(key)

    def exists(self, key: str) -> bool:
        self._note("HEAD", key)
        return bool(self.inner.exists(key))

    def __getattr__(self, name: str) -> Callable[..., Any]:
        attr = getattr(self.inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self._note(name, str(args[0]) if args else "")
            return attr(*args, **kwargs)

        return call

    def between(self, a: float, b: float) -> list[tuple[str, str]]:
        with self._mu:
            return [(op, key) for t, op, key in self.log if a <= t < b]


def _kind(op: str, key: str) -> str:
    if key.startswith("segments/") and not key.endswith("/base"):
        return f"segment {op}"
    for prefix, name in (("leases/", "lease"), ("locks/", "lock")):
        if key.startswith(prefix):
            return f"{name} {op}"
    return f"other {op} {key}"


def _tally(reqs: list[tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for op, key in reqs:
        k = _kind(op, key)
        out[k] = out.get(k, 0) + 1
    return out


def _refreshes_allowed(tally: dict[str, int], seconds: float) -> None:
    """Only lease refreshes (PUT + 3 HEAD each: its own object, epoch + 1, the rewrite's store
    time) and lock refreshes (PUT, 2 HEAD, DELETE each), at
    most one of each per period (plus one already due at the start)."""
    leases, locks = math.ceil(seconds / LEASE_EVERY) + 1, math.ceil(seconds / LOCK_EVERY) + 1
    allowed = {"lease HEAD": 3 * leases, "lease PUT": leases, "lock PUT": locks, "lock HEAD": 2 * locks,
               "lock DELETE": locks}
    for kind, n in tally.items():
        if kind.startswith("segment"):
            continue
        assert kind in allowed, f"unexpected request {kind}: {tally}"
        assert n <= allowed[kind], f"{n} x {kind} in {seconds:.1f} s: {tally}"


def test_requests_per_interval_and_while_idle(tmp_path: Path, s3_repo_url: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease_mod, "REFRESH_SECONDS", LEASE_EVERY)
    monkeypatch.setattr(lock_mod, "REFRESH_SECONDS", LOCK_EVERY)
    src, log = tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, 500)
    Repository.open_or_init(s3_repo_url)
    store = CountingStore(S3Store.from_url(s3_repo_url))
    repo = Repository.open(store)
    rep = Replicator(repo, src, "app", INTERVAL)
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rep.run(stop)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not any(op == "PUT" and key.endswith("/base") for _, op, key in store.log):
            assert not errors and time.monotonic() < deadline, errors or "no base within 30 s"
            time.sleep(0.05)
        time.sleep(1.0)  # start-up is over: lease, lock, listings, the snapshot and the base
        startup = _tally(store.between(0, time.monotonic()))
        assert any(k.startswith("other LIST") for k in startup), startup  # (the counter sees listings)

        # writes: 20 commits a second for 6 s
        a = time.monotonic()
        assert start_writer(src, log, 6.0, start_seq=500, pause=0.05, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(INTERVAL + 1.0)  # the last commits are shipped
        b = time.monotonic()
        busy = _tally(store.between(a, b))
        # (the pacing ships when the oldest commit has waited the interval less an upload and a poll)
        intervals = math.ceil((b - a) / max(INTERVAL / 4, INTERVAL - 2 * rep.upload_seconds - 0.05))
        assert busy.get("segment GET", 0) == 0 and busy.get("segment LIST", 0) == 0, busy
        assert 6.0 / INTERVAL / 2 <= busy.get("segment PUT", 0) <= intervals, (busy, intervals)
        _refreshes_allowed(busy, b - a)

        # idle: 12 s without a commit
        time.sleep(12.0)
        c = time.monotonic()
        idle = _tally(store.between(b, c))
        assert "segment PUT" not in idle, idle
        _refreshes_allowed(idle, c - b)
        assert idle.get("lease PUT", 0) >= 3, idle  # (the refreshes do run: the lease stays live)
        print(f"\nstart-up {startup}\n{b - a:.1f} s of writes ({intervals} intervals): {busy}\n"
              f"{c - b:.1f} s idle: {idle}")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(check_chains(Repository.open(s3_repo_url))) == 1


def test_the_check_before_a_segment_makes_no_request_and_refuses_when_refreshes_stopped(tmp_path: Path) -> None:
    store = CountingStore(LocalStore(tmp_path / "repo"))
    repo = Repository.open_or_init(store)
    with repo.lock("replicate app") as lock:
        lease = Lease(store, "app", lock)
        lease.acquire()
        n = len(store.log)
        for _ in range(100):
            lease.verify("segment")
            lock.check_alive("segment", refresh=False)
        assert len(store.log) == n  # a hundred checks, no request
        # the lease's last good refresh older than STALE - SAFETY (boot or wall clock): refused
        boot, wall = lease._ok
        lease._ok = (boot, wall - (lease_mod.STALE_SECONDS - lease_mod.SAFETY_SECONDS) - 1)
        with pytest.raises(LockLostError, match="last written"):
            lease.verify("segment")
        lease.refresh()  # a good refresh makes it live again
        lease.verify("segment")
        # another replicator took the lease over: the next refresh finds it, and nothing more ships
        store.inner.put(lease.key(lease.epoch + 1), b"{}")
        with pytest.raises(LockLostError):
            lease.refresh()
        with pytest.raises(LockLostError, match="took over"):
            lease.verify("segment")
        # the repository lock's refreshes stopped (hung): refused without a request
        lock._last_ok -= lock.stale_seconds
        n = len(store.log)
        with pytest.raises(LockLostError, match="last refreshed"):
            lock.check_alive("segment", refresh=False)
        assert len(store.log) == n
        lock._last_ok += lock.stale_seconds
