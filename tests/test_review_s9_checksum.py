"""Review of checksum reuse and the WITHOUT ROWID key order (session 9): what validation and reuse do
with snapshots written under another checksum definition, and the cases an operator meets on a bad day.

An "old" snapshot is made the way dbre made it before ``stats.checksum_version``: its table
checksums come from the old ``table_checksum`` (02c8fcb, copied below: a WITHOUT ROWID table read
with no ORDER BY, so in SQLite's scan order, a covering index's when there is one) and its stats
carry neither ``checksum_version`` nor ``checksum_basis``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import apsw
import pytest
import xxhash

import dbre.repository.tables as tables_mod
from dbre.cli_inspect import diff_snapshots
from dbre.repository.backup import backup, load_page_sums
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.tables import CHECKSUM_VERSION, qident, table_stats
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.validate.checks import equivalence_check, failed, run_checks

# ----------------------------------------------------------------------------- the old definition


def _old_table_checksum(conn: apsw.Connection, name: str, without_rowid: bool, **_: object) -> tuple[int, str]:
    """``table_checksum`` as of 02c8fcb (verbatim but for names; later keywords ignored)."""
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({qident(name)})")]
    expr = "||x'1f'||".join(f"quote({qident(c)})" for c in cols) or "''"
    order = "" if without_rowid else " ORDER BY rowid"  # WITHOUT ROWID tables scan in key order
    try:
        return _old_checksum(conn, f"SELECT {expr} FROM {qident(name)}{order}")
    except UnicodeDecodeError:
        return _old_checksum(conn, f"SELECT CAST({expr} AS BLOB) FROM {qident(name)}{order}")


def _old_checksum(conn: apsw.Connection, query: str) -> tuple[int, str]:
    h = xxhash.xxh3_128()
    total = 0
    for (row,) in conn.execute(query):
        h.update(row.encode("utf-8", "surrogatepass") if isinstance(row, str) else
                 row if isinstance(row, bytes) else str(row).encode())
        h.update(b"\x1e")
        total += 1
    return total, h.hexdigest()


SCHEMA = """
CREATE TABLE plain(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE w(k TEXT COLLATE NOCASE, j INTEGER, v INTEGER, PRIMARY KEY(k DESC, j)) WITHOUT ROWID;
CREATE INDEX w_v ON w(v);
"""


def _make(path: Path) -> None:
    conn = apsw.Connection(str(path))
    conn.execute(SCHEMA)
    with conn:
        conn.executemany("INSERT INTO plain(v) VALUES (?)", [(f"p{i}",) for i in range(200)])
        conn.executemany("INSERT INTO w VALUES (?, ?, ?)",
                         [(f"K{i % 50}" if i % 2 else f"k{i % 50}x", i, -i) for i in range(500)])
    conn.close()


def _exec(path: Path, sql: str) -> None:
    conn = apsw.Connection(str(path))
    try:
        conn.execute(sql)
    finally:
        conn.close()


def _old_backup(repo: Repository, src: Path, monkeypatch: pytest.MonkeyPatch) -> Manifest:
    """A snapshot as the code before checksum_version wrote it."""
    with monkeypatch.context() as mp:
        mp.setattr(tables_mod, "table_checksum", _old_table_checksum)
        mp.setattr(tables_mod, "_summed_by_page", lambda *a, **k: None)  # (no page sums then)
        real = repo.write_manifest

        def old_stats(manifest: Manifest) -> int:
            for key in ("checksum_version", "checksum_basis", "tables_reused", "checksum_pages"):
                manifest.stats.pop(key, None)
            return real(manifest)

        mp.setattr(repo, "write_manifest", old_stats)
        return backup(repo, LocalFileSource(src), "db").manifest


def _restore(repo: Repository, m: Manifest, target: Path) -> Path:
    apply_restore(repo, plan_restore(repo, m.db, target, snapshot=m.id))
    return target


def _checksum_results(results: list[Any], table: str) -> list[Any]:
    return [r for r in results if r.check == "checksum" and r.table == table]


# ----------------------------------------------------------------------------- task 1: old snapshots


def test_old_without_rowid_snapshot_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore of a snapshot taken before the key order is validated against the scan order it
    was taken in: no false "content differs" (it was one before the fix)."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    old = _old_backup(repo, src, monkeypatch)
    assert old.checksum_version is None and old.checksum_basis is None
    conn = apsw.Connection(str(src))
    assert old.tables["w"].checksum != tables_mod.table_checksum(conn, "w", True)[1]  # the two definitions differ here
    conn.close()
    results = run_checks(_restore(repo, old, tmp_path / "r.db"), old)
    assert failed(results) == []
    (w,) = _checksum_results(results, "w")
    assert "scan order" in w.detail


def test_old_snapshot_damage_is_still_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old-order fallback accepts the recorded rows only: a changed value still fails."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    old = _old_backup(repo, src, monkeypatch)
    restored = _restore(repo, old, tmp_path / "r.db")
    _exec(restored, "UPDATE w SET v = v + 1 WHERE j = 7")
    conn = apsw.Connection(str(restored), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        bad = failed(equivalence_check(conn, old))
    finally:
        conn.close()
    assert [(r.check, r.table) for r in bad] == [("checksum", "w")]


def test_new_snapshots_record_the_version_and_validate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    _old_backup(repo, src, monkeypatch)
    _exec(src, "UPDATE plain SET v='x' WHERE id=1")
    new = backup(repo, LocalFileSource(src), "db").manifest
    assert new.stats["checksum_version"] == CHECKSUM_VERSION == new.checksum_version
    # the parent's checksums have the old meaning: none reused, every table read
    assert new.stats["tables_reused"] == 0
    conn = apsw.Connection(str(src))
    assert {k: (v.rows, v.checksum) for k, v in new.tables.items()} == table_stats(conn, True)
    conn.close()
    results = run_checks(_restore(repo, new, tmp_path / "r.db"), new)
    assert failed(results) == []
    assert [r.detail for r in _checksum_results(results, "w")] == ["content as backed up"]


@pytest.mark.parametrize("version", [None, 1])
def test_no_reuse_from_a_parent_of_another_definition(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      version: int | None) -> None:
    """A parent with a checksum_basis but without (or with another) checksum_version lends nothing:
    its WITHOUT ROWID checksum would carry the old meaning into a snapshot that claims the new one."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    real = repo.write_manifest

    def as_version(manifest: Manifest) -> int:
        manifest.stats.pop("checksum_version")
        if version is not None:
            manifest.stats["checksum_version"] = version
        manifest.tables["w"].checksum = "0" * 32  # what an old definition would have recorded
        return real(manifest)

    monkeypatch.setattr(repo, "write_manifest", as_version)
    first = backup(repo, LocalFileSource(src), "db").manifest
    monkeypatch.setattr(repo, "write_manifest", real)
    assert first.checksum_basis is not None and first.checksum_version == version
    second = backup(repo, LocalFileSource(src), "db").manifest
    assert second.stats["tables_reused"] == 0
    assert second.tables["w"].checksum != "0" * 32
    third = backup(repo, LocalFileSource(src), "db").manifest  # a parent of this definition lends again
    assert third.stats["tables_reused"] == 2
    assert third.tables == second.tables


def test_a_newer_definition_is_not_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot from a newer dbre (checksum_version above this one's): checksums not compared, said
    so; row counts still compared."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    m = backup(repo, LocalFileSource(src), "db").manifest
    restored = _restore(repo, m, tmp_path / "r.db")
    m.stats["checksum_version"] = CHECKSUM_VERSION + 1
    m.tables["w"].checksum = "f" * 32
    _exec(restored, "DELETE FROM plain WHERE id = 3")
    conn = apsw.Connection(str(restored), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        results = equivalence_check(conn, m)
    finally:
        conn.close()
    assert [(r.check, r.table) for r in failed(results)] == [("row_count", "plain")]
    assert all("not compared" in r.detail for r in results if r.check == "checksum")


def test_diff_across_definitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dbre diff` from an old snapshot to a new one: a WITHOUT ROWID table that did not change is
    unchanged (its two checksums have two meanings: both restored and read again), not "changed"."""
    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    old = _old_backup(repo, src, monkeypatch)
    _exec(src, "UPDATE plain SET v='x' WHERE id=1")
    new = backup(repo, LocalFileSource(src), "db").manifest
    assert old.tables["w"].checksum != new.tables["w"].checksum
    changes, basis = diff_snapshots(repo, old, new)
    assert {c.table: c.change for c in changes} == {"plain": "changed", "w": "unchanged"}
    assert basis == "restored and compared"


# ----------------------------------------------------------------------------- review findings


def test_no_reuse_from_another_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: a checksum reused from a parent that another SQLite computed is that SQLite's
    quote() of each REAL (3.43 changed float-to-text), not this one's, so the new snapshot fails
    validation on the host that made it. Simulated: the parent says another SQLite and records the
    value it would have computed (here another value). Fixed: the basis names its SQLite."""
    src = tmp_path / "live.db"
    _make(src)
    _exec(src, "CREATE TABLE reals(x REAL); INSERT INTO reals VALUES (0.1), (1e-300), (2.0000000000000004)")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    real = repo.write_manifest

    def other_sqlite(manifest: Manifest) -> int:
        manifest.stats["checksum_basis"]["sqlite"] = "3.42.0 " + manifest.stats["checksum_basis"]["sqlite"].split()[1]
        manifest.tables["reals"].checksum = "1" * 32  # its rendering of the same REALs
        return real(manifest)

    monkeypatch.setattr(repo, "write_manifest", other_sqlite)
    parent = backup(repo, LocalFileSource(src), "db").manifest
    monkeypatch.setattr(repo, "write_manifest", real)
    assert parent.sum_runs and load_page_sums(repo, parent) is None  # its page sums are not even read
    _exec(src, "UPDATE plain SET v='x' WHERE id=1")
    new = backup(repo, LocalFileSource(src), "db").manifest
    assert new.stats["tables_reused"] == 0
    assert failed(run_checks(_restore(repo, new, tmp_path / "r.db"), new)) == []
    assert load_page_sums(repo, new) is not None
    again = backup(repo, LocalFileSource(src), "db").manifest  # the same SQLite lends again
    assert again.stats["tables_reused"] == 3


def test_requirements_write_rate_across_definitions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (fixed): `dbre requirements`' write rate counted an interval as a change when a
    WITHOUT ROWID table's two checksums differed only because they are of two definitions."""
    from dbre.report.requirements import _write_rate

    src = tmp_path / "live.db"
    _make(src)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    old = _old_backup(repo, src, monkeypatch)
    _exec(src, "UPDATE plain SET v='x' WHERE id=1")
    new = backup(repo, LocalFileSource(src), "db").manifest
    assert old.tables["w"].rows == new.tables["w"].rows and old.tables["w"].checksum != new.tables["w"].checksum
    rate, _ = _write_rate([old, new], "w")
    assert rate == 0.0


def test_a_fast_hash_collision_is_caught_by_a_later_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: the fast hash (xxh3, not keyed) that proves a page unchanged can be collided by
    whoever writes a blob (an overflow page is its bytes but 4) and knows the old bytes: the backup
    keeps the old page. Before reuse the table checksum, read from the source, disagreed with that
    stored page and the next drill failed; a reused checksum agrees with it, so every later snapshot
    validated while the source held other data. Simulated: the fast hash of the new overflow pages
    made equal to the old ones'. Fixed then: a checksum is carried over at most REUSE_LIMIT backups
    in a row, so a snapshot within that many fails validation (found), not none. Since session 10
    what is carried over must also match the parent's keyed hashes, so the table is read from the
    source at once and the first snapshot taken under the collision already fails validation.
    Since session 12 the sink of such a backup (table checksums carried over) tells unchanged pages
    by the keyed hash: the collided pages are stored, and every snapshot restores the source's bytes
    and validates."""
    import dbre.repository.backup as backup_mod
    import dbre.repository.sink as sink_mod

    monkeypatch.setattr(backup_mod, "REUSE_LIMIT", 3)
    src = tmp_path / "live.db"
    conn = apsw.Connection(str(src))
    conn.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB); CREATE TABLE t(x)")
    conn.execute("INSERT INTO blobs(b) VALUES (zeroblob(20000))")
    conn.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, LocalFileSource(src), "db")
    ps = 4096
    before = src.read_bytes()
    conn = apsw.Connection(str(src))
    with conn.blob_open("main", "blobs", "b", 1, True) as blob:
        blob.seek(10000)
        blob.write(b"\xee" * 3000)  # in place: only overflow pages change
    conn.close()
    after = src.read_bytes()
    changed = {after[i:i + ps]: before[i:i + ps] for i in range(0, len(after), ps)
               if after[i:i + ps] != before[i:i + ps]}
    assert changed
    real = xxhash.xxh3_128_digest

    def colliding(data: Any) -> bytes:
        return real(changed.get(bytes(data), data))

    import dbre.restore.full as restore_mod

    monkeypatch.setattr(sink_mod, "FAST_HASH", colliding)
    monkeypatch.setattr(restore_mod, "FAST_HASH", colliding)  # (a real collision collides at restore too)
    found = []
    for i in range(5):
        _exec(src, f"INSERT INTO t VALUES ({i})")  # each backup sees some change
        m = backup(repo, LocalFileSource(src), "db").manifest
        results = run_checks(_restore(repo, m, tmp_path / f"r{i}.db"), m)
        found.append([r.table for r in failed(results)])
        assert (tmp_path / f"r{i}.db").read_bytes() == src.read_bytes()  # the collided pages were stored
    assert found == [[]] * 5, found  # (before session 12: ["blobs"] at once; before session 10: the 4th)


def _collation_in_sql_only(p: Path) -> None:
    conn = apsw.Connection(str(p))
    try:
        conn.execute("PRAGMA writable_schema=ON")
        conn.execute("UPDATE sqlite_schema SET sql = replace(sql, 'v INTEGER', 'v INTEGER COLLATE RTRIM') "
                     "WHERE name='w'")
    finally:
        conn.close()


def _incremental_vacuum(p: Path) -> None:
    _exec(p, "DELETE FROM plain WHERE id < 150")
    _exec(p, "PRAGMA incremental_vacuum")


BAD_DAY = {
    # pages moved to the front of the file, pointers to them rewritten: every moved table read again
    "incremental_vacuum": (_incremental_vacuum, "PRAGMA auto_vacuum=INCREMENTAL", None),
    # the same pages, another meaning (edited sql): read again
    "collation edited in sql only": (_collation_in_sql_only, "", {"w"}),
    # FTS5 shadow tables are b-trees like any other: an insert reads the ones it changed
    "fts5 shadow tables": (lambda p: _exec(p, "INSERT INTO f VALUES ('new words here')"),
                           "CREATE VIRTUAL TABLE f USING fts5(body);"
                           "INSERT INTO f SELECT 'body ' || v FROM plain", None),
    # every page another size: nothing lent
    "page size changed": (lambda p: _exec(p, "PRAGMA page_size=8192; VACUUM"), "", None),
    # uncheckpointed WAL frames hold the change
    "WAL frames": (lambda p: _exec(p, "UPDATE w SET v = 0 WHERE j = 3"), "PRAGMA journal_mode=WAL", {"w"}),
}


@pytest.mark.parametrize("case", sorted(BAD_DAY))
def test_bad_day_reuse_matches_a_fresh_computation(tmp_path: Path, case: str) -> None:
    """Review cases that hold: each second snapshot's counts and checksums equal a fresh
    computation on the source, its restore validates, and a table that had to be read was."""
    change, setup, must_read = BAD_DAY[case]
    src = tmp_path / "live.db"
    if setup.startswith("PRAGMA"):
        _exec(src, setup)
        setup = ""
    _make(src)
    if setup:
        _exec(src, setup)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    first = backup(repo, LocalFileSource(src), "db").manifest
    keep = None
    if case == "WAL frames":
        keep = apsw.Connection(str(src))  # holds the WAL open: the frames stay uncheckpointed
        keep.execute("PRAGMA wal_autocheckpoint=0")
        keep.execute("UPDATE w SET v = 0 WHERE j = 3")
    else:
        change(src)
    try:
        second = backup(repo, LocalFileSource(src), "db").manifest
        if case == "WAL frames":
            assert second.stats["wal_pages"] > 0
        conn = apsw.Connection(str(src))
        try:
            conn.execute("BEGIN")
            fresh = table_stats(conn, True)
            conn.execute("COMMIT")
        finally:
            conn.close()
    finally:
        if keep is not None:
            keep.close()
    assert {k: (v.rows, v.checksum) for k, v in second.tables.items()} == fresh
    reused = set(second.stats["checksum_basis"]["reused"])
    if must_read is not None:
        assert not (must_read & reused)
    if case == "page size changed":
        assert (first.page_size, second.page_size, reused) == (4096, 8192, set())
    assert set(first.tables) - set(second.tables) == set()
    assert failed(run_checks(_restore(repo, second, tmp_path / "r.db"), second)) == []


def test_old_checksum_from_another_plan_matches() -> None:
    """An old snapshot's WITHOUT ROWID checksum follows the plan of the SQLite that took it: one
    that scanned the key b-tree where this one scans the covering index (or the reverse) still
    matches, through the orders ``scan_order_matches`` tries; other rows do not."""
    conn = apsw.Connection(":memory:")
    conn.execute(SCHEMA)
    conn.executemany("INSERT INTO w VALUES (?, ?, ?)", [(f"k{i}", i, (i * 37) % 101) for i in range(300)])
    plan = " ".join(str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN SELECT k, j, v FROM w"))
    assert "w_v" in plan  # this SQLite scans the index: an older one took the key order
    by_key = tables_mod.table_checksum(conn, "w", True, version=2)[1]  # (NOT INDEXED still scans w_v)
    by_index = tables_mod.table_checksum(conn, "w", True, " INDEXED BY w_v")[1]
    assert by_key != by_index
    assert tables_mod.scan_order_matches(conn, "w", by_key)
    assert tables_mod.scan_order_matches(conn, "w", by_index)
    conn.execute("UPDATE w SET v = 0 WHERE j = 5")
    assert not tables_mod.scan_order_matches(conn, "w", by_key)
    assert not tables_mod.scan_order_matches(conn, "w", by_index)
