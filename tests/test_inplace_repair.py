"""`repair-rows` and `restore-table` read the past state in place (issue 13): no scratch copy of the database.

The database has one big table (``items``, ~24 MiB of random payloads) and small ones; the repository
is a real local one, read through a counting wrapper of its real store (nothing about the store's
behaviour is mocked). Each in-place result is compared with the same operation done from a full
restore of the same point (what the scratch path gave). Also: a replicated point (``at``), a damaged
page met in the plan or first in the apply (one line, the live file byte-identical, the lock let go;
restore-table reads its rows before the write lock since session 9: tests/test_review_s9_inplace.py), a
plan that went stale, the shared lock held from plan to apply, and an S3 repository (moto_server).
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import pytest

from dbre.errors import IntegrityError, LockedError, RestoreError
from dbre.replicate.segment import to_time
from dbre.repository.backup import backup, read_run
from dbre.repository.manifest import RECORD, Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.restore.full import apply_restore, plan_restore
from dbre.restore.query import CountingStore, FetchStats
from dbre.restore.rows import apply_row_repair, plan_row_repair
from dbre.restore.table import apply_table_restore, plan_table_restore
from dbre.sources import open_source
from tests.dbfactory import assert_one_line_error, cli
from tests.replication import replicating, restore_at, shipped_transactions


@dataclass
class Shop:
    url: str
    repo: Repository
    src: Path
    snap: Manifest
    size: int  # bytes of the database file


def _make(path: Path, mb: int, journal: str) -> Path:
    """``items(id, name, n, payload)`` of ~``mb`` MiB of random payloads, and the small tables."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"PRAGMA journal_mode={journal}")
    c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, n INTEGER, payload BLOB)")
    c.execute("CREATE INDEX items_name ON items(name)")
    c.execute("WITH RECURSIVE k(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM k WHERE value < ?) "
              "INSERT INTO items(name, n, payload) SELECT 'item ' || value, value * 7 % 1000, randomblob(400) FROM k",
              (mb * 1024 * 1024 // 440,))
    c.close()
    _add_small_tables(path)
    return path


def _add_small_tables(path: Path) -> None:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("BEGIN")
    c.execute("CREATE TABLE small(id INTEGER PRIMARY KEY, v TEXT, n REAL)")
    c.executemany("INSERT INTO small(v, n) VALUES (?, ?)", [(f"v{i}", i / 3) for i in range(300)])
    # a table whose count(*) is answered by its index: the plan never reads its leaf pages
    c.execute("CREATE TABLE docs(id INTEGER PRIMARY KEY, tag TEXT, body BLOB)")
    c.executemany("INSERT INTO docs(tag, body) VALUES (?, randomblob(3000))", [(f"t{i % 7}",) for i in range(2000)])
    c.execute("CREATE INDEX docs_tag ON docs(tag)")
    c.execute("COMMIT")
    c.close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Shop:
    tmp = tmp_path_factory.mktemp("inplace")
    src = _make(tmp / "src.db", 24, "delete")
    url = str(tmp / "repo")
    repo = Repository.open_or_init(url, None)
    snap = backup(repo, open_source(str(src)), "shop", checksums=False).manifest
    return Shop(url, repo, src, snap, src.stat().st_size)


def counted(repo: Repository) -> tuple[Repository, FetchStats]:
    """``repo`` over a wrapper of its real store that counts every read (GETs, ranged GETs, bytes)."""
    stats = FetchStats()
    return Repository(CountingStore(repo.store, stats), repo.config, repo.sealer, repo.raw_config), stats


def restored(repo: Repository, tmp: Path, **choice: Any) -> Path:
    """A full restore of the point (what the scratch path restored first)."""
    out = tmp / f"full-{len(list(tmp.glob('full-*')))}.db"
    apply_restore(repo, plan_restore(repo, "shop", out, **choice))
    return out


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    c = sqlite3.connect(path)
    try:
        return c.execute(sql).fetchall()
    finally:
        c.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scratch_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("dbre-scratch-*")}


def live_copy(shop: Shop, tmp: Path) -> Path:
    live = tmp / "live.db"
    shutil.copy(shop.src, live)
    return live


def no_locks(shop: Shop) -> bool:
    return not list(Path(shop.url, "locks").glob("*"))


# --------------------------------------------------------------------------- reads a small part


def test_restore_table_of_a_small_table_reads_a_small_part_and_equals_the_full_restore(
        shop: Shop, tmp_path: Path) -> None:
    live = live_copy(shop, tmp_path)
    c = sqlite3.connect(live, isolation_level=None)
    c.execute("DELETE FROM small WHERE id % 10 = 0")
    c.execute("UPDATE small SET v = 'oops'")
    c.close()
    repo, stats = counted(shop.repo)
    before = scratch_dirs()
    plan = plan_table_restore(repo, "shop", live, ["small"], mode="replace", scratch_dir=tmp_path / "scratch")
    result = apply_table_restore(plan)
    assert not (tmp_path / "scratch").exists() and scratch_dirs() == before  # no scratch copy was made
    # the counted reads: the state's pages, manifests, lock listings; the safety snapshot's writes aside
    assert 0 < stats.bytes < shop.size / 4, (stats.describe(), shop.size)
    assert plan.past.stats.bytes < shop.size / 4 and plan.past.stats.pages_served < 100, plan.past.stats.describe()
    full = restored(shop.repo, tmp_path, snapshot=shop.snap.id)
    assert rows(live, "SELECT * FROM small ORDER BY id") == rows(full, "SELECT * FROM small ORDER BY id")
    assert rows(live, "SELECT count(*) FROM small")[0][0] == 300
    assert result.safety_snapshot and result.undo and no_locks(shop)
    audit = shop.repo.records("audits", "shop")[-1]
    assert audit["read"] == "in place" and 0 < audit["repository_reads"]["bytes_read"] < shop.size / 4, audit


def test_repair_of_a_few_rows_of_the_big_table_reads_a_small_part_and_equals_the_full_restore(
        shop: Shop, tmp_path: Path) -> None:
    live = live_copy(shop, tmp_path)
    c = sqlite3.connect(live, isolation_level=None)
    c.execute("DELETE FROM items WHERE id IN (7, 3001)")
    c.execute("UPDATE items SET n = -1, payload = x'00' WHERE id = 20000")
    c.close()
    where = "id IN (7, 3001, 20000, 40000)"
    repo, stats = counted(shop.repo)
    before = scratch_dirs()
    with plan_row_repair(repo, "shop", live, "items", where, scratch_dir=tmp_path / "scratch") as plan:
        assert plan.counts() == {"insert": 2, "update": 1, "extra_kept": 0, "unchanged": 1}
        planned = stats.bytes
        result = apply_row_repair(plan)
    assert not (tmp_path / "scratch").exists() and scratch_dirs() == before
    # each row far from the others costs about one sealed batch of pages (~2 MiB), whatever the database's size
    assert 0 < planned < shop.size / 3 and planned < 6 * 2.2 * 2**20, (stats.describe(), shop.size)
    assert plan.past.stats.pages_served < 100, plan.past.stats.describe()
    full = restored(shop.repo, tmp_path, snapshot=shop.snap.id)
    select = f"SELECT * FROM items WHERE {where} ORDER BY id"
    assert rows(live, select) == rows(full, select) and len(rows(live, select)) == 4
    assert rows(live, "SELECT count(*), sum(n) FROM items") == rows(full, "SELECT count(*), sum(n) FROM items")
    assert (result.inserted, result.updated) == (2, 1) and result.undo_command() and no_locks(shop)
    audit = shop.repo.records("audits", "shop")[-1]
    assert audit["operation"] == "repair-rows" and audit["read"] == "in place" and audit["undo"]


# --------------------------------------------------------------------------- a replicated point


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Repository, Path, list[int]]]:
    """A snapshot, then 6 replicated transactions, each inserting a row into ``small`` and changing one."""
    tmp = tmp_path_factory.mktemp("inplace_pitr")
    src = _make(tmp / "src.db", 2, "wal")
    repo = Repository.open_or_init(str(tmp / "repo"), None)
    backup(repo, open_source(str(src)), "shop", checksums=False)
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src, "shop"):
        for k in range(6):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO small(id, v, n) VALUES (?, ?, ?)", (1000 + k, f"late {k}", k))
            conn.execute("UPDATE small SET v = ? WHERE id = ?", (f"changed {k}", k + 1))
            conn.execute("COMMIT")
            time.sleep(0.15)
    conn.close()
    times = [observed for _, _, observed in shipped_transactions(repo, "shop")]
    assert len(times) == 6, times
    yield repo, tmp, times


