"""`dbre sql`: read-only queries against a past state, answered from the repository without a restore.

Every answer is compared with the same query run by Python's sqlite3 (another SQLite build) or the
`sqlite3` command on a full restore of the same point; the repository is on a local disk and on a real
S3 server (moto_server). Also: a point query reads a small part of the database, encryption, refused
writes (the repository byte-identical after), a missing pack, nothing left behind, and a time between
two replicated transactions seeing exactly the first.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import IntegrityError, UsageError
from dbre.replicate.segment import to_time
from dbre.repository.backup import backup
from dbre.repository.manifest import RECORD, Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.restore import query as query_mod
from dbre.restore.full import apply_restore, plan_restore
from dbre.restore.query import query
from dbre.secrets import Secret
from dbre.sources import open_source
from tests.dbfactory import assert_one_line_error, change_rows, make_db, run_dbre
from tests.replication import dbre_cmd, make_source, replicating, restore_at, restored_seq, shipped_transactions

KEY = "correct horse battery staple"

QUERIES = [
    "SELECT count(*), sum(n), max(id) FROM items",
    "SELECT id, name, n FROM items WHERE id = 777",
    "SELECT id, hex(payload) FROM items WHERE id IN (5, 4000, 9999)",
    "SELECT name FROM items ORDER BY name LIMIT 5 OFFSET 300",
    "SELECT id, n FROM items WHERE id % 997 = 0 ORDER BY id",
    "SELECT type, name, sql FROM sqlite_schema ORDER BY name",
    "SELECT count(*) FROM notes",
    "PRAGMA quick_check",
]


@dataclass
class History:
    """A repository holding several snapshots of one database ("app"), changed between them."""

    url: str
    repo: Repository
    snaps: list[Manifest]
    tmp: Path
    key: str | None = None


def _build(url: str, tmp: Path, key: str | None = None) -> History:
    """Three snapshots of a ~32 MiB database (random payloads: the size is the data): rows changed,
    added and deleted between them, and a table that appears in the second and changes in the third."""
    src = make_db(tmp / "src.db", mb=32, seed=7)
    repo = Repository.open_or_init(url, Secret(key) if key else None)
    snaps = [backup(repo, open_source(str(src)), "app", checksums=False).manifest]
    change_rows(src, 40, seed=3)
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
        c.executemany("INSERT INTO notes(body) VALUES (?)", [(f"note {i}",) for i in range(300)])
        c.execute("DELETE FROM items WHERE id BETWEEN 2000 AND 2100")
    time.sleep(0.01)
    snaps.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest)
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("UPDATE items SET n = -n WHERE id % 997 = 0")
        c.execute("DELETE FROM notes WHERE id > 100")
        c.executemany("INSERT INTO items(name, n, payload) VALUES (?, ?, randomblob(300))",
                      [(f"late-{i}", i) for i in range(500)])
    time.sleep(0.01)
    snaps.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest)
    return History(url, repo, snaps, tmp, key)


@pytest.fixture(scope="module")
def local_history(tmp_path_factory: pytest.TempPathFactory) -> History:
    tmp = tmp_path_factory.mktemp("sql_local")
    return _build(str(tmp / "repo"), tmp)


@pytest.fixture(scope="module")
def s3_history(tmp_path_factory: pytest.TempPathFactory, s3_client: Any) -> History:
    from tests.conftest import unique_bucket_name

    bucket = unique_bucket_name()
    s3_client.create_bucket(Bucket=bucket)
    return _build(f"s3://{bucket}/repo", tmp_path_factory.mktemp("sql_s3"))


@pytest.fixture(params=["local", "s3"])
def history(request: pytest.FixtureRequest) -> History:
    return request.getfixturevalue(f"{request.param}_history")  # type: ignore[no-any-return]


def restored(h: History, tmp: Path, **choice: Any) -> Path:
    """A full restore of the point ``choice`` (snapshot= or at=) names, to a new file."""
    out = tmp / f"restored-{len(list(tmp.glob('restored-*.db')))}.db"  # (not its -wal and -shm: names repeat)
    apply_restore(h.repo, plan_restore(h.repo, "app", out, **choice))
    return out


def on_copy(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as c:
        try:
            return c.execute(sql).fetchall()
        except sqlite3.OperationalError as err:  # (the table does not exist at that point)
            return [("error", str(err))]


def answer(h: History, sql: str, **choice: Any) -> list[tuple[Any, ...]]:
    try:
        return query(h.repo, "app", sql, **choice).rows
    except UsageError as err:
        return [("error", err.message.removeprefix("sql: "))]


def tree(h: History) -> dict[str, str]:
    """sha256 of every object of the repository (through its store: local or S3)."""
    store = h.repo.store
    return {k: hashlib.sha256(store.get(k)).hexdigest() for k in sorted(store.list(""))}


# --------------------------------------------------------------------------- answers


def test_answers_equal_a_full_restore_at_every_snapshot_and_time(history: History, tmp_path: Path) -> None:
    h = history
    points: list[dict[str, Any]] = [{"snapshot": m.id} for m in h.snaps]
    # times: exactly at a snapshot, between two (the older one), and after the last
    points += [{"at": h.snaps[0].time}, {"at": h.snaps[1].time - timedelta(microseconds=1)},
               {"at": h.snaps[1].time + (h.snaps[2].time - h.snaps[1].time) / 2},
               {"at": h.snaps[2].time + timedelta(days=1)}]
    expected_ids = [m.id for m in h.snaps] + [h.snaps[0].id, h.snaps[0].id, h.snaps[1].id, h.snaps[2].id]
    for point, snap_id in zip(points, expected_ids, strict=True):
        copy = restored(h, tmp_path, **point)
        result = query(h.repo, "app", "SELECT 1", **point)
        assert result.state.manifest.id == snap_id, point  # the snapshot restore --at chooses
        for sql in QUERIES:
            assert answer(h, sql, **point) == on_copy(copy, sql), (point, sql)
    # the default is the newest; `latest` too
    assert answer(h, QUERIES[0]) == answer(h, QUERIES[0], snapshot="latest") == on_copy(copy, QUERIES[0])
    # the states really differ, so the comparisons above can fail
    assert len({repr(answer(h, QUERIES[0], snapshot=m.id)) for m in h.snaps}) == 3


def test_a_point_query_reads_a_small_part_of_the_database(history: History) -> None:
    h = history
    result = query(h.repo, "app", "SELECT id, name FROM items WHERE id = 31337")
    assert result.rows and result.rows[0][0] == 31337
    size = h.snaps[-1].size
    s = result.stats
    assert size > 30 * 1024 * 1024
    assert s.bytes < size / 6, (s.describe(), size)  # a few sealed batches of 2 MiB, not the database
    assert s.pages_served < 20 and s.objects <= 8, s.describe()
    full = query(h.repo, "app", "SELECT sum(length(payload)) FROM items")  # a scan reads (about) all of it
    assert full.stats.bytes > size / 2, full.stats.describe()


def test_cli_answers_as_sqlite3_on_a_restored_copy_and_says_what_it_read(history: History, tmp_path: Path) -> None:
    h = history
    copy = restored(h, tmp_path, snapshot=h.snaps[1].id)
    sql = "SELECT id, name, n FROM items WHERE id % 1500 = 1 ORDER BY id"
    env = {"DBRE_ENCRYPTION_KEY": h.key}
    r = run_dbre("sql", "--repo", h.url, "--db", "app", "--snapshot", h.snaps[1].id[:8], "--format", "csv", sql,
                 env=env)
    assert r.returncode == 0, r
    reference = subprocess.run(["sqlite3", "-csv", "-header", str(copy), sql], capture_output=True, text=True,
                               check=True).stdout
    assert list(csv.reader(io.StringIO(r.stdout))) == list(csv.reader(io.StringIO(reference)))
    assert len(r.stdout.splitlines()) > 10
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"snapshot {h.snaps[1].id}" in lines[0] and "nothing restored" in lines[0], r
    assert re.search(r"read \d+ objects \(\d+ requests\), [\d.]+ [KM]iB of 3\d\.\d MiB", lines[0]), lines
    js = run_dbre("sql", "--repo", h.url, "--db", "app", "--at", h.snaps[1].taken_at, "--format", "json", sql,
                  env=env)
    assert js.returncode == 0, js
    assert [tuple(o.values()) for o in json.loads(js.stdout)] == on_copy(copy, sql)
    table = run_dbre("sql", "--repo", h.url, "--db", "app", "SELECT count(*) AS n FROM notes", env=env)
    assert table.returncode == 0 and "┃ n" in table.stdout and "100" in table.stdout, table


# --------------------------------------------------------------------------- refusals and errors


WRITES = [
    "INSERT INTO items(name) VALUES ('x')",
    "UPDATE items SET n = 0",
    "DELETE FROM items",
    "DROP TABLE notes",
    "CREATE TABLE t(x)",
    "CREATE TEMP TABLE t(x)",
    "CREATE INDEX i ON items(n)",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = WAL",
    "BEGIN",
    "ANALYZE",
    "REINDEX",
    "VACUUM",
    "ATTACH DATABASE 'other.db' AS other",
    "SELECT 1; DELETE FROM items",
]


def test_writes_are_refused_and_the_repository_is_unchanged(local_history: History, tmp_path: Path) -> None:
    h = local_history
    before = tree(h)
    for sql in [*WRITES, f"VACUUM INTO '{tmp_path / 'into.db'}'"]:
        r = run_dbre("sql", "--repo", h.url, "--db", "app", sql, cwd=tmp_path)
        assert_one_line_error(r, 2, "sql: ")
        assert r.stdout == "", (sql, r)
    assert not (tmp_path / "into.db").exists() and not (tmp_path / "other.db").exists()
    for sql, needle in (("SELEC 1", "syntax error"), ("SELECT * FROM nowhere", "no such table: nowhere"),
                        ("", "no statement"), ("SELECT * FROM items WHERE id = ?", "parameters"),
                        ("SELECT json('{')", "malformed json")):
        assert_one_line_error(run_dbre("sql", "--repo", h.url, "--db", "app", sql), 2, needle)
    assert_one_line_error(run_dbre("sql", "--repo", h.url, "--db", "app", "--format", "xml", "SELECT 1"), 2,
                          "--format")
    assert_one_line_error(run_dbre("sql", "--repo", h.url, "--db", "app", "--at", "2026-01-01T00:00:00Z",
                                   "--snapshot", "latest", "SELECT 1"), 2, "both given")
    assert_one_line_error(run_dbre("sql", "--repo", h.url, "--db", "nope", "SELECT 1"), 2, "no snapshots")
    assert tree(h) == before  # not a byte changed, no lock left behind
    assert query(h.repo, "app", "PRAGMA user_version").rows == [(0,)]  # a pragma that only reads is fine


def test_writes_are_refused_on_s3_and_nothing_changes(s3_history: History) -> None:
    h = s3_history
    before = tree(h)
    for sql in WRITES:
        with pytest.raises(UsageError, match="sql: "):
            query(h.repo, "app", sql)
    assert tree(h) == before


def test_nothing_is_left_behind(local_history: History, tmp_path: Path) -> None:
    """No -wal, -shm, -journal or temp file anywhere: not beside the query (its working directory),
    not in TMPDIR, not in the repository; a sort large enough to spill stays in memory."""
    h = local_history
    work, tmpdir = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmpdir.mkdir()
    before = tree(h)
    sql = "SELECT name, n FROM items ORDER BY payload DESC LIMIT 3"  # sorts ~32 MiB of rows
    r = run_dbre("sql", "--repo", h.url, "--db", "app", "--format", "json", sql, cwd=work,
                 env={"TMPDIR": str(tmpdir), "SQLITE_TMPDIR": str(tmpdir)})
    assert r.returncode == 0, r
    assert len(json.loads(r.stdout)) == 3
    assert list(work.iterdir()) == [] and list(tmpdir.iterdir()) == []
    assert tree(h) == before
    leftovers = [p for p in Path(h.url).rglob("*") if p.name.endswith(("-wal", "-shm", "-journal"))]
    assert leftovers == [] and not list(Path(h.url).glob("locks/*"))


def test_encrypted_repository_and_wrong_key(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    h = _build(str(tmp_path / "repo"), tmp_path, key=KEY)
    copy = restored(h, tmp_path, snapshot=h.snaps[0].id)
    assert answer(h, QUERIES[1], snapshot=h.snaps[0].id) == on_copy(copy, QUERIES[1])
    sql = "SELECT id, name FROM items WHERE id < 4"
    ok = run_dbre("sql", "--repo", h.url, "--db", "app", "--format", "json", "--snapshot", h.snaps[0].id, sql,
                  env={"DBRE_ENCRYPTION_KEY": KEY})
    assert ok.returncode == 0, ok
    assert [tuple(o.values()) for o in json.loads(ok.stdout)] == on_copy(copy, sql)
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    assert run_dbre("sql", "--repo", h.url, "--db", "app", "--key-file", key_file, sql).returncode == 0
    wrong = run_dbre("sql", "--repo", h.url, "--db", "app", sql, env={"DBRE_ENCRYPTION_KEY": "not-the-key-4711"})
    line = assert_one_line_error(wrong, 1, "wrong encryption key")
    assert "4711" not in line and KEY not in line
    assert_one_line_error(run_dbre("sql", "--repo", h.url, "--db", "app", sql), 1, "is encrypted")


def test_a_missing_pack_is_one_line_and_exit_1(tmp_path: Path) -> None:
    h = _build(str(tmp_path / "repo"), tmp_path)
    m = h.snaps[-1]
    # the pack holding the batch of page 1 (every query reads it)
    from dbre.repository.backup import read_run

    record = RECORD.unpack_from(read_run(h.repo, m, m.runs[0]), 0)
    pack = record[1].hex()
    Path(h.url, pack_key(pack)).unlink()
    r = run_dbre("sql", "--repo", h.url, "--db", "app", "SELECT count(*) FROM items")
    assert_one_line_error(r, 1, f"packs/{pack[:2]}/{pack}", "missing")
    assert r.stdout == ""
    with pytest.raises(IntegrityError, match="missing"):
        query(h.repo, "app", "SELECT count(*) FROM items")
    assert not list(Path(h.url).glob("locks/*"))  # the lock was let go


def test_the_shared_lock_is_held_while_a_query_reads(local_history: History,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A query holds the repository's shared lock (as restore does) while it reads pages: prune's
    exclusive lock is refused meanwhile, so nothing the query reads can be deleted under it."""
    from dbre.errors import LockedError

    h = local_history
    seen: list[str] = []
    real = Repository.read_blob

    def read_blob(self: Repository, *args: Any, **kwargs: Any) -> bytes:
        seen.extend(p.read_text() for p in Path(h.url).glob("locks/*"))
        with pytest.raises(LockedError), h.repo.lock("prune", exclusive=True):
            pass
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Repository, "read_blob", read_blob)
    assert query(h.repo, "app", "SELECT count(*) FROM notes").rows == [(100,)]
    assert seen and all('"exclusive": false' in s and "sql app" in s for s in seen), seen


