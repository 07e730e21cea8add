"""`dbre last-good`: the newest point of a database that passes integrity_check, the user's SQL checks and its GX
suites, found by bisecting snapshots and replicated transactions, each probed in place (the suites on a temporary
restore); the printed command restores exactly that point, and nothing but locks is written to the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.restore.lastgood import find_last_good, list_points
from dbre.sources import open_source
from tests.dbfactory import assert_one_line_error, run_dbre
from tests.replication import make_source, replicating, shipped_transactions

GOOD_ROWS = 1000
CHECK = f"SELECT count(*) >= {GOOD_ROWS} FROM t"


@dataclass
class History:
    """Six snapshots of "app": t grows by 100 rows each time; after snapshot 3, half its rows are deleted."""

    url: str
    repo: Repository
    snaps: list[Manifest]
    tmp: Path


def _rows(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM t").fetchone()[0])


def tree(repo: Repository) -> dict[str, str]:
    """sha256 of every object but the locks (a search holds the shared lock; its object goes when it ends)."""
    return {k: hashlib.sha256(repo.store.get(k)).hexdigest() for k in sorted(repo.store.list(""))
            if not k.startswith("locks/")}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    tmp = tmp_path_factory.mktemp("last_good")
    src = tmp / "src.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, pad BLOB)")
        c.execute("CREATE INDEX t_name ON t(name)")
        c.executemany("INSERT INTO t(name, pad) VALUES (?, randomblob(200))", [(f"r{i}",) for i in range(900)])
    repo = Repository.open_or_init(str(tmp / "repo"))
    snaps = []
    for i in range(6):
        with sqlite3.connect(src, isolation_level=None) as c:
            c.executemany("INSERT INTO t(name, pad) VALUES (?, randomblob(200))", [(f"s{i}-{j}",) for j in range(100)])
            if i == 4:
                c.execute("DELETE FROM t WHERE id % 2 = 0")  # the mistake, made after snapshot 3
        snaps.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest)
        time.sleep(0.01)
    return History(str(tmp / "repo"), repo, snaps, tmp)


def test_finds_the_snapshot_before_the_mistake_and_the_command_restores_it(history: History, tmp_path: Path) -> None:
    before = tree(history.repo)
    result = find_last_good(history.repo, "app", [CHECK])
    assert result.found is not None and result.found.point.snapshot == history.snaps[3].id
    assert result.first_bad is not None and result.first_bad.point.snapshot == history.snaps[4].id
    # the newest, the oldest, then halving 0..5: 2, 3, 4 (at most 2 + ceil(log2(6)))
    assert [p.point.snapshot for p in result.probes] == [history.snaps[i].id for i in (5, 0, 2, 3, 4)]
    assert [p.good for p in result.probes] == [False, True, True, True, False]
    bad = result.probes[0]
    assert bad.failed == "check 1" and "-> 0" in bad.detail and bad.integrity is None
    assert all(p.integrity == "integrity_check" for p in result.probes if p.good)
    assert all(not p.restored_for_expectations for p in result.probes)

    r = run_dbre("last-good", "--repo", history.url, "--db", "app", "--check", CHECK, cwd=tmp_path)
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["time", "point", "result"]
    rows = lines[1:6]
    assert [row.split()[1:4] for row in rows][:2] == [["snapshot", history.snaps[5].id, "BAD"],
                                                      ["snapshot", history.snaps[0].id, "good"]]
    assert "check 1" in rows[0] and history.snaps[5].taken_at[:19] in rows[0]
    command = lines[-1].strip()
    assert command == (f"dbre restore --repo {history.url} --db app --snapshot {history.snaps[3].id} "
                       "--to app-last-good.db"), r.stdout
    done = run_dbre(*shlex.split(command)[1:], cwd=tmp_path)
    assert done.returncode == 0, done
    assert _rows(tmp_path / "app-last-good.db") == 900 + 400  # snapshot 3 exactly: 4 x 100 rows added, none deleted
    # --since past the mistake: nothing good since then
    r = run_dbre("last-good", "--repo", history.url, "--db", "app", "--check", CHECK,
                 "--since", history.snaps[4].taken_at)
    line = assert_one_line_error(r, 1, "no good point since", f"snapshot {history.snaps[4].id}", "check 1")
    assert line and r.stdout.count("BAD") == 2, r.stdout
    # --since between: the search starts at snapshot 2's point
    result = find_last_good(history.repo, "app", [CHECK], since=history.snaps[2].time)
    assert result.points == 4 and result.lower.snapshot == history.snaps[2].id
    assert result.found is not None and result.found.point.snapshot == history.snaps[3].id
    # JSON
    r = run_dbre("last-good", "--repo", history.url, "--db", "app", "--check", CHECK, "--json")
    d = json.loads(r.stdout)
    assert r.returncode == 0 and d["found"]["snapshot"] == history.snaps[3].id and len(d["probes"]) == 5
    assert d["restore_command"].endswith(f"--snapshot {history.snaps[3].id} --to app-last-good.db")
    assert tree(history.repo) == before
    assert not list(history.repo.store.list("locks/"))


def test_a_good_newest_point_is_one_probe(history: History) -> None:
    result = find_last_good(history.repo, "app", ["SELECT user_version = 0 FROM pragma_user_version",
                                                  "SELECT count(*) > 0 FROM t"])
    assert len(result.probes) == 1 and result.found is not None
    assert result.found.point.snapshot == history.snaps[5].id and result.first_bad is None


def test_expectations_fail_the_bad_points_on_a_temporary_restore(history: History, tmp_path: Path) -> None:
    suites = tmp_path / "expectations" / "app"
    suites.mkdir(parents=True)
    (suites / "t.json").write_text(json.dumps({"name": "app.t", "meta": {"dbre": {"table": "t"}}, "expectations": [
        {"type": "expect_table_row_count_to_be_between", "kwargs": {"min_value": GOOD_ROWS}}]}))
    before = tree(history.repo)
    r = run_dbre("last-good", "--repo", history.url, "--db", "app", "--expectations", tmp_path / "expectations",
                 "--json", timeout=600)
    assert r.returncode == 0, r
    d = json.loads(r.stdout)
    assert d["found"]["snapshot"] == history.snaps[3].id
    bad = [p for p in d["probes"] if p["result"] == "bad"]
    assert bad and all(p["failed"] == "expectations" and "expect_table_row_count" in p["detail"] for p in bad), bad
    assert all(p["restored_for_expectations"] for p in d["probes"])
    assert tree(history.repo) == before
    assert not [p for p in Path("/tmp").glob("dbre-last-good-app-*")]


def test_an_integrity_failure_is_found(tmp_path: Path) -> None:
    """From snapshot 2 on, index t_a holds the entries of another column (its schema rewritten by
    writable_schema): integrity_check reports rows missing from it (quick_check, which skips index
    content, would not)."""
    src = tmp_path / "src.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, a INT, b INT)")
        c.execute("CREATE INDEX t_a ON t(a)")
        c.executemany("INSERT INTO t(a, b) VALUES (?, ?)", [(i, -i) for i in range(300)])
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snaps = []
    for i in range(4):
        if i == 2:
            with sqlite3.connect(src, isolation_level=None) as c:
                c.execute("PRAGMA writable_schema=ON")
                c.execute("UPDATE sqlite_schema SET sql = 'CREATE INDEX t_a ON t(b)' WHERE name = 't_a'")
        with sqlite3.connect(src, isolation_level=None) as c:
            c.execute("INSERT INTO t(a, b) VALUES (?, ?)", (1000 + i, -1000 - i))
        snaps.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest)
        time.sleep(0.01)
    result = find_last_good(repo, "app")
    assert result.found is not None and result.found.point.snapshot == snaps[1].id
    assert result.first_bad is not None and result.first_bad.point.snapshot == snaps[2].id
    assert result.first_bad.failed == "integrity_check" and "missing from index t_a" in result.first_bad.detail
    quick = find_last_good(repo, "app", quick=True)
    assert quick.found is not None and quick.found.point.snapshot == snaps[3].id
    assert quick.found.integrity == "quick_check"


@pytest.mark.parametrize(("check", "needle"), [
    ("DELETE FROM t", "writes"),
    ("SELEC count(*) FROM t", "syntax error"),
    ("SELECT 1; SELECT 2", "more than one statement"),
    ("PRAGMA user_version = 3", "user_version"),
    ("SELECT count(*) FROM no_such_table_anywhere", "no such table"),
    ("ATTACH 'x.db' AS x", "attach"),
])
def test_a_bad_check_is_refused_before_any_probe(history: History, check: str, needle: str) -> None:
    before = tree(history.repo)
    r = run_dbre("last-good", "--repo", history.url, "--db", "app", "--check", "SELECT 1", "--check", check)
    assert_one_line_error(r, 2, "--check 2", needle)
    assert r.stdout == "", r.stdout
    assert tree(history.repo) == before


def test_a_table_dropped_by_mistake_is_a_failed_check_not_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("CREATE TABLE orders(id INTEGER PRIMARY KEY)")
        c.execute("INSERT INTO orders VALUES (1)")
    first = backup(repo, open_source(str(src)), "app", checksums=False).manifest
    time.sleep(0.01)
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("DROP TABLE orders")
        c.execute("CREATE TABLE other(x)")
    backup(repo, open_source(str(src)), "app", checksums=False)
    result = find_last_good(repo, "app", ["SELECT count(*) FROM orders"])
    assert result.found is not None and result.found.point.snapshot == first.id
    assert result.probes[0].failed == "check 1" and "no such table: orders" in result.probes[0].detail


# --------------------------------------------------------------------------- replicated


@dataclass
class Replicated:
    repo: Repository
    url: str
    txids: list[int]  # in commit order: txids[k] is commit k
    bad: int  # the index of the bad commit


COMMITS, BAD = 24, 17


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[Replicated]:
    """One generation: 50 rows in the base, then COMMITS transactions, each inserting a row; commit BAD also
    deletes 40 rows (the mistake): count(*) >= 50 holds up to the commit before it, and never again."""
    src = tmp_path / "src.db"
    make_source(src, 50)
    url = str(tmp_path / "repo")
    repo = Repository.open_or_init(url)
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        for k in range(COMMITS):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(300))", (51 + k,))
            if k == BAD:
                conn.execute("DELETE FROM t WHERE seq <= 40")
            conn.execute("UPDATE counter SET n = ?", (51 + k,))
            conn.execute("COMMIT")
            time.sleep(0.07)
    conn.close()
    txids = [txid for _, txid, _ in shipped_transactions(repo)]
    assert len(txids) == COMMITS, txids
    yield Replicated(repo, url, txids, BAD)


def test_a_replicated_database_finds_the_transaction_before_the_bad_one(replicated: Replicated,
                                                                        tmp_path: Path) -> None:
    r = replicated
    before = tree(r.repo)
    points = list_points(r.repo, "app")
    assert [p.txid for p in points if p.txid is not None] == r.txids
    assert sum(p.snapshot is not None for p in points) == 1  # the generation's base
    result = find_last_good(r.repo, "app", ["SELECT count(*) >= 50 FROM t"])
    expected = r.txids[r.bad - 1]
    assert result.found is not None and result.found.point.txid == expected
    assert result.first_bad is not None and result.first_bad.point.txid == r.txids[r.bad]
    n = len(points)
    assert len(result.probes) <= 2 + math.ceil(math.log2(n)), (len(result.probes), n)
    assert len(result.probes) < n / 3
    cli = run_dbre("last-good", "--repo", r.url, "--db", "app", "--check", "SELECT count(*) >= 50 FROM t",
                   cwd=tmp_path)
    assert cli.returncode == 0, cli
    command = cli.stdout.splitlines()[-1].strip()
    assert command == f"dbre restore --repo {r.url} --db app --txid {expected} --to app-last-good.db", cli.stdout
    done = run_dbre(*shlex.split(command)[1:], cwd=tmp_path)
    assert done.returncode == 0, done
    with sqlite3.connect(tmp_path / "app-last-good.db") as c:
        # every commit before the bad one, exactly: rows 1..50 + BAD
        assert c.execute("SELECT count(*), max(seq), (SELECT n FROM counter) FROM t").fetchone() == (
            50 + r.bad, 50 + r.bad, 50 + r.bad)
    assert tree(r.repo) == before


def test_nothing_good_is_exit_1_with_the_whole_result_in_json(history: History) -> None:
    r = run_dbre("last-good", "--repo", history.url, "--db", "app", "--check", "SELECT 0", "--json")
    assert r.returncode == 1, r
    d = json.loads(r.stdout)
    assert d["found"] is None and d["restore_command"] is None and len(d["probes"]) == 2
    assert d["first_bad"]["snapshot"] == history.snaps[0].id and d["probes"][1]["failed"] == "check 1"
    assert r.stderr.strip() == (f"dbre: no good point since the oldest point: snapshot {history.snaps[0].id} "
                                "fails check 1"), r.stderr


def test_a_point_whose_pages_are_missing_is_bad_not_an_error(tmp_path: Path) -> None:
    """The pack holding page 1 of the newest snapshot is deleted: that point cannot be read (nor restored), so the
    search counts it bad ("read") and finds the one before it."""
    from dbre.repository.backup import read_run
    from dbre.repository.manifest import RECORD
    from dbre.repository.repo import pack_key

    src = tmp_path / "src.db"
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    snaps = []
    for _ in range(3):
        with sqlite3.connect(src, isolation_level=None) as c:
            c.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, pad BLOB)")
            c.executemany("INSERT INTO t(pad) VALUES (randomblob(500))", [()] * 50)
        snaps.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest)
        time.sleep(0.01)

    def page1_pack(m: Manifest) -> str:
        return str(RECORD.unpack_from(read_run(repo, m, m.runs[0]), 0)[1].hex())

    pack = page1_pack(snaps[2])
    assert pack not in {page1_pack(snaps[0]), page1_pack(snaps[1])}
    Path(tmp_path / "repo", pack_key(pack)).unlink()
    result = find_last_good(repo, "app")
    assert result.found is not None and result.found.point.snapshot == snaps[1].id
    newest = result.probes[0]
    assert newest.point.snapshot == snaps[2].id and newest.failed == "read" and "missing" in newest.detail, newest
    assert not list(repo.store.list("locks/"))
