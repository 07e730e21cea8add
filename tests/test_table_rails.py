"""Safety rails of table restores and row repairs (issue 15) on real files and repositories: a
dropped table comes back under its own name, the printed undo of a replace runs as printed, a row
repair's plan names what foreign-key actions and triggers do to other tables, and `dbre audit`
reads the audit records back.

Databases are written and read with Python's sqlite3 one short connection at a time (dbre uses
apsw: two SQLite libraries must never hold one file open at once in one process).
"""

from __future__ import annotations

import json
import shlex
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from dbre.cli import _document
from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from tests.dbfactory import assert_one_line_error, cli, dbre_env, run_dbre
from tests.sqld import SqldServer, sqld  # noqa: F401 - the session's sqld

SCHEMA = """
PRAGMA journal_mode=WAL;
CREATE TABLE customers(id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT);
CREATE TABLE orders(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    customer_id INTEGER REFERENCES customers(id) ON DELETE CASCADE,
    email TEXT REFERENCES customers(email) ON UPDATE CASCADE,
    total REAL
);
CREATE INDEX orders_customer ON orders(customer_id);
CREATE TABLE reviews(id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id) ON DELETE SET NULL,
                     body TEXT);
CREATE TABLE notes(id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), body TEXT);
CREATE TABLE log(what TEXT);
CREATE TRIGGER customers_log AFTER UPDATE ON customers BEGIN INSERT INTO log VALUES ('update ' || new.id); END;
CREATE TRIGGER customers_gone AFTER DELETE ON customers BEGIN DELETE FROM notes WHERE customer_id = old.id; END;
CREATE TRIGGER orders_log AFTER INSERT ON orders BEGIN INSERT INTO log VALUES ('order ' || new.id); END;
"""


def sql(path: Path, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def script(path: Path, text: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(text)
    finally:
        conn.close()


def make_shop(path: Path) -> Path:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA)
        conn.executemany("INSERT INTO customers VALUES (?, ?, ?)", [(i, f"c{i}@x", f"customer {i}")
                                                                   for i in range(1, 11)])
        conn.executemany("INSERT INTO orders(customer_id, email, total) VALUES (?, ?, ?)",
                         [(i % 10 + 1, f"c{i % 10 + 1}@x", i * 1.5) for i in range(60)])
        conn.executemany("INSERT INTO reviews(customer_id, body) VALUES (?, ?)",
                         [(i % 10 + 1, f"review {i}") for i in range(30)])
        conn.executemany("INSERT INTO notes(customer_id, body) VALUES (?, ?)",
                         [(i % 10 + 1, f"n{i}") for i in range(20)])
        conn.execute("DELETE FROM log")
        conn.commit()
    finally:
        conn.close()
    return path


def rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    return sql(path, f'SELECT * FROM "{table}" ORDER BY rowid')


def schema_of(path: Path, table: str) -> list[tuple[Any, ...]]:
    return sql(path, "SELECT type, name, sql FROM sqlite_schema WHERE tbl_name = ? ORDER BY type, name", (table,))


def names(path: Path) -> set[str]:
    return {r[0] for r in sql(path, "SELECT name FROM sqlite_schema")}


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, Path, str]:
    """A live WAL database, a plain local repository, and the id of a snapshot of the database."""
    live = make_shop(tmp_path / "shop.db")
    repo = tmp_path / "repo"
    snap = backup(Repository.open_or_init(str(repo)), LocalFileSource(live), "shop").manifest.id
    return live, repo, snap


def run_printed(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a printed shell command word for word (shlex), `dbre` being this checkout's CLI."""
    words = shlex.split(command)
    argv = [sys.executable, "-m", "dbre.cli", *words[1:]] if words[0] == "dbre" else words
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=dbre_env(), timeout=120)


def undo_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("to undo"))
    return [line.strip() for line in lines[start + 1:] if line.startswith("  ")]


# --------------------------------------------------------------------------- 1: a dropped table


