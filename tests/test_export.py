"""`dbre export`: a table of a past state to Parquet or CSV, streamed through the query VFS without a restore.

Every file is read back (pyarrow.parquet, csv) and compared with the same table read by Python's sqlite3
on a full restore of the same point, at two snapshots, with the repository on a local disk and on a real
S3 server (moto_server). Also: a column holding values of several types, memory that does not grow with
the table (peak RSS of a subprocess, 50k against 200k rows), bad input, and nothing left on failure.
"""

from __future__ import annotations

import csv
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from dbre.errors import UsageError
from dbre.repository.backup import backup
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.restore.export import affinity, export_table
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources import open_source
from tests.dbfactory import assert_one_line_error, dbre_env, run_dbre

TEXTS = ["plain", "a, comma", 'a "quote"', "two\nlines", "crlf\r\nend", "", "ünïcödé ✓", "'single'", None]


@dataclass
class History:
    """A repository holding two snapshots of one database ("app"), changed between them."""

    url: str
    repo: Repository
    snaps: list[Manifest]
    tmp: Path


def _build(url: str, tmp: Path) -> History:
    src = tmp / "src.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("PRAGMA synchronous=OFF")  # (test data: one fsync per insert would take most of a minute)
        c.execute("CREATE TABLE things(id INTEGER PRIMARY KEY, n INTEGER, x REAL, s TEXT, b BLOB, price NUMERIC, "
                  "anything)")
        rows = []
        for i in range(3000):
            rows.append((i * 7 - 1000 if i % 11 else None, i / 3 if i % 13 else None, TEXTS[i % len(TEXTS)],
                         bytes([i % 256, 0, 255]) * (i % 5) if i % 17 else None, i % 100 / 4, i * 2 ** 40))
        c.executemany("INSERT INTO things(n, x, s, b, price, anything) VALUES (?, ?, ?, ?, ?, ?)", rows)
        c.execute("CREATE TABLE mixed(id INTEGER PRIMARY KEY, v INTEGER, u)")
        c.executemany("INSERT INTO mixed(v, u) VALUES (?, ?)",
                      [(5, 1), ("abc", "x"), (2.5, 3.5), (b"\x00\xff", None), (None, 7)])
    repo = Repository.open_or_init(url, None)
    snaps = [backup(repo, open_source(str(src)), "app", checksums=False).manifest]
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("PRAGMA synchronous=OFF")
        c.execute("UPDATE things SET s = s || ', changed\n\"again\"' WHERE id % 5 = 0")
        c.execute("DELETE FROM things WHERE id BETWEEN 100 AND 400")
        c.executemany("INSERT INTO things(n, s, b) VALUES (?, ?, randomblob(40))",
                      [(i, f"late {i}") for i in range(500)])
    time.sleep(0.01)
    snaps.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest)
    return History(url, repo, snaps, tmp)


@pytest.fixture(scope="module")
def local_history(tmp_path_factory: pytest.TempPathFactory) -> History:
    tmp = tmp_path_factory.mktemp("export_local")
    return _build(str(tmp / "repo"), tmp)


@pytest.fixture(scope="module")
def s3_history(tmp_path_factory: pytest.TempPathFactory, s3_client: Any) -> History:
    from tests.conftest import unique_bucket_name

    bucket = unique_bucket_name()
    s3_client.create_bucket(Bucket=bucket)
    return _build(f"s3://{bucket}/repo", tmp_path_factory.mktemp("export_s3"))


@pytest.fixture(params=["local", "s3"])
def history(request: pytest.FixtureRequest) -> History:
    return request.getfixturevalue(f"{request.param}_history")  # type: ignore[no-any-return]


def restored_rows(h: History, tmp: Path, table: str, **choice: Any) -> list[tuple[Any, ...]]:
    """The rows of ``table`` in a full restore of the point ``choice`` names, read by Python's sqlite3."""
    out = tmp / f"restored-{len(list(tmp.glob('restored-*')))}.db"
    apply_restore(h.repo, plan_restore(h.repo, "app", out, **choice))
    with sqlite3.connect(out) as c:
        return c.execute(f"SELECT * FROM {table}").fetchall()


def parquet_rows(path: Path) -> list[tuple[Any, ...]]:
    return [tuple(d.values()) for d in pq.read_table(path).to_pylist()]


def csv_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def as_csv(rows: list[tuple[Any, ...]]) -> list[list[str]]:
    """Rows as the export writes them to CSV: NULL empty, blobs hex, numbers as Python's text."""
    return [["" if v is None else v.hex() if isinstance(v, bytes) else str(v) for v in r] for r in rows]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "dbre-export" in p.name)


