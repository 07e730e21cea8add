"""Cold review of ff57d53 (the replication lease records ``wal``, the WAL position the replicator
stands at with nothing unshipped, and `dbre status` reports lag 0 for a source whose WAL stands there).

Findings tested here:
- ``wal`` was set in the lease's record by the polling thread, and every lease write wrote the record
  as it stood: the renewal ``verify`` makes inside a segment's job (after a pause) and ``name`` in a new
  generation's start job wrote the position before the segments submitted ahead of it were durable. A
  replicator killed (or a host lost) then leaves a lease that says "nothing unshipped" over commits that
  are not in the repository: status reports lag 0 for good.
- ``refresher`` snapshotted the whole record at submit time, ``generation`` included: a renewal
  submitted while a new generation's start job was queued wrote the old generation back after that
  job named the new one (the lease named a generation it no longer ships into until the next renewal).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dbre.metrics import replication_lag
from dbre.replicate.lease import Lease
from dbre.replicate.wal import WalTail
from dbre.repository.repo import Repository
from dbre.storage.local import LocalStore
from tests.replication import make_source, replicating
from tests.stores import PassThroughStore

W = {"salt": "0102030405060708", "frame": 0, "cksum": [7, 9]}


def _record(repo: Repository, lease: Lease) -> dict[str, Any]:
    return dict(json.loads(repo.store.get(lease.key())))


def test_the_followed_position_is_written_only_by_the_renewal_submitted_after_it(tmp_path: Path) -> None:
    """``followed`` comes from the polling thread while segments submitted before it may still wait in
    the uploader; a lease write that runs before them (the renewal ``verify`` makes after a pause, inside
    the job of such a segment; ``name`` in a new generation's start job) must not write the position.
    Only the renewal submitted after ``followed`` (``refresher``), which runs after those segments, does."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with repo.lock("replicate app") as lock:
        lease = Lease(repo.store, "app", lock)
        lease.acquire()
        lease.name("g1")
        lease.followed(W)  # polling thread: every transaction read is submitted, none durable yet
        after = lease.refresher()  # submitted behind those segments
        lease.refresh()  # verify's renewal, in the job of a segment submitted before ``followed``
        assert "wal" not in _record(repo, lease), "the position was written before the segments ahead of it"
        lease.name("g2")  # a start job queued before those segments
        assert "wal" not in _record(repo, lease), "name wrote a position whose segments are not written"
        after()  # the segments ahead of it are durable now
        rec = _record(repo, lease)
        assert rec["wal"] == W and rec["generation"] == "g2", rec
        lease.refresh()  # later renewals keep it
        assert _record(repo, lease)["wal"] == W


def test_a_renewal_queued_before_a_new_generation_is_named_does_not_name_the_old_one_again(tmp_path: Path) -> None:
    """A renewal submitted while the start job of a new generation waits in the uploader runs after that
    job named the new generation: the lease must go on naming the new one (prune and forget keep the
    generation a live lease names), not the one the renewal's submitter saw."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with repo.lock("replicate app") as lock:
        lease = Lease(repo.store, "app", lock)
        lease.acquire()
        lease.name("g1")
        renewal = lease.refresher()  # the polling loop's periodic renewal, behind the start job of g2
        lease.name("g2")  # the start job
        renewal()
        assert _record(repo, lease)["generation"] == "g2", _record(repo, lease)


class _Gates(PassThroughStore):
    """The real local store; a base put, or every segment put, can be held at a gate (an upload in
    flight: what a kill -9 at that moment leaves in the store is what the store holds meanwhile)."""

    def __init__(self, inner: LocalStore) -> None:
        super().__init__(inner)
        self.hold_base: threading.Event | None = None
        self.hold_segments: threading.Event | None = None
        self.base_held = threading.Event()
        self.segment_held = threading.Event()
        self.held_base_key = ""

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith("segments/"):
            gate = self.hold_base if key.endswith("/base") else self.hold_segments
            if gate is not None:
                if key.endswith("/base"):
                    self.held_base_key = key
                    self.base_held.set()
                else:
                    self.segment_held.set()
                assert gate.wait(30), f"gate of {key} never opened"
        super().put(key, data, if_absent=if_absent)


# The application, in a process of its own (in this one, its SQLite and the replicator's would not see
# each other's POSIX locks): runs each statement; "TRUNCATE" is a TRUNCATE checkpoint, tried until it
# is not busy; "LOOP seconds pause" commits a row and truncates the WAL, again and again.
APP = r'''
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
def truncate():
    deadline = time.time() + 20
    while c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] != 0:
        assert time.time() < deadline, "the TRUNCATE checkpoint stayed busy"
        time.sleep(0.05)
for stmt in sys.argv[2:]:
    if stmt == "TRUNCATE":
        truncate()
    elif stmt.startswith("LOOP "):
        seconds, pause = map(float, stmt.split()[1:])
        end, seq = time.time() + seconds, 20000
        while time.time() < end:
            c.execute("INSERT INTO t(seq, pad) VALUES (?, x'00')", (seq,))
            seq += 1
            truncate()
            time.sleep(pause)
    else:
        c.execute(stmt)
c.close()
'''


def _app(src: Path, *stmts: str) -> None:
    r = subprocess.run([sys.executable, "-c", APP, str(src), *stmts], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()


def test_a_kill_while_a_segment_is_in_flight_never_leaves_a_lease_that_hides_it(tmp_path: Path) -> None:
    """End to end, real replicator and local store: a VACUUM starts a new generation whose start job
    waits (a slow base put); meanwhile a commit is shipped into a segment queued behind it, and a
    TRUNCATE checkpoint empties the WAL (the replicator follows: ``followed``). The start job then names
    the new generation in the lease while that segment is still in flight. A replicator killed there
    must leave a lease status cannot mistake for "nothing unshipped" (it said lag 0 for good); once the
    segment is durable the lease names the new generation and the position, and status says lag 0."""
    src, url = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 2000)  # ~150 pages: a VACUUM rewrites more than the replicator's threshold
    Repository.open_or_init(url)
    gates = _Gates(LocalStore(url))
    plain = Repository.open(url)
    later = datetime.now(UTC) + timedelta(seconds=600)  # judged as if nothing wrote the lease since
    with replicating(Repository.open(gates), src, "app", 0.2) as rep:
        gates.hold_base = threading.Event()
        _app(src, "VACUUM")
        assert gates.base_held.wait(30), "no new generation after the VACUUM"
        new_gen = gates.held_base_key.split("/")[2]
        gates.hold_segments = threading.Event()  # (the old generation's segments are written by now)
        try:
            _app(src, "INSERT INTO t(seq, pad) VALUES (9000, x'00')")  # shipped behind the start job
            time.sleep(0.8)
            assert not rep.pending, "the commit was not submitted"
            _app(src, "TRUNCATE")
            tail = WalTail(str(src))
            try:
                here = tail.position()
            finally:
                tail.close()
            assert here.frame == 0
            time.sleep(0.5)  # the polling loop follows the emptied WAL
            gates.hold_base.set()  # the start job names the new generation
            assert gates.segment_held.wait(30), "the commit's segment never came"
            time.sleep(0.3)
            rec = json.loads(plain.store.get(next(iter(plain.store.list("leases/app/")))))
            assert rec.get("generation") == new_gen, rec
            found = replication_lag(plain, "app", later, str(src))
            assert found is not None and found.seconds > 300, \
                f"a lease written while commit 9000 was in flight says nothing is unshipped: {rec}"
        finally:
            gates.hold_base.set()
            gates.hold_segments.set()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rec = json.loads(plain.store.get(next(iter(plain.store.list("leases/app/")))))
            if rec.get("wal") is not None and rec["wal"]["salt"] == here.salt.hex():
                break
            time.sleep(0.05)
        assert rec.get("wal", {}).get("salt") == here.salt.hex(), rec
        assert rec.get("generation") == new_gen, f"the lease names a generation it no longer ships into: {rec}"
        found = replication_lag(plain, "app", later, str(src))
        assert found is not None and found.seconds == 0, (found, rec)


class _Counted(PassThroughStore):
    """The real local store, counting the puts of leases and of segments."""

    def __init__(self, inner: LocalStore) -> None:
        super().__init__(inner)
        self.leases = self.segments = 0

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        if key.startswith("leases/"):
            self.leases += 1
        elif key.startswith("segments/"):
            self.segments += 1
        super().put(key, data, if_absent=if_absent)


def test_an_application_that_truncates_after_every_commit_gets_no_lease_write_per_segment(tmp_path: Path) -> None:
    """An application that runs ``wal_checkpoint(TRUNCATE)`` after each commit leaves the replicator, after
    almost every segment, at an emptied WAL with nothing pending. Recording each such position forced a
    lease write (three HEADs and a PUT, in the ordered uploader in front of the next segment): one per
    segment (measured 8 lease puts for 8 segments in 5 s at a 0.75 s interval). Only a position that
    stood an interval is recorded now; once the application goes quiet, it is, and status says lag 0."""
    src, url = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 200)
    Repository.open_or_init(url)
    store = _Counted(LocalStore(url))
    later = datetime.now(UTC) + timedelta(seconds=600)
    with replicating(Repository.open(store), src, "app", 0.3):
        leases, segments = store.leases, store.segments
        _app(src, "LOOP 3 0.05")  # a commit and a TRUNCATE every ~60 ms
        busy_leases, busy_segments = store.leases - leases, store.segments - segments
        time.sleep(1.0)  # quiet: the emptied WAL stands
        rec = json.loads(store.get(next(iter(store.list("leases/app/")))))
        found = replication_lag(Repository.open(url), "app", later, str(src))
    assert busy_segments >= 5, busy_segments
    assert busy_leases <= 2, f"{busy_leases} lease writes for {busy_segments} segments"
    assert "wal" in rec and found is not None and found.seconds == 0, (found, rec)


def test_a_replayed_or_forged_lease_position_never_hides_a_commit(tmp_path: Path) -> None:
    """Attacker with write access to the repository (no key): the lease is plain JSON, so the position
    it records can be read and written back later, or forged. It is only ever a position the source
    stood at with nothing unshipped, and any commit moves the WAL off it: replayed after a commit it
    hides nothing; forged with the wrong types it is ignored (no crash). (Writing any lease object
    already makes the heartbeat fresh: the field adds no way to hide lag that was not there.)"""
    src, url = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 200)
    repo = Repository.open_or_init(url)
    with replicating(repo, src, "app", 0.2):
        _app(src, "INSERT INTO t(seq, pad) VALUES (9000, x'00')", "TRUNCATE")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rec = json.loads(repo.store.get(next(iter(repo.store.list("leases/app/")))))
            if "wal" in rec:
                break
            time.sleep(0.05)
    assert "wal" in rec, rec
    later = datetime.now(UTC) + timedelta(seconds=600)
    key = "leases/app/00000000000000ff"
    repo.store.put(key, json.dumps(rec).encode())  # replayed while the source still stands there: true
    found = replication_lag(repo, "app", later, str(src))
    assert found is not None and found.seconds == 0, found
    _app(src, "INSERT INTO t(seq, pad) VALUES (9001, x'00')")  # unshipped: no replicator runs
    for forged in (rec, rec | {"wal": "x"}, rec | {"wal": {"salt": "zz", "frame": 0}}, rec | {"wal": {}},
                   rec | {"wal": rec["wal"] | {"cksum": [1]}}, [rec], rec | {"generation": 7}):
        repo.store.put(key, json.dumps(forged).encode())
        found = replication_lag(repo, "app", later, str(src))
        assert found is not None and found.seconds > 300, (forged, found)
