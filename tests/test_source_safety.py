"""The source and the restored file: a backup never writes the source, both read paths restore the
same bytes, taken_at precedes the snapshot, `restore --force` is crash-safe and keeps the file's
mode, and two backups of one database in one process keep each other's locks.

Everything is real: SQLite files, writer processes, kill -9, `chattr +i` (we run as root on ext4).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import apsw
import pytest

import dbre.sources.image as image_mod
from dbre.errors import RestoreError
from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.tables import table_stats
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.sources.pins import open_descriptors
from tests.dbfactory import assert_same_db, integrity, query

ROOT = Path(__file__).resolve().parent.parent


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(script: str, *args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out


def restore(repo: Repository, manifest: Manifest, to: Path, force: bool = False) -> Path:
    apply_restore(repo, plan_restore(repo, manifest.db, to, snapshot=manifest.id, force=force))
    return to


# A writer that commits in WAL mode and dies without closing (as after kill -9): its WAL keeps
# frames the database file does not have, and -shm stays, as a crashed or killed app leaves them.
WAL_LEFT_BEHIND = r"""
import apsw, os, sys
path, rows, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
c = apsw.Connection(path)
c.execute("PRAGMA journal_mode=wal")
c.execute("PRAGMA wal_autocheckpoint=0")
c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
if marker:
    c.execute("CREATE TABLE marker(what TEXT)")
    c.execute("INSERT INTO marker VALUES (?)", marker)
with c:
    for i in range(rows):
        c.execute("INSERT INTO t(v, b) VALUES (?, randomblob(200))", (f"row {i}",))
