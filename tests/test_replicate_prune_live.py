"""Prune and compaction beside a live replicator (issue 10): a real writer, `dbre replicate` as a
subprocess, forget --prune with a short PITR window and compaction run again and again while it
ships; every time of the window that is left restores exactly, the chain verifies, and a base the
replicator must take while a prune holds the repository is put off or waited for, never failed."""

from __future__ import annotations

import functools
import os
import random
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import dbre.replicate.compact as compact_mod
from dbre.errors import LockedError
from dbre.replicate.segment import list_generations, open_segment, read_base
from dbre.replicate.window import read_pruned
from dbre.repository.lock import Lock
from dbre.repository.repo import Repository
from dbre.repository.retention import forget
from tests.replication import (
    Commit,
    SecondsWindow,
    check_chains,
    check_exact,
    check_oracle,
    dbre_cmd,
    make_source,
    read_log,
    restore_at,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 300



def observed_all(repo: Repository) -> tuple[dict[int, float], list[tuple[float, int]]]:
    """Writer seq -> the stamp its commit has in the generations left (each chain-checked; commits
    older than the oldest generation left are in its base snapshot: they get the base's time); and
    each base's (time, last seq it holds)."""
    out: dict[int, float] = {}
    bases = []
    for gen_id, names in list_generations(repo, "app").items():
        base = read_base(repo, "app", gen_id)
        for q in range(BASE_ROWS + 1, BASE_ROWS + base.base_txid + 1):
            out.setdefault(q, base.time.timestamp())
        bases.append((base.time.timestamp(), BASE_ROWS + base.base_txid))
        state = bytes.fromhex(base.state)
        for name in names:
            seg = open_segment(repo, name, state)
            state = seg.state_after
            out.update((BASE_ROWS + tx.txid, tx.observed_us / 1e6) for tx in seg.transactions)
    return out, bases


def check_restored(out: Path, commits: list[Commit], observed: dict[int, float], bases: list[tuple[float, int]],
                   at: float) -> int:
    """``check_exact``; but from a base's time until the last commit it holds was stamped, the
    restore is that base snapshot, which holds commits stamped a little after its time (a snapshot's
    time is read just before its read transaction; the replicator stamps commits when it reads them):
    there ``check_oracle`` (one prefix, every commit that returned before, none begun after)."""
    if any(t <= at < observed.get(last, t) for t, last in bases):
        return check_oracle(out, commits, at, BASE_ROWS)
    return check_exact(out, commits, observed, at, BASE_ROWS)


def _stderr_until(proc: subprocess.Popen[bytes], text: str, timeout: float = 60) -> str:
    """The replicator's stderr up to the line holding ``text`` (the rest stays in the pipe)."""
    assert proc.stderr is not None
    seen, deadline = b"", time.time() + timeout
    while text.encode() not in seen:
        assert time.time() < deadline and proc.poll() is None, seen.decode()
        if select.select([proc.stderr], [], [], 0.2)[0]:
            seen += os.read(proc.stderr.fileno(), 4096)
    return seen.decode()


def _wait_unlocked(repo: Repository, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until no repository lock is held (the replicator lets its lock go once a generation started)."""
    deadline = time.time() + timeout
    while list(repo.store.list("locks/")):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.time() < deadline, "the replicator still holds the repository lock"
        time.sleep(0.05)


# S3 (moto): a prune costs seconds, not tenths: fewer rounds, over a longer run with fewer bases
# (and pauses between prunes: back to back they would hold the repository most of the time, and
# put off most bases, as they should)
@pytest.mark.parametrize(("where", "seconds", "every", "rounds", "gap"),
                         [("local", 8.0, "6", 5, 0.2), ("s3", 8.0, "8", 3, 1.5)])
def test_prune_and_compaction_again_and_again_beside_a_live_replicator(
        tmp_path: Path, where: str, seconds: float, every: str, rounds: int, gap: float, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer commits for 8 s or more while the replicator ships (200 ms interval, a new base every
    6 segments; on S3 8). Meanwhile forget --prune (keep-within 3 s, grace 0) runs again and again,
    each one first compacting (any 3 segments older than 1 s). Proves: the prunes run (refused only
    while a base is taken), delete whole generations and compacted small segments and merge
    segments (the test goes on until each happened), yet never touch what
    the replicator still writes: it exits 0, every generation left chains from its base, `dbre
    verify` passes, and every time from the pruned marker to the end restores exactly (at every
    kind of moment: random times, and transaction stamps themselves)."""
    repo_url = str(tmp_path / "repo") if where == "local" else request.getfixturevalue("s3_repo_url")
    monkeypatch.setattr(compact_mod, "compact_segments",
                        functools.partial(compact_mod.compact_segments, older_than=1.0, group=3))
    src, log = tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="200ms",
                           env={"DBRE_REPLICATE_GENERATION_SEGMENTS": every, "DBRE_REPLICATE_LOCK_RETRY": "0.3"})
    prunes = refused = deleted = merged = superseded = 0
    try:
        wait_for_generation(repo_url, proc=rep)
        repo = Repository.open(repo_url)
        _wait_unlocked(repo, rep)
        # the writer commits on (2 s runs, one after the other) until the prunes have done each kind
        # of deletion, at least ``seconds`` in all; a prune every ``gap`` seconds meanwhile
        began, seq = time.time(), BASE_ROWS
        writer = start_writer(src, log, 2.0, start_seq=seq, pause=0.01, ckpt_every=0)
        while time.time() - began < seconds or prunes < rounds or not (deleted and merged and superseded):
            assert time.time() - began < 60, (prunes, refused, deleted, merged, superseded)
            if writer.poll() is not None:
                assert writer.returncode == 0
                seq = read_log(log)[0][-1].seq
                writer = start_writer(src, log, 2.0, start_seq=seq, pause=0.01, ckpt_every=0)
            try:
                _, pplan = forget(repo, SecondsWindow(within="1h", seconds=3.0), "app", prune=True, grace=0)
            except LockedError as refusal:
                # only while the replicator takes a base (its lock, its backup's): the next round runs
                assert "replicate app" in refusal.message or "backup app" in refusal.message, refusal
                refused += 1
                time.sleep(0.1)
                continue
            assert pplan is not None
            prunes += 1
            deleted += len(pplan.segments[0].delete)
            merged += pplan.compacted
            superseded += len(pplan.segments[0].superseded)
            assert rep.poll() is None, rep.stderr.read().decode() if rep.stderr else ""
            time.sleep(gap)
        assert writer.wait() == 0
        time.sleep(1.0)  # the last commits shipped
        _wait_unlocked(repo, rep)
        forget(repo, SecondsWindow(within="1h", seconds=3.0), "app", prune=True, grace=0)  # once more, beside it
        time.sleep(0.5)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err

    check_chains(repo)
    ver = subprocess.run(dbre_cmd("verify", "--repo", repo_url), capture_output=True, text=True, timeout=120)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    commits, _ = read_log(log)
    observed, bases = observed_all(repo)
    assert sorted(observed) == list(range(BASE_ROWS + 1, commits[-1].seq + 1))  # one txid per commit, none lost
    lo = read_pruned(repo, "app")
    assert lo is not None
    lo_t = lo.timestamp() + 0.05  # (a commit begun a few ms after the base's time can be in it)
    rng = random.Random(7)
    stamps = [t for t in observed.values() if t > lo_t]
    moments = sorted(rng.sample(stamps, 6) + [rng.uniform(lo_t, commits[-1].after) for _ in range(3)])
    for i, at in enumerate([lo_t, *moments, commits[-1].after + 1.0]):
        out = tmp_path / f"r{i}.db"
        restore_at(repo, "app", utc(at), out)
        top = check_restored(out, commits, observed, bases, at)
        assert at < commits[-1].after or top == commits[-1].seq
        out.unlink()


def _take_exclusive(repo: Repository, timeout: float = 30.0) -> Lock:
    """The exclusive (prune) lock, tried again while the replicator's shared one is live."""
    deadline = time.monotonic() + timeout
    while True:
        lock = Lock(repo.store, "prune", exclusive=True)
        try:
            lock.acquire()
            return lock
        except LockedError:
            assert time.monotonic() < deadline, "the replicator held the repository for 30 s"
            time.sleep(0.05)


def test_a_base_while_prune_holds_the_repository_waits_and_is_never_lost(tmp_path: Path) -> None:
    """The exclusive lock (a prune) is held while (1) the replicator starts: it waits, alive, and
    starts its generation once the lock goes; (2) a periodic base falls due (every 3 segments): it is
    put off and retried, shipping on in the current generation meanwhile. Proves: never exit 1, no
    gap, every commit restores exactly at its stamp."""
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(repo_url)
    first = Lock(repo.store, "prune", exclusive=True)
    first.acquire()
    rep = start_replicator(src, repo_url, interval="200ms",
                           env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "3", "DBRE_REPLICATE_LOCK_RETRY": "0.3"})
    try:
        said = _stderr_until(rep, "waiting to start a generation")  # (1) it found the prune's lock
        time.sleep(1.0)
        assert rep.poll() is None, said
        assert list(repo.store.list("segments/")) == []  # and waits: no generation under a prune
        first.release()
        wait_for_generation(repo_url, proc=rep)
        _wait_unlocked(repo, rep)
        writer = start_writer(src, log, 7.0, start_seq=BASE_ROWS, pause=0.01, ckpt_every=0)
        time.sleep(1.0)
        # (a periodic base may hold the replicator's shared lock right now: a loaded machine saw it
        # in CI; the prune tries again until it has the repository, as --retry-lock does)
        prune_lock = _take_exclusive(repo)
        try:
            gens = len(list_generations(repo, "app"))
            segs = len(list(list_generations(repo, "app").values())[-1])
            time.sleep(3.0)  # (2) bases fall due meanwhile (3 segments = 0.6 s)
            held = list_generations(repo, "app")
            assert len(held) == gens, "a generation started while prune held the repository"
            assert len(list(held.values())[-1]) >= segs + 3  # shipping went on in the current generation
            prune_lock.check_alive("test")  # (the prune's lock stayed its own all along)
        finally:
            prune_lock.release()
        assert writer.wait(timeout=60) == 0
        time.sleep(1.0)
        assert rep.poll() is None, rep.stderr.read().decode() if rep.stderr else ""
        assert len(list_generations(repo, "app")) > gens  # the base put off was taken once it could be
    finally:
        first.release()  # (a second release only stops an already stopped thread)
        code, err = stop_replicator(rep)
    assert code == 0, err
    assert "put off" in err and "new base taken after" in err, err
    check_chains(repo)
    commits, _ = read_log(log)
    observed, bases = observed_all(repo)
    assert sorted(observed) == list(range(BASE_ROWS + 1, commits[-1].seq + 1))
    rng = random.Random(5)
    for i, at in enumerate(sorted(rng.sample(list(observed.values()), 8)) + [commits[-1].after + 1.0]):
        out = tmp_path / f"r{i}.db"
        restore_at(repo, "app", utc(at), out)
        check_restored(out, commits, observed, bases, at)
        out.unlink()


