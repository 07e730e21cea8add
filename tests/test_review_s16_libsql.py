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
from tests.dbfactory import cli, sql_file
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