os._exit(0)
"""


def wal_left_behind(path: Path, rows: int = 500, *marker: str) -> None:
    run(WAL_LEFT_BEHIND, path, rows, *marker)
    assert Path(f"{path}-wal").stat().st_size > 0 and Path(f"{path}-shm").exists()


def cleanly_closed(path: Path, journal: str, rows: int = 500) -> None:
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    with conn:
        conn.executemany("INSERT INTO t(v, b) VALUES (?, randomblob(200))", [(f"row {i}",) for i in range(rows)])
    conn.close()


# --------------------------------------------------------------------------- the source is never written


@pytest.mark.parametrize("direct", [True, False])
def test_a_backup_leaves_a_wal_database_without_its_app_untouched(tmp_path: Path, direct: bool) -> None:
    """dbre's connection is the only one: closing it must not checkpoint the WAL into the file
    nor delete -wal/-shm (that is what SQLite does by default for the last connection)."""
    src = tmp_path / "app.db"
    wal_left_behind(src)
    wal = Path(f"{src}-wal")
    before = (digest(src), digest(wal))
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src), direct=direct)
    assert (digest(src), digest(wal)) == before
    assert wal.exists() and Path(f"{src}-shm").exists()
    assert result.manifest.stats["wal_pages" if direct else "read"]  # the WAL's frames were read
    restored = restore(repo, result.manifest, tmp_path / "restored.db")
    assert query(restored, "SELECT count(*) FROM t") == [(500,)]
    assert open_descriptors() == 0  # the last pin closed every descriptor


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_a_cleanly_closed_database_gets_no_stray_files(tmp_path: Path, journal: str) -> None:
    """The -wal and -shm that reading a WAL database creates are removed again (by SQLite, as the
    last connection, with an empty WAL): the folder and the file are as they were."""
    src = tmp_path / "app.db"
    cleanly_closed(src, journal)
    before = digest(src)
    listing = sorted(p.name for p in tmp_path.iterdir())
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src))
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*listing, "repo"])
    assert_same_db(src, restore(repo, result.manifest, tmp_path / "restored.db"))


# In rollback mode, a transaction bigger than the page cache spills pages into the database file
# before it commits; killed then, it leaves a hot journal that the next reader must roll back.
HOT_JOURNAL_WRITER = r"""
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("PRAGMA cache_size=5")
c.execute("BEGIN")
c.execute("UPDATE t SET v = 'uncommitted', b = randomblob(250)")
c.execute("INSERT INTO t(v, b) SELECT 'uncommitted', randomblob(200) FROM t")
print("spilled", flush=True)
time.sleep(120)
"""


def test_a_hot_journal_is_rolled_back_to_the_exact_committed_bytes(tmp_path: Path) -> None:
    """What SQLite must write before anyone can read: a crashed writer's hot journal is rolled
    back. The file then has exactly the bytes it had before that transaction, and the snapshot
    holds the committed rows only."""
    src = tmp_path / "app.db"
    cleanly_closed(src, "delete", rows=2000)
    committed = digest(src)
    writer = subprocess.Popen([sys.executable, "-c", HOT_JOURNAL_WRITER, str(src)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "spilled"
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=10)
    journal = Path(f"{src}-journal")
    assert journal.stat().st_size > 0 and digest(src) != committed  # a hot journal, a half-written file
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    result = backup(repo, LocalFileSource(src))
    assert digest(src) == committed and not journal.exists()
    restored = restore(repo, result.manifest, tmp_path / "restored.db")
    assert query(restored, "SELECT count(*), sum(v = 'uncommitted') FROM t") == [(2000, 0)]
    assert integrity(restored) == "ok"


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        with pytest.raises(PermissionError):
            os.open(path, os.O_RDWR)  # chattr +i took effect (root is refused too)
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize(("journal", "wal_frames"), [("wal", False), ("delete", False), ("wal", True)])
def test_an_immutable_source_backs_up_and_gets_no_stray_files(tmp_path: Path, journal: str,
                                                             wal_frames: bool) -> None:
    """chattr +i: SQLite opens the file read-only. With no WAL frames to add, dbre reads it as
    immutable=1 (no -wal/-shm appear); with frames, SQLite reads the WAL that is already there."""
    src = tmp_path / "app.db"
    if wal_frames:
        wal_left_behind(src)
    else:
        cleanly_closed(src, journal)
    listing = sorted(p.name for p in tmp_path.iterdir())
    hashes = {p.name: digest(p) for p in tmp_path.iterdir() if not p.name.endswith("-shm")}
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with immutable(src):
        result = backup(repo, LocalFileSource(src))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*listing, "repo"])
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name in hashes} == hashes
    restored = restore(repo, result.manifest, tmp_path / "restored.db")
    assert query(restored, "SELECT count(*) FROM t") == [(500,)]
    assert integrity(restored) == "ok"


# --------------------------------------------------------------------------- both read paths, one result


def _open_app(path: Path, journal: str) -> apsw.Connection:
    """An app connection kept open; in WAL mode its frames (page 1 among them) stay in the WAL."""
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, b BLOB)")
    conn.execute("CREATE INDEX t_v ON t(v)")
    with conn:
        conn.executemany("INSERT INTO t(v, b) VALUES (?, randomblob(300))", [(f"row {i}",) for i in range(800)])
    conn.execute("CREATE TABLE u(x)")  # page 1 changes again: the newest copy is a later WAL frame
    return conn


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_both_read_paths_restore_the_same_bytes(tmp_path: Path, journal: str) -> None:
    """The backup API rewrites page 1's header (change counter, schema cookie, version numbers);
    its path takes the source's own page 1 instead, so both restores are byte for byte equal."""
    src = tmp_path / "app.db"
    app = _open_app(src, journal)
    try:
        repo = Repository.open_or_init(str(tmp_path / "repo"))
        direct = backup(repo, LocalFileSource(src), "direct", direct=True).manifest
        api = backup(repo, LocalFileSource(src), "api", direct=False).manifest
        assert direct.stats["read"] == "direct" and api.stats["read"].startswith("backup API")
        assert api.stats["page1"] == "source"
        if journal == "wal":
            assert direct.stats["wal_pages"] > 0
        a = restore(repo, direct, tmp_path / "direct.db").read_bytes()
        b = restore(repo, api, tmp_path / "api.db").read_bytes()
        assert a == b
        app.execute("PRAGMA wal_checkpoint(TRUNCATE)" if journal == "wal" else "SELECT 1")
        assert a == src.read_bytes()  # and both are the source itself
    finally:
        app.close()


HOLD_WRITE_LOCK = r"""
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""


def test_without_the_wal_end_the_fallback_differs_only_in_three_header_fields(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the write lock is held elsewhere the WAL's end is unknown, so the source's page 1
    cannot be picked out: the backup API's page 1 is kept with the schema cookie put back. What
    FORMAT.md says differs is exactly what differs: bytes 24-27, 92-95, 96-99 of the file."""
    src = tmp_path / "app.db"
    app = _open_app(src, "wal")
    monkeypatch.setattr(image_mod, "LOCK_WAIT", 0.2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITE_LOCK, str(src)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        repo = Repository.open_or_init(str(tmp_path / "repo"))
        api = backup(repo, LocalFileSource(src), "api").manifest
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=10)
    assert "write lock" in api.stats["read"] and api.stats["page1"] == "rebuilt header"
    app.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    app.close()
    source, restored = src.read_bytes(), restore(repo, api, tmp_path / "api.db").read_bytes()
    assert len(source) == len(restored)
    differ = {i for i in range(len(source)) if source[i] != restored[i]}
    assert differ and differ <= set(range(24, 28)) | set(range(92, 100))
    assert_same_db(src, tmp_path / "api.db")


