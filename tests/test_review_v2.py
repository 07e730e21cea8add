"""Review of format v2 (issue 9): reproductions of the findings, each failing on the code it was
written against. Each test is marked ``xfail(strict=True)`` until the lead fixes the finding (then
the marker goes). Real parts only: local directories, the moto S3 server, real subprocesses and
real SIGKILL; each test takes seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

import dbre.repository.backup as backup_mod
from dbre.repository.backup import backup
from dbre.repository.lock import Lock
from dbre.repository.manifest import now_utc
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage.local import LocalStore
from tests.dbfactory import change_rows, cli, dbre_env, make_db, pack_files, query

V1 = Path(__file__).parent / "data" / "v1"
ROOT = Path(__file__).resolve().parent.parent
COUNT = "SELECT count(*), sum(n) FROM items"


def _run_cli(args: list[str | Path], *, preamble: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`dbre ARGS` as a real process; ``preamble`` runs first (resource limits, crash hooks)."""
    code = f"import sys\n{preamble}\nsys.argv = ['dbre'] + sys.argv[1:]\nfrom dbre.cli import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=dbre_env(), cwd=ROOT, timeout=timeout)


# -- finding 1: a paused VM's boot clock does not advance; check_alive trusts it -------------------


def test_check_alive_refuses_once_the_store_clock_says_the_lock_is_stale(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo")
    Repository.open_or_init(store)
    mine = Lock(store, "backup app")
    mine.acquire()
    try:
        # A VM paused for 20 minutes: the store's clock went on, this host's clocks (boot clock
        # included, under kvmclock) did not. Seen from the store, our lock object is 20 min old.
        # (Equivalent: move the object's store time 20 min back instead of the store's "now" on.)
        path = store.root / mine.key
        then = time.time() - 20 * 60
        os.utime(path, (then, then))
        # another host now judges the lock stale, by the store's clock, and may prune
        other = Lock(store, "forget", exclusive=True)
        other.acquire()
        other.release()
        # ... so this run must not commit anything
        with pytest.raises(Exception, match="lock"):
            mine.check_alive("backup of app")
    finally:
        mine.release()


# -- finding 2: taken_at is the backup host's wall clock; hosts 10 min apart reorder history ------


def test_clock_skew_between_backup_hosts_does_not_make_older_data_the_newest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = make_db(tmp_path / "app.db", mb=0.3)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    # host A (clock 10 min fast) backs up first: every clock of this host that dbre could read
    # is 10 min fast (the wall clock as SQLite, Python and the manifest helpers see it)
    fast = timedelta(minutes=10)
    with monkeypatch.context() as mp:
        mp.setattr(backup_mod, "now_utc", lambda: now_utc() + fast, raising=False)
        mp.setattr("dbre.repository.manifest.now_utc", lambda: now_utc() + fast)
        backup(repo, LocalFileSource(db), "app")
    before = query(db, COUNT)
    # the application commits; then host B (correct clock) backs up the newer state
    change_rows(db, 50, seed=7)
    after = query(db, COUNT)
    assert after != before
    backup(Repository.open(str(tmp_path / "repo")), LocalFileSource(db), "app")
    # restore "the newest snapshot" must give the newest data
    out = tmp_path / "restored.db"
    fresh = Repository.open(str(tmp_path / "repo"))
    apply_restore(fresh, plan_restore(fresh, "app", out))
    assert query(out, COUNT) == after


# -- finding 3: one lost pack blocks every later snapshot from reaching the offsite copy ----------


def test_copy_sends_healthy_snapshots_when_an_old_one_lost_a_pack(tmp_path: Path, s3_repo_url: str) -> None:
    db = make_db(tmp_path / "app.db", mb=0.3)
    src_dir = tmp_path / "repo"
    src = Repository.open_or_init(str(src_dir))
    first = backup(src, LocalFileSource(db), "app").manifest
    for pack in first.packs:
        (src_dir / "packs" / pack[:2] / pack).unlink()  # the lost pack
    change_rows(db, 20, seed=3)
    second = backup(Repository.open(str(src_dir)), LocalFileSource(db), "app").manifest  # stores pages again
    assert not set(second.packs) & set(first.packs)
    result = cli("copy", "--repo", src_dir, "--to", s3_repo_url)
    dst = Repository.open(s3_repo_url)
    assert second.id in {m.id for m in dst.snapshots("app")}, result


# -- finding 4: migrate cannot get past one damaged format-1 snapshot ------------------------------


def test_migrate_carries_the_healthy_snapshots_past_a_damaged_one(tmp_path: Path) -> None:
    repo_dir = tmp_path / "v1"
    shutil.copytree(V1 / "plain", repo_dir)
    src = Repository.open(str(repo_dir))
    oldest, newest = src.snapshots("app")
    key = repo_dir / "snapshots" / "app" / oldest.id
    raw = bytearray(key.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # bit rot in the older snapshot's manifest
    key.write_bytes(bytes(raw))
    # the newest snapshot still restores from format 1
    ok = tmp_path / "ok.db"
    apply_restore(src, plan_restore(src, "app", ok, snapshot=newest.id))
    # the v1 repository refuses forget, so migrate is the only way forward
    refused = cli("forget", "--repo", repo_dir, "--keep-last", "1")
    assert refused.returncode != 0 and "format 1" in refused.stderr
    r = cli("migrate", "--repo", repo_dir, "--to", tmp_path / "v2")
    dst = Repository.open(str(tmp_path / "v2"))
    migrated = {m.stats["migrated_from"]["id"] for m in dst.snapshots("app")}
    assert newest.id in migrated
    # the damaged one is named, one line, and the exit code says not everything was migrated
    assert r.returncode == 1 and oldest.id in r.stderr and "Traceback" not in r.stderr, r


# -- finding 5: objects are read whole, whatever their size ----------------------------------------


def test_an_oversized_planted_lock_object_gives_a_clear_error_not_memory_exhaustion(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=0.2)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    # an attacker with write access plants a 4 GiB object under locks/ (sparse here: costs nothing)
    with open(repo_dir / "locks" / "0123456789abcdef", "wb") as f:
        f.truncate(4 << 30)
    # the process may use 1.5 GiB of address space (a small VM, or a container's limit)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29))"
    r = _run_cli(["backup", db, "--repo", repo_dir, "--db", "app"], preamble=limit)
    assert "MemoryError" not in r.stderr, r.stderr
    assert r.returncode == 0 or "locks/0123456789abcdef" in r.stderr, r.stderr


# -- finding 6: `dbre snapshots --last` crashes on a stray name ------------------------------------


def test_snapshots_last_with_a_stray_object_is_one_clear_line(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=0.2)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    (repo_dir / "snapshots" / "app" / ".DS_Store").write_bytes(b"\0")  # a desktop's stray file
    r = cli("snapshots", "--repo", repo_dir, "--db", "app", "--last", "1")
    assert "unexpected error" not in r.stderr, r.stderr
    assert ".DS_Store" in r.stderr


# -- finding 7: a restore killed mid-way leaves a database-sized temp file nobody removes ---------


def test_restore_killed_leaves_nothing_the_next_restore_does_not_clean(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=1)
    repo_dir = tmp_path / "repo"
    assert cli("backup", db, "--repo", repo_dir, "--db", "app").returncode == 0
    target_dir = tmp_path / "srv"
    target_dir.mkdir()
    target = target_dir / "app.db"
    shutil.copy(db, target)
    # kill -9 at the instant the restored file is complete, before it replaces the target
    hook = ("import os, signal, dbre.restore.full as F\n"
            "F._crash_point = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == 'held' else None")
    r = _run_cli(["restore", "--repo", repo_dir, "--db", "app", "--to", target, "--force"], preamble=hook)
    assert r.returncode == -signal.SIGKILL
    assert [p.name for p in target_dir.iterdir() if "dbre-restore" in p.name]  # the killed run's temp file
    # the operator runs it again; it succeeds, and nothing is left for anyone to clean by hand
    assert cli("restore", "--repo", repo_dir, "--db", "app", "--to", target, "--force").returncode == 0
    assert [p.name for p in target_dir.iterdir()] == ["app.db"]


def test_pack_files_helper_sees_packs(tmp_path: Path) -> None:
    """(sanity for the helpers above: not a finding)"""
    db = make_db(tmp_path / "app.db", mb=0.1)
    assert cli("backup", db, "--repo", tmp_path / "repo", "--db", "app").returncode == 0
    assert pack_files(tmp_path / "repo")
