"""Review of prune beside a live replicator (e5406fb, 749f1ac, e7024f2): paused hosts, two
replicators, forged leases, prune and compaction beside the replicator; real writer and
`dbre replicate` subprocesses on local repositories.

A host paused with its clocks stopped is stood in for by SIGSTOP plus the store's clock moved on:
the lease's object is given a modification time 20 minutes back (the local store judges by mtime),
which is what every other host sees after such a pause, while the paused process's own clocks saw
only the seconds of the SIGSTOP. An attacker with write access and no key is stood in for by
writing the lease object the way the store would hold it (plain JSON, as the format has it).
Preconditions of the set-up raise ``RuntimeError``; only the properties under review assert, so a
strict xfail fails on anything but the finding itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from dbre.replicate.lease import live_generation
from dbre.replicate.segment import list_generations
from dbre.repository.keep import KeepPolicy
from dbre.repository.repo import Repository
from dbre.repository.retention import forget
from tests.replication import (
    check_chains,
    dbre_cmd,
    make_source,
    read_log,
    restore_at,
    restored_seq,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 300
PAUSE = 20 * 60.0  # the store's clock moves on this much while the host is paused


def _need(cond: object, what: str) -> None:
    if not cond:
        raise RuntimeError(f"set-up: {what}")


def _until(cond: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not cond():  # type: ignore[operator]
        if time.time() > deadline:
            raise RuntimeError(f"set-up: timed out waiting for {what}")
        time.sleep(0.05)


def _leases(repo: Repository) -> dict[str, dict[str, object]]:
    out = {}
    for key in repo.store.list("leases/app/"):
        try:
            out[key] = json.loads(repo.store.get(key))
        except Exception:  # noqa: BLE001 - released meanwhile
            continue
    return out


def _named(repo: Repository) -> str:
    """The generation the (only) lease names, once it names one."""
    got: list[str] = []

    def ready() -> bool:
        named = [str(r["generation"]) for r in _leases(repo).values() if r.get("generation")]
        got[:] = named
        return len(named) == 1

    _until(ready, "the lease to name its generation")
    return got[0]


def _age(repo_dir: Path, key: str, seconds: float) -> None:
    """The store's clock: ``key`` last written ``seconds`` ago (its mtime, as LocalStore judges)."""
    t = time.time() - seconds
    os.utime(repo_dir / key, (t, t))


def _store_now(repo: Repository) -> float:
    with repo.lock("review probe") as probe:
        return probe.store_now()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def _keep_last_1() -> KeepPolicy:
    return KeepPolicy(last=1)


# -- 1. a paused replicator whose lease was taken over and given back ------------------------------


