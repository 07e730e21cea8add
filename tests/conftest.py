"""Shared pytest fixtures and helpers for the whole test suite, grouped by what they provide.

Sections: Prefect (the session harness), the run (--runslow, pytest-xdist scheduling), helpers (ports),
S3 (a real moto_server), stores (one per backend).
Add new fixtures under a section of their own; keep each fixture's docstring saying what it
yields and how long it lives.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from dbre.storage.base import Store
from dbre.storage.local import LocalStore

# Prefect reads its settings (PREFECT_HOME, ...) when first imported: set them before anything
# else, and share one test harness across the session (it takes 15-60 s to start).
from tests.prefect_fixtures import prefect_harness  # noqa: F401, I001

# --------------------------------------------------------------------------- the run


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the long variants (tests marked slow; make test-all)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The tests marked ``slow`` (long variants of what a shorter test covers) run only with --runslow."""
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="a long variant: run with --runslow (make test-all)")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)


# A pytest-xdist worker starts with COLUMNS=80 and LINES=24 in its environment, which the CLI's tables
# (and the tests reading them through subprocesses) would take as a terminal 80 columns wide: the
# workers get the controller's values (or none) instead.
_TERMINAL_ENV = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    node.workerinput["dbre_terminal_env"] = {name: os.environ.get(name) for name in _TERMINAL_ENV}


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background (`make test &`) inherits SIGINT ignored, and so would every
    # dbre it starts: Ctrl-C tests (exit 130, serve.py's SIGINT) need Python's own handler back.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and "dbre_terminal_env" in workerinput:
        _set_env(workerinput["dbre_terminal_env"])


# A module that defines a module-scoped fixture (a served Prefect deployment, a repository built
# once), or names an xdist_group, runs on one worker: the fixture is built once, and its tests run in
# file order, which some rely on (one writes what the next reads). pytest-xdist 3.8's own loadgroup
# cannot group under pytest 9 (its group suffix on item._nodeid no longer reaches the nodeid), so
# the grouping is decided here, from the module's text.
_ONE_WORKER = re.compile(r"""scope\s*=\s*["']module["']|mark\.xdist_group""")
# Modules whose tests load the machine hard (many processes, fault proxies, full-disk and concurrency
# trials) name this group in a comment line: they run one after another on one worker, so the timing
# of the other workers' tests (replication lag, kill instants) is not measured beside several of them.
_HEAVY = re.compile(r"^# test-group: heavy$", re.M)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """For ``-n N --dist loadgroup`` (make test): every other test is handed out on its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    @functools.cache
    def text(path: str) -> str:
        try:
            return (config.rootpath / path).read_text()
        except OSError:
            return ""

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if _HEAVY.search(text(path)):
                return "heavy"
            return path if _ONE_WORKER.search(text(path)) else nodeid

    return ModuleFixtureScheduling(config, log)


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- S3: moto_server

MOTO_SERVER = Path(sys.executable).parent / "moto_server"

# moto keeps its state in memory, so a restarted server has no buckets. This launcher creates the
# named buckets inside the server process before the port opens, then runs moto_server's main():
# a test that stops and restarts a server finds its bucket there again at once.
_SEEDED_MOTO = """
import sys
import boto3
from moto import mock_aws
from moto.server import main

port, buckets = sys.argv[1], sys.argv[2:]
mock = mock_aws()
mock.start()
s3 = boto3.client("s3", region_name="us-east-1")
for bucket in buckets:
    s3.create_bucket(Bucket=bucket)
