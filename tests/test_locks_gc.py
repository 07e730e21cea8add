"""Locks and garbage collection: staleness by the store's clock, a writer that lost its lock commits
nothing, prune's grace period, and forget/prune that stop at the first thing they cannot read.

Every storage case runs on a local directory and on a real S3 server (moto_server). On S3 an
object's LastModified cannot be set, so those cases shorten the stale limit and wait instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import IntegrityError, LockedError
from dbre.repository import lock as lock_mod
from dbre.repository.backup import backup
from dbre.repository.copy import copy_snapshots, plan_copy
from dbre.repository.keep import KeepPolicy
from dbre.repository.lock import Lock, LockLostError, hold, list_locks, remove_locks, this_process
from dbre.repository.repo import Repository, pack_key
from dbre.repository.retention import forget, prune
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage import PermanentError, Store
from tests.dbfactory import assert_one_line_error, assert_same_db, change_rows, cli, make_db


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A repository URL of each backend: a local path, and s3://<fresh bucket>/repo."""
    if request.param == "local":
        return str(tmp_path / "repo")
    return str(request.getfixturevalue("s3_repo_url"))


def is_local(url: str) -> bool:
    return not url.startswith("s3://")


def short_limits(monkeypatch: pytest.MonkeyPatch, stale: float, refresh: float, safety: float) -> None:
    monkeypatch.setattr(lock_mod, "STALE_SECONDS", stale)
    monkeypatch.setattr(lock_mod, "REFRESH_SECONDS", refresh)
    monkeypatch.setattr(lock_mod, "SAFETY_SECONDS", safety)


def put_lock(store: Store, name: str, **fields: Any) -> str:
    """A lock record written by hand, as another run would have written it."""
    record = {"op": "prune", "exclusive": True, "host": "elsewhere", "pid": 4242,
              "created": "2026-01-01T00:00:00Z", "time": time.time(), **fields}
    key = f"locks/{name}"
    store.put(key, json.dumps(record).encode())
    return key


def age_object(url: str, key: str, seconds: float) -> None:
    """Make a local object look written ``seconds`` ago by the store's clock (its mtime)."""
    path = Path(url) / key
    then = time.time() - seconds
    os.utime(path, (then, then))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def snapshot_keys(repo: Repository) -> set[str]:
    return set(repo.store.list("snapshots/"))


def all_keys(repo: Repository) -> set[str]:
    return {k for k in repo.store.list("") if not k.startswith("locks/")}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_db(tmp_path / "src.db", mb=0.3, journal="delete")


# --------------------------------------------------------------------------- staleness by the store's clock


@pytest.mark.parametrize("skew", [3600.0, -3600.0])
def test_wall_clock_field_never_makes_a_lock_stale(repo_url: str, skew: float) -> None:
    """A lock written a moment ago by a host whose clock is an hour off is live."""
    repo = Repository.open_or_init(repo_url)
    put_lock(repo.store, "skewed", time=time.time() + skew,
             created="2020-01-01T00:00:00Z" if skew < 0 else "2030-01-01T00:00:00Z")
    with pytest.raises(LockedError, match="locked by prune on elsewhere"):
        with repo.lock("backup app"):
            pass
    assert remove_locks(repo.store) == 0  # `dbre unlock` leaves it too
    assert [i.key for i in list_locks(repo.store)] == ["locks/skewed"]


