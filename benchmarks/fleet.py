"""Fleet benchmark: back up a fleet of databases (namespaces of one sqld, --enable-namespaces) through the
fleet-backup flow at 1, 2 and 4 concurrent backups, and print the fleet time of each.

    python -m benchmarks.fleet                          # 100 namespaces; concurrency 1, 2, 4; thread runner
    python -m benchmarks.fleet --dbs 20 --concurrency 1,4 --runner dask --global-limit

Each level backs up into a fresh local repository (the first, full backup of every database), then
once more after a few rows changed in every namespace (the incremental, the hourly case). Flow runs
go to a temporary Prefect API (prefect_test_harness), so the figures include Prefect's own per-task
cost. Results go to bench-output/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dbs", type=int, default=100, help="databases (sqld namespaces) in the fleet (default 100)")
    p.add_argument("--rows", type=int, default=2000, help="rows per database, ~150 bytes each (default 2000)")
    p.add_argument("--concurrency", default="1,2,4", help="concurrent backups to measure (default 1,2,4)")
    p.add_argument("--runner", choices=["thread", "dask"], default="thread", help="task runner (default thread)")
    p.add_argument("--global-limit", action="store_true",
                   help="also hold a Prefect global concurrency limit slot per backup (sized to the level)")
    p.add_argument("--out", type=Path, default=Path("bench-output"), help="results folder (default ./bench-output)")
    return p.parse_args(argv)


def build_fleet(server: Any, n: int, rows: int) -> list[str]:
    """``n`` namespaces, each with a customers and an orders table of ``rows`` rows."""
    names = [f"tenant-{i:03d}" for i in range(n)]
    for i, ns in enumerate(names):
        server.create_namespace(ns)
        server.pipeline([
            "CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT)",
            "CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), "
            "total REAL, note TEXT)",
            f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {max(1, rows // 10)}) "
            f"INSERT INTO customers SELECT x, 'customer ' || x || ' of {ns}', 'c' || x || '@example.com' FROM c",
            f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
            f"INSERT INTO orders SELECT x, x % {max(1, rows // 10)} + 1, x * {i + 1} / 7.0, hex(randomblob(40)) FROM c",
        ], namespace=ns)
    return names


def change_fleet(server: Any, names: list[str]) -> None:
    for ns in names:
        server.pipeline(["UPDATE orders SET total = total + 1 WHERE id % 97 = 0"], namespace=ns)


def measure(policy: str, repo: str, level: int, runner: str, limit: str) -> dict[str, Any]:
    from flows.fleet import ensure_concurrency_limit, fleet_backup_flow

    if limit:
        ensure_concurrency_limit(limit, level)
    t0 = time.perf_counter()
    result = fleet_backup_flow(policy=policy, repo=repo, max_concurrency=level, task_runner=runner,
                               concurrency_limit=limit)
    return {"seconds": round(time.perf_counter() - t0, 2), "backups": result["backups"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="dbre-fleet-bench-"))
    os.environ.update({"PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_LOGGING_LEVEL": "WARNING", "DBRE_CACHE_DIR": str(work / "cache"),
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"})
    sys.path.insert(0, str(ROOT))
    from prefect.testing.utilities import prefect_test_harness
    from rich.console import Console
    from rich.table import Table

    from tests.sqld import start_sqld

    console = Console()
    server = start_sqld(work / "sqld", namespaces=True, admin=True)
    try:
        t0 = time.perf_counter()
        names = build_fleet(server, args.dbs, args.rows)
        console.print(f"built {len(names)} namespaces on sqld {server.url} in {time.perf_counter() - t0:.1f} s")
        policy = server.write_fleet_policy(work / "policy.yaml", work / "unused", names, rto="15m", keep_last=10)
        results = []
        with prefect_test_harness(server_startup_timeout=120):
            for level in levels:
                repo = str(work / f"repo-{level}")
                limit = f"dbre-bench-{level}" if args.global_limit else ""
                full = measure(str(policy), repo, level, args.runner, limit)
                change_fleet(server, names)
                incr = measure(str(policy), repo, level, args.runner, limit)
                results.append({"concurrency": level, "full_seconds": full["seconds"],
                                "incremental_seconds": incr["seconds"], "backups": full["backups"]})
                console.print(f"concurrency {level}: full {full['seconds']} s, incremental {incr['seconds']} s")
    finally:
        server.stop()
    base = results[0]["full_seconds"] if results else 1.0
    table = Table(title=f"fleet backup of {args.dbs} databases ({args.runner} runner"
                  + (", global concurrency limit" if args.global_limit else "") + ")", title_justify="left")
    for col in ("concurrent backups", "full: fleet s", "per db s", "speed-up", "incremental: fleet s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["concurrency"]), f"{r['full_seconds']:.1f}", f"{r['full_seconds'] / args.dbs:.2f}",
                      f"{base / r['full_seconds']:.2f}x", f"{r['incremental_seconds']:.1f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "dbs": args.dbs, "rows": args.rows,
           "runner": args.runner, "global_limit": args.global_limit, "cpus": os.cpu_count(),
           "median_full_seconds": statistics.median(r["full_seconds"] for r in results) if results else None,
           "results": results}
    (args.out / "fleet.json").write_text(json.dumps(out, indent=2))
    console.print(f"results: {args.out / 'fleet.json'}")


if __name__ == "__main__":
    main()
