"""History benchmark: backup and `restore --at` cost with 5 vs 200 snapshots in an S3 repository, and a
synthetic 10,000-snapshot repository that must stay usable.

    python -m benchmarks --history             # after the size benchmarks
    python -m benchmarks.history               # this part alone (medians of 3)
    python -m benchmarks.history --runs 1 --synthetic 2000

S3 is a moto_server started here (loopback, in memory). The 5- and 200-snapshot repositories hold
the history of one small database each; every round measures, on both, one incremental backup (a
few rows changed) and one restore at the middle snapshot's time, in the same order, so noise hits
both alike; the figure is the median over rounds of the 200/5 ratio within a round (target <= 1.2).
A round's restore time is the fastest of 3, alternating between the two repositories, and the
store requests of each restore are counted (they, not the bytes, make the cost on S3).
The synthetic repository's manifests are written directly (copies of one real snapshot with new
ids and times, an hour apart); `dbre snapshots`, the newest restore and `restore --at` run as the
CLI (a child process, interpreter start included) against it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

SMALL, LARGE = 5, 200
TARGET = 1.2
BIN = Path(sys.executable).parent
Log = Callable[[str], None]


@contextmanager
def moto() -> Iterator[str]:
    """A moto_server on a free loopback port; the env points boto3 (and child dbre runs) at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 30
        while True:
            try:
                opener.open(endpoint + "/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.kill()
        proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bucket(name: str) -> str:
    import boto3

    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}/repo"


