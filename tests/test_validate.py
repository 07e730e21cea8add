"""Validation of restored data: each kind of damage is caught by the check named for it.

A small shop database is backed up, suites are profiled from it, and the snapshot is restored once.
Each test copies the restored file, damages it in one known way (missing rows, a duplicate key,
NULLs, a changed value, a dropped index, orphan rows, a corrupted page) and runs every check:
SQLite's (integrity_check, foreign_key_check), the manifest's (schema, row_count, checksum) and
the GX suites. The damage must be reported by its named check, on the right table and column.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dbre.errors import UsageError
from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources import open_source
from dbre.validate.checks import CheckResult, run_checks
from dbre.validate.profile import profile_database, write_suites
from dbre.validate.subset import pack_bucket, parse_subset, subset_filter, subset_for_week, week_index
from dbre.validate.suites import Suite, load_suites, run_suites, suite_parameters

SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT NOT NULL, country TEXT, created_at TEXT NOT NULL);
CREATE UNIQUE INDEX customers_email ON customers(email);
CREATE TABLE orders (
    id INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers(id),
    status TEXT NOT NULL,
    total REAL NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX orders_customer ON orders(customer_id);
"""


def make_shop(path: Path, customers: int = 800, orders: int = 4000, seed: int = 1) -> Path:
    """A small shop database with recent timestamps (so freshness expectations hold)."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.executemany("INSERT INTO customers VALUES (?,?,?,?)", [
        (i, f"c{i}@example.com", rng.choice(["DE", "FR", "JP", "US"]),
         (now - timedelta(hours=rng.randint(1, 2000))).strftime("%Y-%m-%d %H:%M:%S"))
        for i in range(1, customers + 1)])
    conn.executemany("INSERT INTO orders VALUES (?,?,?,?,?)", [
        (i, rng.randint(1, customers), rng.choice(["new", "paid", "shipped"]), round(rng.uniform(1, 500), 2),
         (now - timedelta(hours=rng.randint(1, 500))).strftime("%Y-%m-%dT%H:%M:%SZ"))
        for i in range(1, orders + 1)])
    conn.commit()
    conn.close()
    return path


@dataclass
class Restored:
    repo: Repository
    manifest: Manifest
    pristine: Path
    suites: list[Suite]
    suites_dir: Path


@pytest.fixture(scope="module")
def restored(tmp_path_factory: pytest.TempPathFactory) -> Restored:
    base = tmp_path_factory.mktemp("validate")
    src = make_shop(base / "shop.db")
    repo = Repository.open_or_init(str(base / "repo"))
    manifest = backup(repo, open_source(str(src)), "shop").manifest
    import apsw

    with apsw.Connection(str(src)) as a:
        write_suites(profile_database(a, "shop"), base / "expectations" / "shop")
    target = base / "pristine.db"
    apply_restore(repo, plan_restore(repo, "shop", target))
    return Restored(repo, manifest, target, load_suites(base / "expectations" / "shop"), base / "expectations")


def all_checks(r: Restored, path: Path) -> list[CheckResult]:
    return run_checks(path, r.manifest) + run_suites(path, r.suites, snapshot_time=r.manifest.time).checks()


def failures(results: list[CheckResult]) -> set[tuple[str, str | None, str | None]]:
    return {(c.check, c.table, c.column) for c in results if not c.passed}


def test_a_faithful_restore_passes_every_check(restored: Restored) -> None:
    results = all_checks(restored, restored.pristine)
    assert not failures(results), [c.describe() for c in results if not c.passed]
    names = {c.check for c in results}
    assert {"integrity_check", "foreign_key_check", "schema", "row_count", "checksum"} <= names
    assert "gx.expect_column_values_to_be_unique" in names and "gx.unexpected_rows_expectation" in names


def _corrupt_index_page(path: Path) -> None:
    conn = sqlite3.connect(path)
    (root,) = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'orders_customer'").fetchone()
    (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(path, "r+b") as f:  # scramble the cells of the index's root page, keep its header
        f.seek((root - 1) * page_size + 100)
        f.write(bytes(random.Random(3).randrange(256) for _ in range(page_size - 200)))


@dataclass
class Damage:
    name: str
    apply: Callable[[Path], None] | str
    caught_by: set[tuple[str, str | None, str | None]]
    only: bool = False  # True: nothing else may fail (the check is precise, not just loud)


DAMAGES = [
    Damage("missing rows", "DELETE FROM orders WHERE id % 50 = 0",
           {("row_count", "orders", None)}),
    Damage("duplicate key", "DROP INDEX customers_email; "
                            "UPDATE customers SET email = (SELECT email FROM customers WHERE id = 1) WHERE id = 2",
           {("gx.expect_column_values_to_be_unique", "customers", "email")}),
    Damage("nulls", "UPDATE customers SET country = NULL WHERE id % 7 = 0",
           {("gx.expect_column_values_to_not_be_null", "customers", "country")}),
    Damage("changed value", "UPDATE orders SET total = total + 1 WHERE id = 42",
           {("checksum", "orders", None)}, only=True),
    Damage("dropped index", "DROP INDEX orders_customer",
           {("schema", "orders", None)}, only=True),
    Damage("orphan rows", "DELETE FROM customers WHERE id IN (SELECT customer_id FROM orders WHERE id <= 3)",
           {("foreign_key_check", "orders", "customer_id"), ("gx.unexpected_rows_expectation", "orders", "customer_id"),
            ("row_count", "customers", None)}),
    Damage("corrupted page", _corrupt_index_page, {("integrity_check", None, None)}),
]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.name for d in DAMAGES])
def test_damage_is_caught_by_the_check_named_for_it(restored: Restored, damage: Damage, tmp_path: Path) -> None:
    path = tmp_path / "damaged.db"
    shutil.copyfile(restored.pristine, path)
    if isinstance(damage.apply, str):
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.executescript(damage.apply)
        conn.close()
    else:
        damage.apply(path)
    found = failures(all_checks(restored, path))
    assert damage.caught_by <= found, f"{damage.name}: expected {damage.caught_by}, failing: {found}"
    if damage.only:
        assert found == damage.caught_by


def test_failed_expectation_names_table_column_and_values(restored: Restored, tmp_path: Path) -> None:
    path = tmp_path / "bad-status.db"
    shutil.copyfile(restored.pristine, path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE orders SET status = 'lost' WHERE id <= 5")
    conn.commit()
    conn.close()
    run = run_suites(path, restored.suites, snapshot_time=restored.manifest.time)
    bad = [c for c in run.checks() if not c.passed]
    assert [c.describe() for c in bad] == [
        "gx.expect_column_values_to_be_in_set on orders.status: 5 unexpected values (e.g. 'lost', 'lost', 'lost')"]
    assert run.summary()["failed"] == 1 and run.results, "GX's own JSON results are kept"


def test_a_suite_for_a_missing_table_fails_by_name(restored: Restored) -> None:
    ghost = Suite("ghost", "shop.ghost", {"expectations": [{"type": "expect_table_row_count_to_be_between",
                                                            "kwargs": {"min_value": 1}}]})
    run = run_suites(restored.pristine, [ghost], snapshot_time=restored.manifest.time)
    (check,) = run.checks()
    assert not check.passed and check.table == "ghost" and "not in the restored database" in check.detail


# -- the profiler ----------------------------------------------------------------------------------


def test_profile_writes_an_editable_starter_suite(restored: Restored) -> None:
    by_table = {s.table: s for s in restored.suites}
    assert set(by_table) == {"customers", "orders"}
    orders = [(e["type"], e["kwargs"].get("column"), e["meta"]["dbre"]["basis"])
              for e in by_table["orders"].expectations]
    assert ("expect_column_values_to_be_unique", "id", "declared") in orders
    assert ("expect_column_values_to_be_in_set", "status", "observed") in orders
    assert ("expect_column_values_to_be_between", "total", "observed") in orders
    assert ("expect_column_max_to_be_between", "created_at", "observed") in orders
    fk = [e for e in by_table["orders"].expectations if e["type"] == "unexpected_rows_expectation"]
    assert fk and fk[0]["meta"]["dbre"] == {"basis": "declared", "check": "foreign_key", "column": "customer_id",
                                             "references": "customers(id)"}
    customers = [(e["type"], e["kwargs"].get("column"), e["meta"]["dbre"]["basis"])
                 for e in by_table["customers"].expectations]
    assert ("expect_column_values_to_be_unique", "email", "declared") in customers  # from the UNIQUE index
    assert ("expect_column_values_to_not_be_null", "email", "declared") in customers
    assert ("expect_column_values_to_not_be_null", "country", "observed") in customers
    band = next(e for e in by_table["orders"].expectations if e["type"] == "expect_table_row_count_to_be_between")
    assert band["kwargs"]["min_value"] <= 4000 <= band["kwargs"]["max_value"]
    fresh = next(e for e in by_table["orders"].expectations if e["type"] == "expect_column_max_to_be_between")
    assert fresh["kwargs"]["min_value"]["$PARAMETER"].startswith("snapshot_minus_")


def test_profile_keeps_edited_suites_unless_overwrite(restored: Restored, tmp_path: Path) -> None:
    import apsw

    out = tmp_path / "suites"
    with apsw.Connection(str(restored.pristine), flags=apsw.SQLITE_OPEN_READONLY) as conn:
        suites = profile_database(conn, "shop")
    assert len(write_suites(suites, out)) == 2
    (out / "orders.json").write_text(json.dumps({"name": "mine", "expectations": []}))
    assert [p.name for p in write_suites(suites, out)] == []
    assert json.loads((out / "orders.json").read_text())["name"] == "mine"
    assert len(write_suites(suites, out, overwrite=True)) == 2


def test_suite_parameters_follow_the_snapshot_time() -> None:
    t = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    suite = Suite("t", "t", {"expectations": [
        {"type": "x", "kwargs": {"a": {"$PARAMETER": "snapshot_minus_2d"}, "b": {"$PARAMETER": "snapshot_minus_6h"},
                                 "c": {"$PARAMETER": "snapshot_minus_1d_epoch"}}}]})
    assert suite_parameters([suite], t) == {"snapshot_minus_2d": "2026-03-08",
                                            "snapshot_minus_6h": "2026-03-10 06:00:00",
                                            "snapshot_minus_1d_epoch": int((t - timedelta(days=1)).timestamp())}
    bad = Suite("t", "t", {"expectations": [{"type": "x", "kwargs": {"a": {"$PARAMETER": "tomorrow"}}}]})
    with pytest.raises(UsageError, match="tomorrow"):
        suite_parameters([bad], t)


def test_a_file_that_is_not_a_suite_is_named(tmp_path: Path) -> None:
    (tmp_path / "orders.json").write_text('{"name": "x"}')
    with pytest.raises(UsageError, match="orders.json: not a GX suite"):
        load_suites(tmp_path)


# -- the rotating --read-data subset ---------------------------------------------------------------


def test_subset_rotation_reads_every_pack_once_per_cycle() -> None:
    packs = [f"{i:032x}" for i in range(500)]
    start = datetime(2026, 12, 28, tzinfo=UTC)  # across a new year: the week count must not reset
    seen: list[str] = []
    buckets = []
    for week in range(4):
        n, m = subset_for_week(4, start + timedelta(weeks=week))
        buckets.append(n)
        seen += [p for p in packs if subset_filter(n, m)(p)]
    assert sorted(buckets) == [1, 2, 3, 4]
    assert sorted(seen) == packs  # each pack exactly once
    assert all(0.15 < sum(pack_bucket(p, 4) == b for p in packs) / 500 < 0.35 for b in range(1, 5))
    assert week_index(datetime(2026, 1, 5, 23, tzinfo=UTC)) == week_index(datetime(2026, 1, 11, 1, tzinfo=UTC))
    assert parse_subset("2/5") == (2, 5)
    for bad in ("0/3", "4/3", "1-3", ""):
        with pytest.raises(UsageError):
            parse_subset(bad)


def test_verify_reads_only_the_subset(restored: Restored) -> None:
    repo = restored.repo
    packs = repo.pack_ids()
    read = 0
    for n in (1, 2, 3):
        report = verify(repo, read_data=True, packs_filter=subset_filter(n, 3))
        assert report.ok
        assert report.packs_read == sum(1 for p in packs if pack_bucket(p, 3) == n)
        read += report.packs_read
    assert read == len(packs)


def test_weekly_validation_records_each_database(restored: Restored) -> None:
    from dbre.validate.integrity import validate_repository

    out = validate_repository(restored.repo, subset=(1, 1), expectations=restored.suites_dir)
    assert out["ok"] and out["read_data_subset"] == "1/1"
    (rec,) = out["databases"]
    assert rec["passed"] and rec["expectations"]["expectations"] > 10 and rec["checks"]["failed"] == 0
    stored = restored.repo.records("verifications", "shop")
    assert stored[-1]["record_id"] == rec["record_id"]