def test_a_replicator_paused_after_its_base_snapshot_starts_no_generation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replicator's repository-lock refreshes hang and it stalls (a paused VM) between its base
    snapshot's commit and the base object, past the lock's limit (shortened to 2 s): another host
    may have pruned by then. Proves: it writes no base object (no generation), raises
    ``LockLostError`` (exit 1: a restart takes a new base), and leaves no lock behind; the
    snapshot it committed is an ordinary one, whole."""
    import dbre.replicate.shipper as shipper_mod
    import dbre.repository.lock as lock_mod
    from dbre.replicate.shipper import Replicator
    from dbre.repository.lock import LockLostError

    monkeypatch.setattr(lock_mod, "STALE_SECONDS", 2.0)
    monkeypatch.setattr(lock_mod, "REFRESH_SECONDS", 0.3)
    monkeypatch.setattr(lock_mod, "SAFETY_SECONDS", 0.5)
    monkeypatch.setenv(lock_mod.STALL_ENV, "replicate")  # the replicator's lock, not its backup's
    real = shipper_mod.backup

    def paused(*a: Any, **kw: Any) -> Any:
        result = real(*a, **kw)  # committed under the backup's own (live) lock
        time.sleep(2.5)  # the pause: the replicator's lock is past its limit when it resumes
        return result

    monkeypatch.setattr(shipper_mod, "backup", paused)
    src = tmp_path / "src.db"
    make_source(src, BASE_ROWS)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    stop, outcome = threading.Event(), dict[str, Any]()

    def run() -> None:
        try:
            outcome["stats"] = Replicator(repo, src, "app", 0.2).run(stop)
        except BaseException as err:  # noqa: BLE001 - judged below
            outcome["error"] = err

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(30)
    stop.set()  # (had it started a generation, it would still be running)
    runner.join(30)
    err = outcome.get("error")
    assert isinstance(err, LockLostError) and "was not started" in err.message, outcome
    assert [k for k in repo.store.list("segments/")] == []
    assert list(repo.store.list("locks/")) == [] and list(repo.store.list("leases/")) == []
    (snap,) = repo.snapshots("app")
    assert snap.stats.get("wal") is not None


class _RefreshWhileRead:
    """A store through which a lock listing reads ``key`` only after ``lock`` was refreshed (its
    object replaced by a new one, as `check_alive` does right before a replicator's base object)."""

    def __init__(self, store: Any, lock: Lock) -> None:
        self._store, self._lock, self._key = store, lock, lock.key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key == self._key and self._lock.key == key:
            self._lock.refresh()  # the listing showed the old object; now only the new one exists
        return bytes(self._store.get_range(key, offset, length))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lock_refreshed_while_prune_lists_the_locks_still_refuses_prune(
        tmp_path: Path, where: str, request: pytest.FixtureRequest) -> None:
    """The replicator's shared lock is refreshed while a prune reads the lock listing: the old object
    it listed is gone when read, the new one was not in the listing. Proves: the prune lists again
    and refuses (before, it skipped the vanished object and took the exclusive lock beside the
    replicator's, right as the replicator wrote its base object)."""
    url = str(tmp_path / "repo") if where == "local" else request.getfixturevalue("s3_repo_url")
    repo = Repository.open_or_init(url)
    with repo.lock("replicate app") as held:
        first = held.key
        prune_lock = Lock(_RefreshWhileRead(repo.store, held), "prune", exclusive=True)  # type: ignore[arg-type]
        with pytest.raises(LockedError, match="locked by replicate app"):
            prune_lock.acquire()
        assert held.key != first and not repo.store.exists(first)  # (it was refreshed mid-listing)
    assert list(repo.store.list("locks/")) == []