def test_a_paused_replicator_resumed_after_a_takeover_loses_no_commit(tmp_path: Path) -> None:
    """A ships (200 ms interval) while a writer commits for 12 s. A is paused (SIGSTOP; the store's
    clock moves on 20 min: its lease is stale to every other host). B starts on the same database
    (a standby's systemd, an operator): it takes the stale lease over, as it must, ships and starts
    newer generations (a base every 3 segments), then is stopped cleanly (its lease released). A
    resumes. Proves: A ships nothing into its old generation once a newer one exists (no restore
    would ever read it), and if it runs on, every commit restores at the end: it either stops
    (exit 1, naming its lease as gone; the lease is not written again) or its commits reach the
    newest generation. (Its polling loop sees the stop, so the lease is renewed, by the store's
    clock, before the next segment.)"""
    repo_dir, src, log = tmp_path / "repo", tmp_path / "src.db", tmp_path / "writer.log"
    repo_url = str(repo_dir)
    make_source(src, BASE_ROWS)
    a = start_replicator(src, repo_url, interval="200ms")
    b: subprocess.Popen[bytes] | None = None
    writer: subprocess.Popen[bytes] | None = None
    try:
        wait_for_generation(repo_url, timeout=90, proc=a)
        repo = Repository.open(repo_url)
        gen_a = _named(repo)
        writer = start_writer(src, log, 12.0, start_seq=BASE_ROWS, pause=0.01, ckpt_every=0)
        time.sleep(1.5)
        a.send_signal(signal.SIGSTOP)  # the pause
        time.sleep(0.3)
        (lease_a,) = _leases(repo)
        _age(repo_dir, lease_a, PAUSE)
        _need(live_generation(repo.store, "app", _store_now(repo)) is None, "A's lease is stale to others")

        b = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "3"})
        _until(lambda: len(list_generations(repo, "app")) >= 3, "B to start newer generations", 90)
        code, err = stop_replicator(b)
        _need(code == 0, f"B exits 0: {err}")
        _need(list(repo.store.list("leases/app/")) == ["leases/app/stopped"], "B released its lease")

        a.send_signal(signal.SIGCONT)  # A resumes: its own clocks saw a few seconds
        _need(writer.wait(timeout=60) == 0, "the writer")
        time.sleep(2.0)  # the last commits shipped (by A, if it ships)
        a_alive = a.poll() is None
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
        if b is not None and b.poll() is None:
            b.kill()
        if a.poll() is None:
            a.send_signal(signal.SIGCONT)
            code_a, err_a = stop_replicator(a)
        else:
            code_a, err_a = a.returncode, (a.stderr.read().decode() if a.stderr else "")

    commits, _ = read_log(log)
    gens = list_generations(repo, "app")
    newest = list(gens)[-1]
    # A's segments in its old generation after a newer one's base: no restore ever reads them
    behind = [n for n in gens.get(gen_a, []) if n.last_us > int(newest[:16], 16)]
    out = tmp_path / "latest.db"
    restore_at(repo, "app", utc(commits[-1].after + 1.0), out)
    _, top, _ = restored_seq(out)
    assert a_alive or (code_a == 1 and "is gone" in err_a and "not written again" in err_a), (code_a, err_a[-500:])
    assert not behind and (not a_alive or top == commits[-1].seq), (
        f"{len(behind)} segments shipped by A into {gen_a} after the base of {newest} ({len(gens)} generations); "
        f"restore at the end holds seq {top} of {commits[-1].seq}; A alive to the end: {a_alive}, exit {code_a}; "
        f"{err_a[-300:]}")


# -- 2. a forged lease at a higher epoch --------------------------------------------------------------


def _plant_stale_lease(repo: Repository, repo_dir: Path, skip: int, generation: str | None) -> str:
    """Write access, no key: a lease object ``skip`` epochs past the newest, left to go stale
    (written once; 2 minutes later by the store's clock)."""
    epochs = sorted(int(k.rsplit("/", 1)[1], 16) for k in repo.store.list("leases/app/"))
    key = f"leases/app/{epochs[-1] + skip:016x}"
    record: dict[str, object] = {"op": "replicate app", "host": "elsewhere", "pid": 1,
                                 "created": "2026-01-01T00:00:00Z"}
    if generation is not None:
        record["generation"] = generation
    repo.store.put(key, json.dumps(record).encode())
    _age(repo_dir, key, 300.0)
    return key


def test_a_planted_stale_lease_above_the_live_one_hides_no_replicator(tmp_path: Path) -> None:
    """A replicates; a stale lease object is planted at A's epoch + 2. Proves: prune's view
    (``live_generation``, which judges every lease listed) still names A's generation, and a second
    `dbre replicate` of the same database refuses (one replicator per database: any live lease
    refuses) instead of running beside A."""
    repo_dir, src = tmp_path / "repo", tmp_path / "src.db"
    repo_url = str(repo_dir)
    make_source(src, BASE_ROWS)
    a = start_replicator(src, repo_url, interval="200ms")
    b: subprocess.Popen[bytes] | None = None
    try:
        wait_for_generation(repo_url, timeout=90, proc=a)
        repo = Repository.open(repo_url)
        gen_a = _named(repo)
        _plant_stale_lease(repo, repo_dir, 2, None)
        seen = live_generation(repo.store, "app", _store_now(repo))
        b = start_replicator(src, repo_url, interval="200ms")
        try:
            b.wait(timeout=8)
        except subprocess.TimeoutExpired:
            pass
        b_running = b.poll() is None
        _need(a.poll() is None, "A still runs")
        assert seen == gen_a and not b_running, (
            f"with a stale lease planted above A's, prune sees live generation {seen!r} (A ships into "
            f"{gen_a!r}), and a second replicator {'runs beside A' if b_running else 'exited'}")
    finally:
        if b is not None and b.poll() is None:
            b.kill()
            b.wait()
        code, err = stop_replicator(a)
    _need(code in (0, 1), err)


