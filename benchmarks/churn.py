"""Churn benchmark: repository size under retention, with and without repacking through backup.

    python -m benchmarks --churn               # after the size benchmarks
    python -m benchmarks.churn                 # this part alone (medians of 3 runs)
    python -m benchmarks.churn --runs 1 --below 0.4,0.5,0.6 --budget 0.25

One WAL database of ~48 MiB (benchmarks/dataset.py) goes through 24 rounds of: update 1% of the
rows of every table at scattered rowids (about 15% of the pages change), back up, `forget
--keep-last 3 --prune --grace 0`. Every configuration sees the same sequence of databases (same
seeds). After the last round the repository's bytes (packs/ and snapshots/) are compared with
what the kept snapshots need: a fresh repository into which the 3 kept snapshots are replayed,
oldest first (each restored to a file and backed up: dense by construction). Target: <= 1.5x
with repacking. The cost: bytes added and seconds per backup (median over the rounds).
The repository is on the local disk (sizes do not depend on the store; S3 is covered by
tests/test_churn.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import dataset

ROUNDS = 24
KEEP = 3
SIZE_MIB = 48
TARGET = 1.5
Log = Callable[[str], None]


def repo_bytes(root: Path) -> int:
    """Bytes of every object under packs/ and snapshots/ of a local repository."""
    return sum(p.stat().st_size for sub in ("packs", "snapshots") for p in (root / sub).rglob("*") if p.is_file())


@contextmanager
def repack_settings(below: float, budget: float) -> Iterator[None]:
    from dbre.repository import backup as engine

    saved = engine.REPACK_BELOW, engine.REPACK_BUDGET
    engine.REPACK_BELOW, engine.REPACK_BUDGET = below, budget
    try:
        yield
    finally:
        engine.REPACK_BELOW, engine.REPACK_BUDGET = saved


def dense_bytes(repo_url: str, work: Path) -> int:
    """The size of a new repository holding only the kept snapshots: each restored, then backed
    up into it, oldest first."""
    from dbre.repository.backup import backup
    from dbre.repository.repo import Repository
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.sources.local import LocalFileSource

    repo = Repository.open(repo_url)
    fresh_root = work / "dense"
    shutil.rmtree(fresh_root, ignore_errors=True)
    fresh = Repository.open_or_init(str(fresh_root))
    for m in sorted(repo.snapshots(), key=lambda m: m.time):
        out = work / "replay.db"
        out.unlink(missing_ok=True)
        apply_restore(repo, plan_restore(repo, m.db, out, snapshot=m.id))
        backup(fresh, LocalFileSource(str(out)), m.db)
        out.unlink()
    size = repo_bytes(fresh_root)
    shutil.rmtree(fresh_root)
    return size


def churn(base: Path, work: Path, *, repack: bool, below: float, budget: float, rounds: int = ROUNDS,
          log: Log = print) -> dict[str, Any]:
    """One pass of ``rounds`` rounds on a copy of ``base``; sizes, ratio and per-round cost."""
    from dbre.repository.backup import backup
    from dbre.repository.repo import Repository
    from dbre.repository.retention import KeepPolicy, forget
    from dbre.sources.local import LocalFileSource

    src = work / "churn.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{src}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(base, src)
    root = work / "repo"
    shutil.rmtree(root, ignore_errors=True)
    url = str(root)
    repo = Repository.open_or_init(url)
    backup(repo, LocalFileSource(str(src)), "churn", repack=repack)
    added, seconds, repacked, changed, sizes = [], [], [], [], []
    with repack_settings(below, budget):
        for r in range(rounds):
            dataset.update_rows(src, seed=dataset.SEED + 100 + r)
            started = time.perf_counter()
            m = backup(repo, LocalFileSource(str(src)), "churn", repack=repack).manifest
            seconds.append(time.perf_counter() - started)
            forget(repo, KeepPolicy(last=KEEP), "churn", prune=True, grace=0)
            added.append(m.stats["bytes_added"])
            repacked.append(m.stats.get("repacked_pages", 0))
            changed.append((m.stats["pages_added"] - m.stats.get("repacked_pages", 0)) / m.page_count)
            sizes.append(repo_bytes(root))
    stored = repo_bytes(root)
    dense = dense_bytes(url, work)
    result = {
        "repack": repack, "below": below, "budget": budget,
        "repo_bytes": stored, "dense_bytes": dense, "ratio": round(stored / dense, 3),
        "peak_ratio_last_8": round(max(sizes[-8:]) / dense, 3),
        "bytes_added_per_round": int(statistics.median(added)),
        "seconds_per_round": round(statistics.median(seconds), 3),
        "repacked_pages_per_round": int(statistics.median(repacked)),
        "pages": m.page_count,
        "changed_share": round(statistics.median(changed), 3),  # lower bound: pages_added minus repack
    }
    log(f"  repack {'on ' if repack else 'off'} below {below} budget {budget}: repository "
        f"{stored / 2**20:.1f} MiB vs dense {dense / 2**20:.1f} MiB = {result['ratio']:.2f}x; "
        f"{result['bytes_added_per_round'] / 2**20:.2f} MiB and {result['seconds_per_round']:.2f} s per backup")
    shutil.rmtree(root)
    return result


def measure(runs: int = 3, belows: tuple[float, ...] = (0.6,), budgets: tuple[float, ...] = (0.25,),
            size_mib: int = SIZE_MIB, rounds: int = ROUNDS, data: Path | None = None,
            log: Log = print) -> dict[str, Any]:
    """Medians over ``runs`` of each configuration: repack off, and on for each (below, budget)."""
    configs = [(False, belows[0], budgets[0])] + [(True, b, g) for b in belows for g in budgets]
    with tempfile.TemporaryDirectory(prefix="dbre-churn-") as tmp:
        work = Path(tmp)
        db = dataset.ensure(data or work / "data", size_mib, log=log)
        log(f"churn: {size_mib} MiB WAL database, {rounds} rounds of 1% rows updated, keep-last {KEEP} "
            f"with prune; {runs} runs")
        by_config: dict[tuple[bool, float, float], list[dict[str, Any]]] = {c: [] for c in configs}
        for _ in range(runs):  # configurations interleaved: machine noise hits them alike
            for c in configs:
                by_config[c].append(churn(db.base, work, repack=c[0], below=c[1], budget=c[2],
                                          rounds=rounds, log=log))
    rows = []
    for results in by_config.values():
        row = {k: results[0][k] for k in ("repack", "below", "budget", "pages")}
        for k in ("repo_bytes", "dense_bytes", "ratio", "peak_ratio_last_8", "bytes_added_per_round",
                  "seconds_per_round", "repacked_pages_per_round", "changed_share"):
            row[k] = statistics.median(r[k] for r in results)
        rows.append(row)
    on = [r for r in rows if r["repack"] and r["below"] == 0.6 and r["budget"] == 0.25] or \
        [r for r in rows if r["repack"]]
    return {"rounds": rounds, "keep_last": KEEP, "size_mib": size_mib, "runs": runs, "rows": rows,
            "target": TARGET, "pass": bool(on) and on[0]["ratio"] <= TARGET}


def print_result(result: dict[str, Any], log: Log = print) -> None:
    log(f"churn ({result['rounds']} rounds, keep-last {result['keep_last']} + prune, {result['size_mib']} MiB, "
        f"medians of {result['runs']}; target <= {result['target']}x with repack):")
    log(f"  {'repack':<22} {'repo MiB':>9} {'dense MiB':>9} {'ratio':>6} {'peak':>6} "
        f"{'added MiB/round':>15} {'s/backup':>8} {'repacked pg':>11} {'changed':>7}")
    for r in result["rows"]:
        label = f"on (<{r['below']}, {r['budget']:.0%})" if r["repack"] else "off"
        log(f"  {label:<22} {r['repo_bytes'] / 2**20:>9.1f} {r['dense_bytes'] / 2**20:>9.1f} {r['ratio']:>6.2f} "
            f"{r['peak_ratio_last_8']:>6.2f} {r['bytes_added_per_round'] / 2**20:>15.2f} "
            f"{r['seconds_per_round']:>8.2f} {r['repacked_pages_per_round']:>11.0f} {r['changed_share']:>7.1%}")


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, not {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError("each value must be in (0, 1]")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.churn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="runs per configuration; figures are medians (default 3)")
    p.add_argument("--below", type=_floats, default=(0.6,), help="REPACK_BELOW values to measure (default 0.6)")
    p.add_argument("--budget", type=_floats, default=(0.25,), help="REPACK_BUDGET values to measure (default 0.25)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds of churn (default {ROUNDS})")
    p.add_argument("--size-mib", type=int, default=SIZE_MIB, help=f"database size (default {SIZE_MIB})")
    p.add_argument("--out", type=Path, default=Path("bench-output"),
                   help="cache and results folder (default ./bench-output)")
    args = p.parse_args(argv)
    if args.runs < 1 or args.rounds < 1:
        p.error("--runs and --rounds must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args.runs, args.below, args.budget, args.size_mib, args.rounds, data=args.out.absolute() / "data")
    print_result(result)
    (args.out / "churn.json").write_text(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
