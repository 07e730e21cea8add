"""Retention tasks: forget snapshots a keep-policy does not keep, prune packs nothing needs."""

from __future__ import annotations

from typing import Any

from prefect import task

from dbre.repository.repo import Repository
from dbre.repository.retention import PRUNE_GRACE_SECONDS, KeepPolicy, forget, prune
from tasks.retry import HOUR, TASK_OPTIONS
from tasks.secrets import resolve_key


@task(name="forget", task_run_name="forget in {repo}", timeout_seconds=HOUR, **TASK_OPTIONS)
def forget_snapshots(repo: str, keep: dict[str, Any], dbs: list[str] | None = None, dry_run: bool = False,
                     key: str | None = None) -> dict[str, Any]:
    """Forget the snapshots (of ``dbs``) that ``keep`` (KeepPolicy fields, time zone included) does not keep."""
    repository = Repository.open(repo, resolve_key(key))
    policy = KeepPolicy(**keep)
    known = set(repository.databases())
    kept: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for db in (dbs if dbs is not None else sorted(known)):
        if db not in known:
            continue  # never backed up here yet: nothing to forget
        plan, _ = forget(repository, policy, db, dry_run=dry_run)  # planned and applied under one lock
        kept += plan.describe()["keep"]
        removed += plan.describe()["remove"]
    return {"repository": repository.url, "dry_run": dry_run, "kept": len(kept), "forgotten": len(removed),
            "forgotten_snapshots": removed}


@task(name="prune", task_run_name="prune {repo}", timeout_seconds=2 * HOUR, **TASK_OPTIONS)
def prune_repository(repo: str, dry_run: bool = False, key: str | None = None,
                     grace_seconds: float = PRUNE_GRACE_SECONDS) -> dict[str, Any]:
    """Delete packs no snapshot needs and older than the grace period (exclusive lock); returns how many
    went and stayed."""
    repository = Repository.open(repo, resolve_key(key))
    plan = prune(repository, dry_run=dry_run, grace=grace_seconds)
    return {"repository": repository.url, "dry_run": dry_run, **plan.describe()}
