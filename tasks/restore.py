"""Restore tasks: the plan of a whole-database restore (a dry run), and the restore itself."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task

from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from tasks.retry import HOUR, TASK_OPTIONS
from tasks.secrets import resolve_key


@task(name="plan restore", task_run_name="plan restore of {db}", timeout_seconds=HOUR, **TASK_OPTIONS)
def plan_whole_restore(repo: str, db: str, target: str, snapshot: str | None = None, at: datetime | None = None,
                       force: bool = False, key: str | None = None) -> dict[str, Any]:
    """What restoring ``db`` to ``target`` would do; touches nothing."""
    repository = Repository.open(repo, resolve_key(key))
    return {"repository": repository.url,
            **plan_restore(repository, db, target, snapshot=snapshot, at=at, force=force).describe()}


@task(name="restore", task_run_name="restore {db} to {target}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def restore_whole(repo: str, db: str, target: str, snapshot: str | None = None, at: datetime | None = None,
                  force: bool = False, key: str | None = None) -> dict[str, Any]:
    """Restore a snapshot of ``db`` to ``target`` atomically (every page checked); returns the summary."""
    repository = Repository.open(repo, resolve_key(key))
    plan = plan_restore(repository, db, target, snapshot=snapshot, at=at, force=force)
    return {"repository": repository.url, **apply_restore(repository, plan).summary()}
