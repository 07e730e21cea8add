"""A backup reuses its parent's table count and checksum only when nothing of the table changed.

Each case backs up a database, changes it one way, backs it up again, and compares every table's
count and checksum in the new manifest with a from-scratch computation on the source
(``table_stats`` without a parent): a wrongly reused checksum is a mismatch. Each case also says
which tables must have been reused (not read again) and which must have been read.
Also: the checksum's fast path gives the values of the row-by-row definition, and a WITHOUT
ROWID table's checksum does not depend on its secondary indexes.
"""

from __future__ import annotations

import itertools
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
import xxhash

import dbre.repository.backup as backup_mod
import dbre.repository.tables as tables_mod
from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from tests.checksums import fresh_stats

SCHEMA = """
CREATE TABLE small(id INTEGER PRIMARY KEY, v TEXT, n REAL);
CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB);
CREATE TABLE wr(k TEXT PRIMARY KEY, v INTEGER) WITHOUT ROWID;
CREATE TABLE other(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE empty(id INTEGER PRIMARY KEY, v TEXT);
"""


def _make(path: Path, *, wal: bool = False, auto_vacuum: bool = False) -> None:
    conn = apsw.Connection(str(path))
    if auto_vacuum:
        conn.execute("PRAGMA auto_vacuum=FULL")
    if wal:
        conn.execute("PRAGMA journal_mode=wal")
    conn.execute(SCHEMA)
    with conn:
        conn.executemany("INSERT INTO small(v, n) VALUES (?, ?)", [(f"row {i} " + "x" * 60, i / 7) for i in range(600)])
        conn.executemany("INSERT INTO blobs(b) VALUES (?)", [(random.Random(i).randbytes(9000),) for i in range(20)])
        conn.executemany("INSERT INTO wr VALUES (?, ?)", [(f"k{i:04d}", 900 - i) for i in range(400)])
        conn.executemany("INSERT INTO other(v) VALUES (?)", [(f"o{i}",) for i in range(300)])
    conn.close()