# --------------------------------------------------------------------------- files equal a restore


def test_parquet_and_csv_equal_a_full_restore_at_two_snapshots(history: History, tmp_path: Path) -> None:
    h = history
    seen = []
    for snap in h.snaps:
        expected = restored_rows(h, tmp_path, "things", snapshot=snap.id)
        pq_out, csv_out = tmp_path / f"{snap.id}.parquet", tmp_path / f"{snap.id}.csv"
        r = export_table(h.repo, "app", "things", pq_out, "parquet", snapshot=snap.id, batch_rows=500)
        assert r.rows == len(expected) and r.state.manifest.id == snap.id
        assert r.bytes_written == pq_out.stat().st_size and r.stats.bytes > 0
        assert parquet_rows(pq_out) == expected
        assert pq.ParquetFile(pq_out).num_row_groups == -(-len(expected) // 500)  # one row group a batch
        schema = pq.read_schema(pq_out)
        assert [str(t) for t in schema.types] == ["int64", "int64", "double", "string", "binary", "double", "int64"]
        assert not r.fallbacks, r.fallbacks
        export_table(h.repo, "app", "things", csv_out, "csv", snapshot=snap.id)
        got = csv_rows(csv_out)
        assert got[0] == ["id", "n", "x", "s", "b", "price", "anything"]
        assert got[1:] == as_csv(expected)
        seen.append(expected)
        assert leftovers(tmp_path) == []
    assert seen[0] != seen[1]  # the two points differ, so the comparisons above could fail
    # --at chooses as restore does: just before the second snapshot is the first
    r = export_table(h.repo, "app", "things", tmp_path / "at.parquet", "parquet",
                     at=h.snaps[1].time - timedelta(microseconds=1))
    assert r.state.manifest.id == h.snaps[0].id
    assert parquet_rows(tmp_path / "at.parquet") == seen[0]


def test_cli_exports_and_prints_one_summary_line(history: History, tmp_path: Path) -> None:
    h = history
    out = tmp_path / "things.csv"
    r = run_dbre("export", "--repo", h.url, "--db", "app", "--table", "THINGS", "--snapshot", h.snaps[0].id[:8],
                 "--format", "csv", "--out", out)
    assert r.returncode == 0, r
    assert csv_rows(out)[1:] == as_csv(restored_rows(h, tmp_path, "things", snapshot=h.snaps[0].id))
    lines = r.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("exported 3,000 rows of things"), r
    assert "rows/s" in lines[0] and "objects" in lines[0] and "from the repository" in lines[0]
    assert r.stderr == ""  # no terminal: no progress bar
    pq_out = tmp_path / "things.parquet"
    r = run_dbre("export", "--repo", h.url, "--db", "app", "--table", "things", "--format", "parquet",
                 "--out", pq_out)
    assert r.returncode == 0, r
    assert parquet_rows(pq_out) == restored_rows(h, tmp_path, "things", snapshot=h.snaps[1].id)  # the newest
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- dynamic types


def test_a_column_of_mixed_types_falls_back_and_says_so(local_history: History, tmp_path: Path) -> None:
    h = local_history
    out = tmp_path / "mixed.parquet"
    r = run_dbre("export", "--repo", h.url, "--db", "app", "--table", "mixed", "--format", "parquet", "--out", out)
    assert r.returncode == 0, r
    assert "column 'v' (INTEGER) holds blob, integer, real, text values: written as binary" in r.stderr, r.stderr
    assert "column 'u' (no declared type)" in r.stderr and "written as string" in r.stderr, r.stderr
    assert [str(t) for t in pq.read_schema(out).types] == ["int64", "binary", "string"]
    assert parquet_rows(out) == [(1, b"5", "1"), (2, b"abc", "x"), (3, b"2.5", "3.5"), (4, b"\x00\xff", None),
                                 (5, None, "7")]
    # CSV has no types: the values as they are
    out_csv = tmp_path / "mixed.csv"
    assert run_dbre("export", "--repo", h.url, "--db", "app", "--table", "mixed", "--format", "csv",
                    "--out", out_csv).returncode == 0
    assert csv_rows(out_csv)[1:] == as_csv(restored_rows(h, tmp_path, "mixed", snapshot=h.snaps[1].id))


def test_a_misfit_after_the_first_batch_starts_again_with_the_wider_type(tmp_path: Path) -> None:
    src = tmp_path / "late.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, p NUMERIC)")
        c.executemany("INSERT INTO t(k, p) VALUES (?, ?)", [(i, i) for i in range(250)])
        c.execute("INSERT INTO t(k, p) VALUES ('late text', 0.5)")
        c.execute("INSERT INTO t(k, p) VALUES (1, ?)", (2**60,))  # not exact as a double: p ends as string
    repo = Repository.open_or_init(str(tmp_path / "repo"), None)
    backup(repo, open_source(str(src)), "app", checksums=False)
    warned: list[str] = []
    r = export_table(repo, "app", "t", tmp_path / "t.parquet", "parquet", batch_rows=100, warn=warned.append)
    assert r.restarts >= 2, (r.restarts, warned)
    assert any("'k'" in w and "string instead of int64" in w and "starts again" in w for w in warned), warned
    assert any("'p'" in w and "double instead of int64" in w for w in warned), warned
    assert any("'p'" in w and "string instead of double" in w for w in warned), warned
    rows = parquet_rows(tmp_path / "t.parquet")
    with sqlite3.connect(src) as c:
        expected = c.execute("SELECT id, CAST(k AS TEXT), p FROM t").fetchall()
    assert [(a, b) for a, b, _ in rows] == [(a, b) for a, b, _ in expected]
    assert [p for *_, p in rows][-3:] == ["249", "0.5", str(2**60)]
    assert [str(t) for t in pq.read_schema(tmp_path / "t.parquet").types] == ["int64", "string", "string"]


