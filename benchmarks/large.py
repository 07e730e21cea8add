"""The issue-14 ratios at 8 GiB with the default settings: whole commands against `sqlite3 .backup` and cp.

``python -m benchmarks --large`` builds (or reuses) the memory benchmark's 8 GiB database of 1 KB rows
(built in SQL in minutes; the realistic dataset of ``benchmarks.dataset`` would take most of an hour
at this size) and its twin with 1% of rows rewritten, then measures, round after round: the two
anchors, a full backup, an incremental and a restore with the default settings (no option: table
checksums are off above 256 MiB). Each dbre figure is the child's wall time, interpreter start and
imports included, and the engine's own seconds; ratios are taken within each round, then the median.
Every output is deleted as soon as it is measured, so the peak on disk is about 4x the database.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.memory import build
from benchmarks.run import _rm, cp_fsync, sqlite_backup
from benchmarks.worker import run_child

GIB = 1024**3
MB = 1_000_000
TARGETS = {"full_vs_sqlite_backup": 1.5, "incremental_vs_full": 0.35, "restore_vs_cp_fsync": 2.5}

Log = Callable[[str], None]


def one_round(base: Path, updated: Path, work: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    t = sqlite_backup(base, work / "anchor.db")
    out["sqlite_backup"] = {"seconds": t, "wall": t}
    t = cp_fsync(base, work / "copy.db")
    out["cp_fsync"] = {"seconds": t, "wall": t}
    repo, target = work / "repo", work / "restored.db"
    _rm(repo)
    out["full_backup"] = run_child(["backup", "--repo", str(repo), "--source", str(base), "--db", "large",
                                    "--default-checksums"])
    out["incremental_backup"] = run_child(["backup", "--repo", str(repo), "--source", str(updated), "--db", "large",
                                           "--default-checksums"])
    _rm(target)
    out["restore"] = run_child(["restore", "--repo", str(repo), "--db", "large", "--to", str(target)])
    out["restore"]["size_ok"] = target.stat().st_size == updated.stat().st_size
    _rm(target)
    _rm(repo)
    return out


def measure(data: Path, log: Log, gib: float = 8.0, runs: int = 3, warmup: int = 0) -> dict[str, Any]:
    """Medians over ``runs`` rounds (after ``warmup`` thrown away) at ``gib`` GiB."""
    data.mkdir(parents=True, exist_ok=True)
    base, updated = build(data / f"memory-{gib:g}gib.db", gib, log)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(dir=data) as tmp:
        for i in range(warmup + runs):
            r = one_round(base, updated, Path(tmp))
            log(f"  {gib:g} GiB {'warm-up' if i < warmup else f'run {i - warmup + 1}/{runs}'}: "
                + ", ".join(f"{k} {v['wall']:.1f}s" for k, v in r.items()))
            if i >= warmup:
                rounds.append(r)

    def med(key: str, field: str) -> float:
        return float(statistics.median(r[key][field] for r in rounds))

    def paired(num: str, den: str, field: str) -> float:
        return float(statistics.median(r[num][field] / r[den][field] for r in rounds))

    keys = ("sqlite_backup", "cp_fsync", "full_backup", "incremental_backup", "restore")
    pairs = {"full_vs_sqlite_backup": ("full_backup", "sqlite_backup"),
             "incremental_vs_full": ("incremental_backup", "full_backup"),
             "restore_vs_cp_fsync": ("restore", "cp_fsync")}
    ratios = {k: {"command": paired(*p, "wall"), "engine": paired(*p, "seconds")} for k, p in pairs.items()}
    return {
        "gib": base.stat().st_size / GIB,
        "pages": rounds[0]["full_backup"].get("pages"),
        "runs": runs,
        "wall": {k: med(k, "wall") for k in keys},
        "seconds": {k: med(k, "seconds") for k in keys},
        "ratios": ratios,
        "rss_mb": {k: max(r[k]["rss_bytes"] for r in rounds) / MB for k in ("full_backup", "incremental_backup",
                                                                             "restore")},
        "restored_size_ok": all(r["restore"]["size_ok"] for r in rounds),
        "samples": {k: [round(r[k]["wall"], 6) for r in rounds] for k in keys},  # (ms would cut a 10 ms cp by 5%)
        "pass": all(ratios[k]["command"] <= limit for k, limit in TARGETS.items())
        and all(r["restore"]["size_ok"] for r in rounds),
    }


def print_result(res: dict[str, Any], log: Log) -> None:
    log(f"{res['gib']:.1f} GiB ({res['pages']} pages), default settings, medians of {res['runs']} rounds: "
        "whole commands (the engine's own seconds in brackets)")
    for k in ("sqlite_backup", "cp_fsync", "full_backup", "incremental_backup", "restore"):
        rss = f", peak RSS {res['rss_mb'][k]:.0f} MB" if k in res["rss_mb"] else ""
        log(f"  {k:20} {res['wall'][k]:7.2f} s ({res['seconds'][k]:.2f}){rss}")
    for k, limit in TARGETS.items():
        r = res["ratios"][k]
        log(f"  {k:24} {r['command']:.3f} ({r['engine']:.3f})  target <= {limit}"
            f"  {'ok' if r['command'] <= limit else 'MISSED'}")
    log(f"  restored files of the right size: {res['restored_size_ok']}")