class Counting:
    """Counts the tables whose rows are read again, by name: read whole (``table_checksum``) or,
    for rowid tables summed leaf by leaf, with at least one leaf read (``leaves`` has the
    (leaves read, leaves) of each)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.names: list[str] = []
        self.leaves: dict[str, tuple[int, int]] = {}
        real, by_page = tables_mod.table_checksum, tables_mod._summed_by_page

        def counted(conn: apsw.Connection, name: str, without_rowid: bool, *a: Any, **kw: Any) -> tuple[int, str]:
            self.names.append(name)
            return real(conn, name, without_rowid, *a, **kw)

        def paged(conn: apsw.Connection, name: str, root: int, sums: tables_mod.PageSums, prior: Any) -> Any:
            got = by_page(conn, name, root, sums, prior)
            if got is not None:
                self.leaves[name] = sums.leaves[name]
                if sums.leaves[name][0]:
                    self.names.append(name)
            return got

        monkeypatch.setattr(tables_mod, "table_checksum", counted)
        monkeypatch.setattr(tables_mod, "_summed_by_page", paged)


def _backup(repo: Repository, src: Path, **kw: object) -> Manifest:
    return backup(repo, LocalFileSource(src), "db", **kw).manifest  # type: ignore[arg-type]


def _check(m: Manifest, src: Path) -> None:
    got = {k: (v.rows, v.checksum) for k, v in m.tables.items()}
    assert got == fresh_stats(src)


def _exec(path: Path, sql: str, *params: object) -> None:
    conn = apsw.Connection(str(path))
    try:
        conn.execute(sql, params or None)
    finally:
        conn.close()


def _pages(path: Path, name: str) -> dict[int, bytes]:
    conn = apsw.Connection(str(path))
    try:
        ps = conn.execute("PRAGMA page_size").fetchone()[0]
        nums = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name=?", (name,))]
    finally:
        conn.close()
    data = path.read_bytes()
    return {p: data[(p - 1) * ps : p * ps] for p in nums}


def _blob_tail(path: Path, rowid: int, data: bytes) -> None:
    """Overwrite bytes 6000.. of a blob in place (incremental blob I/O: only its overflow pages change)."""
    conn = apsw.Connection(str(path))
    try:
        if conn.execute("SELECT 1 FROM blobs WHERE id = ?", (rowid,)).fetchone():
            with conn.blob_open("main", "blobs", "b", rowid, True) as blob:
                blob.seek(6000)
                blob.write(data)
    finally:
        conn.close()


def _root(path: Path, name: str) -> int:
    conn = apsw.Connection(str(path))
    try:
        return int(conn.execute("SELECT rootpage FROM sqlite_schema WHERE name=?", (name,)).fetchone()[0])
    finally:
        conn.close()


ALL = {"small", "blobs", "wr", "other", "empty"}

# (change, tables that must be read again: every other one must be reused)
CASES: dict[str, tuple[Callable[[Path], None], set[str]]] = {
    "update one row": (lambda p: _exec(p, "UPDATE small SET v='changed' WHERE id=300"), {"small"}),
    "insert with splits": (lambda p: _exec(p, "INSERT INTO small(v, n) SELECT v || 'y', n FROM small"), {"small"}),
    "delete one row": (lambda p: _exec(p, "DELETE FROM other WHERE id=7"), {"other"}),
    "delete into the freelist": (lambda p: _exec(p, "DELETE FROM blobs WHERE id > 10"), {"blobs"}),
    "rename table": (lambda p: _exec(p, "ALTER TABLE other RENAME TO other2"), {"other2"}),
    "add column with a default": (lambda p: _exec(p, "ALTER TABLE other ADD COLUMN w TEXT DEFAULT 'dflt'"), {"other"}),
    "index only (rowid table)": (lambda p: _exec(p, "CREATE INDEX small_v ON small(v)"), set()),
    "covering index on WITHOUT ROWID": (lambda p: _exec(p, "CREATE INDEX wr_v ON wr(v)"), set()),
    "update a WITHOUT ROWID row": (lambda p: _exec(p, "UPDATE wr SET v = -1 WHERE k = 'k0200'"), {"wr"}),
    "nothing": (lambda p: None, set()),
}


@pytest.mark.parametrize("wal", [False, True], ids=["rollback", "wal"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reuse_matches_a_fresh_computation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           case: str, wal: bool) -> None:
    src = tmp_path / "live.db"
    _make(src, wal=wal)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = _backup(repo, src)
    _check(first, src)
    change, read = CASES[case]
    change(src)
    counting = Counting(monkeypatch)
    second = _backup(repo, src)
    assert set(counting.names) == read
    _check(second, src)
    names = set(fresh_stats(src))
    # (a rowid table read leaf by leaf keeps the leaves that did not change: it counts as reused too)
    partly = {n for n in read if 0 < counting.leaves.get(n, (0, 0))[0] < counting.leaves[n][1]}
    assert second.stats["tables_reused"] == len(names - read) + len(partly)
    if case in ("update one row", "delete one row"):
        assert {n: counting.leaves[n][0] for n in read} == {n: 1 for n in read}  # one leaf of many read again
    for name in read & set(first.tables):
        assert (second.tables[name].rows, second.tables[name].checksum) != \
            (first.tables[name].rows, first.tables[name].checksum), "the change must change the checksum"


def test_same_size_blob_overwrite_changes_only_overflow_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blob overwritten in place: its leaf page is byte-identical, only overflow pages
    change, and the table is still read again."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = _backup(repo, src)
    before = _pages(src, "blobs")
    conn = apsw.Connection(str(src))
    try:  # incremental blob I/O writes the bytes in place: only the pages that hold them change
        with conn.blob_open("main", "blobs", "b", 3, True) as blob:
            blob.seek(6000)
            blob.write(random.Random(99).randbytes(3000))
    finally:
        conn.close()
    after = _pages(src, "blobs")
    changed = [p for p in after if after[p] != before.get(p)]
    leaves = {p for p, data in after.items() if data[0] in (0x0D, 0x05)}  # table b-tree leaf / interior pages
    assert changed and not set(changed) & leaves, "the scenario: only overflow pages differ"
    counting = Counting(monkeypatch)
    second = _backup(repo, src)
    assert counting.names == ["blobs"]
    _check(second, src)
    assert second.tables["blobs"].checksum != first.tables["blobs"].checksum


def test_drop_and_create_at_the_same_root(tmp_path: Path) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = _backup(repo, src)
    root = _root(src, "other")
    conn = apsw.Connection(str(src))
    with conn:
        conn.execute("DROP TABLE other")
        conn.execute("CREATE TABLE other(id INTEGER PRIMARY KEY, v TEXT)")
        conn.execute("INSERT INTO other(v) VALUES ('new')")
    conn.close()
    assert _root(src, "other") == root, "the scenario: the new table takes the old one's root page"
    second = _backup(repo, src)
    _check(second, src)
    assert second.tables["other"].rows == 1 != first.tables["other"].rows


@pytest.mark.parametrize("auto_vacuum", [False, True], ids=["plain", "auto_vacuum"])
def test_vacuum_and_autovacuum_moves(tmp_path: Path, auto_vacuum: bool) -> None:
    src = tmp_path / "live.db"
    _make(src, auto_vacuum=auto_vacuum)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    _exec(src, "DELETE FROM small WHERE id % 3 = 0")  # with auto_vacuum, pages of later tables move
    _check(_backup(repo, src), src)
    _exec(src, "DROP TABLE blobs")
    _exec(src, "VACUUM")
    _check(_backup(repo, src), src)


def test_no_reuse_across_sources_or_without_a_basis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    moved = tmp_path / "moved.db"
    shutil.copyfile(src, moved)
    counting = Counting(monkeypatch)
    third = backup(repo, LocalFileSource(moved), "db", accept_new_source=True).manifest
    assert set(counting.names) == ALL and third.stats["tables_reused"] == 0
    # a parent without the basis (an older dbre's): every table is read
    monkeypatch.setattr(backup_mod, "_basis", lambda *args: None)
    _backup(repo, moved)
    monkeypatch.undo()
    counting = Counting(monkeypatch)
    fifth = _backup(repo, moved)
    assert set(counting.names) == ALL and fifth.stats["tables_reused"] == 0
    counting.names.clear()
    _backup(repo, moved)
    assert counting.names == []  # and the next one reuses again


def test_other_reserved_bytes_read_every_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent whose pages had another usable size (reserved bytes) lends nothing."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    real = backup_mod._basis
    monkeypatch.setattr(backup_mod, "_basis", lambda *args: {**(real(*args) or {}), "reserved": 8})
    _backup(repo, src)
    monkeypatch.undo()
    counting = Counting(monkeypatch)
    assert _backup(repo, src).stats["tables_reused"] == 0 and set(counting.names) == ALL


@pytest.mark.parametrize("basis", [
    None, [], {"roots": {"t": 2}}, {"reserved": -1, "roots": {"t": 2}}, {"reserved": True, "roots": {"t": 2}},
    {"reserved": 0, "roots": {"t": 0}}, {"reserved": 0, "roots": {"t": "2"}}, {"reserved": 0, "roots": [2]},
])
def test_a_malformed_basis_is_none(basis: object) -> None:
    m = Manifest(id="a" * 16, db="db", taken_at="2026-01-01T00:00:00Z", page_size=4096, page_count=1, runs=[],
                 packs=[], stats={"checksum_basis": basis})
    assert m.checksum_basis is None
    m.stats["checksum_basis"] = {"reserved": 0, "roots": {"t": 2}}
    assert m.checksum_basis == (0, {"t": 2})


def test_parent_without_checksums(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src, checksums=False)
    counting = Counting(monkeypatch)
    second = _backup(repo, src, checksums=True)
    assert set(counting.names) == ALL
    counting.names.clear()
    _check(second, src)
    counting.names.clear()
    third = _backup(repo, src, checksums=False)  # counts only: count(*) costs less than the page walk
    assert counting.names == [] and third.stats["tables_reused"] == 0
    monkeypatch.undo()
    assert {k: v.rows for k, v in third.tables.items()} == {k: v[0] for k, v in fresh_stats(src).items()}
    assert all(v.checksum is None for v in third.tables.values())


def test_a_user_table_named_dbstat(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table that hides SQLite's dbstat: no page walk, so every table is read (and is right)."""
    src = tmp_path / "live.db"
    _make(src)
    _exec(src, "CREATE TABLE dbstat(name TEXT, pageno INTEGER)")
    _exec(src, "INSERT INTO dbstat VALUES ('small', 1)")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    counting = Counting(monkeypatch)
    second = _backup(repo, src)
    assert set(counting.names) == ALL | {"dbstat"} and second.stats["tables_reused"] == 0
    monkeypatch.undo()
    _check(second, src)


