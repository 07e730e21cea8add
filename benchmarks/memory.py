"""Peak memory against database size: full backup, incremental and restore of 1 and 8 GiB databases.

``python -m benchmarks --memory`` (issue 9, *Size*: at most 300 MB for an 8 GiB database, and the
growth per GiB stated). The databases are built in SQL by SQLite itself (a recursive CTE: about a
minute per GiB, instead of the realistic dataset's several): one table of 1 KB rows, 300 random
bytes and 700 zero bytes each, so they compress about 3x; the incremental's source is a copy with
1% of the rows rewritten (4% of the pages). Each command runs in a child process
(``benchmarks.worker``), whose own peak RSS ``os.wait4`` reports; the growth per GiB is the slope
between the two sizes.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.worker import run_child

MB = 1_000_000
GIB = 1024**3
SIZES_GIB = (1, 8)
LIMIT_MB = 300.0  # the limit at 8 GiB
ROW_BYTES = 1000

Log = Callable[[str], None]


def build(path: Path, gib: float, log: Log) -> tuple[Path, Path]:
    """``path`` (``gib`` GiB of 1 KB rows) and its updated twin, cached beside each other."""
    updated = path.with_name(path.stem + "-updated.db")
    if path.exists() and updated.exists():
        return path, updated
    log(f"building {path.name} ({gib:g} GiB, in SQL) and its updated twin ...")
    rows = int(gib * GIB / ROW_BYTES * 0.94)  # (pages are not quite full)
    tmp = path.with_name("." + path.name + ".building")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        con.execute("PRAGMA page_size=4096")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
        con.execute("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
                    "INSERT INTO t SELECT x, randomblob(300) || zeroblob(700) FROM c", (rows,))
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    twin = updated.with_name("." + updated.name + ".building")
    shutil.copyfile(tmp, twin)
    con = sqlite3.connect(twin)
    try:
        con.execute("UPDATE t SET v = randomblob(300) || zeroblob(700) WHERE id % 100 = 7")
        con.commit()
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    for p in (tmp, twin):
        for suffix in ("-wal", "-shm"):
            Path(str(p) + suffix).unlink(missing_ok=True)
    twin.rename(updated)
    tmp.rename(path)
    return path, updated


def measure_one(base: Path, updated: Path, work: Path) -> dict[str, Any]:
    """Peak RSS (MB) and seconds of a full backup, an incremental and a restore."""
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    full = run_child(["backup", "--repo", str(repo), "--source", str(base), "--db", "m"])
    incr = run_child(["backup", "--repo", str(repo), "--source", str(updated), "--db", "m"])
    target = work / "restored.db"
    target.unlink(missing_ok=True)
    rest = run_child(["restore", "--repo", str(repo), "--db", "m", "--to", str(target)])
    same = target.stat().st_size == updated.stat().st_size
    target.unlink(missing_ok=True)
    shutil.rmtree(repo, ignore_errors=True)
    return {
        "bytes": base.stat().st_size,
        "pages": full["pages"],
        "rss_mb": {"full_backup": full["rss_bytes"] / MB, "incremental_backup": incr["rss_bytes"] / MB,
                   "restore": rest["rss_bytes"] / MB},
        "seconds": {"full_backup": full["seconds"], "incremental_backup": incr["seconds"],
                    "restore": rest["seconds"]},
        "incremental_pages_added": incr["pages_added"],
        "restored_size_ok": same,
    }


def measure(data: Path, log: Log, sizes: tuple[float, ...] = SIZES_GIB) -> dict[str, Any]:
    data.mkdir(parents=True, exist_ok=True)
    points = []
    with tempfile.TemporaryDirectory(dir=data) as work:
        for gib in sizes:
            base, updated = build(data / f"memory-{gib:g}gib.db", gib, log)
            log(f"measuring {gib:g} GiB: full backup, incremental, restore (each in a child process) ...")
            points.append(measure_one(base, updated, Path(work)))
    first, last = points[0], points[-1]
    span = (last["bytes"] - first["bytes"]) / GIB
    growth = {k: (last["rss_mb"][k] - first["rss_mb"][k]) / span if span else 0.0 for k in first["rss_mb"]}
    peak = max(last["rss_mb"].values())
    ok = peak <= LIMIT_MB and all(p["restored_size_ok"] for p in points)
    return {"points": points, "growth_mb_per_gib": growth, "largest_gib": last["bytes"] / GIB,
            "peak_mb": peak, "limit_mb": LIMIT_MB, "pass": ok}


def print_result(res: dict[str, Any], log: Log) -> None:
    from rich.table import Table

    t = Table(title="Peak RSS against database size (MB; growth per GiB from the two sizes)")
    t.add_column("command")
    for p in res["points"]:
        t.add_column(f"{p['bytes'] / GIB:.1f} GiB ({p['pages']:,} pages)", justify="right")
    t.add_column("growth / GiB", justify="right")
    for k in ("full_backup", "incremental_backup", "restore"):
        t.add_row(k.replace("_", " "), *(f"{p['rss_mb'][k]:.0f} MB ({p['seconds'][k]:.1f} s)" for p in res["points"]),
                  f"{res['growth_mb_per_gib'][k]:.1f} MB")
    from rich.console import Console

    Console(width=150).print(t)
    log(f"largest: {res['peak_mb']:.0f} MB at {res['largest_gib']:.1f} GiB (limit {res['limit_mb']:.0f} MB): "
        f"{'ok' if res['pass'] else 'MISSED'}")
