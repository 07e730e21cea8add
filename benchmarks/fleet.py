"""Fleet benchmark: back up a fleet of databases (namespaces of one sqld, --enable-namespaces) through the
fleet-backup flow at 1, 2 and 4 concurrent backups, and print the fleet time of each.

    python -m benchmarks.fleet                          # 100 namespaces; concurrency 1, 2, 4; thread runner
    python -m benchmarks.fleet --dbs 20 --concurrency 1,4 --runner dask --global-limit
    python -m benchmarks.fleet --replica                # also: each namespace through an embedded replica

Each level backs up into a fresh local repository (the first, full backup of every database), then
once more after a few rows changed in every namespace (the incremental, the hourly case). Flow runs
go to a temporary Prefect API (prefect_test_harness), so the figures include Prefect's own per-task
cost. Results go to bench-output/fleet.json.

``--replica`` measures the same levels a second time with the policy's ``replica_url``: each
namespace is read through an embedded replica addressed by hostname (``<namespace>.fleet.test``),
kept between rounds, instead of a full /dump. Those hostnames need DNS; the benchmark runs itself
again in a private mount namespace (``unshare -rm``) whose /etc/hosts maps them to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
    p.add_argument("--replica", action="store_true",
                   help="also measure each namespace read through an embedded replica (replica_url)")
    p.add_argument("--out", type=Path, default=Path("bench-output"), help="results folder (default ./bench-output)")
    return p.parse_args(argv)


DOMAIN = "fleet.test"
_IN_NS = "DBRE_BENCH_FLEET_HOSTS"


def _in_mount_namespace(args: argparse.Namespace, argv: list[str] | None) -> None:
    """Run this benchmark again in a private mount namespace whose /etc/hosts names every tenant
    (``<tenant>.fleet.test``: what a wildcard DNS record gives in production); never returns."""
    sys.path.insert(0, str(ROOT))
    from tests.sqld import with_hostnames

    hosts = Path(tempfile.mkdtemp(prefix="dbre-fleet-hosts-")) / "hosts"
    cmd = [sys.executable, "-m", "benchmarks.fleet", *(sys.argv[1:] if argv is None else argv)]
    env = {**os.environ, _IN_NS: "1"}
    try:
        code = subprocess.run(with_hostnames(cmd, "127.0.0.1", [f"{ns}.{DOMAIN}" for ns in tenant_names(args.dbs)],
                                             hosts), env=env, cwd=ROOT, check=False).returncode
    except FileNotFoundError:
        sys.exit("--replica needs unshare (util-linux) to give the tenants hostnames; run without --replica")
    sys.exit(code)


def tenant_names(n: int) -> list[str]:
    return [f"tenant-{i:03d}" for i in range(n)]


def build_fleet(server: Any, n: int, rows: int) -> list[str]:
    """``n`` namespaces, each with a customers and an orders table of ``rows`` rows."""
    names = tenant_names(n)
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
    if args.replica and not os.environ.get(_IN_NS):
        _in_mount_namespace(args, argv)
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
        port = server.url.rsplit(":", 1)[1]
        policies = {"dump": server.write_fleet_policy(work / "policy.yaml", work / "unused", names, rto="15m",
                                                      keep_last=10)}
        if args.replica:
            policies["replica"] = server.write_fleet_policy(
                work / "policy-replica.yaml", work / "unused", names, rto="15m", keep_last=10,
                replica_url=f"http://{{namespace}}.{DOMAIN}:{port}")
        results = []
        with prefect_test_harness(server_startup_timeout=120):
            for read, policy in policies.items():
                for level in levels:
                    repo = str(work / f"repo-{read}-{level}")
                    os.environ["DBRE_CACHE_DIR"] = str(work / f"cache-{read}-{level}")  # (replicas: made anew)
                    limit = f"dbre-bench-{level}" if args.global_limit else ""
                    full = measure(str(policy), repo, level, args.runner, limit)
                    change_fleet(server, names)
                    incr = measure(str(policy), repo, level, args.runner, limit)
                    methods = _methods(repo)
                    results.append({"read": read, "concurrency": level, "full_seconds": full["seconds"],
                                    "incremental_seconds": incr["seconds"], "backups": full["backups"],
                                    "methods": methods})
                    console.print(f"{read}, concurrency {level}: full {full['seconds']} s, incremental "
                                  f"{incr['seconds']} s (sources read by {methods})")
    finally:
        server.stop()
    base = results[0]["full_seconds"] if results else 1.0
    table = Table(title=f"fleet backup of {args.dbs} databases ({args.runner} runner"
                  + (", global concurrency limit" if args.global_limit else "") + ")", title_justify="left")
    for col in ("read through", "concurrent backups", "full: fleet s", "per db s", "speed-up",
                "incremental: fleet s", "incremental / full"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["read"], str(r["concurrency"]), f"{r['full_seconds']:.1f}",
                      f"{r['full_seconds'] / args.dbs:.2f}", f"{base / r['full_seconds']:.2f}x",
                      f"{r['incremental_seconds']:.1f}", f"{r['incremental_seconds'] / r['full_seconds']:.2f}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "dbs": args.dbs, "rows": args.rows,
           "runner": args.runner, "global_limit": args.global_limit, "cpus": os.cpu_count(),
           "median_full_seconds": statistics.median(r["full_seconds"] for r in results) if results else None,
           "results": results}
    (args.out / "fleet.json").write_text(json.dumps(out, indent=2))
    console.print(f"results: {args.out / 'fleet.json'}")


def _methods(repo: str) -> dict[str, int]:
    """How the snapshots of ``repo`` read their sources (``stats.source_method``), counted."""
    from dbre.repository.repo import Repository

    counts: dict[str, int] = {}
    for m in Repository.open(repo).snapshots():
        key = str(m.stats.get("source_method"))
        counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    main()