def test_lock_not_rewritten_for_the_stale_limit_is_stale(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale is judged by the object's last write on the store's clock, though its "time" field is fresh."""
    repo = Repository.open_or_init(repo_url)
    if not is_local(repo_url):
        short_limits(monkeypatch, stale=2.0, refresh=60.0, safety=0.5)
    key = put_lock(repo.store, "silent", time=time.time() + 30)
    with pytest.raises(LockedError):
        with repo.lock("backup app"):
            pass
    if is_local(repo_url):
        age_object(repo_url, key, lock_mod.STALE_SECONDS + 60)
    else:
        time.sleep(lock_mod.STALE_SECONDS + 1.5)  # LastModified counts whole seconds
    with repo.lock("prune", exclusive=True) as held:
        assert held.key != key
    assert remove_locks(repo.store) == 1
    assert list_locks(repo.store) == []


def test_pid_check_only_within_one_pid_namespace_and_boot(repo_url: str) -> None:
    repo = Repository.open_or_init(repo_url)
    me = this_process()
    dead = dead_pid()
    # same hostname, dead pid, but another pid namespace (another container): live until its time runs out
    put_lock(repo.store, "other-ns", host=me["host"], boot_id=me["boot_id"], pid_ns=(me["pid_ns"] or 0) + 1, pid=dead)
    # a record without the namespace fields (an older dbre) is judged by time only
    put_lock(repo.store, "no-ns", host=me["host"], pid=dead)
    with pytest.raises(LockedError):
        with repo.lock("backup app"):
            pass
    repo.store.delete("locks/other-ns")
    with pytest.raises(LockedError):
        with repo.lock("backup app"):
            pass
    repo.store.delete("locks/no-ns")
    # same host, boot and pid namespace, dead pid: stale at once
    put_lock(repo.store, "same-ns", **{**me, "pid": dead})
    with repo.lock("prune", exclusive=True):
        pass
    # ... but a live pid there is live
    put_lock(repo.store, "alive", **{**me, "pid": os.getppid()})
    with pytest.raises(LockedError):
        with repo.lock("backup app"):
            pass
    assert remove_locks(repo.store) == 1  # the dead one
    assert [i.key for i in list_locks(repo.store)] == ["locks/alive"]


# --------------------------------------------------------------------------- the holder's side


def test_refreshed_lock_stays_live_and_its_thread_is_joined(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    short_limits(monkeypatch, stale=2.0, refresh=0.3, safety=0.5)
    repo = Repository.open_or_init(repo_url)
    with repo.lock("backup app") as held:
        first = held.key
        time.sleep(3.5)  # longer than the stale limit: only the refreshes keep it live
        assert held.key != first  # each refresh is a new object; the old one is gone
        # (a refresh under way, every 0.3 s, lists its old object until it deletes it: on a loaded
        # machine that moment was caught once, [old, new]; the listing settles on the one held)
        deadline = time.time() + 5
        while (keys := [i.key for i in list_locks(repo.store)]) != [held.key] and time.time() < deadline:
            time.sleep(0.05)
        assert keys == [held.key]
        held.check_alive("backup of app")
        with pytest.raises(LockedError, match="backup app"):
            with Repository.open(repo_url).lock("prune", exclusive=True):
                pass
        thread = held._thread
    assert thread is not None and not thread.is_alive()
    assert list_locks(repo.store) == []


def test_stalled_refresh_makes_check_alive_refuse(repo_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    short_limits(monkeypatch, stale=2.0, refresh=0.3, safety=0.5)
    monkeypatch.setenv(lock_mod.STALL_ENV, "backup")
    repo = Repository.open_or_init(repo_url)
    with repo.lock("backup app") as held:
        held.check_alive("backup of app")  # fresh
        time.sleep(1.7)
        with pytest.raises(LockLostError) as err:
            held.check_alive("backup of app", hint="run the backup again")
        thread = held._thread
    msg = str(err.value)
    # check_alive refreshes first: the store's clock shows the gap (or, when that refresh fails
    # too, the boot clock shows the age)
    assert ("backup of app: by the store's clock the repository lock went " in msg
            and "past what another host tolerates (1.5 s)" in msg) or (
        "backup of app: the repository lock was last refreshed " in msg
        and (" of the stale limit (2.0 s)" in msg or "longer than the stale limit (2.0 s)" in msg)), msg
    assert "nothing was committed" in msg and "run the backup again" in msg and "\n" not in msg
    assert thread is not None and not thread.is_alive()  # stopped and joined, though it hung
    assert list_locks(repo.store) == []


def test_lock_removed_by_unlock_is_lost_and_never_written_again(repo_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    short_limits(monkeypatch, stale=60.0, refresh=30.0, safety=5.0)  # refreshes by hand below
    repo = Repository.open_or_init(repo_url)
    with repo.lock("backup app") as held:
        held.refresh()  # a refresh while the lock is there: a new object replaces it
        assert [i.key for i in list_locks(repo.store)] == [held.key]
        assert remove_locks(Repository.open(repo_url).store, all_locks=True) == 1  # `dbre unlock --remove-all`
        held.refresh()  # finds it gone: lost, and the lock is not written again
        assert list_locks(repo.store) == []
        with pytest.raises(LockLostError, match="removed by another run"):
            held.check_alive("backup of app")
    with repo.lock("backup app") as held:
        remove_locks(Repository.open(repo_url).store, all_locks=True)
        with pytest.raises(LockLostError, match="removed by another run"):
            held.check_alive("backup of app")  # noticed at the commit, not only at the next refresh


# --------------------------------------------------------------------------- the reported loss


@contextmanager
def pause_before_commit(monkeypatch: pytest.MonkeyPatch, repo: Repository, meanwhile: Any) -> Iterator[None]:
    """Run ``meanwhile()`` once, right before the first ``check_alive`` of a lock taken on ``repo``:
    the moment a backup has uploaded all its packs and is about to commit."""
    real = repo.lock

    @contextmanager
    def lock(op: str, *, exclusive: bool = False) -> Iterator[Lock]:
        with real(op, exclusive=exclusive) as held:
            check = held.check_alive

            def check_alive(what: str, **kw: Any) -> None:
                meanwhile()
                check(what, **kw)

            monkeypatch.setattr(held, "check_alive", check_alive)
            yield held

    monkeypatch.setattr(repo, "lock", lock)
    yield
    monkeypatch.setattr(repo, "lock", real)


def test_backup_whose_lock_stalled_commits_nothing_and_prune_keeps_its_packs(
        repo_url: str, src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup's refreshes hang; prune on another host finds its lock stale and runs; the backup
    must then abort, its packs must survive (grace), and the repository must verify clean."""
    repo = Repository.open_or_init(repo_url)
    backup(repo, LocalFileSource(src))
    change_rows(src, 50)
    short_limits(monkeypatch, stale=2.0, refresh=0.3, safety=0.5)
    monkeypatch.setenv(lock_mod.STALL_ENV, "backup")
    before_packs = repo.pack_ids()
    before_snaps = snapshot_keys(repo)
    seen: dict[str, Any] = {}

    def other_host_prunes() -> None:
        if seen:
            return
        seen["new_packs"] = repo.pack_ids() - before_packs
        time.sleep(lock_mod.STALE_SECONDS + 1.5)  # the stalled lock goes stale by the store's clock
        other = Repository.open(repo_url)
        seen["plan"] = prune(other)  # takes its exclusive lock: the backup's no longer counts

    with pause_before_commit(monkeypatch, repo, other_host_prunes):
        with pytest.raises(LockLostError) as err:
            backup(repo, LocalFileSource(src))
    assert ("backup of src: the repository lock was last refreshed" in str(err.value)
            or "backup of src: by the store's clock the repository lock went" in str(err.value)), err.value
    assert "another host may have pruned — nothing was committed" in str(err.value)
    assert err.value.hint == "run the backup again"
    new_packs = seen["new_packs"]
    assert new_packs, "the stalled backup uploaded packs before its commit"
    plan = seen["plan"]
    assert plan.unused_packs == [] and plan.grace_kept == len(new_packs)
    assert repo.pack_ids() == before_packs | new_packs  # the grace period kept every one
    assert snapshot_keys(repo) == before_snaps  # nothing committed
    assert list_locks(repo.store) == []
    report = verify(Repository.open(repo_url), read_data=True)
    assert report.ok, report.problems

    monkeypatch.delenv(lock_mod.STALL_ENV)
    result = backup(Repository.open(repo_url), LocalFileSource(src))
    fresh = Repository.open(repo_url)
    assert verify(fresh, read_data=True).ok
    plan_r = plan_restore(fresh, "src", tmp_path / "out.db", snapshot=result.manifest.id)
    apply_restore(fresh, plan_r)
    assert_same_db(src, tmp_path / "out.db")


# --------------------------------------------------------------------------- prune's grace period


def test_prune_grace_period_by_store_clock(repo_url: str, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = Repository.open_or_init(repo_url)
    backup(repo, LocalFileSource(src))
    replace_db(src)
    backup(repo, LocalFileSource(src))
    plan, pruned = forget(repo, KeepPolicy(last=1), "src", prune=True)
    assert len(plan.remove) == 1 and pruned is not None
    assert pruned.unused_packs == [] and pruned.grace_kept > 0  # unused, but written moments ago
    unused = pruned.grace_kept
    packs = repo.pack_ids()
    if is_local(repo_url):
        for pack in packs:
            age_object(repo_url, pack_key(pack), 3 * 3600)  # older than the default 2 h
        again = prune(repo, dry_run=True)
        assert (len(again.unused_packs), again.grace_kept) == (unused, 0)
        assert repo.pack_ids() == packs  # a dry run deletes nothing
        done = prune(repo)
    else:
        time.sleep(2.5)
        assert prune(repo, grace=3600).grace_kept == unused
        done = prune(repo, grace=1.0)
    assert len(done.unused_packs) == unused and done.grace_kept == 0
    assert repo.pack_ids() == packs - set(done.unused_packs)
    assert verify(Repository.open(repo_url), read_data=True).ok


def test_cli_forget_prune_shows_the_grace_period(repo_url: str, src: Path) -> None:
    assert cli("backup", src, "--repo", repo_url).returncode == 0
    replace_db(src)
    assert cli("backup", src, "--repo", repo_url).returncode == 0
    r = cli("forget", "--repo", repo_url, "--keep-last", "1", "--prune", "--dry-run")
    assert r.returncode == 0, r
    assert "prune: would delete 0 unused packs" in r.stdout and "younger than the grace period (2h)" in r.stdout
    r = cli("forget", "--repo", repo_url, "--keep-last", "1", "--prune", "--grace", "0", "--json")
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    assert out["prune"]["delete_packs"] > 0 and out["prune"]["grace_kept_packs"] == 0
    assert out["prune"]["grace_seconds"] == 0
    bad = cli("forget", "--repo", repo_url, "--keep-last", "1", "--prune", "--grace", "2m")
    assert_one_line_error(bad, 2, "--grace", "not a duration")


# --------------------------------------------------------------------------- nothing concluded from a failed read


class FailingListStore:
    """A store whose listing of ``prefix`` fails after its first key (a request that broke mid-way)."""

    def __init__(self, store: Store, prefix: str) -> None:
        self.store = store
        self.url = store.url
        self.prefix = prefix

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def list(self, prefix: str = "", **kw: Any) -> Iterator[str]:
        for i, key in enumerate(self.store.list(prefix, **kw)):
            if prefix.startswith(self.prefix) and i >= 1:
                raise PermanentError(f"list {prefix}: AccessDenied")
            yield key


def replace_db(src: Path) -> None:
    """Every page of src changes: the packs of its earlier snapshots hold nothing the next one uses."""
    src.unlink()
    make_db(src, mb=0.3, journal="delete", seed=7, page_size=8192)  # pages are deduplicated by hash


def orphaned(repo_url: str, src: Path) -> Repository:
    """Two snapshots of src (sharing no pack) plus one of "other"."""
    repo = Repository.open_or_init(repo_url)
    backup(repo, LocalFileSource(src))
    other = make_db(src.parent / "other.db", mb=0.1, journal="delete", seed=3, page_size=16384)
    backup(repo, LocalFileSource(other))
    replace_db(src)
    backup(repo, LocalFileSource(src))
    return repo


def test_unreadable_snapshots_folder_aborts_prune(tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "repo")
    repo = orphaned(url, src)
    before = all_keys(repo)
    blocked = str(Path(url) / "snapshots" / "src")
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        # LocalStore walks folders by descriptor (no link followed): name the folder behind it
        named = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)
        if named == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermanentError, match="prune: list snapshots/.*no pack was deleted"):
        prune(repo, grace=0)
    with pytest.raises(PermanentError, match="forget: list snapshots/.*no snapshot was forgotten"):
        forget(repo, KeepPolicy(last=1), prune=True, grace=0)
    r = cli("forget", "--repo", url, "--keep-last", "1", "--prune", "--grace", "0")
    assert_one_line_error(r, 1, "list snapshots/", "permission denied")
    monkeypatch.setattr(os, "scandir", real)
    assert all_keys(repo) == before
    assert prune(repo, grace=0).unused_packs == []  # readable again: nothing unused but the lost snapshot's