def make_db(path: Path, rows: int = 4000) -> Path:
    """A small WAL database (~2 MiB): a table of random rows and an index."""
    rng = random.Random(1)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
    conn.execute("CREATE INDEX t_name ON t(name)")
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t(name, payload) VALUES (?, ?)",
                     ((f"n{rng.random():.9f}", rng.randbytes(400)) for _ in range(rows)))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def change(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executemany("UPDATE t SET payload = ? WHERE id = ?",
                     ((rng.randbytes(400), rng.randrange(1, 4000)) for _ in range(5)))
    conn.close()


def _backup(url: str, db: Path) -> tuple[float, Any]:
    from dbre.repository.backup import backup
    from dbre.repository.repo import Repository
    from dbre.sources.local import LocalFileSource

    started = time.perf_counter()
    m = backup(Repository.open_or_init(url), LocalFileSource(str(db)), "x").manifest
    return time.perf_counter() - started, m


class CountingStore:
    """A store that counts the requests made through it (every call but ``open_upload``)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.requests = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in {"get", "get_range", "put", "list", "modified", "delete", "exists"}:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.requests += 1
            return attr(*args, **kwargs)

        return counted


def _restore_at(url: str, at: Any, out: Path, requests: list[int] | None = None) -> float:
    """One `restore --at` (open, plan, apply); the store requests it made go to ``requests``."""
    from dbre.repository.repo import Repository
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.storage import open_store

    out.unlink(missing_ok=True)
    started = time.perf_counter()
    store = CountingStore(open_store(url))
    repo = Repository.open(store)  # type: ignore[arg-type]
    apply_restore(repo, plan_restore(repo, "x", out, at=at))
    seconds = time.perf_counter() - started
    out.unlink()
    if requests is not None:
        requests.append(store.requests)
    return seconds


def _lookup_at(url: str, at: Any) -> float:
    """Open the repository, find the snapshot at ``at`` and read its page map: the part of a
    restore that depends on the length of the history (the rest depends on the packs it spans)."""
    from dbre.repository.backup import load_records
    from dbre.repository.repo import Repository

    started = time.perf_counter()
    repo = Repository.open(url)
    load_records(repo, repo.find_snapshot("x", at=at))
    return time.perf_counter() - started


def _cli(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "dbre"), *args], check=True, capture_output=True)
    return time.perf_counter() - started


def history_ratio(work: Path, runs: int, log: Log, repeat: int = 3) -> dict[str, Any]:
    """Incremental backup and `restore --at` (middle of history) with 200 vs 5 snapshots on S3.
    Within a round each restore runs ``repeat`` times, alternating between the two repositories,
    and counts its fastest (a shared machine's load comes in bursts of a second or so: one burst
    would otherwise decide a round); the requests each restore makes are counted too."""
    repos: dict[int, tuple[str, Path, Any]] = {}
    packs: dict[int, int] = {}
    for n in (SMALL, LARGE):
        url = _bucket(f"history-{n}-{os.getpid()}")
        db = make_db(work / f"h{n}.db")
        snaps = []
        started = time.perf_counter()
        for i in range(n):
            if i:
                change(db, i)
            snaps.append(_backup(url, db)[1])
        log(f"  {n} snapshots written in {time.perf_counter() - started:.1f} s")
        repos[n] = (url, db, snaps[n // 2].time)
        packs[n] = len(snaps[n // 2].packs)
    rounds: list[dict[str, float]] = []
    requests: dict[int, list[int]] = {SMALL: [], LARGE: []}
    for r in range(runs + 1):  # the first round warms up (imports, connections) and is thrown away
        row: dict[str, float] = {}
        for n in (SMALL, LARGE):
            url, db, middle = repos[n]
            change(db, 1000 + r)
            row[f"backup_{n}"] = _backup(url, db)[0]
            row[f"lookup_at_{n}"] = _lookup_at(url, middle)
        for n in (SMALL, LARGE):
            row[f"restore_at_{n}"] = float("inf")
        for _ in range(repeat):
            for n in (SMALL, LARGE):
                url, _, middle = repos[n]
                row[f"restore_at_{n}"] = min(row[f"restore_at_{n}"], _restore_at(url, middle, work / "restored.db",
                                                                              requests[n]))
        if r:
            rounds.append(row)
            log("  round " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items()))

    def med(key: str) -> float:
        return float(statistics.median(x[key] for x in rounds))

    def ratio(what: str) -> float:
        return float(statistics.median(x[f"{what}_{LARGE}"] / x[f"{what}_{SMALL}"] for x in rounds))

    return {
        "seconds": {k: round(med(k), 4) for k in rounds[0]},
        "backup_ratio": round(ratio("backup"), 3),
        "restore_at_ratio": round(ratio("restore_at"), 3),
        "lookup_at_ratio": round(ratio("lookup_at"), 3),
        "packs_of_middle_snapshot": packs,
        "restore_requests": {n: int(statistics.median(requests[n])) for n in (SMALL, LARGE)},
        "target": TARGET,
    }


def synthetic(work: Path, count: int, runs: int, log: Log) -> dict[str, Any]:
    """A repository of ``count`` snapshots (manifests written directly): the CLI stays usable."""
    from dbre.repository.manifest import iso, new_snapshot_id
    from dbre.repository.repo import Repository

    url = _bucket(f"history-synthetic-{os.getpid()}")
    db = make_db(work / "syn.db")
    _, base = _backup(url, db)
    repo = Repository.open(url)
    start = base.time - timedelta(hours=count)
    fakes = [dataclasses.replace(base, id=new_snapshot_id(), taken_at=iso(start + timedelta(hours=i)))
             for i in range(count - 1)]
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(repo.write_manifest, fakes))
    log(f"  {count} manifests written in {time.perf_counter() - started:.1f} s")
    middle = fakes[len(fakes) // 2]
    out = work / "syn-restored.db"
    rounds: list[dict[str, float]] = []
    for _ in range(runs):
        row = {"snapshots": _cli("snapshots", "--repo", url, "--db", "x", "--json")}
        out.unlink(missing_ok=True)
        row["restore_newest"] = _cli("restore", "--repo", url, "--db", "x", "--to", str(out))
        out.unlink()
        row["restore_at"] = _cli("restore", "--repo", url, "--db", "x", "--at", middle.taken_at, "--to", str(out))
        out.unlink()
        rounds.append(row)
        log("  round " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()))
    return {"snapshots": count,
            "seconds": {k: round(float(statistics.median(x[k] for x in rounds)), 3) for k in rounds[0]}}


def measure(runs: int = 3, synthetic_count: int = 10_000, log: Log = print) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dbre-history-") as tmp, moto():
        work = Path(tmp)
        log(f"history: {SMALL} vs {LARGE} snapshots on S3 (moto_server), {runs} rounds")
        result = {"ratio": history_ratio(work, runs, log)}
        log(f"history: synthetic repository of {synthetic_count} snapshots, {runs} rounds")
        result["synthetic"] = synthetic(work, synthetic_count, runs, log)
    ratio = result["ratio"]
    result["pass"] = ratio["backup_ratio"] <= TARGET and ratio["restore_at_ratio"] <= TARGET
    return result


def print_result(result: dict[str, Any], log: Log = print) -> None:
    r, s = result["ratio"], result["synthetic"]
    log(f"history ({LARGE} vs {SMALL} snapshots, S3, medians): "
        f"incremental backup {r['seconds'][f'backup_{LARGE}']:.3f} vs {r['seconds'][f'backup_{SMALL}']:.3f} s "
        f"= {r['backup_ratio']:.2f}x; restore --at {r['seconds'][f'restore_at_{LARGE}']:.3f} vs "
        f"{r['seconds'][f'restore_at_{SMALL}']:.3f} s = {r['restore_at_ratio']:.2f}x (target <= {TARGET}); "
        f"its lookup (open, find, page map) {r['seconds'][f'lookup_at_{LARGE}']:.3f} vs "
        f"{r['seconds'][f'lookup_at_{SMALL}']:.3f} s = {r['lookup_at_ratio']:.2f}x; the middle snapshot spans "
        f"{r['packs_of_middle_snapshot'][LARGE]} vs {r['packs_of_middle_snapshot'][SMALL]} packs, its restore "
        f"makes {r['restore_requests'][LARGE]} vs {r['restore_requests'][SMALL]} store requests")
    log(f"synthetic {s['snapshots']} snapshots (CLI, medians): " +
        ", ".join(f"{k} {v:.2f} s" for k, v in s["seconds"].items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.history", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="measured rounds; figures are medians (default 3)")
    p.add_argument("--synthetic", type=int, default=10_000, help="snapshots in the synthetic repository")
    p.add_argument("--out", type=Path, default=Path("bench-output"), help="results folder (default ./bench-output)")
    args = p.parse_args(argv)
    result = measure(args.runs, args.synthetic)
    print_result(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "history.json").write_text(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
