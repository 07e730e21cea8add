"""`dbre restore`'s rails: a target some process uses is refused (a writer in a write transaction, a
reader in a read transaction, a connection merely open; plain, PITR and --follow restores) and left
as it was, -wal and -shm included, and the writer's later commit survives; a target nobody uses is
replaced; --if-db-not-exists and --if-replica-exists exit 0 with one line; a plain restore of a
replicated database gives its newest replicated state, `--snapshot latest` the newest snapshot."""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dbfactory import assert_one_line_error, cli, integrity, query, sqldiff
from tests.replication import (
    dbre_cmd,
    make_source,
    restored_seq,
    start_replicator,
    start_writer,
    stop_replicator,
    wait_for_generation,
)

# A process using the live database: connects (journal mode argv[2]), gets into the state argv[3]
# names (idle: a query done, no transaction; read: a read transaction open; write: a write
# transaction with one row inserted), prints "ready", and on a line from stdin commits (or ends the
# read), inserts one more row in its own transaction, and exits.
HOLDER = r'''
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
c.execute(f"PRAGMA journal_mode={sys.argv[2]}")
c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("INSERT INTO t(v) VALUES ('before')")
state = sys.argv[3]
if state == "read":
    c.execute("BEGIN")
    c.execute("SELECT count(*) FROM t").fetchone()
elif state == "write":
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO t(v) VALUES ('held')")
else:
    c.execute("SELECT count(*) FROM t").fetchone()
print("ready", flush=True)
sys.stdin.readline()
if state in ("read", "write"):
    c.execute("COMMIT")
c.execute("INSERT INTO t(v) VALUES ('after')")
c.close()
print("done", flush=True)
'''


def _live(path: Path, mode: str = "wal") -> None:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"PRAGMA journal_mode={mode}")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    c.execute("INSERT INTO t(v) VALUES ('live')")
    c.close()


def _hold(path: Path, mode: str, state: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode, state], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _release(proc: subprocess.Popen[str]) -> None:
    out, _ = proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0 and out.strip() == "done", out


def _crashed(path: Path) -> None:
    """A WAL database whose last user was killed: its -wal (holding a commit) and -shm left, unlocked."""
    proc = _hold(path, "wal", "idle")
    proc.kill()
    proc.communicate(timeout=30)
    assert Path(f"{path}-wal").stat().st_size > 0 and Path(f"{path}-shm").exists()