def test_a_planted_lease_naming_an_old_generation_never_gets_the_live_one_deleted(tmp_path: Path) -> None:
    """Write access, no key: a lease at A's epoch + 1, kept fresh, naming the oldest generation (or
    a made-up one). Proves: A notices the takeover and stops shipping (exit 1, "took over"), and a
    forget --prune (keep-last 1, grace 0) keeps the newest generation and its base snapshot: the
    forged name can keep old data (cost), never get the live data deleted; the chain verifies and
    the last shipped commit restores."""
    repo_dir, src, log = tmp_path / "repo", tmp_path / "src.db", tmp_path / "writer.log"
    repo_url = str(repo_dir)
    make_source(src, BASE_ROWS)
    a = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "4"})
    try:
        wait_for_generation(repo_url, timeout=90, proc=a)
        repo = Repository.open(repo_url)
        seq, began = BASE_ROWS, time.time()
        while len(list_generations(repo, "app")) < 3:  # 1 s writer runs until A started 3 generations
            _need(time.time() - began < 60 and a.poll() is None, "A starts generations")
            writer = start_writer(src, log, 1.0, start_seq=seq, pause=0.01, ckpt_every=0)
            _need(writer.wait(timeout=60) == 0, "the writer")
            seq = read_log(log)[0][-1].seq
        time.sleep(1.0)
        gens = list(list_generations(repo, "app"))
        _plant_stale_lease(repo, repo_dir, 1, "0" * 16 + "-made-up")
        (forged,) = [k for k in repo.store.list("leases/app/") if not k.endswith(f"{0:016x}")]
        _age(repo_dir, forged, 0.0)  # kept fresh by the attacker
        code, err = a.wait(timeout=90), (a.stderr.read().decode() if a.stderr else "")
    finally:
        _kill(a)
    assert code == 1 and "took over" in err, (code, err[-500:])
    newest = gens[-1]
    _, pplan = forget(repo, _keep_last_1(), "app", prune=True, grace=0)
    assert pplan is not None
    left = list(list_generations(repo, "app"))
    assert newest in left, (newest, left)
    check_chains(repo)
    commits, _ = read_log(log)
    out = tmp_path / "latest.db"
    restore_at(repo, "app", utc(commits[-1].after + 1.0), out)
    assert restored_seq(out)[1] == commits[-1].seq


# -- 3. prune beside a paused replicator whose lease is stale ---------------------------------------


def test_prune_beside_a_paused_replicator_with_a_stale_lease_keeps_what_it_ships_into(tmp_path: Path) -> None:
    """A ships (a base every 4 segments) while a writer commits; A is paused (SIGSTOP, 1.5 s at least,
    its lease 20 min old by the store's clock: prune sees no live replicator). forget --prune with keep-last 1
    and grace 0, compaction of every 2 segments, runs meanwhile. A resumes, the writer commits on.
    Proves: prune still keeps A's generation and its base snapshot (it is the newest: the window
    needs it, lease or none); A, resumed, ships nothing more (its lease went stale by the store's
    clock, another replicator may have taken it: it renews the lease before the next segment, finds
    the gap, and stops, exit 1, naming the store's clock); the chain verifies, `dbre verify` passes,
    and every commit A shipped restores at the end."""
    from tests.test_replicate_prune_live import observed_all

    repo_dir, src, log = tmp_path / "repo", tmp_path / "src.db", tmp_path / "writer.log"
    repo_url = str(repo_dir)
    make_source(src, BASE_ROWS)
    a = start_replicator(src, repo_url, interval="200ms", env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "4"})
    try:
        wait_for_generation(repo_url, timeout=90, proc=a)
        repo = Repository.open(repo_url)
        writer = start_writer(src, log, 6.0, start_seq=BASE_ROWS, pause=0.01, ckpt_every=0)
        time.sleep(2.5)
        for _ in range(100):  # paused between bases (paused during one, it stops at its base: exit 1)
            paused_at = time.time()
            a.send_signal(signal.SIGSTOP)
            time.sleep(0.3)
            # nor in the middle of a put: prune's --grace 0 empties .tmp, and the put would fail for that
            # (test_storage_contract: one clear line) before the lease check this test is about
            tmp = repo_dir / ".tmp"
            if not list(repo.store.list("locks/")) and not (tmp.is_dir() and any(tmp.iterdir())):
                break
            a.send_signal(signal.SIGCONT)
            time.sleep(0.05)
        _need(not list(repo.store.list("locks/")), "A paused between two bases, no put under way")
        for key in repo.store.list("leases/app/"):
            _age(repo_dir, key, PAUSE)
        _need(live_generation(repo.store, "app", _store_now(repo)) is None, "A's lease is stale to others")
        gen_a = list(list_generations(repo, "app"))[-1]
        _, pplan = forget(repo, _keep_last_1(), "app", prune=True, grace=0)
        _need(pplan is not None and pplan.segments[0].delete, "prune deleted older generations")
        assert gen_a in list_generations(repo, "app")
        assert any(m.id == read_base_snapshot(repo, gen_a) for m in repo.snapshots("app"))
        # a pause its own clocks saw (SIGSTOP): over SUSPECT_SECONDS, the lease is renewed before the
        # next segment (one they did not see is found at the next periodic renewal, within 20 s)
        time.sleep(max(0.0, paused_at + 1.5 - time.time()))
        a.send_signal(signal.SIGCONT)
        _need(writer.wait(timeout=60) == 0, "the writer")
        time.sleep(1.5)
    finally:
        a.send_signal(signal.SIGCONT)
        code, err = stop_replicator(a)
    assert code == 1 and "by the store's clock the lease" in err, err
    after = [n for n in list_generations(repo, "app")[gen_a] if n.last_us > (paused_at + 0.25) * 1e6]
    assert not after, f"{len(after)} segments shipped by A after it resumed on a stale lease"
    check_chains(repo)
    ver = subprocess.run(dbre_cmd("verify", "--repo", repo_url), capture_output=True, text=True, timeout=60)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    observed, _ = observed_all(repo)
    commits, _ = read_log(log)
    out = tmp_path / "latest.db"
    restore_at(repo, "app", utc(commits[-1].after + 1.0), out)
    # every commit A shipped restores; more when A, resumed, took a periodic base snapshot (a backup
    # under the repository lock, consistent and complete) before its lease check stopped it: the
    # restore then takes that newer snapshot (seen under 3 loaded xdist workers: 656 rows over 505)
    assert restored_seq(out)[1] >= max(observed)


