"""Restore from S3 against restore from a local repository (and `cp` + fsync), same database, same run.

The 1 GiB benchmark database is backed up once into a local repository and once into an S3
repository on a moto_server started here (loopback, in memory: what is measured is dbre's
requests, their concurrency and the decoding, not a network). Each round restores it from both
(in child processes, so each peak RSS is its own) and copies it with `cp` + fsync; the figures are
medians: seconds, throughput (database bytes per second), S3 / local, S3 / (cp + fsync), and the
S3 restore's peak RSS, which must stay bounded (restore fetches a few spans at once, never the
whole pack set).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import dataset
from benchmarks.history import _bucket, moto
from benchmarks.run import DB_NAME, _rm, cp_fsync
from benchmarks.worker import run_child

Log = Callable[[str], None]
RSS_LIMIT_MB = 300  # the S3 restore's peak RSS (the format's memory target for an 8 GiB restore)


def measure(data: Path, runs: int, log: Log = print, size_mib: int = 1024) -> dict[str, Any]:
    db = dataset.ensure(data, size_mib, log=log)
    with tempfile.TemporaryDirectory(prefix="dbre-s3restore-") as tmp, moto():
        work = Path(tmp)
        local, s3 = work / "repo", _bucket("bench-s3restore")
        log(f"s3 restore: backing up {size_mib} MiB into a local and an S3 (moto_server) repository")
        for url in (str(local), s3):
            run_child(["backup", "--repo", url, "--source", str(db.base), "--db", DB_NAME])
        out = work / "restored.db"
        rounds: list[dict[str, Any]] = []
        for i in range(runs + 1):  # the first round warms the caches and is thrown away
            got: dict[str, Any] = {}
            for name, url in (("local", str(local)), ("s3", s3)):
                _rm(out)
                r = run_child(["restore", "--repo", url, "--db", DB_NAME, "--to", str(out)])
                if out.stat().st_size != db.bytes:
                    raise RuntimeError(f"the {name} restore wrote {out.stat().st_size} bytes, not {db.bytes}")
                got[name] = {"seconds": r["wall"], "rss_mb": r["rss_bytes"] / 1e6}
            _rm(out)
            got["cp_fsync"] = {"seconds": cp_fsync(db.base, out)}
            if i:
                rounds.append(got)
            log(f"  round {i}{' (warm-up)' if not i else ''}: " + ", ".join(
                f"{k} {v['seconds']:.2f} s" for k, v in got.items()))

    def med(key: str) -> float:
        return statistics.median(r[key]["seconds"] for r in rounds)

    s3_rss = max(r["s3"]["rss_mb"] for r in rounds)
    return {
        "size_mib": size_mib,
        "bytes": db.bytes,
        "runs": runs,
        "seconds": {k: round(med(k), 3) for k in ("local", "s3", "cp_fsync")},
        "throughput_mb_s": {k: round(db.bytes / 1e6 / med(k), 1) for k in ("local", "s3", "cp_fsync")},
        "s3_over_local": round(med("s3") / med("local"), 2),
        "s3_over_cp": round(med("s3") / med("cp_fsync"), 2),
        "rss_mb": {k: round(max(r[k]["rss_mb"] for r in rounds), 1) for k in ("local", "s3")},
        "samples": {k: [round(r[k]["seconds"], 3) for r in rounds] for k in ("local", "s3", "cp_fsync")},
        "pass": s3_rss <= RSS_LIMIT_MB,
    }


def print_result(res: dict[str, Any], log: Log = print) -> None:
    t, s = res["throughput_mb_s"], res["seconds"]
    log(f"restore of {res['size_mib']} MiB, medians of {res['runs']}: local {s['local']:.2f} s ({t['local']} MB/s), "
        f"S3 {s['s3']:.2f} s ({t['s3']} MB/s), cp + fsync {s['cp_fsync']:.2f} s; S3 / local {res['s3_over_local']}, "
        f"S3 / (cp + fsync) {res['s3_over_cp']}; peak RSS local {res['rss_mb']['local']} MB, "
        f"S3 {res['rss_mb']['s3']} MB (limit {RSS_LIMIT_MB} MB)")