def _files(path: Path) -> dict[str, tuple[int, str]]:
    """Each of the database, -wal, -shm and -journal that exists: (inode, sha256)."""
    out = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(str(path) + suffix)
        if p.exists():
            out[suffix] = (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[str, Path]:
    """A repository with one snapshot of ``app`` (a WAL database of 50 rows)."""
    src, repo = tmp_path / "src.db", str(tmp_path / "repo")
    make_source(src, 50)
    r = cli("backup", src, "--repo", repo, "--db", "app")
    assert r.returncode == 0, r
    return repo, src


@pytest.mark.parametrize(("mode", "state", "cause"), [
    ("wal", "write", "holds a write transaction"),
    ("wal", "read", "has a read transaction open"),
    ("wal", "idle", "has it open in WAL mode"),
    ("delete", "write", "holds a write transaction"),
    ("delete", "read", "has a read transaction open"),
    ("delete", "idle", "has live.db open"),
])
def test_a_target_in_use_is_refused_and_left_as_it_was(backed_up: tuple[str, Path], tmp_path: Path, mode: str,
                                                      state: str, cause: str) -> None:
    repo, _ = backed_up
    live = tmp_path / "live.db"
    _live(live, mode)
    holder = _hold(live, mode, state)
    try:
        before = _files(live)
        if mode == "wal":  # the holder's commits sit in its WAL (autocheckpoint off): -wal and -shm are live
            assert {"-wal", "-shm"} <= set(before) and Path(f"{live}-wal").stat().st_size > 0
        r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
        line = assert_one_line_error(r, 1, "in use", cause, f"process {holder.pid}", "stop the application")
        assert str(live) in line
        assert _files(live) == before  # the probe checkpointed nothing, deleted nothing, wrote nothing
        assert not [p.name for p in tmp_path.iterdir() if ".dbre-" in p.name]  # no temp file left
    finally:
        _release(holder)
    rows = [v for (v,) in query(live, "SELECT v FROM t ORDER BY id")]
    assert rows == ["live", "before", *(["held"] if state == "write" else []), "after"]  # its commits survive


def test_a_target_nobody_uses_is_replaced(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    repo, src = backed_up
    live = tmp_path / "live.db"
    _live(live)
    _crashed(live)
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    assert r.returncode == 0, r
    assert "restored snapshot" in r.stdout
    assert not Path(f"{live}-wal").exists() and not Path(f"{live}-shm").exists()
    assert sqldiff(src, live) == "" and integrity(live) == "ok"


def test_if_db_not_exists(backed_up: tuple[str, Path], tmp_path: Path) -> None:
    repo, src = backed_up
    live = tmp_path / "live.db"
    _live(live)
    holder = _hold(live, "wal", "write")  # (in use, even: nothing is probed, nothing touched)
    try:
        before = _files(live)
        for repository in (repo, str(tmp_path / "no-repo")):  # the repository is not even opened
            r = cli("restore", "--repo", repository, "--db", "app", "--to", live, "--if-db-not-exists")
            assert r.returncode == 0, r
            assert r.stdout.strip() == f"{live} already exists: nothing restored (--if-db-not-exists)"
        assert _files(live) == before
    finally:
        _release(holder)
    fresh = tmp_path / "fresh.db"
    r = cli("restore", "--repo", repo, "--db", "app", "--to", fresh, "--if-db-not-exists")
    assert r.returncode == 0 and "restored snapshot" in r.stdout, r
    assert sqldiff(src, fresh) == ""
    r = cli("restore", "--repo", repo, "--db", "app", "--to", fresh, "--if-db-not-exists", "--force")
    assert_one_line_error(r, 2, "--if-db-not-exists and --force")
    r = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "y.db", "--snapshot", "latest", "--at",
            "2026-01-01T00:00:00Z")
    assert_one_line_error(r, 2, "--snapshot and --at")


def test_if_replica_exists(backed_up: tuple[str, Path], tmp_path: Path, s3_repo_url: str) -> None:
    repo, _ = backed_up
    out = tmp_path / "out.db"
    for repository, db in ((repo, "other"), (str(tmp_path / "no-repo"), "app"), (s3_repo_url, "app")):
        r = cli("restore", "--repo", repository, "--db", db, "--to", out, "--if-replica-exists")
        assert r.returncode == 0, r
        assert r.stdout.strip() == f"no snapshot of {db} in {repository}: nothing restored (--if-replica-exists)"
        assert not out.exists()
    # without the flag these are failures, as before
    assert_one_line_error(cli("restore", "--repo", repo, "--db", "other", "--to", out), 2, "no snapshots")
    assert_one_line_error(cli("restore", "--repo", s3_repo_url, "--db", "app", "--to", out), 1, "no repository")
    # with it, a replica that exists is restored
    r = cli("restore", "--repo", repo, "--db", "app", "--to", out, "--if-replica-exists")
    assert r.returncode == 0 and out.exists(), r


def test_plain_restore_of_a_replicated_db_is_its_newest_state(tmp_path: Path) -> None:
    repo, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "w.log"
    make_source(src, 300)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
        assert start_writer(src, log, 1.5, start_seq=300, ckpt_every=100).wait(timeout=60) == 0
    finally:
        code, err = stop_replicator(rep)  # (SIGTERM ships every committed transaction first)
    assert code == 0, err
    newest = tmp_path / "newest.db"
    r = cli("restore", "--repo", repo, "--db", "app", "--to", newest)
    assert r.returncode == 0, r
    assert r.stdout.startswith("restored app the newest replicated state to ") and "last txid " in r.stdout, r
    assert sqldiff(src, newest) == "" and integrity(newest) == "ok"
    count, _, _ = restored_seq(newest)
    assert count > 300  # (the writer's commits, not only the base's rows)
    # the dry run says the same, and --snapshot latest is the newest snapshot (the generation's base)
    r = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "x.db", "--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("would restore the newest replicated state of app (txid "), r
    base = tmp_path / "base.db"
    r = cli("restore", "--repo", repo, "--db", "app", "--to", base, "--snapshot", "latest")
    assert r.returncode == 0 and r.stdout.startswith("restored snapshot "), r
    assert restored_seq(base) == (300, 300, 300)

    # PITR and --follow refuse a target in use as the plain restore does; -wal and -shm stay
    live = tmp_path / "live.db"
    _live(live)
    holder = _hold(live, "wal", "write")
    try:
        before = _files(live)
        for extra in ([], ["--txid", "3"], ["--at", "2099-01-01T00:00:00Z"]):
            r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force", *extra)
            assert_one_line_error(r, 1, "in use", "holds a write transaction")
        follow = subprocess.run(dbre_cmd("restore", "--repo", repo, "--db", "app", "--to", str(live), "--force",
                                         "--follow"), capture_output=True, text=True, timeout=60)
        assert follow.returncode == 1 and "holds a write transaction" in follow.stderr, follow
        assert _files(live) == before
    finally:
        _release(holder)
    assert [v for (v,) in query(live, "SELECT v FROM t ORDER BY id")] == ["live", "before", "held", "after"]

    # a gap in the newest generation: refused (its transactions would be dropped silently), the hint
    # naming --snapshot latest, which restores
    from dbre.replicate.segment import list_generations
    from dbre.repository.repo import Repository

    repository = Repository.open(repo)
    (names,) = list_generations(repository, "app").values()
    assert len(names) >= 3, names
    repository.store.delete(names[len(names) // 2].key)
    r = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "gap.db")
    assert_one_line_error(r, 1, "gap before", "--snapshot latest")
    assert not (tmp_path / "gap.db").exists()
    r = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "gap.db", "--snapshot", "latest")
    assert r.returncode == 0 and restored_seq(tmp_path / "gap.db") == (300, 300, 300), r

    # commits made with no replicator running, then a backup: the snapshot is newer (the gap no longer
    # matters), a plain restore takes it
    c = sqlite3.connect(src, isolation_level=None)
    c.execute("INSERT INTO t(seq, pad) VALUES (1000000, x'00')")
    c.close()
    time.sleep(0.01)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    r = cli("restore", "--repo", repo, "--db", "app", "--to", live, "--force")
    assert r.returncode == 0 and r.stdout.startswith("restored snapshot "), r
    assert sqldiff(src, live) == ""


def test_follow_replaces_an_unused_target_without_its_old_wal(tmp_path: Path) -> None:
    repo, src = str(tmp_path / "repo"), tmp_path / "src.db"
    make_source(src, 100)
    rep = start_replicator(src, repo, interval="200ms")
    try:
        wait_for_generation(repo, proc=rep)
    finally:
        assert stop_replicator(rep)[0] == 0
    live = tmp_path / "live.db"
    _live(live)
    _crashed(live)  # (SQLite would replay its frames into a file renamed beside them)
    old = live.stat().st_ino
    follower = subprocess.Popen(dbre_cmd("restore", "--repo", repo, "--db", "app", "--to", str(live), "--force",
                                         "--follow", "--interval", "200ms"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 30
        while live.stat().st_ino == old:  # (not opened meanwhile: this process would be a user of it)
            assert follower.poll() is None and time.time() < deadline, follower.stderr
            time.sleep(0.1)
        assert not Path(f"{live}-wal").exists()  # (SQLite would replay the old frames into the new file)
        assert restored_seq(live) == (100, 100, 100)
    finally:
        follower.terminate()
        follower.communicate(timeout=30)
    assert follower.returncode == 0


def test_a_process_opening_the_target_after_the_first_look_is_refused(backed_up: tuple[str, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The old database held still (its exclusive lock taken), a process that opened it since the first
    look still refuses the rename: it would go on writing to the replaced file."""
    import dbre.restore.full as full
    from dbre.errors import RestoreError
    from dbre.repository.repo import Repository

    repo, _ = backed_up
    live = tmp_path / "live.db"
    _live(live)
    late: list[subprocess.Popen[str]] = []

    def at(point: str) -> None:
        if point == "held":  # opens the file, no SQLite lock (ours is exclusive): only /proc shows it
            late.append(subprocess.Popen([sys.executable, "-c", "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR)"
                                          "; print('ready', flush=True); sys.stdin.readline()", str(live)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            assert late[0].stdout is not None and late[0].stdout.readline().strip() == "ready"

    repository = Repository.open(repo)
    plan = full.plan_restore(repository, "app", live, force=True)
    monkeypatch.setattr(full, "_crash_point", at)
    before = query(live, "SELECT v FROM t")
    try:
        with pytest.raises(RestoreError) as err:
            full.apply_restore(repository, plan)
        assert late and f"in use: process {late[0].pid} (python" in str(err.value)
        assert "has live.db open" in str(err.value)
    finally:
        for proc in late:
            proc.communicate("go\n", timeout=30)
    assert query(live, "SELECT v FROM t") == before == [("live",)]
    assert not [p.name for p in tmp_path.iterdir() if ".dbre-" in p.name]


def test_plain_restore_on_s3_takes_the_newest_generation(tmp_path: Path, s3_repo_url: str) -> None:
    from dbre.replicate.segment import list_generations
    from dbre.repository.repo import Repository

    src, log, out = tmp_path / "src.db", tmp_path / "w.log", tmp_path / "out.db"
    make_source(src, 200)
    top = 200
    for run in (1, 2):  # two runs of the replicator: the WAL restarted in between, the second starts a generation
        rep = start_replicator(src, s3_repo_url, interval="200ms")
        try:
            wait_for_generation(s3_repo_url, proc=rep)
            deadline = time.time() + 30
            while len(list_generations(Repository.open(s3_repo_url), "app")) < run:
                assert rep.poll() is None and time.time() < deadline, "no new generation"
                time.sleep(0.1)
            assert start_writer(src, log, 1.0, start_seq=top).wait(timeout=60) == 0
            time.sleep(0.3)
        finally:
            code, err = stop_replicator(rep)
        assert code == 0, err
        c = sqlite3.connect(src, isolation_level=None)
        top = c.execute("SELECT max(seq) FROM t").fetchone()[0]
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
    gens = list_generations(Repository.open(s3_repo_url), "app")
    newest = list(gens.values())[-1]
    assert len(gens) >= 2 and newest, {g: len(n) for g, n in gens.items()}
    r = cli("restore", "--repo", s3_repo_url, "--db", "app", "--to", out)
    assert r.returncode == 0 and r.stdout.startswith(f"restored app the newest replicated state to {out}: "), r
    assert f"(last txid {newest[-1].last}, committed " in r.stdout
    assert sqldiff(src, out) == "" and integrity(out) == "ok"