def test_dropped_table_is_restored_under_its_own_name_with_indexes_and_triggers(
        shop: tuple[Path, Path, str], tmp_path: Path) -> None:
    live, repo, snap = shop
    orders, schema = rows(live, "orders"), schema_of(live, "orders")
    sql(live, "DROP TABLE orders")
    args: list[str | Path] = ["--repo", repo, "--db", "shop", "--live", live, "--table", "orders", "--snapshot", snap]

    plan = cli("restore-table", *args, "--json")
    assert plan.returncode == 0, plan
    (action,) = json.loads(plan.stdout)["tables"]
    assert (action["target"], action["action"], action["skipped"]) == ("orders", "recreate (dropped in live)", [])
    assert any(s.startswith("CREATE TRIGGER orders_log") for s in action["statements"])

    done = cli("restore-table", *args, "--apply")
    assert done.returncode == 0, done
    assert "orders: recreated orders (60 rows" in done.stdout
    assert rows(live, "orders") == orders and schema_of(live, "orders") == schema  # indexes and triggers as they were
    assert not any(n.endswith("_restored") for n in names(live))
    sql(live, "INSERT INTO orders(customer_id, email, total) VALUES (1, 'c1@x', 1)")
    assert sql(live, "SELECT what FROM log") == [("order 61",)]  # its trigger is live again

    # the live table exists now: without --replace the snapshot's table comes as a copy beside it
    copy = cli("restore-table", *args, "--apply")
    assert copy.returncode == 0, copy
    assert "orders: restored as orders_restored (60 rows" in copy.stdout and rows(live, "orders_restored") == orders
    assert "orders_log" in names(live) and {"orders_customer_restored"} <= names(live)

    # the printed undo of the recreate drops the table again (with its index and trigger)
    (undo,) = undo_lines(done.stdout)
    assert undo.startswith("sqlite3 ")
    sql(live, "DROP TABLE orders_restored")
    dropped = run_printed(undo, tmp_path)
    assert dropped.returncode == 0, dropped.stderr
    assert not {"orders", "orders_customer", "orders_log"} & names(live)


def test_dropped_table_whose_index_name_is_taken_is_refused(shop: tuple[Path, Path, str]) -> None:
    live, repo, snap = shop
    script(live, "DROP TABLE orders; CREATE INDEX orders_customer ON reviews(customer_id);")
    res = cli("restore-table", "--repo", repo, "--db", "shop", "--live", live, "--table", "orders")
    assert_one_line_error(res, 2, "index 'orders_customer' on 'reviews'")


def test_a_live_file_that_is_another_database_is_refused(shop: tuple[Path, Path, str], tmp_path: Path) -> None:
    """--live naming a database that shares no table with the snapshot (a wrong path, or --db naming
    another database) is refused before any plan, nothing changed; an empty database is a new one to
    fill and is planned. A cold tester's restore-table created a table in an unrelated database."""
    _, repo, _ = shop
    other = tmp_path / "other.db"
    script(other, "CREATE TABLE kv(k TEXT PRIMARY KEY, v TEXT); INSERT INTO kv VALUES ('a', 'b');")
    before, objects = other.read_bytes(), names(other)
    for extra in ([], ["--apply"]):
        res = cli("restore-table", "--repo", repo, "--db", "shop", "--live", other, "--table", "orders", *extra)
        assert_one_line_error(res, 2, "shares no table with snapshot", "kv", "--live and --db")
    assert other.read_bytes() == before and names(other) == objects
    empty = tmp_path / "empty.db"
    script(empty, "PRAGMA user_version = 1;")
    res = cli("restore-table", "--repo", repo, "--db", "shop", "--live", empty, "--table", "customers", "--apply")
    assert res.returncode == 0 and "customers" in names(empty), res


# --------------------------------------------------------------------------- 2: the undo of a replace


