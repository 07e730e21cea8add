"""`dbre sql` against a full restore: a point query by primary key answered from an S3 repository in place.

    python -m benchmarks.sqlquery                    # the 1 GiB benchmark database, medians of 5
    python -m benchmarks.sqlquery --size-mib 50 --runs 3 --data /tmp/bench-data

The benchmark database (bench-output/data/bench-<size>mib-v1.db, built the first time) is backed up
into an S3 repository on a moto_server started here (loopback, in memory: what is measured is dbre's
requests and decoding, not a network). Each round then answers `SELECT * FROM orders WHERE id = N`
twice: as the whole command (`dbre sql` in a child process: interpreter start-up, imports, the
repository's config and lock included) and in-process (`dbre.restore.query.query` on an opened
repository: the lock, the snapshot's choice and the pages read); and restores the whole database
from the same repository (in a child process) for comparison. Figures are medians; the objects,
requests and bytes a query read are its own count (every GET and ranged GET of the store).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import dataset
from benchmarks.history import _bucket, moto
from benchmarks.run import DB_NAME, _rm
from benchmarks.worker import _env, run_child

Log = Callable[[str], None]


def _point_sql(orders: int) -> str:
    return f"SELECT * FROM orders WHERE id = {max(1, orders // 2 + 17)}"


def measure(data: Path, runs: int, log: Log = print, size_mib: int = 1024) -> dict[str, Any]:
    from dbre.repository.repo import Repository
    from dbre.restore.query import query

    db = dataset.ensure(data, size_mib, log=log)
    sql = _point_sql(db.rows.get("orders", 1))
    with tempfile.TemporaryDirectory(prefix="dbre-sqlquery-") as tmp, moto():
        work = Path(tmp)
        url = _bucket("bench-sqlquery")
        log(f"sql query: backing up {size_mib} MiB into an S3 (moto_server) repository")
        run_child(["backup", "--repo", url, "--source", str(db.base), "--db", DB_NAME])
        repo = Repository.open(url)
        out = work / "restored.db"
        rounds: list[dict[str, Any]] = []
        answer: list[Any] | None = None
        for i in range(runs + 1):  # the first round warms the caches and is thrown away
            started = time.perf_counter()
            cmd = subprocess.run([sys.executable, "-m", "dbre.cli", "sql", "--repo", url, "--db", DB_NAME,
                                  "--format", "json", sql], capture_output=True, text=True, env=_env(), cwd=work)
            command = time.perf_counter() - started
            if cmd.returncode != 0:
                raise RuntimeError(f"dbre sql failed (exit {cmd.returncode}): {cmd.stderr.strip()}")
            rows = json.loads(cmd.stdout)
            result = query(repo, DB_NAME, sql)
            if len(rows) != 1 or [list(r.values()) for r in rows] != [list(r) for r in result.rows]:
                raise RuntimeError(f"the command and the in-process query disagree: {rows} vs {result.rows}")
            if answer is None:
                answer = list(result.rows[0])
            _rm(out)
            restore = run_child(["restore", "--repo", url, "--db", DB_NAME, "--to", str(out)])
            got = {"command": command, "in_process": result.seconds, "restore": restore["wall"],
                   **result.stats.describe()}
            with sqlite3.connect(out) as check:  # the restored copy gives the same row
                if list(check.execute(sql).fetchone()) != answer:
                    raise RuntimeError("the restored database answers otherwise")
            _rm(out)
            if i:
                rounds.append(got)
            log(f"  round {i}{' (warm-up)' if not i else ''}: command {command:.2f} s, in-process "
                f"{result.seconds:.3f} s ({got['objects']} objects, {got['requests']} requests, "
                f"{got['bytes_read'] / 2**20:.2f} MiB), full restore {restore['wall']:.2f} s")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    return {
        "size_mib": size_mib,
        "bytes": db.bytes,
        "runs": runs,
        "query": sql,
        "seconds": {k: round(med(k), 3) for k in ("command", "in_process", "restore")},
        "objects": int(med("objects")),
        "requests": int(med("requests")),
        "bytes_read": int(med("bytes_read")),
        "pages_served": int(med("pages_served")),
        "share_read": round(med("bytes_read") / db.bytes, 5),
        "restore_over_command": round(med("restore") / med("command"), 1),
        "samples": {k: [round(r[k], 3) for r in rounds] for k in ("command", "in_process", "restore")},
    }


def print_result(res: dict[str, Any], log: Log = print) -> None:
    s = res["seconds"]
    log(f"point query on {res['size_mib']} MiB in S3 (moto), medians of {res['runs']}: `dbre sql` {s['command']:.2f} s "
        f"(in-process {s['in_process']:.3f} s), {res['objects']} objects in {res['requests']} requests, "
        f"{res['bytes_read'] / 2**20:.2f} MiB read ({100 * res['share_read']:.2f}% of the database), "
        f"{res['pages_served']} pages served; full restore {s['restore']:.2f} s ({res['restore_over_command']}x the "
        "command)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sqlquery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=1024, help="database size in MiB (default 1024)")
    p.add_argument("--runs", type=int, default=5, help="measured rounds; the figures are medians (default 5)")
    p.add_argument("--data", type=Path, default=Path("bench-output/data"), help="where benchmark databases are "
                   "cached (default bench-output/data)")
    p.add_argument("--json", type=Path, help="also write the result to this file")
    args = p.parse_args(argv)
    if args.runs < 1 or args.size_mib < 1:
        p.error("--runs and --size-mib must be at least 1")
    res = measure(args.data, args.runs, size_mib=args.size_mib)
    print_result(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