def read_base_snapshot(repo: Repository, gen_id: str) -> str:
    from dbre.replicate.segment import read_base

    return read_base(repo, "app", gen_id).snapshot


# -- 4. kill -9 of prune mid-compaction, beside the live replicator ------------------------------

PRUNE = r'''
import functools, os, signal, sys
import dbre.replicate.compact as c
from dbre.repository.keep import KeepPolicy
from dbre.repository.repo import Repository
from dbre.repository.retention import forget
from dbre.storage.local import LocalStore
c.compact_segments = functools.partial(c.compact_segments, older_than=0.3, group=2)
mode, n = sys.argv[2], int(sys.argv[3])
if mode == "merge":  # kill -9 right after the n-th merged segment is written (its small ones all left)
    put, done = c.write_segment, [0]
    def write(*a, **k):
        out = put(*a, **k)
        done[0] += 1
        if done[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    c.write_segment = write
elif mode == "delete":  # kill -9 right after the n-th segment object deleted (smalls, a generation)
    delete, gone = LocalStore.delete, [0]
    def remove(self, key):
        delete(self, key)
        if key.startswith("segments/"):
            gone[0] += 1
            if gone[0] >= n:
                os.kill(os.getpid(), signal.SIGKILL)
    LocalStore.delete = remove
forget(Repository.open(sys.argv[1]), KeepPolicy(last=1), "app", prune=True, grace=0)
'''