def test_affinity_follows_sqlite() -> None:
    assert [affinity(t) for t in ["INT", "BIGINT", "VARCHAR(10)", "CLOB", "BLOB", None, "", "DOUBLE PRECISION",
                                  "FLOAT", "DECIMAL(10,5)", "BOOLEAN", "DATETIME", "CHARINT", "POINT"]] == [
        "INTEGER", "INTEGER", "TEXT", "TEXT", "BLOB", "BLOB", "BLOB", "REAL", "REAL", "NUMERIC", "NUMERIC",
        "NUMERIC", "INTEGER", "INTEGER"]


# --------------------------------------------------------------------------- memory

_MEASURE = """
import json, resource, sys, tracemalloc
from pathlib import Path
from dbre.repository.repo import Repository
from dbre.restore.export import export_table
import pyarrow, pyarrow.parquet  # (imported by the export: their own allocations, ~3 MB either way, are no row's)
tracemalloc.start()
r = export_table(Repository.open(sys.argv[1], None), "app", sys.argv[2], Path(sys.argv[3]), "parquet",
                 cache_bytes=4 * 1024 * 1024, batch_rows=int(sys.argv[4]))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rows": r.rows, "seconds": r.seconds, "rss": rss, "py_peak": tracemalloc.get_traced_memory()[1]}))
"""


