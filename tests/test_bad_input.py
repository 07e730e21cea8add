"""Bad input and damaged repositories: one line on stderr naming cause and fix, the right exit
code, no traceback, and the repository and the source left exactly as they were.

Every case runs the real `dbre` process (python -m dbre.cli) and compares a sha256 of every file
of the repository and of the source before and after.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbre.repository.lock import this_process
from dbre.repository.repo import Repository
from tests.dbfactory import (
    CliResult,
    assert_one_line_error,
    cli,
    dbre_env,
    integrity,
    make_db,
    pack_files,
    run_dbre,
    snapshot_files,
    tree_hashes,
)


@dataclass
class World:
    tmp: Path
    src: Path
    repo: Path
    snap_id: str
    taken_at: str

    @contextmanager
    def unchanged(self, *extra: Path) -> Iterator[None]:
        """Assert that the repository, the source and ``extra`` files are the same afterwards."""
        before = tree_hashes(self.repo, self.src, *extra)
        yield
        assert tree_hashes(self.repo, self.src, *extra) == before

    def leftovers(self, folder: Path | None = None) -> list[str]:
        """Restore temp files left in a folder (there must never be any)."""
        return [p.name for p in (folder or self.tmp).iterdir() if "dbre-restore" in p.name]


@pytest.fixture
def world(tmp_path: Path) -> World:
    src = make_db(tmp_path / "src.db", mb=0.5, journal="delete")
    repo = tmp_path / "repo"
    result = cli("backup", src, "--repo", repo, "--json")
    assert result.returncode == 0, result
    snap = json.loads(result.stdout)
    return World(tmp_path, src, repo, snap["id"], snap["taken_at"])


def restore_args(w: World, target: Path, *more: str) -> list[str | Path]:
    return ["restore", "--repo", w.repo, "--db", "src", "--to", target, *more]


# --------------------------------------------------------------------------- sources


def test_missing_source(world: World) -> None:
    with world.unchanged():
        r = run_dbre("backup", world.tmp / "nosuch.db", "--repo", world.repo)
    assert_one_line_error(r, 1, "nosuch.db", "no such file", "check the path")


def test_a_database_gone_with_its_wal_left_says_so(world: World) -> None:
    """The file deleted (or moved) while its -wal stays: commits may live only in that WAL, so the
    error names it and says not to delete it; the WAL is left byte for byte."""
    db = world.tmp / "gone.db"
    leave = ("import sqlite3, os, sys\n"
             "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
             "c.execute('PRAGMA journal_mode=WAL'); c.execute('CREATE TABLE t(x)')\n"
             "c.execute('INSERT INTO t VALUES (1)')\n"
             "os._exit(0)\n")  # (no close: the last connection's close would checkpoint the WAL away)
    subprocess.run([sys.executable, "-c", leave, str(db)], check=True, timeout=60)
    wal = Path(f"{db}-wal")
    held = wal.read_bytes()
    assert held
    db.unlink()
    with world.unchanged():
        r = run_dbre("backup", db, "--repo", world.repo)
    assert_one_line_error(r, 1, "gone.db: no such file", "gone.db-wal", "moved or deleted", "do not delete")
    assert wal.read_bytes() == held
    wal.write_bytes(b"")  # an empty WAL holds nothing: the plain message
    assert_one_line_error(run_dbre("backup", db, "--repo", world.repo), 1, "no such file", "check the path")


def test_failed_backup_creates_no_repository(world: World) -> None:
    fresh = world.tmp / "fresh-repo"
    r = cli("backup", world.tmp / "nosuch.db", "--repo", fresh)
    assert_one_line_error(r, 1, "no such file")
    assert not fresh.exists()


def test_not_a_sqlite_file(world: World) -> None:
    text = world.tmp / "notes.db"
    text.write_text("these are not the pages you are looking for\n" * 100)
    with world.unchanged(text):
        r = cli("backup", text, "--repo", world.repo)
    assert_one_line_error(r, 1, "not a SQLite database", "give the path of a SQLite")


def test_damaged_sqlite_file(world: World) -> None:
    fake = world.tmp / "fake.db"
    fake.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    with world.unchanged(fake):
        r = cli("backup", fake, "--repo", world.repo)
    assert_one_line_error(r, 1, "fake", "not a database")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_server(world: World) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    with world.unchanged():
        started = time.monotonic()
        r = run_dbre("backup", url, "--repo", world.repo, "--db", "remote", env={"DBRE_CACHE_DIR": str(world.tmp)})
        elapsed = time.monotonic() - started
    assert_one_line_error(r, 1, url, "reach", "server is up")
    assert elapsed < 30


# --------------------------------------------------------------------------- keys


def test_wrong_encryption_key(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=0.3, journal="delete")
    repo = tmp_path / "repo"
    assert cli("backup", src, "--repo", repo, env={"DBRE_ENCRYPTION_KEY": "right one"}).returncode == 0
    target = tmp_path / "out.db"
    before = tree_hashes(repo, src)
    commands: list[list[str | Path]] = [
        ["restore", "--repo", repo, "--db", "src", "--to", target], ["backup", src, "--repo", repo],
        ["verify", "--repo", repo], ["forget", "--repo", repo, "--keep-last", "1", "--prune"],
    ]
    for args in commands:
        r = (run_dbre if args[0] == "restore" else cli)(*args, env={"DBRE_ENCRYPTION_KEY": "wrong one"})
        assert_one_line_error(r, 1, "wrong encryption key", "DBRE_ENCRYPTION_KEY")
        assert "wrong one" not in r.stderr + r.stdout
    key_file = tmp_path / "key"
    key_file.write_text("")
    r = cli("restore", "--repo", repo, "--db", "src", "--to", target, "--key-file", key_file)
    assert_one_line_error(r, 2, "empty")
    r = cli("restore", "--repo", repo, "--db", "src", "--to", target, "--key-file", tmp_path / "nokey")
    assert_one_line_error(r, 2, "key file", "--key-file")
    assert tree_hashes(repo, src) == before
    assert not target.exists()


# --------------------------------------------------------------------------- damaged repositories


def flip_middle(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("blank", ["", "  \n"])
def test_an_empty_encryption_key_is_refused_not_a_plain_repository(tmp_path: Path, blank: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """DBRE_ENCRYPTION_KEY set but empty (a secret that failed to load) must not create a repository
    without encryption, nor open one: one line, exit 2, nothing written; the Prefect tasks' key
    resolution refuses it the same way. Found by a cold tester: `init` made a plain repository."""
    from dbre.errors import UsageError
    from tasks.secrets import resolve_key

    src = make_db(tmp_path / "src.db", mb=0.1)
    repo = tmp_path / "repo"
    for args in (["init", "--repo", repo], ["backup", src, "--repo", repo]):
        r = cli(*args, env={"DBRE_ENCRYPTION_KEY": blank})
        assert_one_line_error(r, 2, "DBRE_ENCRYPTION_KEY is set but empty")
    assert not repo.exists()
    monkeypatch.setenv("DBRE_ENCRYPTION_KEY", blank)
    with pytest.raises(UsageError, match="set but empty"):
        resolve_key(None)


def test_corrupted_pack(world: World) -> None:
    pack = max(pack_files(world.repo), key=lambda p: p.stat().st_size)
    flip_middle(pack)
    target = world.tmp / "out.db"
    with world.unchanged():
        quick = cli("verify", "--repo", world.repo)  # without --read-data the pack is not read
        full = cli("verify", "--repo", world.repo, "--read-data")
        r = run_dbre(*restore_args(world, target))
    assert quick.returncode == 0, quick
    assert full.returncode == 1, full
    assert pack.name in full.stderr and "DAMAGED" in full.stderr
    assert "Traceback" not in full.stderr + full.stdout
    assert full.stdout.startswith("1 problem: ")
    line = assert_one_line_error(r, 1)
    assert pack.name in line, line
    assert not target.exists() and not world.leftovers()


def test_corrupted_pack_with_force_keeps_target(world: World) -> None:
    flip_middle(max(pack_files(world.repo), key=lambda p: p.stat().st_size))
    target = world.tmp / "existing.db"
    target.write_bytes(b"precious")
    with world.unchanged(target):
        r = cli(*restore_args(world, target, "--force"))
    assert_one_line_error(r, 1)
    assert not world.leftovers()


def test_missing_pack(world: World) -> None:
    pack = pack_files(world.repo)[0]
    pack.unlink()
    with world.unchanged():
        r = cli("verify", "--repo", world.repo)
        rj = cli("verify", "--repo", world.repo, "--json")
    assert r.returncode == 1, r
    assert pack.name in r.stderr and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    report = json.loads(rj.stdout)
    assert rj.returncode == 1 and not report["ok"]
    assert any(pack.name in p["object"] and "missing" in p["detail"] for p in report["problems"])
    target = world.tmp / "out.db"
    with world.unchanged():
        restore = cli(*restore_args(world, target))
    assert_one_line_error(restore, 1, pack.name, "dbre verify", "--fallback")  # (the way on, named)
    assert not target.exists() and not world.leftovers()


def test_truncated_manifest(world: World) -> None:
    manifest = snapshot_files(world.repo)[0]
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    target = world.tmp / "out.db"
    with world.unchanged():
        listed = cli("snapshots", "--repo", world.repo)
        verified = cli("verify", "--repo", world.repo)
        restored = cli(*restore_args(world, target))
    assert_one_line_error(listed, 1, manifest.name)
    assert verified.returncode == 1 and manifest.name in verified.stderr, verified
    assert "Traceback" not in verified.stderr
    assert_one_line_error(restored, 1, manifest.name)
    assert not target.exists()


def test_damaged_manifest_does_not_block_the_others(world: World) -> None:
    """One damaged manifest must not keep a restore by id of another snapshot from working."""
    second = cli("backup", world.src, "--repo", world.repo, "--json")
    assert second.returncode == 0, second
    (damaged,) = (world.repo / "snapshots" / "src").glob(f"*-{world.snap_id}")  # format 2: <time>-<id>
    damaged.write_bytes(damaged.read_bytes()[:40])
    target = world.tmp / "out.db"
    r = run_dbre(*restore_args(world, target, "--snapshot", json.loads(second.stdout)["id"]))
    assert r.returncode == 0, r
    assert integrity(target) == "ok"
    # asking for the damaged one by id names it
    r = cli(*restore_args(world, world.tmp / "bad.db", "--snapshot", world.snap_id[:6]))
    assert_one_line_error(r, 1, world.snap_id)
    assert not (world.tmp / "bad.db").exists()


def test_a_planted_snapshot_name_out_of_range_is_named_not_a_crash(world: World) -> None:
    """A file named like a format-2 snapshot whose time lies past year 9999 (someone with write
    access, or a stray copy): each command says in one line which file it is, instead of an
    OverflowError; backup still runs (with a note), the other snapshots still list and restore."""
    planted = world.repo / "snapshots" / "src" / f"{0:016x}-{'a' * 16}"  # sorts first: the "newest"
    planted.write_bytes(b"")
    backed = cli("backup", world.src, "--repo", world.repo, "--json")
    assert backed.returncode == 0 and planted.name in backed.stdout + backed.stderr, backed
    listed = cli("snapshots", "--repo", world.repo)
    assert world.snap_id in listed.stdout and "OverflowError" not in listed.stderr + listed.stdout, listed
    for r in (cli(*restore_args(world, world.tmp / "out.db")), cli("forget", "--repo", world.repo, "--keep-last", "1")):
        assert_one_line_error(r, 1, planted.name)
        assert "not a snapshot name" in r.stderr and "OverflowError" not in r.stderr, r
    verified = cli("verify", "--repo", world.repo)  # (a report: one DAMAGED line for it)
    assert verified.returncode == 1 and f"DAMAGED snapshots/src/{planted.name}" in verified.stderr, verified
    assert "not a snapshot name" in verified.stderr and "OverflowError" not in verified.stderr, verified
    ok = cli(*restore_args(world, world.tmp / "old.db", "--snapshot", world.snap_id))
    assert ok.returncode == 0 and integrity(world.tmp / "old.db") == "ok", ok


def test_a_config_from_another_repository_stops_backups_and_verify_says_so(world: World) -> None:
    """Someone (or a bad restore of the folder) puts another repository's config in place: every
    manifest fails to open. A backup must not add a full snapshot on top (no one could restore it
    with the right config): refused in one line, nothing written; verify says the config is the
    likely cause. With the right config back, everything verifies. Found by a cold tester."""
    assert cli("backup", world.src, "--repo", world.repo).returncode == 0  # two manifests
    other = world.tmp / "other"
    assert cli("backup", make_db(world.tmp / "o.db", mb=0.1), "--repo", other).returncode == 0
    mine = (world.repo / "config").read_bytes()
    (world.repo / "config").write_bytes((other / "config").read_bytes())
    with world.unchanged():
        r = cli("backup", world.src, "--repo", world.repo)
        assert_one_line_error(r, 1, "no snapshot manifest", "opens", "config")
        verified = cli("verify", "--repo", world.repo)
    assert verified.returncode == 1 and "no snapshot manifest opens (2 tried)" in verified.stdout, verified
    (world.repo / "config").write_bytes(mine)
    assert cli("verify", "--repo", world.repo).returncode == 0


def test_the_only_manifest_damaged_the_next_backup_starts_again(world: World) -> None:
    """One manifest, damaged, and no other in the repository: the backup cannot tell a swapped config
    from that damage, and goes on with a full snapshot (the history starts again), saying what it
    skipped."""
    (manifest,) = snapshot_files(world.repo)
    manifest.write_bytes(manifest.read_bytes()[:40])
    r = cli("backup", world.src, "--repo", world.repo, "--json")
    assert r.returncode == 0 and manifest.name in r.stdout, r
    assert json.loads(r.stdout)["parent"] is None


def test_a_repository_without_its_config_says_so_to_every_command(world: World) -> None:
    """config deleted (or never copied back): verify, snapshots and restore say the repository holds
    data but no config and how to get it back, instead of "no repository at" (found by a cold
    tester); restore --if-replica-exists does not call it "no replica"."""
    (world.repo / "config").unlink()
    with world.unchanged():
        for args in (["verify", "--repo", world.repo], ["snapshots", "--repo", world.repo],
                     restore_args(world, world.tmp / "out.db"),
                     restore_args(world, world.tmp / "out.db", "--if-replica-exists")):
            assert_one_line_error(cli(*args), 1, "holds data but no config", "offsite copy")
    assert not (world.tmp / "out.db").exists()


def test_a_rollback_source_held_by_a_writer_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rollback-mode database under another process's exclusive lock past the busy timeout: the backup
    fails saying a writer held it and to run again, not "check that the source is a healthy database"
    (a cold tester's finding); nothing is stored."""
    import dbre.sources.local as local_mod
    from dbre.errors import SourceError
    from dbre.repository.backup import backup
    from dbre.sources.local import LocalFileSource

    src = make_db(tmp_path / "src.db", mb=0.1, journal="delete")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    monkeypatch.setattr(local_mod, "BUSY_TIMEOUT", 1.0)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(src)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); c.execute('CREATE TABLE held(x)')\n"
        "print('held', flush=True); time.sleep(30)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SourceError, match="stayed locked by a writer") as err:
            backup(repo, LocalFileSource(str(src)), "src")
        assert "run the backup again" in (err.value.hint or "")
    finally:
        holder.kill()
        holder.wait()
    assert repo.list_snapshot_refs("src") == []


