"""Source faults during a backup (issue 11): schema changes, VACUUM and WAL truncations by the
application, the database file replaced, the WAL truncated or replaced by someone else. A backup
either takes one committed state of the database exactly, or fails with one clear error; it never
stores a state the database did not have, and the repository always verifies.
"""

# test-group: heavy

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dbre.errors import DbreError
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from tests.dbfactory import integrity, make_db, query
from tests.torture.harness import content_digest, verify_clean

# The writer: transaction n inserts log row n and sets counter to n. In the same transaction, every
# 7th creates table s<n> holding n, every 21st drops s<n-14>, and n = 40 adds column extra to log;
# after every 25th it runs VACUUM, after every 11th wal_checkpoint(TRUNCATE). The schema a
# committed state k has is thus a function of k alone (expected_schema).
WRITER = r"""
import os, sqlite3, sys, time
path, stop, ready = sys.argv[1:4]
c = sqlite3.connect(path, isolation_level=None, timeout=60)
(n,) = c.execute("SELECT n FROM counter").fetchone()
while not os.path.exists(stop):
    n += 1
    c.execute("BEGIN IMMEDIATE")
    c.execute("INSERT INTO log(n, pad) VALUES (?, randomblob(300))", (n,))
    c.execute("UPDATE counter SET n = ?", (n,))
    if n % 7 == 0:
        c.execute(f"CREATE TABLE s{n}(x INTEGER)")
        c.execute(f"INSERT INTO s{n} VALUES (?)", (n,))
    if n % 21 == 0:
        c.execute(f"DROP TABLE s{n - 14}")
    if n == 40:
        c.execute("ALTER TABLE log ADD COLUMN extra TEXT DEFAULT 'x'")
    c.execute("COMMIT")
    if n % 25 == 0:
        c.execute("VACUUM")
    if n % 11 == 0:
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    if n == 30:
        open(ready, "w").close()
    time.sleep(0.002)
print(n)
"""


def expected_schema(k: int) -> tuple[set[str], bool]:
    """The s-tables and whether log has column extra, in committed state k."""
    tables = {f"s{m}" for m in range(7, k + 1, 7) if not (m + 14 <= k and (m + 14) % 21 == 0)}
    return tables, k >= 40


def make_source(path: Path, filler: int = 3000) -> Path:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.executescript("CREATE TABLE log(n INTEGER PRIMARY KEY, pad BLOB); CREATE TABLE counter(n INTEGER);"
                    "INSERT INTO counter VALUES (0); CREATE TABLE filler(id INTEGER PRIMARY KEY, v BLOB);")
    c.execute("BEGIN")
    c.executemany("INSERT INTO filler VALUES (?, randomblob(1000))", [(i,) for i in range(filler)])
    c.execute("COMMIT")
    c.close()
    return path


def check_state(path: Path) -> int:
    """The restored file is committed state k exactly (rows 1..k, counter k, k's schema); returns k."""
    assert integrity(path) == "ok"
    ((k,),) = query(path, "SELECT n FROM counter")
    ((count, high),) = query(path, "SELECT count(*), coalesce(max(n), 0) FROM log")
    assert (count, high) == (k, k), f"log rows {count} up to {high}, counter {k}"
    tables = {r[0] for r in query(path, "SELECT name FROM sqlite_schema WHERE type = 'table' AND name LIKE 's%'")}
    columns = {r[1] for r in query(path, "PRAGMA table_info(log)")}
    want_tables, want_extra = expected_schema(k)
    assert tables == want_tables, f"state {k}: tables {sorted(tables)}, expected {sorted(want_tables)}"
    assert ("extra" in columns) == want_extra, f"state {k}: column extra {'extra' in columns}"
    for name in tables:
        assert query(path, f"SELECT x FROM {name}") == [(int(name[1:]),)]
    return int(k)