def test_full_and_backup_api_path_read_every_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    counting = Counting(monkeypatch)
    _backup(repo, src, full=True)
    assert set(counting.names) == ALL
    counting.names.clear()
    _backup(repo, src, direct=False)
    assert set(counting.names) == ALL


@pytest.mark.parametrize("seed,wal,steps", [
    (1414, True, 24),
    *[pytest.param(seed, seed % 2 == 0, 60, marks=pytest.mark.slow) for seed in range(6)],
])
def test_random_changes(tmp_path: Path, seed: int, wal: bool, steps: int) -> None:
    """A random walk of writes, in-place blob writes, schema changes and vacuums; after each
    backup every table's count and checksum equal a fresh computation."""
    rnd = random.Random(seed)
    columns = itertools.count()
    src = tmp_path / "live.db"
    _make(src, wal=wal)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _backup(repo, src)
    ops = [
        lambda: _exec(src, "UPDATE small SET v = v || 'u' WHERE id = ?", rnd.randrange(1, 700)),
        lambda: _blob_tail(src, rnd.randrange(1, 21), rnd.randbytes(2000)),
        lambda: _exec(src, "INSERT INTO other(v) VALUES (?)", "n" * rnd.randrange(1, 3000)),
        lambda: _exec(src, "DELETE FROM other WHERE id IN (SELECT id FROM other ORDER BY random() LIMIT 5)"),
        lambda: _exec(src, "INSERT OR REPLACE INTO wr VALUES (?, ?)",
                      f"k{rnd.randrange(0, 800):04d}", rnd.randrange(99)),
        lambda: _exec(src, "VACUUM"),
        lambda: _exec(src, "PRAGMA wal_checkpoint(TRUNCATE)"),
        lambda: _exec(src, f"ALTER TABLE other ADD COLUMN c{next(columns)} DEFAULT {rnd.randrange(9)}"),
        lambda: _exec(src, "CREATE INDEX IF NOT EXISTS wr_v ON wr(v)"),
        lambda: _exec(src, "DROP INDEX IF EXISTS wr_v"),
        lambda: _exec(src, "DROP TABLE IF EXISTS empty; CREATE TABLE empty(id INTEGER PRIMARY KEY, v TEXT)"),
        lambda: None,
    ]
    reused = 0
    for _ in range(steps):
        for _ in range(rnd.randrange(0, 3)):
            rnd.choice(ops)()
        m = _backup(repo, src)
        _check(m, src)
        reused += m.stats["tables_reused"]
    assert reused > 0


