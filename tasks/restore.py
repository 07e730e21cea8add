"""Restore tasks: each scenario (whole database, tables, rows) as a plan (the dry run) and as the restore."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prefect import task

from dbre.errors import UsageError
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.restore.pitr import apply_pitr, plan_pitr
from dbre.restore.rows import apply_row_repair, plan_row_repair
from dbre.restore.table import apply_table_restore, plan_table_restore
from dbre.validate.checks import failed, foreign_key_check, integrity_check, open_restored
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
    plan = plan_restore(repository, db, target, snapshot=snapshot, at=at, force=force, safety=True)
    return {"repository": repository.url, **apply_restore(repository, plan).summary()}


@task(name="plan table restore", task_run_name="plan table restore of {db}", timeout_seconds=6 * HOUR,
      **TASK_OPTIONS)
def plan_tables(repo: str, db: str, live: str, tables: list[str], snapshot: str | None = None,
                at: datetime | None = None, replace: bool = False, key: str | None = None) -> dict[str, Any]:
    """What restoring ``tables`` into the live database would do (reads the past state in place, reads live only)."""
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


@task(name="plan point-in-time restore", task_run_name="plan point-in-time restore of {db}", timeout_seconds=HOUR,
      **TASK_OPTIONS)
def plan_pitr_restore(repo: str, db: str, target: str, at: datetime | None = None, txid: int | None = None,
                      force: bool = False, key: str | None = None) -> dict[str, Any] | None:
    """What restoring ``db`` exactly at ``at`` (or up to ``txid``) from replicated segments would do; None
    when no segments cover ``at`` better than a snapshot does. Touches nothing."""
    repository = Repository.open(repo, resolve_key(key))
    plan = plan_pitr(repository, db, target, at=at, txid=txid, force=force)
    return None if plan is None else {"repository": repository.url, **plan.describe()}


@task(name="point-in-time restore", task_run_name="point-in-time restore of {db} to {target}",
      timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def restore_pitr(repo: str, db: str, target: str, at: datetime | None = None, txid: int | None = None,
                 force: bool = False, key: str | None = None) -> dict[str, Any]:
    """A generation's base snapshot plus its transactions up to ``at`` (or ``txid``), every object checked."""
    repository = Repository.open(repo, resolve_key(key))
    plan = plan_pitr(repository, db, target, at=at, txid=txid, force=force)
    if plan is None:
        when = f"at {at}" if at is not None else f"up to txid {txid}" if txid is not None else "of the newest state"
        raise UsageError(f"restore of {db} {when}: the replicated segments no longer cover it",
                         "start the restore again: its plan then picks the snapshot")
    plan.safety = True  # (with force: the database it replaces is snapshotted first, as from the CLI)
    return {"repository": repository.url, **apply_pitr(repository, plan).summary()}


@task(name="check restored database", task_run_name="check {target}", timeout_seconds=HOUR, **TASK_OPTIONS)
def check_restored_file(target: str) -> dict[str, Any]:
    """integrity_check and foreign_key_check of a restored file (a point-in-time restore has no manifest)."""
    conn = open_restored(target)
    try:
        problems = [f"{r.check}: {r.detail}" for r in failed(integrity_check(conn) + foreign_key_check(conn))]
    finally:
        conn.close()
    return {"ok": not problems, "problems": problems}


@task(name="find the last good point", task_run_name="find the last good point of {db}", timeout_seconds=6 * HOUR,
      **TASK_OPTIONS)
def find_last_good_point(repo: str, db: str, checks: list[str], since: datetime | None = None,
                         expectations: str | None = None, key: str | None = None) -> dict[str, Any]:
    """Bisect ``db``'s timeline for the newest point passing integrity_check, ``checks`` and the GX suites under
    ``expectations`` (dbre.restore.lastgood: each probe reads the state in place); restores nothing."""
    from dbre.restore.lastgood import find_last_good
    from dbre.validate.drill import drill_suites

    suites = drill_suites(expectations, db) if expectations else None
    repository = Repository.open(repo, resolve_key(key))
    result = find_last_good(repository, db, checks, since=since, suites=suites)
    return {"repository": repository.url, **result.describe(),
            "restore_args": result.found.point.restore_args() if result.found else None}
