"""The weekly integrity validation: verify the repository, read a rotating subset of its packs, then
restore each database's newest snapshot to scratch and check it (SQLite, manifest, GX suites).

One record of kind "verifications" per database goes into the repository, so `dbre status` and
the reports see when each database was last proven restorable, and what was wrong if not.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

from dbre.errors import DbreError, UsageError
from dbre.repository.manifest import iso, now_utc
from dbre.repository.repo import Repository
from dbre.repository.verify import verify
from dbre.validate.checks import failed
from dbre.validate.drill import begin_drill, drill_suites, restore_step, validate_step
from dbre.validate.subset import subset_filter, subset_for_week

RECORD_KIND = "verifications"

Progress = Callable[[int, int], None]


def validate_repository(repo: Repository, *, dbs: list[str] | None = None, subset: tuple[int, int] | None = None,
                        cycle_weeks: int = 4, expectations: str | os.PathLike[str] | None = None,
                        scratch_dir: str | os.PathLike[str] | None = None, write: bool = True,
                        progress: Progress | None = None) -> dict[str, Any]:
    """Verify, read this week's packs (``subset`` n/m, else the week's bucket of a ``cycle_weeks`` cycle),
    and restore-check the newest snapshot of each database. Returns a summary with "ok"."""
    started_at = now_utc()
    t0 = time.perf_counter()
    n, m = subset or subset_for_week(cycle_weeks, started_at)
    names = dbs or repo.databases()
    for db in names:
        repo.require_db(db)
    suites = {}
    if expectations is not None:
        for db in names:
            try:
                suites[db] = drill_suites(expectations, db)
            except UsageError:
                suites[db] = []  # a database without suites is still restored and checked
    report = verify(repo, None if len(names) != 1 else names[0], read_data=True,
                    packs_filter=None if m == 1 else subset_filter(n, m), progress=progress)
    verify_summary = {**report.summary(), "read_data_subset": f"{n}/{m}", "seconds": round(time.perf_counter() - t0, 3)}
    results = []
    for db in names:
        results.append(_restore_check(repo, db, suites.get(db) or None, scratch_dir, verify_summary, started_at,
                                      write))
    return {
        "repository": repo.url,
        "started_at": iso(started_at),
        "read_data_subset": f"{n}/{m}",
        "verify": verify_summary,
        "databases": results,
        "ok": report.ok and all(r["passed"] for r in results),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _restore_check(repo: Repository, db: str, suites: Any, scratch_dir: str | os.PathLike[str] | None,
                   verify_summary: dict[str, Any], started_at: Any, write: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    drill = begin_drill(repo, db, "newest", scratch_dir=scratch_dir)
    try:
        try:
            restore_step(repo, drill)
            validate_step(drill, suites)
        except UsageError:
            raise
        except DbreError as err:
            drill.error = str(err)
    finally:
        shutil.rmtree(drill.scratch, ignore_errors=True)
    checks = drill.all_checks()
    bad = failed(checks)
    # the repository problems that concern this database's snapshots
    mine = re.compile(rf"(^|[\s,(/]){re.escape(db)}(/|\))|of {re.escape(db)}\)")
    problems = [p for p in verify_summary["problems"] if mine.search(p["object"]) or mine.search(p["detail"])]
    record = {
        "kind": "verification",
        "db": db,
        "repository": repo.url,
        "started_at": iso(started_at),
        "snapshot": drill.snapshot.id,
        "snapshot_taken_at": drill.snapshot.taken_at,
        "read_data_subset": verify_summary["read_data_subset"],
        "verify_ok": verify_summary["ok"],
        "verify_problems": problems,
        "packs_read": verify_summary["packs_read"],
        "bytes_read": verify_summary["bytes_read"],
        "checks": {"total": len(checks), "failed": len(bad)},
        "failed_checks": [c.to_dict() for c in bad],
        "expectations": drill.suite_run.summary() if drill.suite_run else None,
        "restore_seconds": round(drill.restore_seconds or 0.0, 3),
        "error": drill.error,
        "passed": verify_summary["ok"] and not bad and drill.error is None,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if write:
        record["record_id"] = repo.put_record(RECORD_KIND, db, record)
    return record