def test_prune_killed_at_any_instant_beside_a_live_replicator_loses_nothing(tmp_path: Path) -> None:
    """A ships (200 ms interval, a base every 8 segments) while a writer commits; forget --prune
    (keep-last 1, grace 0; compaction of every 2 segments older than 0.3 s) runs as a process killed
    -9 mid-way, again and again (right after a merged segment is written, its small ones all left;
    right after the 1st-3rd segment object it deletes: small ones half deleted, a generation half
    deleted; its lock left behind each time), then once to the
    end. Proves: the replicator never fails (exit 0), every generation left chains from its base,
    `dbre verify` passes, and every commit from the pruned marker on restores exactly at its stamp."""
    import random
    import sys

    from dbre.replicate.window import read_pruned
    from tests.test_replicate_prune_live import check_restored, observed_all

    repo_dir, src, log = tmp_path / "repo", tmp_path / "src.db", tmp_path / "writer.log"
    repo_url = str(repo_dir)
    make_source(src, BASE_ROWS)
    a = start_replicator(src, repo_url, interval="200ms",
                         env={"DBRE_REPLICATE_GENERATION_SEGMENTS": "8", "DBRE_REPLICATE_LOCK_RETRY": "0.3"})
    rng = random.Random(11)
    kills, finished = {"merge": 0, "delete": 0}, 0
    try:
        wait_for_generation(repo_url, timeout=90, proc=a)
        repo = Repository.open(repo_url)
        seq, began = BASE_ROWS, time.time()
        writer = start_writer(src, log, 1.0, start_seq=seq, pause=0.01, ckpt_every=0)
        time.sleep(1.5)
        while time.time() - began < 8 or min(kills.values()) < 2:  # 1 s writer runs, one after the other
            _need(time.time() - began < 60, f"prunes killed mid-way: {kills} (finished {finished})")
            if writer.poll() is not None:
                _need(writer.returncode == 0, "the writer")
                seq = read_log(log)[0][-1].seq
                writer = start_writer(src, log, 1.0, start_seq=seq, pause=0.01, ckpt_every=0)
            mode = rng.choice(sorted(kills))
            prune = subprocess.run([sys.executable, "-c", PRUNE, repo_url, mode, str(rng.randint(1, 3))],
                                   capture_output=True, text=True, timeout=120)
            if prune.returncode == -signal.SIGKILL:
                kills[mode] += 1
            else:  # done (nothing of that kind to do), or refused while a base was taken
                _need(prune.returncode == 0 or "locked by" in prune.stderr, prune.stderr[-300:])
                finished += 1
            _need(a.poll() is None, "A runs")
        _need(writer.wait(timeout=60) == 0, "the writer")
        time.sleep(1.5)
        for _ in range(20):  # once to the end (refused only while a base is taken)
            done = subprocess.run([sys.executable, "-c", PRUNE, repo_url, "none", "0"], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode == 0:
                break
            _need("locked by" in done.stderr, done.stderr[-300:])
            time.sleep(0.2)
        _need(done.returncode == 0, "a prune ran to the end")
        time.sleep(0.5)
    finally:
        code, err = stop_replicator(a)
    assert code == 0, err
    check_chains(repo)
    ver = subprocess.run(dbre_cmd("verify", "--repo", repo_url), capture_output=True, text=True, timeout=120)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    commits, _ = read_log(log)
    observed, bases = observed_all(repo)
    assert max(observed) == commits[-1].seq
    lo = read_pruned(repo, "app")
    _need(lo is not None, "prune deleted generations")
    assert lo is not None
    stamps = sorted(t for q, t in observed.items() if t > lo.timestamp() + 0.05)
    for i, at in enumerate([*rng.sample(stamps, min(5, len(stamps))), commits[-1].after + 1.0]):
        out = tmp_path / f"k{i}.db"
        restore_at(repo, "app", utc(at), out)
        check_restored(out, commits, observed, bases, at)
        out.unlink()


# -- 5. the lock listing's retries (749f1ac) --------------------------------------------------------


class _RefreshOnEveryRead:
    """A store through which every read of ``lock``'s current object finds it just refreshed (its
    object replaced by a new one, not in the listing being read)."""

    def __init__(self, store: object, lock: object) -> None:
        self._store, self._lock = store, lock

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key == self._lock.key:  # type: ignore[attr-defined]
            self._lock.refresh()  # type: ignore[attr-defined]
        return bytes(self._store.get_range(key, offset, length))  # type: ignore[attr-defined]


def test_prune_never_takes_the_repository_on_a_listing_missing_a_live_lock(tmp_path: Path) -> None:
    """A replicator's shared lock is refreshed during every listing a prune reads. Proves: the prune
    refuses (``LockedError``, naming the listings) after its retries instead of judging a listing
    that misses the live lock, and leaves no lock of its own behind."""
    from dbre.errors import LockedError
    from dbre.repository.lock import Lock

    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with repo.lock("replicate app") as held:
        prune = Lock(_RefreshOnEveryRead(repo.store, held), "prune", exclusive=True)  # type: ignore[arg-type]
        try:
            prune.acquire()
        except LockedError as err:
            assert "changed while listed" in err.message, err.message
            assert [k for k in repo.store.list("locks/")] == [held.key]
            return
        prune.release()
        raise AssertionError("prune took the exclusive lock beside the replicator's live one")
