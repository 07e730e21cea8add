"""Findings of session 16's bug hunt on the libSQL side, against a real sqld: REAL values sent to the server as
JSON floats were read 1-2 ulp off (sqld 0.24's JSON parsing), so `restore --into` could never pass its own
check and `repair-rows --live URL` wrote other values than the snapshot's, saying it had repaired them."""

from __future__ import annotations

import json
import random
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbre.restore.connection import exact_floats
from tests.dbfactory import CliResult, assert_one_line_error, cli, sql_file
from tests.sqld import SqldServer, start_sqld


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    with start_sqld(tmp_path_factory.mktemp("sqld-floats"), namespaces=True, admin=True) as s:
        yield s


def _doubles(n: int, seed: int) -> list[float]:
    """Prices as computed values are (a tenth of them random bit patterns: subnormals, huge, tiny)."""
    rnd = random.Random(seed)
    out = [round(rnd.random() * 1000, rnd.randint(2, 17)) * rnd.random() for _ in range(n - n // 10)]
    while len(out) < n:
        v = struct.unpack("<d", rnd.getrandbits(64).to_bytes(8, "little"))[0]
        if v == v and abs(v) != float("inf"):
            out.append(v)
    return out


def test_exact_floats_rewrites_only_real_placeholders() -> None:
    sql, args = exact_floats("INSERT INTO \"a?\" ('?', x) VALUES (?, ?) -- ?\n/* ? */", [1, 0.1])
    assert sql == "INSERT INTO \"a?\" ('?', x) VALUES (?, CAST(? AS REAL)) -- ?\n/* ? */" and args == [1, "0.1"]
    assert exact_floats("SELECT ?, ?", [float("inf"), -float("inf")])[1] == ["9e999", "-9e999"]
    assert exact_floats("SELECT ?1, ?", [1.5, 2.5]) == ("SELECT ?1, ?", [1.5, 2.5])  # (numbered: left alone)


def test_restore_into_sqld_keeps_every_real_value(server: SqldServer, tmp_path: Path) -> None:
    """Before: 181 of 2,000 values came out 1-2 ulp off; the load's check failed, and --force failed again."""
    values = _doubles(2000, 1)
    src = tmp_path / "prices.db"
    conn = sqlite3.connect(src)
    conn.execute("CREATE TABLE p(id INTEGER PRIMARY KEY, x REAL)")
    conn.executemany("INSERT INTO p VALUES (?, ?)", list(enumerate(values, 1)))
    conn.commit()
    conn.close()
    assert cli("backup", src, "--repo", tmp_path / "repo", "--db", "prices").returncode == 0
    server.create_namespace("floats")
    try:
        result = cli("restore", "--repo", tmp_path / "repo", "--db", "prices", "--into", server.url,
                     "--into-namespace", "floats")
        assert result.returncode == 0, result
        back = [r[0] for r in server.execute("SELECT x FROM p ORDER BY id", namespace="floats")]
        assert [struct.pack("<d", v) for v in back] == [struct.pack("<d", v) for v in values]
    finally:
        server.delete_namespace("floats")


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A sqld of this module's own, its default database repaired in place."""
    with start_sqld(tmp_path_factory.mktemp("sqld-floats-plain")) as s:
        yield s


def test_repair_rows_on_sqld_writes_the_snapshots_reals(plain: SqldServer, tmp_path: Path) -> None:
    """Before: "updated 3", exit 0, and the live values 9.794034521722551 where the snapshot had ...553."""
    values = [9.794034521722553, 15.250713383287053, 24.308445025757262, *_doubles(200, 2)]
    plain.pipeline([("CREATE TABLE t(id INTEGER PRIMARY KEY, x REAL)", []),
                    *[("INSERT INTO t VALUES (?, CAST(? AS REAL))", [i, repr(v)]) for i, v in enumerate(values, 1)]])
    snap = sql_file(tmp_path / "snap.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, x REAL)")
    conn = sqlite3.connect(snap)
    conn.executemany("INSERT INTO t VALUES (?, ?)", list(enumerate(values, 1)))
    conn.commit()
    conn.close()
    assert cli("backup", snap, "--repo", tmp_path / "repo", "--db", "live").returncode == 0
    plain.execute("UPDATE t SET x = 0")
    args = ["repair-rows", "--repo", tmp_path / "repo", "--db", "live", "--live", plain.url, "--table", "t",
            "--where", "1"]
    result = cli(*args, "--apply")
    assert result.returncode == 0 and f"updated {len(values)}" in result.stdout, result
    back = [r[0] for r in plain.execute("SELECT x FROM t ORDER BY id")]
    assert [struct.pack("<d", v) for v in back] == [struct.pack("<d", v) for v in values]
    again = cli(*args, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["counts"]["update"] == 0, again


def _load(server: SqldServer, tmp_path: Path, ns: str, *statements: str, force: bool = False) -> CliResult:
    """A source of ``statements`` backed up, then `restore --into` the namespace ``ns`` (made if missing)."""
    src = sql_file(tmp_path / f"{ns}.db", *statements)
    assert cli("backup", src, "--repo", tmp_path / "repo", "--db", ns).returncode == 0
    if ns not in _namespaces:
        server.create_namespace(ns)
        _namespaces.add(ns)
    return cli("restore", "--repo", tmp_path / "repo", "--db", ns, "--into", server.url, "--into-namespace", ns,
               *(["--force"] if force else []))


_namespaces: set[str] = set()


def test_a_column_named_rowid_is_loaded_and_checked(server: SqldServer, tmp_path: Path) -> None:
    """Before: the check after the load paged by `rowid`, the user's text column: "unexpected error: ValueError"."""
    rows = [f"INSERT INTO rc VALUES ('r{i}', {i})" for i in range(2500)]
    result = _load(server, tmp_path, "rowidcol", "CREATE TABLE rc(rowid TEXT, v)", *rows)
    assert result.returncode == 0 and "target equals snapshot" in result.stdout, result
    assert server.execute("SELECT count(*), max(v) FROM rc", namespace="rowidcol") == [[2500, 2499]]


def test_force_leaves_the_snapshots_user_version(server: SqldServer, tmp_path: Path) -> None:
    """Before: the snapshot's user_version 0 was not written, so the target kept its 42."""
    server.create_namespace("uv")
    _namespaces.add("uv")
    server.pipeline(["CREATE TABLE old(x)", "PRAGMA user_version=42"], namespace="uv")
    result = _load(server, tmp_path, "uv", "CREATE TABLE t(x)", "INSERT INTO t VALUES (1)", force=True)
    assert result.returncode == 0, result
    assert server.execute("PRAGMA user_version", namespace="uv") == [[0]]


def test_a_source_table_named_libsql_is_the_loads_own(server: SqldServer, tmp_path: Path) -> None:
    """Before: a failed load dropped everything but the source's own table libsql_meta, and every later load,
    --force too, failed on "table libsql_meta already exists"."""
    statements = ["CREATE TABLE libsql_meta(k, v)", "INSERT INTO libsql_meta VALUES ('a', 1)",
                  "CREATE TABLE big(id INTEGER PRIMARY KEY, b BLOB)",
                  "INSERT INTO big VALUES (1, randomblob(6 * 1024 * 1024))"]  # (over sqld's ~5 MB a value)
    failed = _load(server, tmp_path, "meta", *statements)
    assert failed.returncode == 1 and "the target is empty" in failed.stderr, failed
    assert "larger than the server takes" in failed.stderr, failed
    assert server.execute("SELECT name FROM sqlite_schema WHERE name = 'libsql_meta'", namespace="meta") == []
    (tmp_path / "again").mkdir()  # (a smaller source: the same namespace, now empty again, loads it)
    ok = _load(server, tmp_path / "again", "meta", "CREATE TABLE libsql_meta(k, v)",
               "INSERT INTO libsql_meta VALUES ('a', 1)")
    assert ok.returncode == 0, ok
    assert server.execute("SELECT * FROM libsql_meta", namespace="meta") == [["a", 1]]


@pytest.mark.parametrize("url", ["ftp://db.example.com/app", "postgres://h/app", "htps://h"])
def test_into_a_url_that_is_not_libsql_says_so(tmp_path: Path, url: str) -> None:
    src = sql_file(tmp_path / "a.db", "CREATE TABLE t(x)")
    assert cli("backup", src, "--repo", tmp_path / "repo", "--db", "a").returncode == 0
    assert_one_line_error(cli("restore", "--repo", tmp_path / "repo", "--db", "a", "--into", url), 2,
                          "not a libSQL URL")


def test_a_grpc_status_gives_its_message_not_its_metadata() -> None:
    """Before: a server killed mid-backup read "cannot reach the server: {} }" (the tail of MetadataMap)."""
    from dbre.sources.remote import _after_colon

    status = ('status: Unknown, message: "h2 protocol error: error reading a body from connection", details: [], '
              "metadata: MetadataMap { headers: {} }")
    assert _after_colon(status) == "error reading a body from connection"
    assert _after_colon("sync error: tcp connect error: Connection refused (os error 111)") == \
        "Connection refused (os error 111)"
    assert _after_colon("odd: {} }") == "odd: {} }"