def test_printed_undo_of_a_replace_puts_the_live_table_back(tmp_path: Path) -> None:
    """Encrypted repository with a key file, paths with spaces, orphans in live (FKs off): the
    printed command, run word for word from another folder, brings back the table as it was."""
    base = tmp_path / "a folder"
    base.mkdir()
    live = make_shop(base / "live shop.db")
    repo, key = base / "the repo", base / "pass phrase"
    key.write_text("correct horse battery staple\n")
    made = run_dbre("backup", live, "--repo", repo, "--db", "shop", "--key-file", key)
    assert made.returncode == 0, made
    # after the snapshot: rows deleted, changed, added, and an order whose customer is gone (orphan)
    script(live, "DELETE FROM orders WHERE id <= 10; UPDATE orders SET total = -1 WHERE id = 20;"
                 "INSERT INTO orders(customer_id, email, total) VALUES (99, 'nobody@x', 7);")
    before, schema = rows(live, "orders"), schema_of(live, "orders")
    assert len(sql(live, "PRAGMA foreign_key_check(orders)")) == 2  # customer_id and email of the orphan

    replaced = run_dbre("restore-table", "--repo", repo, "--db", "shop", "--live", live, "--table", "orders",
                        "--replace", "--apply", "--key-file", key)
    assert replaced.returncode == 0, replaced
    assert len(rows(live, "orders")) == 60 and rows(live, "orders") != before
    (undo,) = undo_lines(replaced.stdout)
    assert "--allow-fk-violations" in undo  # the state it brings back had violations

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run_printed(undo, elsewhere)
    assert done.returncode == 0, done.stderr
    assert rows(live, "orders") == before and schema_of(live, "orders") == schema
    assert sql(live, "PRAGMA integrity_check") == [("ok",)]
    # the undo is itself undoable: it printed its own command, and its audit record holds it
    audits = Repository.open(str(repo), _secret(key)).records("audits", "shop")
    assert [a["mode"] for a in audits] == ["replace", "replace"]
    listed = run_dbre("audit", "--repo", repo, "--key-file", key, "--json")  # encrypted records read back
    assert listed.returncode == 0, listed
    assert json.loads(listed.stdout) == _document(audits, "records")  # the records, in docs/JSON.md's vocabulary
    assert audits[0]["undo"] == undo and audits[0]["safety_snapshot"] in undo


def _secret(key: Path) -> Any:
    from dbre.secrets import Secret

    return Secret(key.read_text().strip())


# --------------------------------------------------------------------------- 3: row repair beyond its rows


def mistakes(live: Path) -> None:
    """After the snapshot, with foreign keys off (SQLite's default): customer 7 deleted (its orders,
    reviews and notes left behind), 11 added with rows pointing at it, 2 re-keyed by email (its
    orders following by hand), 5 renamed."""
    script(live, "DELETE FROM customers WHERE id = 7;"
                 "INSERT INTO customers VALUES (11, 'c11@x', 'new');"
                 "INSERT INTO orders(customer_id, email, total) VALUES (11, 'c11@x', 1), (11, 'c11@x', 2);"
                 "INSERT INTO reviews(customer_id, body) VALUES (11, 'r'); INSERT INTO notes(customer_id, body) "
                 "VALUES (11, 'n');"
                 "UPDATE customers SET email = 'two@x' WHERE id = 2; UPDATE orders SET email = 'two@x' "
                 "WHERE customer_id = 2;"
                 "UPDATE customers SET name = 'x' WHERE id = 5; DELETE FROM log;")


def test_row_repair_plan_names_rows_and_triggers_of_other_tables(shop: tuple[Path, Path, str]) -> None:
    live, repo, snap = shop
    mistakes(live)
    args: list[str | Path] = ["--repo", repo, "--db", "shop", "--live", live, "--table", "customers",
                              "--where", "id > 0", "--snapshot", snap, "--delete-extra"]
    before = sql(live, "SELECT count(*) FROM orders") + rows(live, "customers")

    plan = cli("repair-rows", *args, "--json")
    assert plan.returncode == 0, plan
    d = json.loads(plan.stdout)
    assert d["counts"] == {"insert": 1, "update": 2, "delete": 1, "unchanged": 7}
    effects = {(e["table"], e["through"], e["rows"]) for e in d["effects"]}
    assert effects == {
        ("orders", "foreign key (customer_id) -> customers(id) ON DELETE CASCADE", 2),  # customer 11's orders
        ("orders", "foreign key (email) -> customers(email) ON DELETE NO ACTION", 2),
        ("orders", "foreign key (email) -> customers(email) ON UPDATE CASCADE", 6),  # 'two@x' goes back to c2@x
        ("reviews", "foreign key (customer_id) -> customers(id) ON DELETE SET NULL", 1),
        ("notes", "foreign key (customer_id) -> customers(id) ON DELETE NO ACTION", 1),
        ("notes", "trigger customers_gone (delete)", 0),  # suspended: its DELETE FROM notes names the table
        ("log", "trigger customers_log (update)", 0),
    }, d["effects"]
    assert all("suspended" in e["when_applied"] for e in d["effects"] if e["through"].startswith("trigger"))
    # the update of customer 5 changes no referenced column: nothing points at it in the effects

    text = cli("repair-rows", *args)
    assert text.returncode == 0, text
    table = text.stdout[text.stdout.index("beyond these rows"):text.stdout.index("dry run: nothing changed")]
    assert "ON DELETE CASCADE" in table and "ON UPDATE CASCADE" in table and "customers_gone" in table
    assert sql(live, "SELECT count(*) FROM orders") + rows(live, "customers") == before  # the plan changed nothing

    # the apply stops on exactly the violations the plan counted (a fixed orphan of customer 7 hides none)
    predicted: dict[str, int] = {}
    for e in d["effects"]:
        predicted[e["table"]] = predicted.get(e["table"], 0) + e["rows"]
    line = assert_one_line_error(cli("repair-rows", *args, "--apply"), 1, "breaks foreign keys")
    assert all(f'{n} in "{t}"' in line for t, n in predicted.items() if n), (predicted, line)
    assert sql(live, "SELECT count(*) FROM orders") + rows(live, "customers") == before

    # with --fire-triggers the plan says they fire, and applying shows where they wrote
    fired = cli("repair-rows", *args, "--fire-triggers", "--json")
    assert {(e["through"], e["rows"]) for e in json.loads(fired.stdout)["effects"]
            if e["through"].startswith("trigger")} == {("trigger customers_gone (delete)", None),
                                                       ("trigger customers_log (update)", None)}
    done = cli("repair-rows", *args, "--fire-triggers", "--allow-fk-violations", "--apply")
    assert done.returncode == 0, done
    assert sorted(sql(live, "SELECT what FROM log")) == [("update 2",), ("update 5",)]
    assert sql(live, "SELECT count(*) FROM notes WHERE customer_id = 11") == [(0,)]  # customers_gone fired
    assert sql(live, "SELECT count(*) FROM orders WHERE customer_id = 11") == [(2,)]  # no cascade ran