# --------------------------------------------------------------------------- taken_at


TIMED_WRITER = r"""
import sqlite3, sys, time
path, journal, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = sqlite3.connect(path, isolation_level=None, timeout=30)
c.execute(f"PRAGMA journal_mode={journal}")
print("ready", flush=True)
for i in range(1, count + 1):
    c.execute("INSERT INTO t(id) VALUES (?)", (i,))
    print(i, time.time(), flush=True)  # the commit has returned
    time.sleep(0.001)
"""


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_taken_at_is_before_the_snapshot_begins(tmp_path: Path, journal: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every commit that returned before a snapshot's taken_at is in that snapshot, so
    `restore --at T` never misses one. The writer's lock is let go slowly here (50 ms) so that
    commits land between the start of the read transaction and the end of its setup."""
    src = tmp_path / "app.db"
    conn = apsw.Connection(str(src))
    conn.execute(f"PRAGMA journal_mode={journal}")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    conn.close()
    release = image_mod.ImageSession._release_writers

    def slow_release(self: image_mod.ImageSession) -> None:
        release(self)
        time.sleep(0.05)

    monkeypatch.setattr(image_mod.ImageSession, "_release_writers", slow_release)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    writer = subprocess.Popen([sys.executable, "-c", TIMED_WRITER, str(src), journal, "3000"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        time.sleep(0.2)
        manifests = [backup(repo, LocalFileSource(src), "app").manifest for _ in range(6)]
        out, _ = writer.communicate(timeout=120)
    finally:
        writer.kill()
        writer.wait()
    done = [(int(i), float(t)) for i, t in (line.split() for line in out.split("\n") if line.strip())]
    assert len(done) > 100
    for m in manifests:
        taken = m.time.timestamp()
        before = max((i for i, t in done if t < taken), default=0)
        assert m.tables["t"].rows >= before, f"snapshot at {m.taken_at} misses commit {before}"
        # and restore --at that moment picks a snapshot that has it
        at = restore_at(repo, m.time, tmp_path / f"at-{m.id}.db")
        assert query(at, "SELECT count(*) FROM t WHERE id <= ?", (before,)) == [(before,)]


def restore_at(repo: Repository, when: datetime, to: Path) -> Path:
    apply_restore(repo, plan_restore(repo, "app", to, at=when.astimezone(UTC)))
    return to


# --------------------------------------------------------------------------- restore --force and the file mode


def _new_snapshot(tmp_path: Path, repo: Repository, mode: int = 0o640) -> Manifest:
    new = tmp_path / "new.db"
    conn = apsw.Connection(str(new))
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE TABLE marker(what TEXT)")
    conn.execute("INSERT INTO marker VALUES ('new')")
    with conn:
        conn.executemany("INSERT INTO t(v) VALUES (?)", [(f"new {i}",) for i in range(300)])
    conn.close()
    new.chmod(mode)
    return backup(repo, LocalFileSource(new), "app").manifest


def _old_target(path: Path) -> None:
    """A WAL database whose committed rows are partly only in its WAL (its writer was killed)."""
    wal_left_behind(path, 700, "old")
    assert Path(f"{path}-wal").stat().st_size > 100_000 and path.stat().st_size < 100_000


def _state(path: Path) -> str:
    """'old' (every committed row of the old database) or 'new' (the whole snapshot); else fails."""
    assert integrity(path) == "ok"
    ((what,),) = query(path, "SELECT what FROM marker")
    rows = query(path, "SELECT count(*) FROM t")
    assert rows == [(700 if what == "old" else 300,)], (what, rows)
    return str(what)


FORCE_RESTORE = r"""
import sys, time
import dbre.restore.full as full
from dbre.repository.repo import Repository
repo, snap, target, stop_at = sys.argv[1:5]

def crash_point(name):
    if name == stop_at:
        print(name, flush=True)
        time.sleep(120)

full._crash_point = crash_point
r = Repository.open(repo)
full.apply_restore(r, full.plan_restore(r, "app", target, snapshot=snap, force=True))
print("done", flush=True)
"""


@pytest.mark.parametrize("stop_at", ["held", "cleared", "renamed", "done"])
def test_restore_force_killed_at_each_instant_leaves_old_or_new(tmp_path: Path, stop_at: str) -> None:
    """kill -9 while `restore --force` replaces a WAL database whose WAL holds committed rows:
    the target is the complete old database (all its rows) or the complete new one, never the
    old file without its WAL, nor the new file beside the old WAL."""
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snap = _new_snapshot(tmp_path, repo)
    target = tmp_path / "target.db"
    _old_target(target)
    child = subprocess.Popen([sys.executable, "-c", FORCE_RESTORE, str(tmp_path / "repo"), snap.id, str(target),
                              stop_at], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == stop_at, child.communicate()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    leftovers = {p.name for p in tmp_path.iterdir() if p.name.startswith("target.db")}
    state = _state(target)
    assert state == ("old" if stop_at in ("held", "cleared") else "new")
    if state == "new":
        assert leftovers == {"target.db"}  # no old -wal or -shm beside the new file
        assert target.stat().st_mode & 0o7777 == 0o640


def test_restore_force_refuses_a_database_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process has the old database open: replacing it under that process would mix two
    databases in one WAL, so the restore stops and the target is untouched."""
    import dbre.restore.full as full

    monkeypatch.setattr(full, "HOLD_WAIT_MS", 200)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snap = _new_snapshot(tmp_path, repo)
    target = tmp_path / "target.db"
    _old_target(target)
    holder = subprocess.Popen([sys.executable, "-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]);"
                               "c.execute('SELECT count(*) FROM t').fetchall(); print('open', flush=True);"
                               "sys.stdin.readline()", str(target)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(RestoreError, match="in use"):
            restore(repo, snap, target, force=True)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert _state(target) == "old"
    assert not [p for p in tmp_path.iterdir() if ".dbre-restore-" in p.name]  # the temp file is gone


@pytest.mark.parametrize(("mode", "umask"), [(0o640, 0o022), (0o600, 0o022), (0o664, 0o077)])
def test_a_restored_file_keeps_the_source_mode(tmp_path: Path, mode: int, umask: int) -> None:
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snap = _new_snapshot(tmp_path, repo, mode)
    assert snap.mode == mode
    old = os.umask(umask)
    try:
        out = restore(repo, snap, tmp_path / "restored.db")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o7777 == mode


# --------------------------------------------------------------------------- two backups in one process


APP = r"""
import os, random, sqlite3, sys, time
path, stop, mode = sys.argv[1:4]
# the checkpointer polls every half millisecond (no busy handler): it restarts the WAL at the
# first instant no read mark holds it, where SQLite's busy handler would sleep up to 100 ms
c = sqlite3.connect(path, isolation_level=None, timeout=30 if mode == "writer" else 0)
c.execute("PRAGMA wal_autocheckpoint=0")
rng = random.Random(mode)
n = 0
while not os.path.exists(stop):
    if mode == "writer":
        n += 1
        a, b = rng.randrange(1, 501), rng.randrange(1, 501)
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE account SET balance = balance - 7 WHERE id = ?", (a,))
        c.execute("UPDATE account SET balance = balance + 7 WHERE id = ?", (b,))
        c.execute("INSERT INTO log(n, pad) VALUES (?, randomblob(300))", (n,))
        c.execute("UPDATE counter SET n = ?", (n,))
        c.execute("COMMIT")
    else:  # the app's checkpointer: copies the WAL back and restarts it as often as it can
        try:
            n += c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
        except sqlite3.OperationalError:
            pass  # the writer holds its lock
        time.sleep(0.0005)
print(n, flush=True)
"""

TWO_BACKUPS = r"""
import json, sys, threading
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from dbre.sources.pins import open_descriptors
src, repo_a, repo_b, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
out, errors = {"a": [], "b": []}, []
b_done = threading.Event()

def work(name, repo):
    # "b" takes slow backups (table checksums: a long read transaction); "a" takes quick ones
    # back to back meanwhile, each ending (closing its descriptors) inside one of b's
    r = Repository.open_or_init(repo)
    try:
        n = 0
        while (n < rounds) if name == "b" else not b_done.is_set():
            m = backup(r, LocalFileSource(src), "app", checksums=name == "b").manifest
            out[name].append([m.id, m.stats["read"]])
            n += 1
    except BaseException as err:
        errors.append(f"{name}: {err!r}")
    finally:
        if name == "b":
            b_done.set()

threads = [threading.Thread(target=work, args=("a", repo_a)), threading.Thread(target=work, args=("b", repo_b))]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"out": out, "errors": errors, "descriptors": open_descriptors()}))
"""


def test_a_backup_ending_keeps_the_read_mark_of_another_in_the_same_process(tmp_path: Path) -> None:
    """Deterministic form of the case below: a backup of the database runs from start to end
    while another read transaction on it (a second backup's) is open in this process. Closing its
    descriptors must not drop that transaction's read mark: a checkpoint from another process
    still cannot restart the WAL, and the pages the open image maps do not change."""
    src = tmp_path / "app.db"
    app = _open_app(src, "wal")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    session = image_mod.ImageSession()
    with LocalFileSource(src).connect() as conn:
        session.begin(conn)
        image = session.image()
        assert image is not None and image.overlay, session.reason
        before = b"".join(image.view(i) for i in range(image.page_count))
        backup(repo, LocalFileSource(src), "other")  # a whole backup, descriptors opened and closed
        script = ("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0.5);"
                  "c.execute(\"UPDATE t SET v='other'\");"
                  "print(c.execute('PRAGMA wal_checkpoint(RESTART)').fetchone()[0]);"
                  "c.execute(\"UPDATE t SET v='again', b=randomblob(300)\")")
        out = run(script, src)
        assert out.stdout.strip() == "1"  # busy: our read mark still holds the WAL
        assert b"".join(image.view(i) for i in range(image.page_count)) == before
        conn.execute("COMMIT")
    session.close()
    app.close()
    assert open_descriptors() == 0


ROUNDS = 6


def test_two_backups_of_one_database_in_one_process_keep_their_locks(tmp_path: Path) -> None:
    """Two threads back up the same WAL database again and again while a writer commits and the
    app checkpoints with TRUNCATE. Had either thread closed a descriptor of the file or its -shm
    under the other, the other's read mark would be gone: the checkpointer would copy newer frames
    into pages it is reading, or cut the WAL it has mapped. Every snapshot is a consistent one."""
    src = tmp_path / "app.db"
    conn = apsw.Connection(str(src))
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("CREATE TABLE account(id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);"
                 "CREATE TABLE log(n INTEGER PRIMARY KEY, pad BLOB); CREATE TABLE counter(n INTEGER);"
                 "INSERT INTO counter VALUES (0)")
    with conn:
        conn.executemany("INSERT INTO account VALUES (?, 1000)", [(i,) for i in range(1, 501)])
        conn.execute("CREATE TABLE filler(b BLOB)")
        conn.executemany("INSERT INTO filler VALUES (randomblob(1000))", [()] * 6000)
    conn.close()
    stop = tmp_path / "stop"
    apps = [subprocess.Popen([sys.executable, "-c", APP, str(src), str(stop), mode], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for mode in ("writer", "checkpointer")]
    try:
        time.sleep(0.3)
        out = run(TWO_BACKUPS, src, tmp_path / "repo-a", tmp_path / "repo-b", ROUNDS, timeout=300)
    finally:
        stop.touch()
        results = [app.communicate(timeout=60) for app in apps]
    for app, (_, err) in zip(apps, results, strict=True):
        assert app.returncode == 0, err
    assert int(results[0][0]) > 0  # the writer committed during the backups
    assert int(results[1][0]) > 0  # and the WAL was checkpointed and truncated under them
    report = json.loads(out.stdout)
    assert report["errors"] == [] and report["descriptors"] == 0
    assert len(report["out"]["b"]) == ROUNDS and report["out"]["a"]
    seen = set()
    for name in ("a", "b"):
        repo = Repository.open(str(tmp_path / f"repo-{name}"))
        for snap_id, _read in report["out"][name]:
            manifest = repo.find_snapshot("app", snap_id, None)
            restored = restore(repo, manifest, tmp_path / f"{name}-{snap_id}.db")
            assert integrity(restored) == "ok", (name, _read)
            ((k,),) = query(restored, "SELECT n FROM counter")
            assert query(restored, "SELECT count(*), coalesce(max(n), 0) FROM log") == [(k, k)]
            assert query(restored, "SELECT sum(balance) FROM account") == [(500 * 1000,)]
            # what the read transaction counted and checksummed is what the pages hold
            conn = apsw.Connection(str(restored), flags=apsw.SQLITE_OPEN_READONLY)
            try:
                stats = table_stats(conn, name == "b")
            finally:
                conn.close()
            assert {t: (s.rows, s.checksum) for t, s in manifest.tables.items()} == stats
            seen.add(k)
            restored.unlink()
    assert len(seen) > 2  # the snapshots are of different moments
