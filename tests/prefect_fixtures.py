"""Prefect for tests: its environment, set before Prefect is first imported, and one harness per session.

tests/conftest.py imports this module first of all, so every test can use the ``prefect_harness``
fixture; test modules import the helpers below from here. Prefect reads PREFECT_HOME and its other
settings when it is imported; the retry delays of dbre's tasks (DBRE_TASK_RETRY_DELAYS) are read
when tasks/retry.py is imported, and are a second or two here so retry tests stay quick.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar
from uuid import UUID

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dbre-test-prefect-home-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ["DBRE_TASK_RETRY_DELAYS"] = "1,1,2"
os.environ.pop("DBRE_POLICY", None)  # flows must not pick up a developer's policy
# drills and requirements reports without a folder go to the reports folder: a temporary one, not ~/.local/share
os.environ["DBRE_REPORTS_DIR"] = tempfile.mkdtemp(prefix="dbre-test-reports-")
os.environ.pop("DBRE_REPORTS_URL", None)

import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

T = TypeVar("T")


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect API server and database for the whole session (about 15 s to start)."""
    with prefect_test_harness(server_startup_timeout=120):
        yield


def wait_for(fn: Callable[[], T | None], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``fn`` until it returns something truthy (task-run states reach the API asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def artifacts_of(flow_run_id: UUID) -> list[Any]:
    """The artifacts a flow run published, read back through the Prefect client."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return list(client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))))


def task_runs_named(name: str) -> list[Any]:
    """Task runs with this name, as the API has them."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    with get_client(sync_client=True) as client:
        return list(client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name]))))