def test_failed_listing_aborts_prune(repo_url: str, src: Path) -> None:
    repo = orphaned(repo_url, src)
    before = all_keys(repo)
    failing = Repository.open(FailingListStore(repo.store, "snapshots/"))  # type: ignore[arg-type]
    with pytest.raises(PermanentError, match="prune: list snapshots/: AccessDenied; no pack was deleted"):
        prune(failing, grace=0)
    with pytest.raises(PermanentError, match="forget: list snapshots/"):
        forget(failing, KeepPolicy(last=1), "src", prune=True, grace=0)
    assert all_keys(repo) == before


def test_damaged_manifest_aborts_forget_and_prune(repo_url: str, src: Path) -> None:
    repo = orphaned(repo_url, src)
    victim = sorted(repo.store.list("snapshots/other/"))[0]
    repo.store.put(victim, b"\x03 not a manifest")
    before = all_keys(Repository.open(repo_url))
    with pytest.raises(IntegrityError, match=f"prune: {victim}.*no pack was deleted"):
        prune(Repository.open(repo_url), grace=0)
    with pytest.raises(IntegrityError, match=f"forget: {victim}.*no snapshot was forgotten"):
        forget(Repository.open(repo_url), KeepPolicy(last=1), prune=True, grace=0)
    r = cli("forget", "--repo", repo_url, "--keep-last", "1", "--prune", "--grace", "0")
    assert_one_line_error(r, 1, victim, "offsite copy", "delete that object")  # the way out, named
    assert all_keys(Repository.open(repo_url)) == before