def test_row_repair_that_only_inserts_touches_no_other_table(shop: tuple[Path, Path, str]) -> None:
    live, repo, snap = shop
    script(live, "DELETE FROM customers WHERE id IN (3, 4)")
    res = cli("repair-rows", "--repo", repo, "--db", "shop", "--live", live, "--table", "customers",
              "--where", "id IN (3, 4)", "--json")
    assert res.returncode == 0, res
    assert json.loads(res.stdout)["effects"] == []  # no trigger on insert, nothing points at an inserted row
    assert "beyond these rows" not in cli("repair-rows", "--repo", repo, "--db", "shop", "--live", live, "--table",
                                          "customers", "--where", "id IN (3, 4)").stdout


# --------------------------------------------------------------------------- 4: dbre audit


def test_audit_lists_and_shows_the_records_of_restores_and_repairs(shop: tuple[Path, Path, str]) -> None:
    live, repo, snap = shop
    assert cli("audit", "--repo", repo).stdout.strip() == "no audit records"
    script(live, "DELETE FROM notes WHERE id <= 5; UPDATE customers SET name = 'x' WHERE id = 5;")
    base: list[str | Path] = ["--repo", repo, "--db", "shop", "--live", live, "--snapshot", snap]
    replaced = cli("restore-table", *base, "--table", "notes", "--replace", "--apply")
    assert replaced.returncode == 0, replaced
    repaired = cli("repair-rows", *base, "--table", "customers", "--where", "id = 5", "--apply")
    assert repaired.returncode == 0, repaired
    stored = Repository.open(str(repo)).records("audits", "shop")

    listed = cli("audit", "--repo", repo, "--json")
    assert listed.returncode == 0, listed
    records = json.loads(listed.stdout)["records"]
    assert records == _document(stored, "records")["records"]  # the records as written, in time order
    assert [(r["operation"], r["db"]) for r in records] == [("restore-table", "shop"), ("repair-rows", "shop")]
    safety = records[0]["safety_snapshot"]
    assert safety and safety in replaced.stdout and records[0]["record_id"] in replaced.stdout

    text = cli("audit", "--repo", repo, "--db", "shop").stdout
    for word in ("restore-table", "repair-rows", "notes (replace, 20 rows)", "customers: 0 inserted, 1 updated",
                 safety, records[1]["record_id"], records[0]["time"]):
        assert word in text, (word, text)
    newest = json.loads(cli("audit", "--repo", repo, "--last", "1", "--json").stdout)["records"]
    assert [r["operation"] for r in newest] == ["repair-rows"]
    none = json.loads(cli("audit", "--repo", repo, "--db", "other", "--json").stdout)
    assert none == {"schema": "dbre/1", "records": []}

    rec_id = records[0]["record_id"]
    shown = cli("audit", "show", rec_id[:-3], "--repo", repo, "--json")
    assert shown.returncode == 0, shown
    assert json.loads(shown.stdout) == {"schema": "dbre/1", **records[0]}
    full = cli("audit", "show", rec_id, "--repo", repo).stdout
    for word in ("tables[0].target", "notes", "undo", "dbre restore-table", "safety_snapshot", safety, "who"):
        assert word in full, (word, full)
    keys = cli("audit", "show", records[1]["record_id"], "--repo", repo, "--db", "shop").stdout
    assert "keys.update" in keys and "[[5]]" in keys and "id = 5" in keys

    assert_one_line_error(cli("audit", "show", "19990101", "--repo", repo), 2, "no audit record")
    assert_one_line_error(cli("audit", "show", rec_id[:4], "--repo", repo), 2, "2 audit records")
    assert_one_line_error(cli("audit"), 2, "--repo")


