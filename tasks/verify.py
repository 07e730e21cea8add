"""Verification tasks: check the repository, and restore a snapshot to scratch and check the result.

``integrity_problems`` compares a restored file with its manifest (integrity_check,
foreign_key_check, page size and count, per-table row counts and content checksums). It is the
only logic here that is not a one-line call into dbre: when dbre.validate offers the same
check (the verification issue), the task should call that instead.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import apsw
from prefect import task

from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.tables import table_stats
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from tasks.retry import HOUR, TASK_OPTIONS
from tasks.secrets import resolve_key


@task(name="verify repository", task_run_name="verify {repo}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def verify_repository(repo: str, key: str | None = None, db: str | None = None,
                      read_data: bool = False) -> dict[str, Any]:
    """``dbre verify`` (of ``db``): every manifest and page map, with ``read_data`` every pack byte."""
    repository = Repository.open(repo, resolve_key(key))
    return {"repository": repository.url, **verify(repository, db, read_data=read_data).summary()}


@task(name="restore check", task_run_name="restore check of {db}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def restore_check(repo: str, db: str, key: str | None = None, snapshot: str | None = None,
                  scratch_dir: str | None = None) -> dict[str, Any]:
    """Restore a snapshot of ``db`` (default: the newest) to scratch, check it, delete it."""
    repository = Repository.open(repo, resolve_key(key))
    if scratch_dir:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"dbre-check-{db}-", dir=scratch_dir))
    try:
        plan = plan_restore(repository, db, work / f"{db}.db", snapshot=snapshot)
        restored = apply_restore(repository, plan)
        started = time.perf_counter()
        problems = integrity_problems(plan.target, plan.manifest)
        return {"db": db, "snapshot": plan.manifest.id, "taken_at": plan.manifest.taken_at, "ok": not problems,
                "problems": problems, "size": plan.manifest.size, "tables": len(plan.manifest.tables),
                "restore_seconds": round(restored.seconds, 3),
                "check_seconds": round(time.perf_counter() - started, 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def integrity_problems(path: Path, manifest: Manifest, limit: int = 20) -> list[str]:
    """What is wrong with a restored database file compared with the manifest it came from."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        problems: list[str] = []
        page_size = conn.execute("PRAGMA page_size").fetchall()[0][0]
        page_count = conn.execute("PRAGMA page_count").fetchall()[0][0]
        if (page_size, page_count) != (manifest.page_size, manifest.page_count):
            problems.append(f"pages: {page_count} x {page_size} B, manifest says "
                            f"{manifest.page_count} x {manifest.page_size} B")
        messages = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        if messages != ["ok"]:
            problems += [f"integrity_check: {m}" for m in messages[:limit]]
        violations = conn.execute("PRAGMA foreign_key_check").fetchall()
        if violations:
            t, rowid, parent, _ = violations[0]
            problems.append(f"foreign_key_check: {len(violations)} rows break a foreign key "
                            f"(first: {t} rowid {rowid} -> {parent})")
        with_checksums = any(s.checksum for s in manifest.tables.values())
        stats = table_stats(conn, with_checksums)
        for name, expected in sorted(manifest.tables.items()):
            if name not in stats:
                problems.append(f"table {name}: missing")
                continue
            rows, checksum = stats[name]
            if rows != expected.rows:
                problems.append(f"table {name}: {rows} rows, manifest says {expected.rows}")
            elif expected.checksum and checksum != expected.checksum:
                problems.append(f"table {name}: content checksum differs from the manifest")
        problems += [f"table {name}: not in the manifest" for name in sorted(set(stats) - set(manifest.tables))]
        return problems[:limit] + ([f"... and {len(problems) - limit} more"] if len(problems) > limit else [])
    finally:
        conn.close()


@task(name="check restored file", task_run_name="check {target}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def check_restored(repo: str, db: str, snapshot: str, target: str, key: str | None = None) -> dict[str, Any]:
    """Check a restored file against the manifest of the snapshot it came from."""
    manifest = Repository.open(repo, resolve_key(key)).find_snapshot(db, snapshot)
    problems = integrity_problems(Path(target), manifest)
    return {"ok": not problems, "problems": problems}
