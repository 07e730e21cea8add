"""Backup tasks: one snapshot of a database, the same under a global concurrency limit, the offsite copy."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

from prefect import task
from prefect.concurrency.sync import concurrency

from dbre.errors import IntegrityError
from dbre.metrics import record_backup
from dbre.repository.backup import backup
from dbre.repository.copy import copy_snapshots
from dbre.repository.manifest import now_utc
from dbre.repository.repo import Repository
from dbre.sources import Source, open_source
from dbre.sources.remote import RemoteLibsqlSource
from tasks.retry import HOUR, RETRY_DELAYS, TASK_OPTIONS, is_transient
from tasks.secrets import resolve_key, resolve_token


@task(name="backup", task_run_name="backup {db}", timeout_seconds=2 * HOUR, **TASK_OPTIONS)
def backup_database(db: str, source: str, repo: str, key: str | None = None, token: str | None = None,
                    checksums: bool | None = None, namespace: str | None = None, full: bool = False,
                    accept_new_source: bool = False, replica_url: str | None = None) -> dict[str, Any]:
    """Take one snapshot of ``source`` (a ``namespace`` of it) into ``repo`` as ``db`` (``full``: reuse nothing
    of the previous snapshot; ``accept_new_source``: ``db`` moved to ``source``; ``replica_url``: the
    namespace by hostname, for an embedded replica); returns its summary."""
    repository = Repository.open_or_init(repo, resolve_key(key))
    if namespace:
        # by header only /dump reaches a namespace (a full read each time); an embedded replica
        # reaches it by hostname (replica_url), then /dump is the fallback
        src: Source = RemoteLibsqlSource(source, resolve_token(token), namespace=namespace,
                                         method="auto" if replica_url else "dump", replica_url=replica_url)
    else:
        src = open_source(source, resolve_token(token))
    started, clock = now_utc(), time.perf_counter()
    try:
        summary = backup(repository, src, db, checksums=checksums, full=full,
                         accept_new_source=accept_new_source).summary()
    except Exception as err:
        # the success rate (dbre status) counts attempts that end a run: not one a retry will repeat
        if not is_transient(err) or _last_attempt():
            _note(repository, db, ok=False, started_at=started, seconds=time.perf_counter() - clock, error=str(err))
        raise
    _note(repository, db, ok=True, started_at=started, seconds=summary["seconds"], snapshot=summary["id"])
    return summary


def _last_attempt() -> bool:
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ctx is None or ctx.task_run.run_count > len(RETRY_DELAYS)


def _note(repository: Repository, db: str, **fields: Any) -> None:
    try:
        record_backup(repository, db, **fields)
    except Exception:  # noqa: BLE001 - a missing record must not fail or repeat a backup
        pass


@task(name="backup (limited)", task_run_name="backup {db}", timeout_seconds=2 * HOUR, **TASK_OPTIONS)
def backup_database_limited(db: str, source: str, repo: str, key: str | None = None, token: str | None = None,
                            checksums: bool | None = None, namespace: str | None = None,
                            limit: str | None = None, full: bool = False,
                            accept_new_source: bool = False, replica_url: str | None = None) -> dict[str, Any]:
    """``backup_database`` holding a slot of the Prefect global concurrency limit ``limit`` (if any)."""
    with concurrency(limit, occupy=1, strict=False) if limit else nullcontext():
        return backup_database.fn(db, source, repo, key, token, checksums, namespace, full, accept_new_source,
                                  replica_url)


@task(name="copy to offsite", task_run_name="copy to {offsite}", timeout_seconds=6 * HOUR, **TASK_OPTIONS)
def copy_to_offsite(repo: str, offsite: str, key: str | None = None, db: str | None = None) -> dict[str, Any]:
    """Copy snapshots (of ``db``) not yet in ``offsite`` there; returns what was copied."""
    secret = resolve_key(key)
    src = Repository.open(repo, secret)
    dst = Repository.init_copy_of(src, offsite, secret)
    plan, copied = copy_snapshots(src, dst, db)
    if plan.problems:  # the healthy snapshots were copied; what was not, or lost history, fails the task
        more = f" (and {len(plan.problems) - 1} more)" if len(plan.problems) > 1 else ""
        raise IntegrityError(f"copy to {dst.url}: {len(plan.snapshots)} snapshots copied, but {plan.problems[0]}{more}",
                             "run `dbre verify` on the primary")
    return {"offsite": dst.url, "snapshots_copied": len(plan.snapshots), "packs_copied": len(plan.packs),
            "bytes_copied": copied, "already_there": plan.already}


@task(name="known databases", task_run_name="known databases", timeout_seconds=HOUR, **TASK_OPTIONS)
def known_databases(repo: str, key: str | None = None) -> list[str]:
    """The databases ``repo`` holds snapshots of."""
    return sorted(Repository.open(repo, resolve_key(key)).databases())


@task(name="list snapshots", task_run_name="list snapshots", timeout_seconds=HOUR, **TASK_OPTIONS)
def list_snapshots(repo: str, key: str | None = None, db: str | None = None) -> list[dict[str, Any]]:
    """Summaries of the snapshots (of ``db``) in ``repo``, oldest first."""
    return [m.summary() for m in Repository.open(repo, resolve_key(key)).snapshots(db)]