# --------------------------------------------------------------------------- replicated points


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[Repository, Path, list[tuple[int, int]]]]:
    """A local repository with one generation: rows 1..50 in the base, then 8 transactions (rows
    51..58) shipped one at a time; yields (repo, tmp, [(txid, observed µs)])."""
    src = tmp_path / "src.db"
    make_source(src, 50)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        for seq in range(51, 59):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(300))", (seq,))
            conn.execute("UPDATE counter SET n = ?", (seq,))
            conn.execute("COMMIT")
            time.sleep(0.15)
    conn.close()
    txs = [(txid, observed) for _, txid, observed in shipped_transactions(repo)]
    assert len(txs) == 8, txs
    yield repo, tmp_path, txs


STATE_SQL = "SELECT count(*), max(seq), (SELECT n FROM counter) FROM t"


def test_a_time_between_two_replicated_transactions_sees_exactly_the_first(
        replicated: tuple[Repository, Path, list[tuple[int, int]]]) -> None:
    repo, tmp, txs = replicated
    for k in (0, 3, 6):
        (_, first_us), (_, second_us) = txs[k], txs[k + 1]
        assert first_us < second_us
        for at_us in (first_us, (first_us + second_us) // 2, second_us - 1):
            result = query(repo, "app", STATE_SQL, at=to_time(at_us))
            rows = 51 + k
            assert result.rows == [(rows, rows, rows)], (k, at_us, result.rows)
            assert result.state.point is not None and result.state.transactions == k + 1
            out = tmp / f"at-{at_us}.db"
            restore_at(repo, "app", to_time(at_us), out)
            assert restored_seq(out) == (rows, rows, rows)  # restore --at agrees
        assert query(repo, "app", STATE_SQL, at=to_time(second_us)).rows == [(52 + k,) * 3]
    # up to a txid, as restore --txid
    for k in (0, 5):
        result = query(repo, "app", STATE_SQL, txid=txs[k][0])
        assert result.rows == [(51 + k,) * 3] and result.state.last_txid == txs[k][0], result.rows
    with pytest.raises(UsageError, match="no replicated transaction"):
        query(repo, "app", STATE_SQL, txid=txs[-1][0] + 100)
    # replicated pages past the overlay's memory go to an unnamed temporary file: the same answers
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(query_mod, "OVERLAY_MEMORY", 0)
        for k in (2, 7):
            result = query(repo, "app", STATE_SQL, at=to_time(txs[k][1]))
            assert result.rows == [(51 + k,) * 3] and len(result.state.overlay) > 0, result.rows
    # the newest replicated state by default (as restore), the base snapshot with --snapshot latest
    assert query(repo, "app", STATE_SQL).rows == [(58, 58, 58)]
    assert query(repo, "app", STATE_SQL, snapshot="latest").rows == [(50, 50, 50)]
    r = run_dbre("sql", "--repo", str(tmp / "repo"), "--db", "app", "--at", to_time(txs[2][1]).isoformat(),
                 "--format", "csv", STATE_SQL)
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "53,53,53", r
    assert "+ 3 replicated transactions" in r.stderr, r
    r = run_dbre("sql", "--repo", str(tmp / "repo"), "--db", "app", "--txid", str(txs[4][0]), "--format", "csv",
                 STATE_SQL)
    assert r.returncode == 0 and r.stdout.splitlines()[1] == "55,55,55", r
    assert not [p for p in tmp.rglob("*") if p.name.endswith(("-journal",)) or ".dbre-" in p.name]


def test_shell_answers_and_refuses_writes(local_history: History, tmp_path: Path) -> None:
    """`dbre shell` (apsw's shell on the same read-only connection): statements from stdin are answered
    from the snapshot, writes are refused (VACUUM INTO included: its ATTACH goes through the authorizer),
    and the repository is unchanged."""
    h = local_history
    before = tree(h)
    into = tmp_path / "into.db"
    script = (f"SELECT count(*) FROM notes;\nDELETE FROM notes;\nVACUUM INTO '{into}';\n"
              "SELECT 'after', count(*) FROM notes;\n.quit\n")
    r = subprocess.run([*dbre_cmd("shell", "--repo", h.url, "--db", "app", "--snapshot", h.snaps[1].id)],
                       input=script, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r
    out = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    assert out[0] == "300" and out[-1].replace(" ", "").replace("|", ",").endswith("after,300"), r.stdout
    assert "not authorized" in r.stderr and "authorization denied" in r.stderr, r.stderr
    assert f"snapshot {h.snaps[1].id}" in r.stderr and "nothing restored" in r.stderr
    assert not into.exists() and list(tmp_path.iterdir()) == []
    assert tree(h) == before


def test_a_format_1_repository_is_queried_too(tmp_path: Path) -> None:
    """A repository of dbre before format 2 (read only: unkeyed page hashes, runs sealed without names)
    answers as its restore does."""
    import shutil

    data = Path(__file__).parent / "data" / "v1" / "plain"
    shutil.copytree(data, tmp_path / "repo")
    repo = Repository.open(str(tmp_path / "repo"))
    snaps = repo.snapshots("app")
    assert len(snaps) == 2 and repo.version == 1
    h = History(str(tmp_path / "repo"), repo, snaps, tmp_path)
    before = tree(h)
    for m in snaps:
        copy = restored(h, tmp_path, snapshot=m.id)
        for sql in ("SELECT count(*), sum(total), max(customer) FROM orders", "PRAGMA quick_check"):
            assert answer(h, sql, snapshot=m.id) == on_copy(copy, sql), (m.id, sql)
    assert answer(h, "SELECT count(*) FROM orders", snapshot=snaps[0].id) != answer(h, "SELECT count(*) FROM orders")
    assert tree(h) == before
    assert not list((tmp_path / "repo").glob("locks/*"))


def test_a_scan_reads_batches_ahead_a_point_query_does_not(local_history: History,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Several ranged reads are in flight while a query reads the file in order (a table scan), and
    none is read ahead for a point query's few scattered pages."""
    h = local_history
    real = Repository.read_blob
    mutex = threading.Lock()
    now = {"in_flight": 0, "most": 0, "batches": 0}

    def read_blob(self: Repository, pack: str, offset: int, length: int, name: str) -> bytes:
        if name != "page-batch":
            return real(self, pack, offset, length, name)
        with mutex:
            now["in_flight"] += 1
            now["batches"] += 1
            now["most"] = max(now["most"], now["in_flight"])
        try:
            time.sleep(0.03)  # (a store's latency: reads that overlap show)
            return real(self, pack, offset, length, name)
        finally:
            with mutex:
                now["in_flight"] -= 1

    monkeypatch.setattr(Repository, "read_blob", read_blob)
    point = query(h.repo, "app", "SELECT name FROM items WHERE id = 4242")
    assert point.rows and now["most"] == 1 and now["batches"] <= 4, now
    now.update(most=0, batches=0)
    scan = query(h.repo, "app", "SELECT sum(length(payload)) FROM items")
    assert scan.rows[0][0] > 0 and now["most"] >= 3 and now["batches"] > 10, now