# --------------------------------------------------------------------------- the checksum itself


def _legacy(conn: apsw.Connection, name: str) -> tuple[int, str]:
    """The row-by-row definition: quote() of each column joined by 0x1f, each row ended by 0x1e."""
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({tables_mod.qident(name)})")]
    expr = "||x'1f'||".join(f"quote({tables_mod.qident(c)})" for c in cols)
    h, n = xxhash.xxh3_128(), 0
    for (row,) in conn.execute(f"SELECT CAST({expr} AS BLOB) FROM {tables_mod.qident(name)} ORDER BY rowid"):
        h.update(row + b"\x1e")
        n += 1
    return n, h.hexdigest()


@pytest.mark.parametrize("encoding", ["UTF-8", "UTF-16le"])
def test_fast_checksum_equals_the_row_by_row_definition(encoding: str) -> None:
    conn = apsw.Connection(":memory:")
    conn.execute(f"PRAGMA encoding='{encoding}'")
    conn.execute("CREATE TABLE v(a, b, c)")
    values: list[object] = [None, 0, -1, 2**63 - 1, 1.5, -0.0, 1e300, "", "it's", "naïve ✓", "a\x00b",
                            b"", b"\x00\xff", "x" * 5000, b"y" * 9000]
    rnd = random.Random(7)
    conn.executemany("INSERT INTO v VALUES (?, ?, ?)",
                     [tuple(rnd.choice(values) for _ in range(3)) for _ in range(300)])
    if encoding == "UTF-8":
        conn.execute("INSERT INTO v VALUES (CAST(x'80ff' AS TEXT), CAST(x'eda080' AS TEXT), 1)")  # not valid UTF-8
        want = _legacy(conn, "v")
    else:
        h, n = xxhash.xxh3_128(), 0
        for (row,) in conn.execute("SELECT quote(a)||x'1f'||quote(b)||x'1f'||quote(c) FROM v ORDER BY rowid"):
            h.update(row.encode("utf-8", "surrogatepass") + b"\x1e")
            n += 1
        want = (n, h.hexdigest())
    assert tables_mod.table_checksum(conn, "v", False, version=2) == want
    # version 3: the rows' xxh3-128 summed lane by lane, in any order
    lanes = [0, 0]
    n = 0
    query = "SELECT quote(a)||x'1f'||quote(b)||x'1f'||quote(c) FROM v ORDER BY random()"
    for (row,) in conn.execute(query if encoding != "UTF-8" else f"SELECT CAST(({query[7:query.index(' FROM')]}) "
                                                                 "AS BLOB) FROM v ORDER BY random()"):
        digest = xxhash.xxh3_128_digest(row.encode("utf-8", "surrogatepass") if isinstance(row, str) else row)
        lanes = [(lanes[0] + int.from_bytes(digest[:8], "little")) % 2**64,
                 (lanes[1] + int.from_bytes(digest[8:], "little")) % 2**64]
        n += 1
    assert tables_mod.table_checksum(conn, "v", False) == (n, b"".join(x.to_bytes(8, "little") for x in lanes).hex())


@pytest.mark.parametrize("version", [2, 3])
def test_without_rowid_checksum_ignores_secondary_indexes(version: int) -> None:
    """SQLite scans a covering secondary index when it can: version 2 asks for the key order,
    version 3 does not depend on any order."""
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE w(k TEXT COLLATE NOCASE, j INTEGER, v INTEGER, PRIMARY KEY(k DESC, j)) WITHOUT ROWID")
    conn.executemany("INSERT INTO w VALUES (?, ?, ?)",
                     [(f"K{i % 50}" if i % 2 else f"k{i % 50}x", i, -i) for i in range(500)])
    bare = tables_mod.table_checksum(conn, "w", True, version=version)
    conn.execute("CREATE INDEX w_v ON w(v)")
    plan = " ".join(str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN SELECT k, j, v FROM w"))
    assert "w_v" in plan  # the scenario: without an order the index would be scanned
    assert tables_mod.table_checksum(conn, "w", True, version=version) == bare
    conn.execute("ANALYZE")
    assert tables_mod.table_checksum(conn, "w", True, version=version) == bare