def test_memory_does_not_grow_with_the_rows(tmp_path: Path) -> None:
    src = tmp_path / "big.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        for name, n in (("small", 50_000), ("large", 200_000)):
            c.execute(f"CREATE TABLE {name}(id INTEGER PRIMARY KEY, n INTEGER, x REAL, s TEXT)")
            c.execute(f"WITH RECURSIVE k(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM k WHERE i < {n}) "
                      f"INSERT INTO {name}(n, x, s) SELECT i, i / 7.0, printf('%.150d', i) FROM k")
    repo_url = str(tmp_path / "repo")
    backup(Repository.open_or_init(repo_url, None), open_source(str(src)), "app", checksums=False)
    figures = {}
    for name in ("small", "large"):
        out = tmp_path / f"{name}.parquet"
        proc = subprocess.run([sys.executable, "-c", _MEASURE, repo_url, name, str(out), "8192"], capture_output=True,
                              text=True, env=dbre_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr
        figures[name] = json.loads(proc.stdout)
        assert pq.ParquetFile(out).metadata.num_rows == figures[name]["rows"]
    small, large = figures["small"], figures["large"]
    assert (small["rows"], large["rows"]) == (50_000, 200_000)
    # the large table's rows are ~60 MB more of Python objects than the small one's (~40 MB more values),
    # held all at once; a batch of 8192 rows (the query's page cache cut to 4 MiB) either way: the same peaks,
    # give or take a batch or two (~2.5 MB of values each; the two peaks were 0.6-5.3 MB apart over runs)
    assert large["py_peak"] - small["py_peak"] < 10 * 1024 * 1024, figures
    assert large["rss"] - small["rss"] < 12 * 1024 * 1024, figures
    print("export memory figures:", figures)


# --------------------------------------------------------------------------- bad input, failures


def test_bad_input_is_one_line_and_writes_nothing(local_history: History, tmp_path: Path) -> None:
    h = local_history
    out = tmp_path / "out.parquet"
    base = ["export", "--repo", h.url, "--db", "app"]
    assert_one_line_error(run_dbre(*base, "--table", "nope", "--format", "parquet", "--out", out), 2,
                          "no table 'nope'", "tables: mixed, things")
    assert_one_line_error(run_dbre(*base, "--table", "things", "--format", "xlsx", "--out", out), 2,
                          "'xlsx' is not a format", "parquet or csv")
    assert_one_line_error(run_dbre(*base, "--table", "things", "--format", "csv", "--out", tmp_path / "no" / "x.csv"),
                          2, "does not exist")
    assert_one_line_error(run_dbre(*base, "--table", "things", "--format", "csv", "--out", tmp_path), 2,
                          "is a directory")
    assert_one_line_error(run_dbre(*base, "--table", "things", "--format", "csv", "--out", out, "--at",
                                   "2026-01-01T00:00:00Z", "--snapshot", "latest"), 2, "--snapshot and --at")
    assert_one_line_error(run_dbre("export", "--repo", h.url, "--db", "other", "--table", "t", "--format", "csv",
                                   "--out", out), 2, "no snapshots")
    assert list(tmp_path.iterdir()) == []
    out.write_text("keep me")
    assert_one_line_error(run_dbre(*base, "--table", "things", "--format", "csv", "--out", out), 2, "exists",
                          "--force")
    assert out.read_text() == "keep me"
    assert run_dbre(*base, "--table", "things", "--format", "csv", "--out", out, "--force").returncode == 0
    assert csv_rows(out)[0][0] == "id"
    assert leftovers(tmp_path) == []


def test_a_failure_midway_leaves_nothing(local_history: History, tmp_path: Path) -> None:
    h = local_history
    out = tmp_path / "half.parquet"

    def progress(done: int, total: int) -> None:
        if done > 0:
            raise RuntimeError("stopped before the end")

    for fmt in ("parquet", "csv"):
        with pytest.raises(RuntimeError, match="before the end"):
            export_table(h.repo, "app", "things", out, fmt, batch_rows=1000, progress=progress)
        assert list(tmp_path.iterdir()) == []
    # a repository whose packs are gone: exit 1, one line, nothing at --out
    broken = tmp_path / "broken"
    shutil.copytree(h.url, broken)
    for pack in (broken / "packs").rglob("*"):
        if pack.is_file():
            pack.unlink()
    r = run_dbre("export", "--repo", broken, "--db", "app", "--table", "things", "--format", "csv", "--out", out)
    assert_one_line_error(r, 1, "missing")
    assert not out.exists() and leftovers(tmp_path) == []


def test_progress_counts_to_the_table_rows(local_history: History, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    r = export_table(local_history.repo, "app", "things", tmp_path / "p.csv", "csv",
                     progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, r.rows) and calls[-1] == (r.rows, r.rows)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(UsageError, match="exists"):
        export_table(local_history.repo, "app", "things", tmp_path / "p.csv", "csv")  # no force


def test_text_that_is_not_utf8_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "bad.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("CREATE TABLE bad(t TEXT)")
        c.execute("INSERT INTO bad VALUES ('fine'), (CAST(x'61ff62' AS TEXT))")
    repo_url = str(tmp_path / "repo")
    backup(Repository.open_or_init(repo_url, None), open_source(str(src)), "app", checksums=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for fmt in ("parquet", "csv"):
        r = run_dbre("export", "--repo", repo_url, "--db", "app", "--table", "bad", "--format", fmt,
                     "--out", out_dir / f"bad.{fmt}")
        assert_one_line_error(r, 1, "not valid UTF-8", "CAST(column AS BLOB)")
    assert list(out_dir.iterdir()) == []


def test_a_view_exports_and_a_broken_one_is_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "views.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("CREATE TABLE t(a INTEGER, b TEXT)")
        c.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        c.execute("CREATE VIEW two AS SELECT a, b FROM t WHERE a = 2")
        c.execute("CREATE TABLE gone(x)")
        c.execute("CREATE VIEW broken AS SELECT x FROM gone")
        c.execute("DROP TABLE gone")
    repo = Repository.open_or_init(str(tmp_path / "repo"), None)
    backup(repo, open_source(str(src)), "app", checksums=False)
    r = export_table(repo, "app", "two", tmp_path / "two.parquet", "parquet")
    assert r.table == "two (a view)" and parquet_rows(tmp_path / "two.parquet") == [(2, "two")]
    with pytest.raises(UsageError, match="view 'broken' cannot be read: no such table"):
        export_table(repo, "app", "broken", tmp_path / "broken.csv", "csv")
    assert not (tmp_path / "broken.csv").exists() and leftovers(tmp_path) == []
