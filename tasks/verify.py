"""Verification tasks: check the repository, and restore a snapshot to scratch and check the result
(integrity_check, foreign_key_check, schema, row counts and content checksums against the manifest)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task

from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.validate.checks import failed, run_checks
from dbre.validate.subset import subset_filter
from tasks.retry import HOUR, TASK_OPTIONS
from tasks.secrets import resolve_key


@task(name="verify repository", task_run_name="verify {repo}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def verify_repository(repo: str, key: str | None = None, db: str | None = None, read_data: bool = False,
                      subset: tuple[int, int] | None = None) -> dict[str, Any]:
    """``dbre verify`` (of ``db``): every manifest and page map; with ``read_data`` every byte of the packs
    (of bucket n of m, when ``subset`` is (n, m))."""
    repository = Repository.open(repo, resolve_key(key))
    packs = subset_filter(*subset) if read_data and subset and subset[1] > 1 else None
    return {"repository": repository.url, "read_data_subset": f"{subset[0]}/{subset[1]}" if packs else None,
            **verify(repository, db, read_data=read_data, packs_filter=packs).summary()}


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


def integrity_problems(path: Path, manifest: Manifest) -> list[str]:
    """What is wrong with a restored file compared with its manifest (dbre.validate's checks), one line each."""
    return [r.describe() for r in failed(run_checks(path, manifest))]


@task(name="check restored file", task_run_name="check {target}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def check_restored(repo: str, db: str, snapshot: str, target: str, key: str | None = None) -> dict[str, Any]:
    """Check a restored file against the manifest of the snapshot it came from."""
    manifest = Repository.open(repo, resolve_key(key)).find_snapshot(db, snapshot)
    problems = integrity_problems(Path(target), manifest)
    return {"ok": not problems, "problems": problems}