@pytest.mark.parametrize("read", ["direct", "api"])
def test_backups_beside_schema_changes_vacuum_and_wal_truncation(tmp_path: Path, read: str) -> None:
    """12 backups while the writer changes the schema, VACUUMs and truncates the WAL: each restores to one
    committed state with that state's schema, the states never go back, and the writer moved through
    schema changes and VACUUMs between them."""
    src = make_source(tmp_path / "live.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    stop, ready = tmp_path / "stop", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(stop), str(ready)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ids: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline, "the writer did not start"
            time.sleep(0.01)
        for _ in range(12):
            ids.append(backup(repo, LocalFileSource(src), direct=read == "direct").manifest.id)
            time.sleep(0.1)
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    ks = []
    for i, snap_id in enumerate(ids):
        target = tmp_path / f"r{i}.db"
        apply_restore(repo, plan_restore(repo, "live", target, snapshot=snap_id))
        ks.append(check_state(target))
    assert ks == sorted(ks) and ks[-1] <= int(out), ks
    assert ks[-1] - ks[0] >= 25, f"the writer made too few changes during the backups: {ks}"
    verify_clean(str(repo.store.url))


def _backup_in_thread(repo: Repository, src: Path, direct: bool) -> tuple[threading.Thread, dict[str, object]]:
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["id"] = backup(repo, LocalFileSource(src), "app", direct=direct,
                                  accept_new_source=True).manifest.id
        except DbreError as err:
            result["error"] = err
    t = threading.Thread(target=run)
    t.start()
    return t, result


@pytest.mark.parametrize("read", ["direct", "api"])
def test_database_file_replaced_during_a_backup(tmp_path: Path, read: str) -> None:
    """While a backup of a 24 MiB database runs, the file is replaced (os.replace by another database, as a
    deploy or a restore by hand does) at 5 instants: each backup stores the old database or the new one
    exactly, or fails with a DbreError; never a mix. The repository verifies."""
    old = make_db(tmp_path / "old.db", mb=24, seed=1)
    new = make_db(tmp_path / "new.db", mb=24, seed=2)
    digests = {content_digest(old): "old", content_digest(new): "new"}
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    src = tmp_path / "app.db"
    outcomes = []
    for i, delay in enumerate([0.0, 0.05, 0.15, 0.3, 0.6]):
        for suffix in ("-wal", "-shm"):
            Path(f"{src}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(old, src)
        staged = tmp_path / "staged.db"
        shutil.copyfile(new, staged)
        t, result = _backup_in_thread(repo, src, read == "direct")
        time.sleep(delay)
        os.replace(staged, src)
        t.join(120)
        if "id" in result:
            target = tmp_path / f"r{i}.db"
            apply_restore(repo, plan_restore(repo, "app", target, snapshot=str(result["id"])))
            assert integrity(target) == "ok"
            got = digests.get(content_digest(target))
            assert got is not None, f"replaced after {delay} s: the snapshot holds neither database"
            outcomes.append(got)
        else:
            assert isinstance(result.get("error"), DbreError), result
            outcomes.append(f"refused: {result['error']}")
    verify_clean(str(repo.store.url))
    print(f"[{read}] file replaced during backups: {outcomes}")


@pytest.mark.parametrize("fault", ["truncated", "replaced"])
def test_wal_truncated_or_replaced_under_a_backup(tmp_path: Path, fault: str) -> None:
    """Someone truncates the -wal file (to nothing or to half) or puts another database's WAL in its place
    while a backup of the database (held open by its application: 200 commits, 8 MiB of frames not yet
    checkpointed, over 16 MiB of file) runs, at 4 instants. A backup never stores a torn state: each
    snapshot passes integrity_check and is either one of the states committed before the fault (k rows
    and counter k) or the file as SQLite itself now reads it (for a foreign WAL, its frames over this
    file: SQLite cannot tell either), or the backup fails with a DbreError. The repository verifies."""
    other = make_source(tmp_path / "other.db", filler=10)
    oc = sqlite3.connect(other, isolation_level=None)
    oc.execute("PRAGMA wal_autocheckpoint=0")
    oc.execute("INSERT INTO log(n, pad) VALUES (1, x'00')")
    other_wal = Path(f"{other}-wal").read_bytes()
    oc.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    outcomes = []
    for i, delay in enumerate([0.0, 0.05, 0.12, 0.25]):
        src = make_source(tmp_path / f"live{i}.db", filler=16_000)
        app = sqlite3.connect(src, isolation_level=None)
        try:
            app.execute("PRAGMA wal_autocheckpoint=0")
            for n in range(1, 201):
                app.execute("BEGIN")
                app.execute("INSERT INTO log(n, pad) VALUES (?, randomblob(300))", (n,))
                app.execute("UPDATE counter SET n = ?", (n,))
                app.execute("UPDATE filler SET v = randomblob(1000) WHERE id % 200 = ?", (n,))
                app.execute("COMMIT")
            wal = Path(f"{src}-wal")
            t, result = _backup_in_thread(repo, src, True)
            time.sleep(delay)
            if fault == "truncated":
                os.truncate(wal, 0 if i % 2 == 0 else wal.stat().st_size // 2)
            else:
                wal.write_bytes(other_wal)
            t.join(120)
        finally:
            app.close()  # closing may checkpoint what is left of the WAL: what SQLite reads is taken below
        where = f"{fault} WAL after {delay} s"
        if "id" in result:
            target = tmp_path / f"r{i}.db"
            apply_restore(repo, plan_restore(repo, "app", target, snapshot=str(result["id"])))
            assert integrity(target) == "ok", f"{where}: restores damaged"
            ((k,),) = query(target, "SELECT n FROM counter")
            ((count, high),) = query(target, "SELECT count(*), coalesce(max(n), 0) FROM log")
            if (count, high) == (k, k) and 0 <= k <= 200:
                outcomes.append(f"k={k}")
            else:
                assert content_digest(target) == content_digest(src, copy=True), \
                    f"{where}: neither a committed state nor the file as SQLite reads it"
                outcomes.append(f"k={k}, the foreign WAL's state, as SQLite reads the file")
        else:
            err = result.get("error")
            assert isinstance(err, DbreError), result
            assert "nothing was stored" in str(err) and "not an error" not in str(err), err
            outcomes.append(f"refused: {err}")
    verify_clean(str(repo.store.url))
    print(f"[{fault}] {outcomes}")


def test_sqld_restarted_during_a_backup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqld killed (SIGKILL) and started again on the same port and data while `dbre backup http://...` syncs
    its embedded replica (12 MB; the kill lands 0, 50 and 200 ms after the replica's file appears): each backup
    either succeeds with exactly the server's rows,
    or fails with one "dbre: ..." line (no traceback) and no snapshot; the next backup, with the server back,
    succeeds and holds exactly its rows (the replica left by the interrupted sync is usable, or replaced)."""
    import tests.sqld as sqld_mod
    from tests.dbfactory import dbre_env, query
    from tests.torture.harness import list_snapshots

    port = sqld_mod.free_port()
    monkeypatch.setattr(sqld_mod, "free_port", lambda: port)  # a restart listens where the source URL points
    data = tmp_path / "sqld"
    server = sqld_mod.start_sqld(data)
    repo, env = tmp_path / "repo", dbre_env({"DBRE_CACHE_DIR": str(tmp_path / "cache"),
                                             "LIBSQL_AUTH_TOKEN": None, "TURSO_AUTH_TOKEN": None})

    def rows_on_server() -> list[tuple[object, ...]]:
        return [tuple(r) for r in server.execute("SELECT id, hex(substr(payload, 1, 16)), note FROM big ORDER BY id")]

    def backup_proc() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "dbre.cli", "backup", server.url, "--repo", str(repo),
                                 "--db", "remote"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def restored_rows() -> list[tuple[object, ...]]:
        out = tmp_path / "restored.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{out}{suffix}").unlink(missing_ok=True)
        r = subprocess.run([sys.executable, "-m", "dbre.cli", "restore", "--repo", str(repo), "--db", "remote",
                            "--to", str(out)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        return [tuple(r) for r in query(out, "SELECT id, hex(substr(payload, 1, 16)), note FROM big ORDER BY id")]

    outcomes = []
    try:
        server.execute("CREATE TABLE big (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, note TEXT)")
        for start in range(0, 3000, 500):
            server.pipeline(["BEGIN", *[f"INSERT INTO big VALUES ({i}, randomblob(4000), 'row {i}')"
                                        for i in range(start, start + 500)], "COMMIT"])
        for i, delay in enumerate([0.0, 0.05, 0.2]):
            server.execute(f"UPDATE big SET note = 'round {i}' WHERE id % 7 = {i}")
            expected = rows_on_server()
            before = len(list_snapshots(str(repo))) if repo.exists() else 0
            proc = backup_proc()
            deadline = time.monotonic() + 60  # the kill lands while the replica syncs: once its file grows
            while time.monotonic() < deadline and proc.poll() is None and not any(
                    f.is_file() and f.stat().st_size > 0 for f in (tmp_path / "cache").rglob("*")):
                time.sleep(0.01)
            time.sleep(delay)
            synced_when_killed = proc.poll() is not None
            server.proc.kill()
            server.stop()
            server = sqld_mod.start_sqld(data)
            out, err = proc.communicate(timeout=180)
            if proc.returncode == 0:
                assert restored_rows() == expected, f"killed after {delay} s: the snapshot is not the server's rows"
                outcomes.append("backed up" + (" (before the kill)" if synced_when_killed else ""))
            else:
                lines = [line for line in err.splitlines() if line.strip()]
                assert len(lines) == 1 and lines[0].startswith("dbre: ") and "Traceback" not in err, err
                assert (len(list_snapshots(str(repo))) if repo.exists() else 0) == before, "a failed backup left one"
                outcomes.append(f"refused: {lines[0]}")
            again = backup_proc()
            _, err2 = again.communicate(timeout=180)
            assert again.returncode == 0, f"the backup after sqld came back failed: {err2}"
            assert restored_rows() == rows_on_server()
    finally:
        server.stop()
    print(f"sqld killed during a backup: {outcomes}")