def test_rows_pointing_at_many_parents_are_not_counted(shop: tuple[Path, Path, str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import dbre.restore.rows
    from dbre.restore.rows import plan_row_repair

    monkeypatch.setattr(dbre.restore.rows, "EFFECT_COUNT_MAX", 1)
    live, repo, snap = shop
    script(live, "INSERT INTO customers VALUES (11, 'c11@x', 'a'), (12, 'c12@x', 'b');"
                 "INSERT INTO notes(customer_id, body) VALUES (11, 'n'), (12, 'n');")
    with plan_row_repair(Repository.open(str(repo)), "shop", live, "customers", "id > 10", delete_extra=True) as plan:
        notes = [e for e in plan.effects if e["table"] == "notes" and e["through"].startswith("foreign key")]
    assert [e["rows"] for e in notes] == [None]
    assert notes[0]["when_applied"].startswith("rows pointing at the 2 deleted rows were not counted (over 1): any")


def test_row_repair_plan_counts_rows_of_other_tables_on_a_remote_libsql_database(
        sqld: SqldServer, tmp_path: Path) -> None:  # noqa: F811
    from dbre.errors import RestoreError
    from dbre.restore.rows import apply_row_repair, plan_row_repair
    from dbre.sources.remote import RemoteLibsqlSource

    p = "pr_" + uuid.uuid4().hex[:8]  # the session's server is shared: tables of our own
    c = p.replace("pr_", "ch_")
    sqld.pipeline([
        f"CREATE TABLE {p}(id INTEGER PRIMARY KEY, code TEXT UNIQUE, name TEXT)",
        f"CREATE TABLE {c}(id INTEGER PRIMARY KEY, pid INTEGER REFERENCES {p}(id), code TEXT REFERENCES {p}(code))",
        *[(f"INSERT INTO {p} VALUES (?, ?, ?)", [i, f"k{i}", f"n{i}"]) for i in range(1, 21)],
        *[(f"INSERT INTO {c}(pid, code) VALUES (?, ?)", [i % 20 + 1, f"k{i % 20 + 1}"]) for i in range(60)],
    ])
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    backup(repo, RemoteLibsqlSource(sqld.url, cache_dir=tmp_path / "cache", method="dump"), "remote")
    sqld.pipeline([f"INSERT INTO {p} VALUES (21, 'k21', 'new')", f"INSERT INTO {c}(pid, code) VALUES (21, 'k21')",
                   "PRAGMA foreign_keys=OFF",  # in this request only (the server may enforce them)
                   f"UPDATE {p} SET code = 'K2' WHERE id = 2", f"UPDATE {c} SET code = 'K2' WHERE code = 'k2'"])
    assert sqld.execute(f"SELECT count(*) FROM {c} WHERE code = 'K2'") == [[3]]

    with plan_row_repair(repo, "remote", sqld.url, p, "id > 0", delete_extra=True) as plan:
        assert plan.counts() == {"delete": 1, "insert": 0, "update": 1, "unchanged": 19}
        effects = {(e["table"], e["through"], e["rows"]) for e in plan.effects}
        assert effects == {(c, f"foreign key (pid) -> {p}(id) ON DELETE NO ACTION", 1),
                           (c, f"foreign key (code) -> {p}(code) ON DELETE NO ACTION", 1),
                           (c, f"foreign key (code) -> {p}(code) ON UPDATE NO ACTION", 3)}, plan.effects
        with pytest.raises(RestoreError, match="foreign key"):
            apply_row_repair(plan)
    assert sqld.execute(f"SELECT count(*) FROM {p}") == [[21]]