def test_at_a_replicated_point_both_equal_restore_at(replicated: tuple[Repository, Path, list[int]],
                                                     tmp_path: Path) -> None:
    repo, tmp, times = replicated
    at = to_time((times[2] + times[3]) // 2)  # after the third replicated transaction, before the fourth
    full = tmp_path / "at.db"
    restore_at(repo, "shop", at, full)
    expected = rows(full, "SELECT * FROM small ORDER BY id")
    assert (1002, "late 2", 2.0) in expected and not any(r[0] == 1003 for r in expected)  # exactly three
    live = tmp_path / "live.db"
    shutil.copy(full, live)
    c = sqlite3.connect(live, isolation_level=None)
    c.execute("DELETE FROM small WHERE id IN (1000, 1001, 2)")
    c.execute("UPDATE small SET v = 'wrong' WHERE id IN (1, 3)")
    c.close()
    with plan_row_repair(repo, "shop", live, "small", "id < 10 OR id >= 1000", at=at) as plan:
        assert plan.past.describe()["transactions"] == 3, plan.past.describe()
        assert plan.counts()["insert"] == 3 and plan.counts()["update"] == 2, plan.counts()
        apply_row_repair(plan)
    assert rows(live, "SELECT * FROM small ORDER BY id") == expected
    # the table too, as a copy beside the live one
    with plan_table_restore(repo, "shop", live, ["small"], at=at) as tplan:
        assert tplan.describe()["transactions"] == 3
        apply_table_restore(tplan)
    assert rows(live, "SELECT * FROM small_restored ORDER BY id") == expected
    assert not list((tmp / "repo" / "locks").glob("*"))


# --------------------------------------------------------------------------- damage and staleness


def _record(repo: Repository, m: Manifest, page: int) -> tuple[str, int, int]:
    """(pack id, offset, length) of the sealed batch holding page ``page`` (from 1) of snapshot ``m``."""
    start = 0
    for run in m.runs:
        if page - 1 < start + run.pages:
            _, pack, offset, length, _ = RECORD.unpack_from(read_run(repo, m, run), (page - 1 - start) * RECORD.size)
            return pack.hex(), offset, length
        start += run.pages
    raise AssertionError(f"no page {page}")


def _flip(repo_dir: Path, where: tuple[str, int, int]) -> tuple[Path, bytes]:
    pack, offset, length = where
    path = repo_dir / pack_key(pack)
    good = path.read_bytes()
    bad = bytearray(good)
    bad[offset + length // 2] ^= 0x40
    path.write_bytes(bytes(bad))
    return path, good


def _pages_of(path: Path, table: str, kind: str = "leaf") -> list[int]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [int(r[0]) for r in conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? "
                                                "ORDER BY pageno", (table, kind))]
    finally:
        conn.close()


def test_a_damaged_page_met_in_the_plan_is_one_line_and_changes_nothing(shop: Shop, tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    shutil.copytree(shop.url, repo_dir)
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("UPDATE small SET v = 'x' WHERE id < 5")
    live_sha, audits = sha(live), sorted(Path(repo_dir).rglob("records/audits/*/*"))
    root = rows(shop.src, "SELECT rootpage FROM sqlite_schema WHERE name = 'small'")[0][0]
    where = _record(shop.repo, shop.snap, root)
    _flip(repo_dir, where)
    for args in (["restore-table", "--table", "small", "--replace"], ["repair-rows", "--table", "small",
                                                                      "--where", "id < 5"]):
        r = cli(*args[:1], "--repo", repo_dir, "--db", "shop", "--live", live, *args[1:], "--apply")
        assert_one_line_error(r, 1, pack_key(where[0]))
        assert sha(live) == live_sha
        assert not list((repo_dir / "locks").glob("*"))
    assert sorted(Path(repo_dir).rglob("records/audits/*/*")) == audits  # no audit record, no safety snapshot
    assert len(list((repo_dir / "snapshots").rglob("*"))) == len(list(Path(shop.url, "snapshots").rglob("*")))


def test_a_damaged_page_first_read_in_the_write_transaction_rolls_it_back(shop: Shop, tmp_path: Path) -> None:
    """The plan counts ``docs`` through its index; the apply then reads a leaf page of the table that the
    plan never fetched (staging the rows, just before the write lock), and it is damaged: nothing is
    written, the live file is byte-identical."""
    repo_dir = tmp_path / "repo"
    shutil.copytree(shop.url, repo_dir)
    repo = Repository.open(str(repo_dir))
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM docs WHERE id < 50")
    live_sha, audits = sha(live), len(repo.records("audits", "shop"))
    plan = plan_table_restore(repo, "shop", live, ["docs"], mode="replace")
    fetched = set(plan.past.past.source._batches)  # noqa: SLF001 - which batches the plan read
    unread = [w for w in (_record(repo, shop.snap, p) for p in _pages_of(shop.src, "docs")) if w not in fetched]
    assert unread, "the plan read every leaf page of docs"
    _flip(repo_dir, unread[len(unread) // 2])
    with pytest.raises(IntegrityError, match=r"^restore-table into .*: packs/.*; rolled back, nothing was changed"):
        apply_table_restore(plan)
    assert sha(live) == live_sha and plan.past.past.closed and not list((repo_dir / "locks").glob("*"))
    assert len(repo.records("audits", "shop")) == audits


def test_a_stale_plan_changes_nothing_and_lets_the_state_go(shop: Shop, tmp_path: Path) -> None:
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM small WHERE id <= 10")
    plan = plan_row_repair(shop.repo, "shop", live, "small", "id <= 20")
    assert plan.counts()["insert"] == 10
    sqlite3.connect(live, isolation_level=None).execute("UPDATE small SET v = 'meanwhile' WHERE id = 15")
    changed = sha(live)
    with pytest.raises(RestoreError, match="changed in the live database since the plan"):
        apply_row_repair(plan)
    assert sha(live) == changed and plan.past.past.closed and no_locks(shop)


def test_the_shared_lock_is_held_from_the_plan_to_the_end_of_the_apply(shop: Shop, tmp_path: Path) -> None:
    """Between a plan and its apply, prune's exclusive lock is refused: nothing the apply reads in place
    can be deleted under it. Once applied (or closed), the lock is gone."""
    live = live_copy(shop, tmp_path)
    sqlite3.connect(live, isolation_level=None).execute("DELETE FROM small WHERE id = 1")
    for make in (lambda: plan_row_repair(shop.repo, "shop", live, "small", "id < 3"),
                 lambda: plan_table_restore(shop.repo, "shop", live, ["small"])):
        plan: Any = make()
        held = [p.read_text() for p in Path(shop.url, "locks").glob("*")]
        assert len(held) == 1 and '"exclusive": false' in held[0], held
        with pytest.raises(LockedError), shop.repo.lock("prune", exclusive=True):
            pass
        plan.close()
        assert no_locks(shop)
        with shop.repo.lock("prune", exclusive=True):
            pass


def test_restore_table_in_place_from_s3_reads_a_small_part(s3_bucket: str, tmp_path: Path) -> None:
    """The same on a real S3 server (moto_server): ranged reads of the pages the small table needs."""
    src = _make(tmp_path / "src.db", 12, "delete")
    repo = Repository.open_or_init(f"s3://{s3_bucket}/repo", None)
    snap = backup(repo, open_source(str(src)), "shop", checksums=False).manifest
    live = tmp_path / "live.db"
    shutil.copy(src, live)
    sqlite3.connect(live, isolation_level=None).execute("DROP TABLE small")
    counted_repo, stats = counted(repo)
    with plan_table_restore(counted_repo, "shop", live, ["small"]) as plan:
        assert plan.actions[0].action == "recreate (dropped in live)"
        apply_table_restore(plan)
    assert 0 < stats.bytes < src.stat().st_size / 3, (stats.describe(), src.stat().st_size)
    full = restored(repo, tmp_path, snapshot=snap.id)
    assert rows(live, "SELECT * FROM small ORDER BY id") == rows(full, "SELECT * FROM small ORDER BY id")
