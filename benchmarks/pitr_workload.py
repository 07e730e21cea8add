"""The PITR benchmark's application: a writer committing numbered, timestamped transactions at a fixed rate.

    python -m benchmarks.pitr_workload DB OUT_DIR --rate 100 --seconds 30 [--checkpoint-every 5]

Every transaction inserts ``oracle(n, t_ns)`` (n = 1, 2, 3, ...) and updates ``--updates`` random
rows of the bulk table ``orders`` (benchmarks/dataset.py), then commits. The wall-clock times right
before COMMIT is sent and after it returns bound the commit instant: ``OUT_DIR/commits.txt`` holds
one "n t_before_ns t_after_ns" line per transaction (the oracle restores are checked against). Both
bounds are needed: SQLite runs its automatic checkpoint inside the COMMIT call after the commit, so
a replicator can see a transaction hundreds of milliseconds before COMMIT returns. The application
behaves like a typical one: ``synchronous=NORMAL``, SQLite's automatic PASSIVE checkpoints at 1000 pages, and every
``--checkpoint-every`` seconds an explicit ``wal_checkpoint(RESTART)`` (busy timeout 5 s) whose
latency and outcome are recorded, with the WAL file's size sampled every 100 ms (Litestream #724:
hung RESTART checkpoints; #1536: WALs that grow without bound). ``OUT_DIR/writer.json`` is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import time
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("new", "paid", "packed", "shipped", "delivered", "returned", "cancelled")
WAL_SAMPLE_NS = 100_000_000


def prepare(db: Path) -> None:
    """Add the empty oracle table to a fresh copy of a benchmark database and checkpoint it."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE IF NOT EXISTS oracle(n INTEGER PRIMARY KEY, t_ns INTEGER NOT NULL)")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


@dataclass
class CommitLog:
    """What the writer committed: numbers 1..len, and the wall-clock times (ns) right before each
    COMMIT was sent and right after it returned: the commit happened in between."""

    before_ns: list[int]
    times_ns: list[int]

    @classmethod
    def read(cls, path: Path) -> CommitLog:
        before, after = [], []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            n, t0, t1 = line.split()
            if int(n) != i:
                raise ValueError(f"{path}: line {i} holds commit {n}")
            before.append(int(t0))
            after.append(int(t1))
        return cls(before, after)

    @property
    def last(self) -> int:
        return len(self.times_ns)

    def commit_time(self, n: int) -> int:
        """When COMMIT of ``n`` returned: the application knows it committed."""
        return self.times_ns[n - 1]

    def sent_time(self, n: int) -> int:
        """When COMMIT of ``n`` was sent: it cannot have committed before."""
        return self.before_ns[n - 1]

    def newest_at(self, t_ns: int) -> int:
        """The newest transaction certainly committed at or before ``t_ns`` (its COMMIT had returned; 0: none)."""
        return bisect_right(self.times_ns, t_ns)

    def newest_possible_at(self, t_ns: int) -> int:
        """The newest transaction that may have committed at or before ``t_ns`` (its COMMIT was sent)."""
        return bisect_right(self.before_ns, t_ns)


def oracle_state(db: Path) -> tuple[int, int]:
    """(count, max n) of a restored database's oracle table: whole and gap-free when they are equal."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        count, top = conn.execute("SELECT count(*), coalesce(max(n), 0) FROM oracle").fetchone()
    finally:
        conn.close()
    return int(count), int(top)


def _wal_size(db: Path) -> int:
    try:
        return os.stat(f"{db}-wal").st_size
    except FileNotFoundError:
        return 0


def _checkpoint(conn: sqlite3.Connection) -> dict[str, float | int]:
    started = time.perf_counter()
    busy, log, done = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
    return {"seconds": time.perf_counter() - started, "busy": busy, "log_frames": log, "checkpointed": done}


def write(db: Path, out: Path, rate: float, seconds: float, updates: int, checkpoint_every: float,
          seed: int = 7) -> dict[str, object]:
    """Commit at ``rate`` per second for ``seconds``; write commits.txt and return the summary."""
    rng = random.Random(seed)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA synchronous=NORMAL")
    (top_order,) = conn.execute("SELECT max(id) FROM orders").fetchone()
    lines: list[str] = []
    checkpoints: list[dict[str, float | int]] = []
    wal_samples: list[int] = []
    commit_seconds: list[float] = []
    behind = 0
    start = time.monotonic_ns()
    period = 1e9 / rate
    next_cp = start + int(checkpoint_every * 1e9) if checkpoint_every > 0 else None
    next_wal = start
    end = start + int(seconds * 1e9)
    n = 0
    while True:
        due = start + int(n * period)
        now = time.monotonic_ns()
        if due >= end:
            break
        if now < due:
            time.sleep((due - now) / 1e9)
        elif now - due > 100_000_000:
            behind += 1
        n += 1
        began = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO oracle(n, t_ns) VALUES (?, ?)", (n, time.time_ns()))
        for _ in range(updates):
            conn.execute("UPDATE orders SET status=?, total_cents=?, updated_at=? WHERE id=?",
                         (rng.choice(STATUSES), rng.randint(100, 500_000), f"n{n}", rng.randint(1, top_order)))
        sent = time.time_ns()
        conn.execute("COMMIT")
        lines.append(f"{n} {sent} {time.time_ns()}\n")
        commit_seconds.append(time.perf_counter() - began)
        now = time.monotonic_ns()
        if now >= next_wal:
            wal_samples.append(_wal_size(db))
            next_wal = now + WAL_SAMPLE_NS
        if next_cp is not None and now >= next_cp:
            checkpoints.append(_checkpoint(conn))
            next_cp = time.monotonic_ns() + int(checkpoint_every * 1e9)
    elapsed = (time.monotonic_ns() - start) / 1e9
    conn.close()
    (out / "commits.txt").write_text("".join(lines))
    cp_seconds = [float(c["seconds"]) for c in checkpoints]
    summary: dict[str, object] = {
        "rate_target": rate,
        "commits": n,
        "rate_achieved": round(n / elapsed, 1),
        "late_commits": behind,  # started more than 100 ms after their slot: the writer could not keep up
        "commit_ms_median": round(statistics.median(commit_seconds) * 1e3, 3) if commit_seconds else None,
        "commit_ms_max": round(max(commit_seconds) * 1e3, 3) if commit_seconds else None,
        "checkpoints": len(checkpoints),
        "checkpoint_ms_median": round(statistics.median(cp_seconds) * 1e3, 2) if cp_seconds else None,
        "checkpoint_ms_max": round(max(cp_seconds) * 1e3, 2) if cp_seconds else None,
        "checkpoints_busy": sum(1 for c in checkpoints if c["busy"]),
        "wal_bytes_max": max(wal_samples, default=0),
        "wal_bytes_median": int(statistics.median(wal_samples)) if wal_samples else 0,
        "wal_bytes_end": _wal_size(db),
    }
    (out / "writer.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pitr_workload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("db", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--updates", type=int, default=2, help="bulk rows updated per transaction (default 2)")
    p.add_argument("--checkpoint-every", type=float, default=5.0,
                   help="seconds between the application's RESTART checkpoints; 0: none (default 5)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.db, args.out, args.rate, args.seconds, args.updates, args.checkpoint_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