mock.stop(remove_data=False)
main(["-H", "127.0.0.1", "-p", port])
"""

# Env for every S3 test: fixed fake credentials, and nothing from the developer's own AWS setup
# (profiles, session tokens, a service-specific endpoint) that could send requests elsewhere.
_AWS_ENV: dict[str, str | None] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": None,
    "AWS_SECURITY_TOKEN": None,
    "AWS_PROFILE": None,
    "AWS_DEFAULT_PROFILE": None,
    "AWS_ENDPOINT_URL_S3": None,
}


class MotoServer:
    """A ``moto_server`` subprocess on ``127.0.0.1:port``; ``start``/``stop`` may repeat.

    Its state lives in memory and is lost on ``stop``, except the buckets named in ``buckets``,
    which each ``start`` creates before the port opens. ``env`` adds to the server's environment,
    e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "0"}`` makes moto check credentials.
    """

    def __init__(
        self,
        port: int,
        log_path: Path,
        *,
        buckets: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.buckets = tuple(buckets)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"MotoServer({self.endpoint!r})"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and return once it answers HTTP; RuntimeError if it does not."""
        if self.buckets:
            argv = [sys.executable, "-c", _SEEDED_MOTO, str(self.port), *self.buckets]
        else:
            argv = [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)]
        env = {**os.environ, **self.env}
        env.pop("AWS_ENDPOINT_URL", None)  # the launcher's in-process boto3 must not go out
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        # no proxy from the environment: the server is on loopback
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server on port {self.port} exited:\n{_tail(self.log_path)}")
            try:
                opener.open(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # it answers, if not with a 200
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server on port {self.port} did not answer in {timeout} s")

    def stop(self) -> None:
        """Kill the server by its pid: its state is in memory, and SIGTERM takes it ~0.5 s."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def start_moto(log_dir: Path, *, buckets: Sequence[str] = (), env: Mapping[str, str] | None = None) -> MotoServer:
    """Start a MotoServer on a free port, trying another port if one was taken meanwhile."""
    for attempt in range(3):
        port = free_port()
        server = MotoServer(port, log_dir / f"moto-{port}.log", buckets=buckets, env=env)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def unique_bucket_name(stem: str = "dbre-test") -> str:
    return f"{stem}-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def s3_client(moto_server: str) -> Any:
    """A boto3 S3 client on the session's moto_server, for test set-up and inspection."""
    import boto3

    return boto3.session.Session().client("s3", endpoint_url=moto_server)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server for the whole session; yields its endpoint URL.

    While it runs, the env points boto3 at it (AWS_ENDPOINT_URL) with fake credentials and no
    AWS config files; the previous values come back at the end of the session.
    """
    log_dir = tmp_path_factory.mktemp("moto")
    empty = log_dir / "no-aws-config"
    env: dict[str, str | None] = {
        **_AWS_ENV,
        "AWS_CONFIG_FILE": str(empty),
        "AWS_SHARED_CREDENTIALS_FILE": str(empty),
    }
    saved = {name: os.environ.get(name) for name in [*env, "AWS_ENDPOINT_URL"]}
    _set_env(env)
    server = start_moto(log_dir)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        yield server.endpoint
    finally:
        server.stop()
        _set_env(saved)


def _set_env(values: Mapping[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_bucket(s3_client: Any) -> str:
    """A fresh, empty bucket on the session's moto_server; returns its name."""
    name = unique_bucket_name()
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_repo_url(s3_bucket: str) -> str:
    """A repository URL ``s3://<fresh bucket>/repo`` on the session's moto_server."""
    return f"s3://{s3_bucket}/repo"


@pytest.fixture
def spawn_moto(moto_server: str, tmp_path: Path) -> Iterator[Callable[..., MotoServer]]:
    """A factory for extra moto servers of a test's own: ``spawn_moto(buckets=(...), env={...})``.

    Each runs on its own port and is stopped when the test ends. Depends on ``moto_server`` for
    the fake-credential env.
    """
    servers: list[MotoServer] = []

    def spawn(*, buckets: Sequence[str] = (), env: Mapping[str, str] | None = None) -> MotoServer:
        server = start_moto(tmp_path, buckets=buckets, env=env)
        servers.append(server)
        return server

    yield spawn
    for server in servers:
        server.stop()


# --------------------------------------------------------------------------- stores


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """An empty Store of each backend: a LocalStore in tmp_path, an S3Store on a fresh bucket."""
    if request.param == "local":
        yield LocalStore(tmp_path / "repo")
    else:
        from dbre.storage.s3 import S3Store

        yield S3Store.from_url(request.getfixturevalue("s3_repo_url"))