def test_a_damaged_record_hides_no_other(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """One record altered in the repository (an audit, a drill): `dbre audit` still lists the others,
    shows that one as DAMAGED and says so on stderr (exit 0); the drill history and status read the rest
    with a warning. A cold tester's damaged audit record made `dbre audit` fail outright."""
    import logging

    repo = Repository.open(str(world.repo))
    for kind in ("audits", "drills"):
        for i in range(2):
            repo.put_record(kind, "src", {"operation": "restore-table", "time": f"2026-12-02T0{i}:00:00Z", "n": i})
    victim = sorted((world.repo / "records" / "audits" / "src").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    drill = sorted((world.repo / "records" / "drills" / "src").iterdir())[1]
    drill.write_bytes(b"\x01 planted")
    r = cli("audit", "--repo", world.repo)
    assert r.returncode == 0 and "DAMAGED" in r.stdout and victim.name in r.stdout, r
    assert "1 audit records could not be read" in r.stderr and "Traceback" not in r.stderr, r
    with caplog.at_level(logging.WARNING):
        assert [rec["n"] for rec in Repository.open(str(world.repo)).records("drills", "src")] == [0]
    assert any(drill.name in m and "skipped" in m for m in caplog.messages), caplog.messages


def test_damaged_config(world: World) -> None:
    (world.repo / "config").write_text("{not json")
    with world.unchanged():
        r = cli("snapshots", "--repo", world.repo)
    assert_one_line_error(r, 1, "config", "damaged")


def test_newer_format_version(world: World) -> None:
    config = json.loads((world.repo / "config").read_text())
    config["version"] = 99
    (world.repo / "config").write_text(json.dumps(config))
    with world.unchanged():
        for args in (["snapshots", "--repo", world.repo], ["backup", world.src, "--repo", world.repo],
                     restore_args(world, world.tmp / "out.db"), ["verify", "--repo", world.repo],
                     ["forget", "--repo", world.repo, "--keep-last", "1", "--prune"]):
            r = cli(*args)
            assert_one_line_error(r, 1, "version 99", "upgrade dbre")
    assert not (world.tmp / "out.db").exists()


def test_no_repository(world: World) -> None:
    nowhere = world.tmp / "nowhere"
    r = cli("snapshots", "--repo", nowhere)
    assert_one_line_error(r, 1, "no repository", "--repo")
    assert not nowhere.exists()


# --------------------------------------------------------------------------- bad options


def test_unknown_database(world: World) -> None:
    cli("backup", world.src, "--repo", world.repo, "--db", "other")
    with world.unchanged():
        r = cli("restore", "--repo", world.repo, "--db", "nosuch", "--to", world.tmp / "out.db")
    line = assert_one_line_error(r, 2, "nosuch", "known databases")
    assert "src" in line and "other" in line
    r = cli("restore", "--repo", world.repo, "--db", "../evil", "--to", world.tmp / "out.db")
    assert_one_line_error(r, 2, "not allowed")


@pytest.mark.parametrize("when", ["yesterday", "2026-13-45", "12:00 tomorrow", ""])
def test_unparseable_at(world: World, when: str) -> None:
    with world.unchanged():
        r = cli(*restore_args(world, world.tmp / "out.db", "--at", when))
    if when == "":
        # an empty --at (an unset shell variable) is refused: it meant the newest snapshot, the state an
        # on-call restoring "before the incident" least wants (changed 2026-12-02 after a cold tester's finding)
        assert_one_line_error(r, 2, "--at is empty")
    else:
        assert_one_line_error(r, 2, "cannot parse time", "ISO-8601")
    assert not (world.tmp / "out.db").exists()


def test_at_before_first_backup(world: World) -> None:
    with world.unchanged():
        r = cli(*restore_args(world, world.tmp / "out.db", "--at", "2001-01-01T00:00:00Z"))
    assert_one_line_error(r, 2, "before the first snapshot", world.taken_at[:10])


def test_snapshot_and_at_together(world: World) -> None:
    with world.unchanged():
        r = cli(*restore_args(world, world.tmp / "out.db", "--snapshot", world.snap_id, "--at",
                                   world.taken_at))
    assert_one_line_error(r, 2, "--snapshot and --at", "one of them")


def test_unknown_snapshot_id(world: World) -> None:
    with world.unchanged():
        r = cli(*restore_args(world, world.tmp / "out.db", "--snapshot", "ffffffffff"))
    assert_one_line_error(r, 2, "ffffffffff", "dbre snapshots")


def test_forget_without_keep_rules(world: World) -> None:
    with world.unchanged():
        r = run_dbre("forget", "--repo", world.repo, "--prune")
        neg = cli("forget", "--repo", world.repo, "--keep-last", "-1")
    assert_one_line_error(r, 2, "no retention rule", "--keep-")
    assert_one_line_error(neg, 2, "negative")


def test_existing_target_without_force(world: World) -> None:
    target = world.tmp / "existing.db"
    target.write_bytes(b"do not touch")
    with world.unchanged(target):
        r = cli(*restore_args(world, target))
        d = cli(*restore_args(world, world.tmp))
        missing_dir = cli(*restore_args(world, world.tmp / "no" / "such" / "dir.db"))
    assert_one_line_error(r, 2, "already exists", "--force")
    assert_one_line_error(d, 2, "directory")
    assert_one_line_error(missing_dir, 2, "does not exist")
    assert not world.leftovers()


# --------------------------------------------------------------------------- locks


def write_lock(repo: Path, pid: int, *, exclusive: bool, age: float = 0.0) -> Path:
    """A lock record of a run on this host, boot and pid namespace, last written ``age`` seconds
    ago by the store's clock (the file's mtime: staleness is judged by it, not by "time")."""
    path = repo / "locks" / f"test{pid:08x}{int(exclusive)}"
    record = {"op": "test", "exclusive": exclusive, **this_process(), "pid": pid,
              "created": "2026-01-01T00:00:00Z", "time": time.time()}
    path.write_text(json.dumps(record))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_locked_by_another_run(world: World) -> None:
    repo = Repository.open(str(world.repo))
    with repo.lock("prune", exclusive=True):  # a live exclusive lock, held by this test process
        with world.unchanged():
            commands: list[list[str | Path]] = [
                ["backup", world.src, "--repo", world.repo],
                ["forget", "--repo", world.repo, "--keep-last", "1", "--prune"],
                ["copy", "--repo", world.repo, "--to", world.tmp / "offsite"],
            ]
            for args in commands:
                r = (cli if args[0] == "copy" else run_dbre)(*args)
                assert_one_line_error(r, 1, "locked", "prune", f"pid {os.getpid()}", "dbre unlock")
            # verify and a whole restore share a lock, so they wait for prune to end (verify read without one
            # until 2026-12-02, and a prune running meanwhile made it report packs "not found")
            assert_one_line_error(cli("verify", "--repo", world.repo), 1, "locked", "prune")
            assert_one_line_error(cli(*restore_args(world, world.tmp / "ro.db")), 1, "locked", "prune")
    assert not list((world.repo / "locks").iterdir())


def test_shared_lock_blocks_only_prune(world: World) -> None:
    live = write_lock(world.repo, os.getpid(), exclusive=False)
    with world.unchanged():
        r = run_dbre("forget", "--repo", world.repo, "--keep-last", "5", "--prune")
    assert_one_line_error(r, 1, "locked")
    ok = cli("backup", world.src, "--repo", world.repo)  # backups share
    assert ok.returncode == 0, ok
    assert live.exists()


def test_unlock_removes_only_stale_locks(world: World) -> None:
    live = write_lock(world.repo, os.getpid(), exclusive=True)
    dead = write_lock(world.repo, dead_pid(), exclusive=True)
    old = write_lock(world.repo, os.getpid() + 1_000_000, exclusive=False, age=3600)
    r = run_dbre("unlock", "--repo", world.repo)
    assert r.returncode == 0, r
    assert "removed 2 locks" in r.stdout
    assert live.exists() and not dead.exists() and not old.exists()
    # a dead run's lock never blocks: it is stale at once on the same host
    dead = write_lock(world.repo, dead_pid(), exclusive=True)
    live.unlink()
    assert cli("forget", "--repo", world.repo, "--keep-last", "1", "--prune").returncode == 0
    r = cli("unlock", "--repo", world.repo, "--remove-all")
    assert r.returncode == 0 and not list((world.repo / "locks").iterdir())
    r = cli("unlock", "--repo", world.tmp / "nowhere")
    assert_one_line_error(r, 1, "no repository")  # (missing: exit 1, as README's table says)


# --------------------------------------------------------------------------- full disk


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def restore_with_small_disk(w: World, target: Path, *more: str) -> CliResult:
    proc = subprocess.run(
        [sys.executable, "-m", "dbre.cli", *map(str, restore_args(w, target, *more))],
        capture_output=True, text=True, timeout=120, env=dbre_env(), preexec_fn=_limit_file_size,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def test_disk_full_during_restore(world: World) -> None:
    assert world.src.stat().st_size > 4 * 64 * 1024
    target = world.tmp / "out.db"
    with world.unchanged():
        r = restore_with_small_disk(world, target)
    assert_one_line_error(r, 1, "disk full", "free space")
    assert not target.exists() and not world.leftovers()

    existing = world.tmp / "existing.db"
    existing.write_bytes(b"the old database, still needed" * 100)
    with world.unchanged(existing):  # (a file that is not SQLite's is replaced only without a safety snapshot)
        r = restore_with_small_disk(world, existing, "--force", "--no-safety-snapshot")
    assert_one_line_error(r, 1, "disk full", "target was not touched")
    assert not world.leftovers()