# --------------------------------------------------------------------------- who locks what, when


def test_forget_plans_and_applies_under_one_exclusive_lock(repo_url: str, src: Path) -> None:
    repo = orphaned(repo_url, src)
    before = snapshot_keys(repo)
    with Repository.open(repo_url).lock("backup src"):  # a backup is running
        with pytest.raises(LockedError, match="locked by backup src"):
            forget(repo, KeepPolicy(last=1))
        plan, _ = forget(repo, KeepPolicy(last=1), dry_run=True)  # a dry run shares
        assert len(plan.remove) == 1
    assert snapshot_keys(repo) == before
    held: list[list[str]] = []
    real = repo.snapshots

    def snapshots(*a: Any, **kw: Any) -> Any:
        held.append([str(i.record.get("op")) for i in list_locks(repo.store) if i.exclusive])
        return real(*a, **kw)

    repo.snapshots = snapshots  # type: ignore[method-assign]
    plan, pruned = forget(repo, KeepPolicy(last=1), prune=True, grace=0)
    assert held and all(ops == ["forget"] for ops in held)  # planned, then pruned, under the one lock
    assert len(plan.remove) == 1 and pruned is not None and pruned.unused_packs
    assert len(snapshot_keys(repo)) == len(before) - 1


def test_copy_plans_under_its_locks(repo_url: str, src: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    repo = orphaned(repo_url, src)
    dst = Repository.init_copy_of(repo, str(tmp_path / "offsite"), None)
    seen: list[tuple[list[Any], list[Any]]] = []

    def spying_plan(s: Repository, d: Repository, db: str | None = None) -> Any:
        seen.append(([i.record["op"] for i in list_locks(s.store)], [i.record["op"] for i in list_locks(d.store)]))
        return plan_copy(s, d, db)

    monkeypatch.setattr("dbre.repository.copy.plan_copy", spying_plan)
    plan, copied = copy_snapshots(repo, dst)
    assert seen == [(["copy (source)"], ["copy"])]
    assert len(plan.snapshots) == 3 and copied > 0
    assert verify(dst, read_data=True).ok
    with hold(dst.store, "prune", exclusive=True):
        with pytest.raises(LockedError, match="locked by prune"):
            copy_snapshots(repo, dst)


def test_whole_restore_holds_a_shared_lock(repo_url: str, src: Path, tmp_path: Path) -> None:
    repo = Repository.open_or_init(repo_url)
    backup(repo, LocalFileSource(src))
    ops: list[list[Any]] = []
    plan = plan_restore(repo, "src", tmp_path / "out.db")
    apply_restore(repo, plan, lambda done, total: ops.append([i.record["op"] for i in list_locks(repo.store)]))
    assert ops and all(o == ["restore src"] for o in ops)
    assert list_locks(repo.store) == []
    with hold(repo.store, "prune", exclusive=True):
        with pytest.raises(LockedError, match="locked by prune"):
            apply_restore(repo, plan_restore(repo, "src", tmp_path / "out2.db"))
    assert not (tmp_path / "out2.db").exists()


def test_cli_unlock_by_the_new_rule(repo_url: str, src: Path) -> None:
    assert cli("backup", src, "--repo", repo_url).returncode == 0
    repo = Repository.open(repo_url)
    me = this_process()
    put_lock(repo.store, "dead", **{**me, "pid": dead_pid()})
    put_lock(repo.store, "live-elsewhere", time=0.0)  # wall-clock field says 1970: ignored
    r = cli("unlock", "--repo", repo_url)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines[0] == "removed 1 locks", r
    # the lock it keeps is named, with what removes it (a cold tester found `removed 0 locks` and no word of it)
    assert lines[1].startswith("kept: prune on elsewhere") and "--remove-all" in lines[2], r
    assert [i.key for i in list_locks(repo.store)] == ["locks/live-elsewhere"]
    r = cli("backup", src, "--repo", repo_url)
    assert_one_line_error(r, 1, "locked by prune on elsewhere", "dbre unlock")
    r = cli("unlock", "--repo", repo_url, "--remove-all")
    assert r.returncode == 0 and r.stdout.strip() == "removed 1 locks", r
    assert list_locks(repo.store) == []


def test_lock_lost_error_is_one_cli_line(tmp_path: Path, src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI prints LockLostError on one line with exit 1 (a backup that lost its lock mid-run)."""
    url = str(tmp_path / "repo")
    assert cli("backup", src, "--repo", url).returncode == 0
    real_hold = lock_mod.hold

    @contextmanager
    def losing(store: Store, op: str, *, exclusive: bool = False) -> Iterator[Lock]:
        with real_hold(store, op, exclusive=exclusive) as held:
            if op.startswith("backup"):
                held._lost = True  # as a refresh does when it finds the object gone
            yield held

    monkeypatch.setattr("dbre.repository.repo.hold_lock", losing)
    r = cli("backup", src, "--repo", url)
    assert_one_line_error(r, 1, "backup of src", "lock was removed", "nothing was committed", "run the backup again")

