"""Fixtures of the torture suite: the fork server that starts the runs a trial kills, the session's
figures (printed at the end and written to bench-output/torture.json), and repository URLs of each
backend (a local folder; a prefix of a fresh bucket on the session's real moto_server)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.dbfactory import dbre_env
from tests.torture.harness import Tally
from tests.torture.launcher import Launcher

OUTPUT = Path(__file__).resolve().parents[2] / "bench-output" / "torture.json"
_TALLY = Tally()


@pytest.fixture(scope="session")
def launcher(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """The fork server for the whole session, with the moto_server env (AWS_ENDPOINT_URL, fake keys)."""
    server = Launcher(tmp_path_factory.mktemp("runs"), dbre_env())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def tally() -> Tally:
    """The session's figures; every test adds its cell."""
    return _TALLY


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def repo_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of fresh repository URLs of this test's backend: ``repo_url("offsite-3")``."""
    if backend == "local":
        return lambda name: str(tmp_path / name)
    bucket = request.getfixturevalue("s3_bucket")
    return lambda name: f"s3://{bucket}/{name}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _TALLY.cells:
        return
    terminalreporter.section("torture: kill -9 figures")
    for line in _TALLY.lines():
        terminalreporter.write_line(line)
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(json.dumps(_TALLY.as_json(), indent=2) + "\n")
    terminalreporter.write_line(f"written to {OUTPUT}")
