"""Row repair and table restore, in place (issue 13) against the scratch copy they restored before.

    python -m benchmarks.inplace_repair [--mb 256] [--out DIR]

Builds a database of one big table (``items``, random payloads, ``--mb`` MiB) and one small table
(``small``, 300 rows), backs it up into a local repository, then in a live copy with rows damaged:
``repair-rows`` of 3 rows of the big table and ``restore-table --replace`` of the small table, each
twice: read in place (now), and from a scratch copy of the whole snapshot (before: the same plan and
apply over ``restore_to_scratch``). Prints wall time (plan + apply, the safety snapshot included) and
what was read from the repository (requests, bytes), counted by a wrapper of the real store (the
safety snapshot's reads included; ``state_bytes_read``: the past state's pages alone, in place).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.restore import live as live_mod
from dbre.restore import rows as rows_mod
from dbre.restore import table as table_mod
from dbre.restore.query import CountingStore, FetchStats
from dbre.sources import open_source


def build(path: Path, mb: int) -> None:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=DELETE")
    c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, n INTEGER, payload BLOB)")
    c.execute("WITH RECURSIVE k(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM k WHERE v < ?) "
              "INSERT INTO items(name, n, payload) SELECT 'item ' || v, v % 1000, randomblob(400) FROM k",
              (mb * 1024 * 1024 // 440,))
    c.execute("CREATE TABLE small(id INTEGER PRIMARY KEY, v TEXT)")
    c.execute("INSERT INTO small(v) SELECT 'v' || value FROM json_each(?)", (json.dumps(list(range(300))),))
    c.close()


def damage(live: Path) -> None:
    c = sqlite3.connect(live, isolation_level=None)
    c.execute("DELETE FROM items WHERE id IN (11, 50000)")
    c.execute("UPDATE items SET n = -1 WHERE id = 300000")
    c.execute("UPDATE small SET v = 'oops'")
    c.close()


def one(repo: Repository, src: Path, work: Path, what: str, scratch: bool) -> dict[str, Any]:
    live = work / "live.db"
    shutil.copy(src, live)
    damage(live)
    stats = FetchStats()
    counted = Repository(CountingStore(repo.store, stats), repo.config, repo.sealer, repo.raw_config)
    saved = rows_mod.open_past, table_mod.open_past
    if scratch:  # before: the whole snapshot restored to a scratch folder first
        def past(r: Repository, db: str, op: str, **kw: Any) -> Any:
            return live_mod.restore_to_scratch(r, db, snapshot=kw.get("snapshot"), at=kw.get("at"),
                                               scratch_dir=work / "scratch")
        rows_mod.open_past = table_mod.open_past = past  # type: ignore[assignment]
    started = time.perf_counter()
    try:
        if what == "repair-rows":
            plan = rows_mod.plan_row_repair(counted, "app", live, "items", "id IN (11, 50000, 300000)")
            result: Any = rows_mod.apply_row_repair(plan)
            done = f"inserted {result.inserted}, updated {result.updated}"
            state = getattr(plan.past, "stats", None)
        else:
            tplan = table_mod.plan_table_restore(counted, "app", live, ["small"], mode="replace")
            table_mod.apply_table_restore(tplan)
            done = "small replaced"
            state = getattr(tplan.past, "stats", None)
    finally:
        rows_mod.open_past, table_mod.open_past = saved
    seconds = time.perf_counter() - started
    return {"operation": what, "read": "scratch copy" if scratch else "in place", "seconds": round(seconds, 2),
            "requests": stats.requests, "bytes_read": stats.bytes,
            "state_bytes_read": state.bytes if state is not None else None, "result": done}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dbre-bench-inplace-", dir=args.out))
    try:
        src = root / "src.db"
        build(src, args.mb)
        repo = Repository.open_or_init(str(root / "repo"), None)
        backup(repo, open_source(str(src)), "app", checksums=False)
        size = src.stat().st_size
        print(f"database {size / 2**20:.0f} MiB")
        for what in ("repair-rows", "restore-table"):
            for scratch in (True, False):
                r = one(repo, src, root, what, scratch)
                r["bytes_read_mib"] = round(r["bytes_read"] / 2**20, 1)
                print(json.dumps(r))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
