"""Which failures a task retries (network, S3 5xx and throttling, SQLITE_BUSY, a held lock) and the shared options."""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from typing import Any

import apsw
from prefect import Task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from prefect.task_engine import TaskRunTimeoutError

from dbre.errors import LockedError, SourceError
from dbre.storage.base import TransientError

# Delays between attempts (seconds); DBRE_TASK_RETRY_DELAYS="10,60,300" changes them (read at import).
RETRY_DELAYS = [float(x) for x in os.environ.get("DBRE_TASK_RETRY_DELAYS", "10,60,300").split(",") if x.strip()]

# Remote-source failures the source reports as SourceError text (it has no transient subclass yet).
_TRANSIENT_SOURCE = re.compile(r"cannot reach the server|failed with HTTP (5\d\d|429)|snapshot not found")


def is_transient(exc: BaseException | None) -> bool:
    """True when another attempt may succeed: follows ``raise ... from`` chains to the root cause.

    A task's own timeout is never transient: retrying a backup that ran out of time only runs out again."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TaskRunTimeoutError):
            return False
        if isinstance(exc, TransientError | LockedError | apsw.BusyError | apsw.LockedError
                      | ConnectionError | TimeoutError):
            return True
        if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
            return True
        if isinstance(exc, SourceError) and _TRANSIENT_SOURCE.search(exc.message):
            return True
        exc = exc.__cause__
    return False


def _exception(state: State[Any]) -> BaseException | None:
    if isinstance(state.data, BaseException):
        return state.data
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return exc
    return None


def retry_on_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Prefect's ``retry_condition_fn``: retry only transient failures."""
    exc = _exception(state)
    transient = is_transient(exc)
    if not transient:
        try:
            log: Any = get_run_logger()
        except MissingContextError:
            log = logging.getLogger(__name__)
        log.info("not retrying %s: %s is not transient", task_run.name, type(exc).__name__)
    return transient


# Every dbre task: retried only on transient errors, nothing cached, no result written to storage.
RETRIES: dict[str, Any] = {
    "retries": len(RETRY_DELAYS),
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient,
}
NO_RESULTS: dict[str, Any] = {"persist_result": False, "cache_policy": NO_CACHE}
TASK_OPTIONS: dict[str, Any] = {**RETRIES, **NO_RESULTS}

HOUR = 3600


class _ThreadTimeoutNotice(logging.Filter):
    """Drops Prefect's per-run warning that a timeout cannot interrupt a task in a worker thread.

    For dbre tasks it can: Prefect raises the timeout in the thread at the next Python bytecode, and
    a backup or restore runs Python code (the page sink, the checks) between every read and write."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout of %s seconds configured for this task, but the task is")


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNotice())
