"""`python -m benchmarks`: build (or reuse) the databases, measure, print the table, write results.json.

    python -m benchmarks                   # 100 MiB and 1 GiB, medians of 3 runs
    python -m benchmarks --quick           # 100 MiB, 1 run: a smoke test
    python -m benchmarks --profile         # also a cProfile of one backup of the largest database
    python -m benchmarks --history         # also cost against history (benchmarks/history.py)
    python -m benchmarks --churn           # also size under churn and retention (benchmarks/churn.py)
    python -m benchmarks --memory          # also peak RSS at 1 and 8 GiB (benchmarks/memory.py)
    python -m benchmarks --large           # also the ratios at 8 GiB, default settings (benchmarks/large.py)
    python -m benchmarks --pitr            # also replication against Litestream 0.5.17 (benchmarks/pitr.py)
    python -m benchmarks --s3              # also restore from S3 against a local one (benchmarks/s3restore.py)
    python -m benchmarks --sql             # also a point query in place on S3 (benchmarks/sqlquery.py)
"""

from __future__ import annotations

import argparse
import compileall
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from benchmarks import dataset, report, run


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes MiB numbers separated by commas, not {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--sizes needs at least one size of 1 MiB or more")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=_sizes, default=[100, 1024], help="database sizes in MiB (default 100,1024)")
    p.add_argument("--runs", type=int, default=3, help="measured runs per size; the figures are medians (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs thrown away first (default 1)")
    p.add_argument("--quick", action="store_true", help="100 MiB only, 1 run: a smoke test")
    p.add_argument("--out", type=Path, default=Path("bench-output"),
                   help="cache and results folder (default ./bench-output)")
    p.add_argument("--profile", action="store_true", help="also profile one full backup of the largest database")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--history", action="store_true",
                   help="also the history part: 5 vs 200 snapshots on S3, and a 10,000-snapshot repository")
    p.add_argument("--churn", action="store_true",
                   help="also the churn part: 24 rounds of 15%% page churn with keep-last 3 + prune, repack off vs on")
    p.add_argument("--memory", action="store_true",
                   help="also the memory part: peak RSS of backup, incremental and restore at 1 and 8 GiB")
    p.add_argument("--memory-gib", type=float, nargs="+", help=argparse.SUPPRESS)  # small sizes for the tests
    p.add_argument("--large", action="store_true",
                   help="also full / .backup, incremental / full and restore / cp at 8 GiB with the default "
                        "settings, whole commands (needs ~35 GB free)")
    p.add_argument("--large-gib", type=float, default=8.0, help=argparse.SUPPRESS)  # small sizes for the tests
    p.add_argument("--pitr", action="store_true",
                   help="also continuous replication and point-in-time restores, dbre vs Litestream "
                        "(256 MiB, 100 and 1000 commits/s, directory and S3; with --quick: 4 MiB, 100/s, directory)")
    p.add_argument("--s3", action="store_true",
                   help="also restore of the largest size from an S3 repository (moto_server) against a local one")
    p.add_argument("--sql", action="store_true",
                   help="also `dbre sql` (a point query in place) on the largest size in S3, against a full restore")
    p.add_argument("--size-mb", type=int, help=argparse.SUPPRESS)  # tiny databases for the tests
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.runs = [100], 1
    if args.size_mb:
        args.sizes = [args.size_mb]
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return args


def _byte_compile() -> None:
    """Byte-compile dbre (and the flows the benchmarks run), as `pip install` does for an installed
    package: an editable install has none, and with PYTHONDONTWRITEBYTECODE set no process writes
    them, so every timed command would compile ~0.2 s of source first (`make pyc` does the same)."""
    root = Path(__file__).resolve().parent.parent
    for folder in ("dbre", "tasks", "flows"):
        compileall.compile_dir(root / folder, quiet=2, workers=0)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _byte_compile()
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file or a pipe: do not wrap the table at 80 columns
    out: Path = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": run.machine(out),
        "config": {"sizes_mib": args.sizes, "runs": args.runs, "warmup": args.warmup, "quick": args.quick},
        "targets": {k: {"limit": v[0], "label": v[1]} for k, v in run.TARGETS.items()},
        "results": [],
    }
    results: list[dict[str, object]] = []
    databases = []
    for size in args.sizes:
        db = dataset.ensure(out / "data", size, log=console.print)
        databases.append(db)
        console.print(f"measuring {size} MiB ({db.bytes / 1024**2:.0f} MiB on disk), "
                      f"{args.warmup} warm-up + {args.runs} runs")
        results.append(run.measure(db, out / "work", args.runs, args.warmup, console.print))
        doc["results"] = results
        (out / "results.json").write_text(json.dumps(doc, indent=1))  # partial results survive a crash
    if args.profile:
        largest = max(databases, key=lambda d: d.bytes)
        console.print(f"cProfile of one full backup of {largest.size_mib} MiB (top functions by own time):")
        text = run.profile_backup(largest, out / "work")
        doc["profile"] = text
        console.print(text, markup=False, highlight=False)
    if args.history:
        from benchmarks import history

        doc["history"] = history.measure(args.runs, log=console.print)
        history.print_result(doc["history"], console.print)  # type: ignore[arg-type]
    if args.memory:
        from benchmarks import memory

        doc["memory"] = memory.measure(out / "data", console.print, tuple(args.memory_gib or memory.SIZES_GIB))
        memory.print_result(doc["memory"], console.print)  # type: ignore[arg-type]
    if args.large:
        from benchmarks import large

        doc["large"] = large.measure(out / "data", console.print, args.large_gib, args.runs)
        large.print_result(doc["large"], console.print)  # type: ignore[arg-type]
    if args.churn:
        from benchmarks import churn

        doc["churn"] = churn.measure(args.runs, data=out / "data", log=console.print)
        churn.print_result(doc["churn"], console.print)  # type: ignore[arg-type]
    if args.pitr:
        from benchmarks import pitr, pitr_report

        doc["pitr"] = pitr.measure(pitr.Settings.quick() if args.quick else pitr.Settings(), out, log=console.print)
        pitr_report.print_tables(doc["pitr"], console)  # type: ignore[arg-type]
    if args.s3:
        from benchmarks import s3restore

        doc["s3_restore"] = s3restore.measure(out / "data", args.runs, console.print, max(args.sizes))
        s3restore.print_result(doc["s3_restore"], console.print)  # type: ignore[arg-type]
    if args.sql:
        from benchmarks import sqlquery

        doc["sql"] = sqlquery.measure(out / "data", args.runs, console.print, size_mib=max(args.sizes))
        sqlquery.print_result(doc["sql"], console.print)  # type: ignore[arg-type]
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    report.print_table(doc, console)
    console.print(f"results: {out / 'results.json'}")
    missed = [c for r in results for c in r["checks"].values() if not c["pass"]]  # type: ignore[attr-defined]
    if args.history and not doc["history"]["pass"]:  # type: ignore[index]
        missed.append(doc["history"])
    if args.churn and not doc["churn"]["pass"]:  # type: ignore[index]
        missed.append(doc["churn"])
    if args.memory and not doc["memory"]["pass"]:  # type: ignore[index]
        missed.append(doc["memory"])
    if args.large and not doc["large"]["pass"]:  # type: ignore[index]
        missed.append(doc["large"])
    if args.s3 and not doc["s3_restore"]["pass"]:  # type: ignore[index]
        missed.append(doc["s3_restore"])
    if args.pitr:
        missed += [c for c in doc["pitr"]["comparison"] if not c.get("pass")]  # type: ignore[index]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
