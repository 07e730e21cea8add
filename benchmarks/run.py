"""The measurement rounds: anchors and dbre interleaved, round after round, medians at the end.

Every round measures everything once, in the same order, so background noise hits anchors and
dbre alike. The first ``warmup`` rounds are thrown away (the page cache cannot be dropped
without root; instead every file is read once before it is measured). Outputs are deleted
after each measurement, so no round profits from another's files.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.dataset import BenchDatabase
from benchmarks.pages import compare
from benchmarks.worker import run_child

DB_NAME = "bench"
MB = 1_000_000

# the targets of the performance section of the backup-engine issue: (ratio key, limit, label)
TARGETS: dict[str, tuple[float, str]] = {
    "full_vs_sqlite_backup": (1.5, "full backup time / sqlite3 .backup time"),
    "full_vs_sqlite_backup_defaults": (1.5, "the same with default settings (table checksums up to 256 MiB)"),
    "incremental_vs_full": (0.35, "incremental backup time / full backup time"),
    "incremental_vs_full_defaults": (0.35, "the same with default settings (table checksums up to 256 MiB)"),
    "incremental_bytes_vs_changed_pages": (0.6, "bytes added / bytes of changed pages"),
    "restore_vs_cp_fsync": (2.5, "restore time / (cp + fsync) time"),
    "backup_rss_mb": (300.0, "peak RSS of backup (MB)"),
    "restore_rss_mb": (300.0, "peak RSS of restore (MB)"),
}

Log = Callable[[str], None]


def _rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(path) + suffix).unlink(missing_ok=True)


def _place(src: Path, dst: Path) -> None:
    """``src`` (with its -wal, if any) copied to ``dst``, replacing what was there, and flushed: on
    ext3/ext4 (data=ordered) the first fsync of the measured command would otherwise write the
    copy's dirty pages too (~0.15 s for 100 MiB here), which an application's own file, written over
    time, does not leave behind."""
    _rm(dst)
    for suffix in ("", "-wal"):
        if Path(str(src) + suffix).exists():
            shutil.copyfile(str(src) + suffix, str(dst) + suffix)
            _fsync(Path(str(dst) + suffix))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sqlite_backup(src: Path, out: Path) -> float:
    """The anchor: the sqlite3 CLI's .backup into a new file (wall time of the command)."""
    _rm(out)
    started = time.perf_counter()
    subprocess.run(["sqlite3", str(src), f".backup '{out}'"], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    _rm(out)
    return seconds


def cp_fsync(src: Path, out: Path) -> float:
    """The anchor: `cp` of the database file, then fsync of the copy."""
    _rm(out)
    started = time.perf_counter()
    subprocess.run(["cp", str(src), str(out)], check=True)
    _fsync(out)
    seconds = time.perf_counter() - started
    _rm(out)
    return seconds


def changed_pages(old: Path, new: Path, page_size: int) -> np.ndarray:
    """The 0-based numbers of the pages both files have whose bytes differ (pages past the end of
    the old file have no earlier version to be a delta against), compared 64 MiB at a time."""
    a = np.memmap(old, dtype=np.uint64, mode="r")
    b = np.memmap(new, dtype=np.uint64, mode="r")
    words = page_size // 8
    pages = min(a.size, b.size) // words
    step = max(1, (64 << 20) // page_size)
    found = []
    for first in range(0, pages, step):
        last = min(pages, first + step)
        x = a[first * words : last * words].reshape(-1, words)
        y = b[first * words : last * words].reshape(-1, words)
        found.append(first + np.flatnonzero((x != y).any(axis=1)))
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def parent_readback(repo: Path, snapshot: str, changed: np.ndarray) -> dict[str, Any]:
    """What sub-page deltas would add to an incremental: reading back from the repository the parent
    snapshot's version of every page that changed (the page batches holding them, fetched 4 at a
    time, unsealed and decompressed, as a restore reads them), to XOR the new pages against. The
    compression of the deltas is left out: about what compressing the whole pages costs now."""
    from concurrent.futures import ThreadPoolExecutor

    from dbre.repository.repo import Repository
    from dbre.repository.verify import snapshot_blobs

    started = time.perf_counter()
    r = Repository.open(str(repo))
    blobs = snapshot_blobs(r, r.find_snapshot(DB_NAME, snapshot)).blobs
    need = [b for b in blobs if np.isin(np.frombuffer(b.pages, dtype=np.uint32), changed).any()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        raw = sum(pool.map(lambda b: len(r.read_blob(b.pack, b.offset, b.length, "page-batch")), need))
    return {"seconds": time.perf_counter() - started, "blobs": len(need), "blobs_of": len(blobs),
            "bytes_read": sum(b.length for b in need), "raw_bytes": raw}


def one_round(db: BenchDatabase, work: Path, changed: np.ndarray | None = None) -> dict[str, dict[str, Any]]:
    """Measure everything once; each value is a dict with at least ``seconds``. ``changed``: the
    pages the update changed (``changed_pages``), for ``parent_readback``."""
    out: dict[str, dict[str, Any]] = {}
    out["sqlite_backup"] = {"seconds": sqlite_backup(db.base, work / "anchor.db")}
    out["cp_fsync"] = {"seconds": cp_fsync(db.base, work / "copy.db")}

    repo = work / "repo"
    _rm(repo)
    out["full_backup"] = run_child(["backup", "--repo", str(repo), "--source", str(db.base), "--db", DB_NAME])
    before = _tree_bytes(repo)
    incr = run_child(["backup", "--repo", str(repo), "--source", str(db.updated), "--db", DB_NAME])
    incr["repo_bytes_added"] = _tree_bytes(repo) - before
    out["incremental_backup"] = incr

    target = work / "restored.db"
    _rm(target)
    rest = run_child(["restore", "--repo", str(repo), "--db", DB_NAME, "--to", str(target)])
    rest["size_ok"] = target.stat().st_size == db.updated.stat().st_size
    out["restore"] = rest
    _rm(target)
    if changed is not None:
        out["parent_readback"] = parent_readback(repo, out["full_backup"]["snapshot"], changed)
    _rm(repo)

    # with the default settings (table checksums up to 256 MiB), the updated twin copied over the
    # same path: one source, as a user's backups are (a moved source reuses no table checksum)
    src, repo_d = work / "source.db", work / "repo-defaults"
    _rm(repo_d)
    _place(db.base, src)
    out["full_backup_defaults"] = run_child(["backup", "--repo", str(repo_d), "--source", str(src), "--db", DB_NAME,
                                             "--default-checksums"])
    _place(db.updated, src)
    out["incremental_backup_defaults"] = run_child(["backup", "--repo", str(repo_d), "--source", str(src),
                                                    "--db", DB_NAME, "--default-checksums"])
    _rm(repo_d)
    _rm(src)

    repo_c = work / "repo-checksums"
    _rm(repo_c)
    out["full_backup_checksums"] = run_child(["backup", "--repo", str(repo_c), "--source", str(db.base),
                                              "--db", DB_NAME, "--checksums"])
    _rm(repo_c)
    return out


def measure(db: BenchDatabase, work: Path, runs: int, warmup: int, log: Log) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    diff = compare(db.base, db.updated, db.page_size)
    changed = changed_pages(db.base, db.updated, db.page_size)
    rounds: list[dict[str, dict[str, Any]]] = []
    for i in range(warmup + runs):
        label = "warm-up" if i < warmup else f"run {i - warmup + 1}/{runs}"
        started = time.perf_counter()
        r = one_round(db, work, changed)
        log(f"  {db.size_mib} MiB {label}: " + ", ".join(f"{k} {v['seconds']:.2f}s" for k, v in r.items())
            + f" ({time.perf_counter() - started:.0f} s)")
        if i >= warmup:
            rounds.append(r)

    def med(key: str, field: str = "seconds") -> float:
        return float(statistics.median(r[key][field] for r in rounds))

    keys = ["sqlite_backup", "cp_fsync", "full_backup", "full_backup_checksums", "incremental_backup", "restore",
            "full_backup_defaults", "incremental_backup_defaults", "parent_readback"]
    seconds = {k: med(k) for k in keys}
    incr_bytes = med("incremental_backup", "repo_bytes_added")
    rss = {k: max(r[k]["rss_bytes"] for r in rounds) / MB
           for k in ("full_backup", "full_backup_checksums", "incremental_backup", "restore")}
    def paired(num: str, den: str) -> float:
        # the ratio within each round, then the median: anchor and dbre ran seconds apart, so a
        # machine that gets busier or quieter between rounds moves both sides of each ratio
        return float(statistics.median(r[num]["seconds"] / r[den]["seconds"] for r in rounds))

    ratios = {
        "full_vs_sqlite_backup": paired("full_backup", "sqlite_backup"),
        "full_checksums_vs_sqlite_backup": paired("full_backup_checksums", "sqlite_backup"),
        "full_vs_sqlite_backup_defaults": paired("full_backup_defaults", "sqlite_backup"),
        # whole commands: the child's wall time (interpreter start and imports included) against the
        # anchors' (each a whole command: the sqlite3 CLI, cp + fsync)
        "full_vs_sqlite_backup_defaults_command": float(statistics.median(
            r["full_backup_defaults"]["wall"] / r["sqlite_backup"]["seconds"] for r in rounds)),
        "restore_vs_cp_fsync_command": float(statistics.median(
            r["restore"]["wall"] / r["cp_fsync"]["seconds"] for r in rounds)),
        "incremental_vs_full": paired("incremental_backup", "full_backup"),
        "incremental_vs_full_defaults": paired("incremental_backup_defaults", "full_backup_defaults"),
        # the same as whole commands (the child's wall time, interpreter start and imports included)
        "incremental_vs_full_defaults_command": float(statistics.median(
            r["incremental_backup_defaults"]["wall"] / r["full_backup_defaults"]["wall"] for r in rounds)),
        "incremental_bytes_vs_changed_pages": incr_bytes / max(1, diff.changed_page_bytes),
        "subpage_delta_vs_changed_pages": diff.subpage_delta_zstd_bytes / max(1, diff.changed_page_bytes),
        # the time side of sub-page deltas: the incremental plus reading the parent's changed pages back
        "incremental_with_readback_vs_full": float(statistics.median(
            (r["incremental_backup"]["seconds"] + r["parent_readback"]["seconds"]) / r["full_backup"]["seconds"]
            for r in rounds)),
        "page_minimum_vs_changed_pages": diff.changed_pages_zstd_bytes / max(1, diff.changed_page_bytes),
        "restore_vs_cp_fsync": paired("restore", "cp_fsync"),
        "backup_rss_mb": max(rss["full_backup"], rss["full_backup_checksums"], rss["incremental_backup"]),
        "restore_rss_mb": rss["restore"],
    }
    checks = {k: {"value": round(ratios[k], 3), "target": limit, "pass": ratios[k] <= limit, "label": label}
              for k, (limit, label) in TARGETS.items()}
    return {
        "size_mib": db.size_mib,
        "db": {"bytes": db.bytes, "page_size": db.page_size, "pages": db.bytes // db.page_size, "rows": db.rows,
               "updated_bytes": db.updated.stat().st_size},
        "seconds": seconds,
        "bytes": {
            "full_backup_added": med("full_backup", "bytes_added"),
            "incremental_added": incr_bytes,  # on-disk growth of the repository
            "incremental_added_reported": med("incremental_backup", "bytes_added"),  # what dbre says
            "changed_page_bytes": diff.changed_page_bytes,
            "changed_pages_zstd": diff.changed_pages_zstd_bytes,
            "subpage_delta_zstd": diff.subpage_delta_zstd_bytes,
            "differing_bytes": diff.differing_bytes,
        },
        "pages": diff.as_dict(),
        "parent_readback": {k: med("parent_readback", k) for k in ("blobs", "blobs_of", "bytes_read", "raw_bytes")},
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "restore_size_ok": all(r["restore"]["size_ok"] for r in rounds),
        "ratios": {k: round(v, 4) for k, v in ratios.items()},
        "checks": checks,
        "samples": {k: [round(r[k]["seconds"], 4) for r in rounds] for k in keys},
    }


def profile_backup(db: BenchDatabase, work: Path, lines: int = 25) -> str:
    """cProfile of one full backup (checksums off) of ``db``: the top functions by own time."""
    repo, out = work / "repo-profile", work / f"profile-{db.size_mib}mib.txt"
    _rm(repo)
    run_child(["backup", "--repo", str(repo), "--source", str(db.base), "--db", DB_NAME,
               "--profile", str(out), "--profile-lines", str(lines)])
    _rm(repo)
    return out.read_text()


def _first(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine(out_dir: Path) -> dict[str, Any]:
    import apsw

    def cmd(*args: str) -> str | None:
        try:
            return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    mem = _first("/proc/meminfo", "MemTotal")  # "24683656 kB"
    if mem and mem.endswith("kB"):
        mem = f"{int(mem.split()[0]) / 1024**2:.1f} GiB RAM"
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor(),
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite3_cli": (cmd("sqlite3", "--version") or "").split(" ")[0] or None,
        "apsw_sqlite": apsw.sqlite_lib_version(),
        "filesystem": cmd("stat", "-f", "-c", "%T", str(out_dir)),
        "loadavg_start": os.getloadavg()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
