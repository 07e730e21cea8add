"""Restore tasks: each scenario (whole database, tables, rows) as a plan (the dry run) and as the restore."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task

from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.restore.rows import apply_row_repair, plan_row_repair
from dbre.restore.table import apply_table_restore, plan_table_restore
from tasks.retry import HOUR, TASK_OPTIONS
from tasks.secrets import resolve_key, resolve_token


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


@task(name="plan table restore", task_run_name="plan table restore of {db}", timeout_seconds=6 * HOUR,
      **TASK_OPTIONS)
def plan_tables(repo: str, db: str, live: str, tables: list[str], snapshot: str | None = None,
                at: datetime | None = None, replace: bool = False, key: str | None = None) -> dict[str, Any]:
    """What restoring ``tables`` into the live database would do (restores to scratch, reads live only)."""
    repository = Repository.open(repo, resolve_key(key))
    mode = "replace" if replace else "rename"
    with plan_table_restore(repository, db, live, tables, snapshot=snapshot, at=at, mode=mode) as plan:
        return {"repository": repository.url, **plan.describe()}


@task(name="restore tables", task_run_name="restore tables of {db} into {live}", timeout_seconds=6 * HOUR,
      **TASK_OPTIONS)
def restore_tables(repo: str, db: str, live: str, tables: list[str], snapshot: str | None = None,
                   at: datetime | None = None, replace: bool = False, key: str | None = None) -> dict[str, Any]:
    """Restore ``tables`` into the live database in one transaction (``replace``: after a safety snapshot)."""
    repository = Repository.open(repo, resolve_key(key))
    mode = "replace" if replace else "rename"
    plan = plan_table_restore(repository, db, live, tables, snapshot=snapshot, at=at, mode=mode)
    return {"repository": repository.url, **apply_table_restore(plan).summary()}


@task(name="plan row repair", task_run_name="plan row repair of {db}.{table}", timeout_seconds=6 * HOUR,
      **TASK_OPTIONS)
def plan_rows(repo: str, db: str, live: str, table: str, where: str, snapshot: str | None = None,
              at: datetime | None = None, delete_extra: bool = False, key: str | None = None,
              token: str | None = None) -> dict[str, Any]:
    """The diff, by key, of the rows ``where`` selects between a snapshot and live (a file or a libSQL URL)."""
    repository = Repository.open(repo, resolve_key(key))
    with plan_row_repair(repository, db, live, table, where, snapshot=snapshot, at=at, delete_extra=delete_extra,
                         token=resolve_token(token)) as plan:
        return {"repository": repository.url, **plan.describe()}


@task(name="repair rows", task_run_name="repair rows of {db}.{table}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def repair_rows(repo: str, db: str, live: str, table: str, where: str, snapshot: str | None = None,
                at: datetime | None = None, delete_extra: bool = False, key: str | None = None,
                token: str | None = None) -> dict[str, Any]:
    """Put the selected rows back as the snapshot had them, in one transaction, with an audit record."""
    repository = Repository.open(repo, resolve_key(key))
    plan = plan_row_repair(repository, db, live, table, where, snapshot=snapshot, at=at, delete_extra=delete_extra,
                           token=resolve_token(token))
    return {"repository": repository.url, **apply_row_repair(plan).summary()}
