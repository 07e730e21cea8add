"""The seed's recovery scenarios end to end on real files: rows deleted or changed by mistake, a
table dropped, the whole database lost. Each is planned (a dry run that changes nothing), then
applied in one transaction with an audit record in the repository.

Databases are built and read with Python's sqlite3 (a different SQLite build from dbre's apsw),
one short-lived connection at a time: two SQLite libraries must never hold the same file open
at once in one process (their POSIX locks would release each other's).
"""

from __future__ import annotations

import hashlib
import shlex
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import RestoreError, UsageError
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.restore.rows import apply_row_repair, check_where, plan_row_repair
from dbre.restore.table import apply_table_restore, plan_table_restore
from dbre.sources.local import LocalFileSource
from tests.dbfactory import assert_one_line_error, cli
from tests.sqld import SqldServer, sqld  # noqa: F401 - the session's sqld

SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE orders(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    total REAL CHECK (total >= 0),
    note TEXT,
    photo BLOB,
    updated_at TEXT
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE UNIQUE INDEX orders_note ON orders(note) WHERE note IS NOT NULL;
CREATE TABLE changes(what TEXT);
CREATE TRIGGER orders_touch AFTER UPDATE OF total ON orders
BEGIN UPDATE orders SET updated_at = 'touched' WHERE id = new.id; END;
CREATE TRIGGER orders_log AFTER INSERT ON orders BEGIN INSERT INTO changes VALUES ('insert ' || new.id); END;
CREATE TABLE events(at TEXT, kind TEXT);
CREATE TABLE stock(sku TEXT, shop INTEGER, qty INTEGER, PRIMARY KEY (sku, shop)) WITHOUT ROWID;
"""


def sql(path: Path, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run one statement (or executemany with a list of rows) in a connection of its own."""
    conn = sqlite3.connect(path)
    try:
        if isinstance(params, list):
            conn.executemany(statement, params)
            rows: list[tuple[Any, ...]] = []
        else:
            rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def make_shop(path: Path) -> Path:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"customer {i}") for i in range(1, 21)])
        conn.executemany(
            "INSERT INTO orders(customer_id, total, note, photo) VALUES (?, ?, ?, ?)",
            [(i % 20 + 1, i * 1.25 + 0.1, f"note {i}" if i % 3 else None, bytes([i % 256]) * (i % 7))
             for i in range(300)])
        conn.executemany("INSERT INTO events VALUES (?, ?)", [(f"2026-01-{i % 28 + 1:02d}", f"k{i % 5}")
                                                             for i in range(120)])
        conn.executemany("INSERT INTO stock VALUES (?, ?, ?)", [(f"sku-{i % 30}", i // 30, i) for i in range(90)])
        conn.execute("DELETE FROM changes")
        conn.commit()
    finally:
        conn.close()
    return path


def snapshot_of(repo: Repository, live: Path, db: str = "shop") -> str:
    return backup(repo, LocalFileSource(live), db).manifest.id


def file_hash(path: Path) -> str:
    """The bytes of the database and its -wal: what a dry run must leave as it was."""
    h = hashlib.sha256()
    for p in (path, Path(f"{path}-wal")):
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()


def rows(path: Path, table: str, order: str = "rowid") -> list[tuple[Any, ...]]:
    return sql(path, f"SELECT * FROM {table} ORDER BY {order}")


def schema_of(path: Path, table: str) -> list[tuple[Any, ...]]:
    return sql(path, "SELECT type, name, sql FROM sqlite_schema WHERE tbl_name = ? ORDER BY type, name", (table,))


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, Repository, str]:
    """A live WAL database, a repository, and the id of a snapshot of the database."""
    live = make_shop(tmp_path / "shop.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    return live, repo, snapshot_of(repo, live)


# --------------------------------------------------------------------------- rows deleted by mistake


def test_deleted_and_changed_rows_come_back_exactly(shop: tuple[Path, Repository, str], tmp_path: Path) -> None:
    live, repo, snap = shop
    original = rows(live, "orders")
    sql(live, "DELETE FROM orders WHERE id BETWEEN 101 AND 150")  # the mistake: 50 rows gone
    sql(live, "UPDATE orders SET total = 0, note = 'oops' WHERE id = 7")  # a row changed after it (trigger fires)
    sql(live, "INSERT INTO orders(customer_id, total) VALUES (1, 5)")  # a new order, id 301: only in live
    where = "id BETWEEN 1 AND 150 OR id > 300"
    args: list[str | Path] = ["--repo", tmp_path / "repo", "--db", "shop", "--live", live, "--table", "orders",
                              "--where", where]

    before = file_hash(live)
    dry = cli("repair-rows", *args)
    assert dry.returncode == 0, dry
    assert "dry run: nothing changed" in dry.stdout and "insert" in dry.stdout and "id=101" in dry.stdout
    assert "total: 0.0 -> 7.6; note: oops -> NULL; updated_at: touched -> NULL" in dry.stdout  # what changes back
    assert file_hash(live) == before

    with plan_row_repair(repo, "shop", live, "orders", where) as plan:
        assert plan.snapshot_rows == 150 and plan.live_rows == 101
        assert plan.counts() == {"insert": 50, "update": 1, "extra_kept": 1, "unchanged": 99}
        assert plan.extras == [(301,)] and plan.key == ["id"]

    done = cli("repair-rows", *args, "--apply")
    assert done.returncode == 0, done
    assert "inserted 50, updated 1, deleted 0" in done.stdout and "1 rows only in live kept" in done.stdout
    assert rows(live, "orders", "id")[:-1] == original  # exact content back, blobs and floats included
    assert rows(live, "orders", "id")[-1][0] == 301
    # the table's triggers were suspended (no 'touched', no logged inserts) and are back in place
    assert sql(live, "SELECT count(*) FROM changes") == [(1,)]  # the insert of order 301 only
    assert [r[1] for r in schema_of(live, "orders") if r[0] == "trigger"] == ["orders_log", "orders_touch"]
    assert sql(live, "PRAGMA integrity_check") == [("ok",)]

    audit = repo.records("audits", "shop")[-1]
    assert audit["operation"] == "repair-rows" and audit["snapshot"] == snap and audit["where"] == where
    assert (audit["inserted"], audit["updated"], audit["deleted"]) == (50, 1, 0)
    assert "@" in audit["who"] and audit["time"] and audit["keys"]["update"] == [[7]]

    again = cli("repair-rows", *args, "--delete-extra", "--apply")
    assert again.returncode == 0, again
    assert "inserted 0, updated 0, deleted 1" in again.stdout
    assert rows(live, "orders", "id") == original


def test_rows_of_tables_keyed_by_rowid_and_by_a_composite_key(shop: tuple[Path, Repository, str]) -> None:
    live, repo, _ = shop
    events, stock = rows(live, "events"), rows(live, "stock", "sku, shop")
    sql(live, "DELETE FROM events WHERE kind = 'k3'")
    sql(live, "UPDATE events SET at = 'never' WHERE rowid = 2")
    sql(live, "DELETE FROM stock WHERE shop = 1")
    sql(live, "UPDATE stock SET qty = -1 WHERE sku = 'sku-4'")
    with plan_row_repair(repo, "shop", live, "events", "kind IN ('k1', 'k3')") as plan:
        assert plan.key_is_rowid and plan.counts() == {"insert": 24, "update": 1, "extra_kept": 0, "unchanged": 23}
        apply_row_repair(plan)
    assert sql(live, "SELECT rowid, * FROM events ORDER BY rowid") == [(i + 1, *r) for i, r in enumerate(events)]
    with plan_row_repair(repo, "shop", live, "stock", "qty >= -1") as plan:
        assert plan.key == ["sku", "shop"] and len(plan.inserts) == 30 and len(plan.updates) == 2
        apply_row_repair(plan)
    assert rows(live, "stock", "sku, shop") == stock


def test_apply_stops_when_live_changed_after_the_plan(shop: tuple[Path, Repository, str]) -> None:
    live, repo, _ = shop
    sql(live, "DELETE FROM orders WHERE id <= 10")
    plan = plan_row_repair(repo, "shop", live, "orders", "id <= 20")
    sql(live, "UPDATE orders SET note = 'meanwhile' WHERE id = 15")  # someone works on a selected row
    changed = file_hash(live)
    with pytest.raises(RestoreError, match=r"1 selected rows of orders changed in the live database since the plan "
                                           r"\(e\.g\. id=15\); nothing was changed"):
        apply_row_repair(plan)
    assert file_hash(live) == changed and plan.past.past.closed  # (the state let go: no scratch copy to remove)
    assert repo.records("audits", "shop") == []
    with plan_row_repair(repo, "shop", live, "orders", "id <= 20") as again:  # a new plan sees the new state
        assert again.counts()["insert"] == 10 and again.counts()["update"] == 1


def test_bad_input_is_one_line_and_exit_2(shop: tuple[Path, Repository, str], tmp_path: Path) -> None:
    live, repo, _ = shop
    base: list[str | Path] = ["repair-rows", "--repo", tmp_path / "repo", "--db", "shop", "--live", live,
                              "--table", "orders"]
    for where, needle in [("id = 1; DROP TABLE orders", "';'"), ("no_such_column = 1", "no such column"),
                          ("id = ?", "parameter"), ("1) OR (1", "parenthesis"), ("id = 1 --", "comment"),
                          ("note = 'x", "unclosed quote"), ("", "empty")]:
        assert_one_line_error(cli(*base, "--where", where), 2, needle)
    assert check_where("note = 'a;b' AND (id > 1)") == "note = 'a;b' AND (id > 1)"  # ';' in a string is data
    unknown = cli("repair-rows", *base[1:-1], "nope", "--where", "1")
    assert_one_line_error(unknown, 2, "no table 'nope'", "customers, events, orders, stock")
    assert_one_line_error(cli("restore-table", *base[1:-1], "nope"), 2, "no table 'nope'")
    remote = cli("restore-table", *base[1:5], "--live", "libsql://db.example.com?authToken=secret", "--table", "x")
    assert "secret" not in assert_one_line_error(remote, 2, "remote databases are not supported yet")
    with pytest.raises(UsageError, match="more than 10 rows of orders"):
        plan_row_repair(repo, "shop", live, "orders", "id <= 50", max_rows=10)


def test_rows_of_a_remote_libsql_database(sqld: SqldServer, tmp_path: Path,  # noqa: F811
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import dbre.restore.rows
    from dbre.sources.remote import RemoteLibsqlSource

    monkeypatch.setattr(dbre.restore.rows, "REMOTE_PAGE_ROWS", 16)  # read the selection in several pages

    t = "rr_" + uuid.uuid4().hex[:8]  # the session's server is shared: a table of our own
    sqld.pipeline([
        f"CREATE TABLE {t}(id INTEGER PRIMARY KEY, name TEXT, price REAL, data BLOB, touched INTEGER DEFAULT 0)",
        f"CREATE TRIGGER {t}_touch AFTER UPDATE OF price ON {t} BEGIN UPDATE {t} SET touched = 1 "
        "WHERE id = new.id; END",
        *[(f"INSERT INTO {t}(id, name, price, data) VALUES (?, ?, ?, ?)",
           [i, f"item {i}" * (i % 4), i / 10 + 0.2, bytes([i % 256]) * (i % 5)]) for i in range(1, 121)],
    ])
    query = f"SELECT * FROM {t} ORDER BY id"
    original = [tuple(r) for r in sqld.execute(query)]
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, RemoteLibsqlSource(sqld.url, cache_dir=tmp_path / "cache", method="dump"), "remote")
    sqld.pipeline([f"DELETE FROM {t} WHERE id % 7 = 0", f"UPDATE {t} SET price = -1, name = NULL WHERE id = 50",
                   f"INSERT INTO {t}(id, name) VALUES (500, 'new')"])

    where = "id <= 120 OR id = 500"
    with plan_row_repair(repo, "remote", sqld.url, t, where, delete_extra=True) as plan:
        assert plan.live == sqld.url and plan.counts() == {"insert": 17, "update": 1, "delete": 1, "unchanged": 102}
        assert "price: -1.0 -> 5.2" in " ".join(p["detail"] for p in plan.preview)
        result = apply_row_repair(plan)
    assert (result.inserted, result.updated, result.deleted) == (17, 1, 1)
    assert [tuple(r) for r in sqld.execute(query)] == original  # 0.30000000000000004-style floats too
    assert sqld.execute(f"SELECT count(*) FROM sqlite_schema WHERE name = '{t}_touch'") == [[1]]
    assert repo.records("audits", "remote")[-1]["live"] == sqld.url

    sqld.execute(f"DELETE FROM {t} WHERE id = 3")
    plan = plan_row_repair(repo, "remote", sqld.url, t, "id < 10")
    sqld.execute(f"UPDATE {t} SET name = 'meanwhile' WHERE id = 4")
    with pytest.raises(RestoreError, match="1 selected rows .* changed in the live database since the plan"):
        apply_row_repair(plan)
    assert sqld.execute(f"SELECT count(*) FROM {t} WHERE id = 3") == [[0]]


# --------------------------------------------------------------------------- a table dropped


def test_dropped_table_comes_back_in_place_then_as_a_copy(shop: tuple[Path, Repository, str], tmp_path: Path) -> None:
    live, repo, snap = shop
    orders, schema = rows(live, "orders"), schema_of(live, "orders")
    sql(live, "DROP TABLE orders")
    args: list[str | Path] = ["--repo", tmp_path / "repo", "--db", "shop", "--live", live, "--table", "orders",
                              "--snapshot", snap[:8]]

    before = file_hash(live)
    dry = cli("restore-table", *args)
    assert dry.returncode == 0, dry
    assert "recreate (dropped in live)" in dry.stdout and "_restored" not in dry.stdout
    assert "CREATE TRIGGER orders_touch" in dry.stdout and "dry run: nothing changed" in dry.stdout
    assert file_hash(live) == before

    back = cli("restore-table", *args, "--apply")  # no live orders: back under its own name, triggers too
    assert back.returncode == 0, back
    assert "orders: recreated orders (300 rows" in back.stdout
    assert rows(live, "orders") == orders and schema_of(live, "orders") == schema
    assert sql(live, "SELECT seq FROM sqlite_sequence WHERE name = 'orders'") == [(300,)]

    copy = cli("restore-table", *args, "--apply")  # orders exists now: a copy beside it
    assert copy.returncode == 0, copy
    assert "orders: restored as orders_restored (300 rows" in copy.stdout
    assert rows(live, "orders_restored") == orders
    assert [r[1] for r in schema_of(live, "orders_restored")] == ["orders_customer_restored", "orders_note_restored",
                                                                 "orders_restored"]  # indexes, no triggers
    assert_one_line_error(cli("restore-table", *args, "--apply"), 2, "'orders_restored' already exists")

    replaced = cli("restore-table", *args, "--replace", "--apply")
    assert replaced.returncode == 0, replaced
    assert "orders: replaced orders" in replaced.stdout and "safety snapshot" in replaced.stdout
    assert rows(live, "orders") == orders and schema_of(live, "orders") == schema
    assert sql(live, "PRAGMA integrity_check") == [("ok",)] and sql(live, "PRAGMA foreign_key_check") == []

    audits = repo.records("audits", "shop")
    assert [(a["mode"], a["tables"][0]["action"]) for a in audits] == [
        ("rename", "recreate (dropped in live)"), ("rename", "create copy"), ("replace", "replace")]
    safety = audits[-1]["safety_snapshot"]
    m = repo.find_snapshot("shop", safety)
    assert "purpose" in m.source and "orders_restored" in m.tables  # the state just before the replace
    assert safety in replaced.stdout and audits[-1]["undo"].endswith("--replace --apply")


def test_replace_is_undone_from_its_safety_snapshot(shop: tuple[Path, Repository, str], tmp_path: Path) -> None:
    live, repo, snap = shop
    orders = rows(live, "orders")
    sql(live, "DELETE FROM orders WHERE customer_id = 4")  # 15 rows gone ...
    sql(live, "INSERT INTO orders(customer_id, total, note) VALUES (2, 1, 'kept after the mistake')")
    after_mistake = rows(live, "orders")

    with plan_table_restore(repo, "shop", live, ["ORDERS"], snapshot=snap, mode="replace") as plan:
        assert [(a.table, a.action, a.snapshot_rows, a.live_rows) for a in plan.actions] == [
            ("orders", "replace", 300, 286)]
        result = apply_table_restore(plan)
    assert rows(live, "orders") == orders
    assert sql(live, "SELECT seq FROM sqlite_sequence WHERE name = 'orders'") == [(301,)]  # no id is handed out twice

    # the user changes their mind: the safety snapshot holds the live table as it was replaced
    restored = tmp_path / "before-replace.db"
    assert result.safety_snapshot is not None
    whole = cli("restore", "--repo", tmp_path / "repo", "--db", "shop", "--snapshot", result.safety_snapshot,
                "--to", restored)
    assert whole.returncode == 0, whole
    assert rows(restored, "orders") == after_mistake
    with plan_table_restore(repo, "shop", live, ["orders"], snapshot=result.safety_snapshot, mode="replace") as undo:
        apply_table_restore(undo)
    assert rows(live, "orders") == after_mistake


def test_replace_rolls_back_on_new_foreign_key_violations(shop: tuple[Path, Repository, str]) -> None:
    live, repo, snap = shop
    sql(live, "DELETE FROM orders WHERE customer_id = 5")
    sql(live, "DELETE FROM customers WHERE id = 5")  # the snapshot's orders of customer 5 would be orphans
    before = file_hash(live)
    plan = plan_table_restore(repo, "shop", live, ["orders"], snapshot=snap, mode="replace")
    with pytest.raises(RestoreError, match=r"break foreign keys \(15 in \"orders\" new violations\); rolled back"):
        apply_table_restore(plan)
    assert file_hash(live) == before and len(rows(live, "orders")) == 285
    assert repo.records("audits", "shop") == []
    with plan_table_restore(repo, "shop", live, ["orders"], snapshot=snap, mode="replace") as again:
        apply_table_restore(again, allow_fk_violations=True)
    assert len(sql(live, "PRAGMA foreign_key_check(orders)")) == 15
    assert repo.records("audits", "shop")[-1]["foreign_key_violations_allowed"] is True


# --------------------------------------------------------------------------- the whole database lost


def test_whole_database_lost_is_restored_through_the_cli(shop: tuple[Path, Repository, str], tmp_path: Path) -> None:
    live, _, _ = shop
    orders = rows(live, "orders")
    live.unlink()
    out = tmp_path / "again" / "shop.db"
    out.parent.mkdir()
    result = cli("restore", "--repo", tmp_path / "repo", "--db", "shop", "--to", out)
    assert result.returncode == 0, result
    assert rows(out, "orders") == orders and sql(out, "PRAGMA integrity_check") == [("ok",)]


def test_repair_rows_takes_a_safety_snapshot_and_its_undo_command_works(shop: tuple[Path, Repository, str],
                                                                         tmp_path: Path) -> None:
    """A repair that turns out wrong (the rows deleted on purpose came back, the live-only row was
    dropped) is undone by the printed command, from the safety snapshot taken just before it."""
    live, repo, snap = shop
    sql(live, "DELETE FROM orders WHERE id BETWEEN 11 AND 20")  # deleted on purpose, it turns out
    sql(live, "INSERT INTO orders(customer_id, total) VALUES (3, 9)")  # id 301: only in live
    before_repair = rows(live, "orders", "id")
    args: list[str | Path] = ["--repo", tmp_path / "repo", "--db", "shop", "--live", live, "--table", "orders",
                              "--where", "id <= 20 OR id > 300"]
    done = cli("repair-rows", *args, "--delete-extra", "--apply")
    assert done.returncode == 0, done
    assert "inserted 10, updated 0, deleted 1" in done.stdout
    assert rows(live, "orders", "id") != before_repair
    safety = [m for m in repo.snapshots("shop") if m.is_safety]
    assert len(safety) == 1 and safety[0].id != snap
    assert f"safety snapshot {safety[0].id} holds the database as it was" in done.stdout
    undo = done.stdout.strip().splitlines()[-1].strip()
    words = shlex.split(undo)
    assert words[:2] == ["dbre", "repair-rows"] and "--snapshot" in words and safety[0].id in words
    assert words[words.index("--live") + 1] == str(live.absolute())
    assert repo.records("audits", "shop")[-1]["safety_snapshot"] == safety[0].id

    back = cli(*words[1:])  # the printed command, as the user pastes it
    assert back.returncode == 0, back
    assert "inserted 1, updated 0, deleted 10" in back.stdout
    assert rows(live, "orders", "id") == before_repair
    assert sql(live, "PRAGMA integrity_check") == [("ok",)]
    # the undo took its own safety snapshot; a plain restore still picks the schedule's snapshot
    assert len([m for m in repo.snapshots("shop") if m.is_safety]) == 2
    assert repo.find_snapshot("shop").id == snap
