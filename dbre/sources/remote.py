"""A remote libSQL database (sqld or Turso) as a backup source.

Two ways to get a consistent local copy, both yielding an apsw connection to a SQLite file:

- ``replica``: an embedded replica (``libsql_experimental``) kept in a persistent cache
  directory and synced from the server's replication log, so the second backup transfers only
  the frames written since the first. The replica is a normal SQLite file in WAL mode; the
  ``-client_wal_index`` file next to it records how far it has synced (keep it). The sync runs
  in a short-lived child process (libsql_experimental holds the GIL for the whole sync and has
  no timeout); ``sync_timeout`` bounds it. A first sync replays every transaction in the
  server's log since its last compaction, one commit (two fsyncs) at a time: a log of many
  small transactions makes the first sync slow, later syncs cost only what changed.
- ``dump``: ``GET /dump`` streams the database as SQL text; it is loaded into a fresh temporary
  file. Always a full transfer, but it works wherever the HTTP API does.

``auto`` tries the replica and falls back to the dump when the replica path fails for any reason
other than a refused token or an unreachable server (those would fail the dump too).

A namespace of a sqld run with ``--enable-namespaces`` is addressed two ways: by a header
(``namespace``: every HTTP request, /dump included) or by hostname (sqld reads the namespace from
the first label of the host). The embedded replica knows only the second, so a namespace gets one
only with ``replica_url`` (e.g. ``http://{namespace}.sqld.internal:8080``: a wildcard DNS record
for the server); its host's first label must be the namespace. Without it, a namespace is always
read through /dump, a full transfer each time; with it, a round reads what changed (and /dump
stays the fallback when that hostname does not answer). DNS decides which server answers that
hostname: after each sync the replica's database id must be the one the source URL itself reports
for the namespace (a gRPC ``Hello``), else the replica is dropped and /dump reads the namespace.
A cached replica is used only while its directory is this user's alone (it is made 0700).

URLs: ``libsql://host`` means ``https://host`` (``?tls=0`` for plain HTTP, as in the libSQL
clients), ``ws(s)://`` means ``http(s)://``. A token may come as ``?authToken=`` in the URL;
it never appears in ``identity()``, ``repr()`` or an error message.

The replica cache lives in ``$DBRE_CACHE_DIR/replicas/<key>/`` (default
``${XDG_CACHE_HOME:-~/.cache}/dbre``), one directory per server URL and namespace, guarded by a
file lock so two processes never sync the same replica at once.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import apsw

from dbre.errors import SourceError
from dbre.secrets import Secret

__all__ = ["RemoteLibsqlSource", "token_from_env", "default_cache_root"]

log = logging.getLogger(__name__)

METHODS = ("auto", "replica", "dump")
TOKEN_ENV_VARS = ("LIBSQL_AUTH_TOKEN", "TURSO_AUTH_TOKEN")
_TOKEN_HINT = "check LIBSQL_AUTH_TOKEN / TURSO_AUTH_TOKEN"
_REACH_HINT = "check the URL and that the server is up"
_SECRET_QUERY_KEYS = {"authtoken", "auth_token", "token", "jwt"}
_SNAPSHOT_RETRIES = 4
_AUTH_FAILURE = re.compile(r"unauthenticated|handshake|401|403")
_DUMP_CHUNK = 1 << 20  # execute the dump in batches of about this many characters

# The sync runs in a child process: libsql_experimental holds the GIL for the whole of sync()
# (every other thread of this process, Prefect's included, would stop), has no timeout of its own,
# and logs its retries to stderr. The token goes over stdin, never on a command line.
_SYNC_CHILD = r"""
import json, sys
req = json.loads(sys.stdin.readline())
try:
    import libsql_experimental
    conn = libsql_experimental.connect(req["path"], sync_url=req["url"], auth_token=req["token"])
    try:
        conn.sync()
    finally:
        conn.close()
    out = {"ok": True}
except Exception as err:
    out = {"ok": False, "error": str(err), "type": type(err).__name__}
sys.stdout.write(json.dumps(out) + "\n")
"""


def _namespace_url(template: str, namespace: str | None) -> str:
    """The HTTP base URL of ``namespace`` addressed by hostname, from ``template`` ("{namespace}"
    filled in; libsql:// and ws(s):// mapped as for the source; no token in it). Its host's first
    label must be the namespace: that is the label sqld reads the namespace from."""
    if not namespace:
        raise SourceError("replica_url is set without a namespace",
                          "set the namespace too, or give the namespace's own URL as the source")
    url = template.replace("{namespace}", namespace)
    parts = urlsplit(url.strip())
    if parts.query and any(k == "authToken" for k, _ in parse_qsl(parts.query)):
        raise SourceError("replica_url carries a token", "give the token as the source's token, not in replica_url")
    host = (parts.netloc.rsplit("@", 1)[-1].split(":", 1)[0]) if parts.netloc else ""
    if host.split(".", 1)[0] != namespace or "." not in host:
        raise SourceError(f"replica_url's host {host or '(none)'} does not start with the namespace {namespace!r}",
                          "sqld reads the namespace from the host's first label: use e.g. "
                          "http://{namespace}.sqld.internal:8080")
    return RemoteLibsqlSource(url).base_url


def token_from_env(environ: dict[str, str] | None = None) -> Secret | None:
    """The token in ``LIBSQL_AUTH_TOKEN``, else ``TURSO_AUTH_TOKEN``, else None."""
    env = os.environ if environ is None else environ
    for var in TOKEN_ENV_VARS:
        value = env.get(var, "").strip()
        if value:
            return Secret(value)
    return None


def default_cache_root() -> Path:
    """``$DBRE_CACHE_DIR``, else ``$XDG_CACHE_HOME/dbre``, else ``~/.cache/dbre``."""
    env = os.environ.get("DBRE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "dbre"


class _ReplicaUnavailable(Exception):
    """The replica path failed in a way the dump may not: fall back (auto) or report (replica)."""


class RemoteLibsqlSource:
    """A libSQL database behind sqld or Turso.

    ``last_method`` is the method the last ``connect()`` used (``replica`` or ``dump``),
    ``last_seconds`` how long its sync or download took, ``last_fallback_reason`` why ``auto``
    fell back to the dump (None if it did not).
    """

    def __init__(
        self,
        url: str,
        token: Secret | None = None,
        *,
        cache_dir: Path | None = None,
        method: str = "auto",
        namespace: str | None = None,
        timeout: float = 60.0,
        lock_timeout: float = 600.0,
        sync_timeout: float | None = 3600.0,
        replica_dir: Path | None = None,
        replica_url: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise SourceError(f"unknown remote source method {method!r}", f"use one of {', '.join(METHODS)}")
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ("libsql", "http", "https", "ws", "wss"):
            raise SourceError(
                f"unsupported URL scheme {scheme!r}", "use libsql://, https://, http://, wss:// or ws://"
            )
        try:
            host, port = parts.hostname, parts.port
        except ValueError as err:
            raise SourceError("bad port in the source URL", "check the URL") from err
        if not host:
            raise SourceError("the source URL has no host", "check the URL, e.g. libsql://mydb-org.turso.io")
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_token = next((v for k, v in query if k.lower() in _SECRET_QUERY_KEYS and v), None)
        public_query = [(k, v) for k, v in query if k.lower() not in _SECRET_QUERY_KEYS]
        tls = dict((k.lower(), v) for k, v in public_query).get("tls")

        if scheme == "libsql":
            http_scheme = "http" if tls == "0" else "https"
        elif scheme in ("http", "ws"):
            http_scheme = "http"
        else:
            http_scheme = "https"
        hostport = f"[{host}]" if ":" in host else host
        if port:
            hostport += f":{port}"
        path = parts.path.rstrip("/")

        self.url = f"{scheme}://{hostport}{path}" + (f"?{urlencode(public_query)}" if public_query else "")
        self.base_url = f"{http_scheme}://{hostport}{path}"
        if isinstance(token, str):  # be forgiving: never keep a plain string around
            token = Secret(token)
        self._token: Secret | None = token if token else (Secret(url_token) if url_token else None)
        self.namespace = namespace or None
        self.method = method
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.sync_timeout = sync_timeout
        self.cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        raw_name = self.namespace or (f"{host}-{port}" if port else host)
        self.name = re.sub(r"[^A-Za-z0-9._-]+", "-", raw_name).strip("-.") or "libsql"
        # a namespace's embedded replica syncs from the namespace's own hostname (sqld reads the
        # namespace from the first label of the host): ``replica_url``, "{namespace}" filled in
        self.replica_base = _namespace_url(replica_url, self.namespace) if replica_url else None
        key_src = self.base_url + (f"#ns={self.namespace}" if self.namespace else "") \
            + (f"#replica={self.replica_base}" if self.replica_base else "")
        self.cache_key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self._replica_dir = Path(replica_dir).expanduser().absolute() if replica_dir is not None else None

        self.last_method: str | None = None
        self.last_seconds: float | None = None
        self.last_fallback_reason: str | None = None

    # ------------------------------------------------------------------ protocol

    def identity(self) -> dict[str, Any]:
        ident: dict[str, Any] = {"kind": "libsql", "url": self.url}
        if self.namespace:
            ident["namespace"] = self.namespace
        return ident

    def __repr__(self) -> str:
        tok = "set" if self._token else "none"
        ns = f", namespace={self.namespace!r}" if self.namespace else ""
        return f"RemoteLibsqlSource({self.url!r}{ns}, method={self.method!r}, token={tok})"

    @property
    def replica_dir(self) -> Path:
        """Where the embedded replica lives: the ``replica_dir`` given, else one per URL in the cache."""
        if self._replica_dir is not None:
            return self._replica_dir
        return self.cache_root / "replicas" / self.cache_key

    @property
    def replica_path(self) -> Path:
        return self.replica_dir / "replica.db"

    @contextmanager
    def connect(self) -> Iterator[apsw.Connection]:
        with ExitStack() as stack:
            conn: apsw.Connection | None = None
            self.last_fallback_reason = None
            if self.method in ("auto", "replica"):
                try:
                    conn = self._open_replica(stack)
                except _ReplicaUnavailable as err:
                    reason = self.scrub(str(err))
                    if self.method == "replica":
                        raise SourceError(
                            f"source {self.url}: embedded replica sync failed: {reason}",
                            "try --method dump, or check the server's replication endpoint",
                        ) from None
                    self.last_fallback_reason = reason
                    log.warning("source %s: embedded replica failed (%s); falling back to /dump",
                                self.url, reason)
            if conn is None:
                conn = self._open_dump(stack)
            yield conn

    # ------------------------------------------------------------------ replica

    def _open_replica(self, stack: ExitStack) -> apsw.Connection:
        if self.namespace and not self.replica_base:
            raise _ReplicaUnavailable(
                "an embedded replica addresses a namespace only by hostname (<namespace>.<host>): "
                "set replica_url (e.g. http://{namespace}.sqld.internal:8080)"
            )
        rdir = self.replica_dir
        try:
            rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = stack.enter_context(open(rdir / "lock", "a+"))
        except OSError as err:
            raise SourceError(
                f"source {self.url}: cannot use the replica cache {rdir}: {err.strerror}",
                "check DBRE_CACHE_DIR and its permissions",
            ) from None
        self._lock(lock)
        if self._replica_dir is None:
            self._check_private()
        self._write_meta()

        started = time.monotonic()
        self.sync_replica()
        if self.replica_base:
            self._check_replica_database()
        self.last_seconds = time.monotonic() - started
        log.info("source %s: replica synced in %.2fs", self.url, self.last_seconds)

        conn = self._open_file(self.replica_path)
        stack.callback(conn.close)
        self.last_method = "replica"
        return conn

    def _check_private(self) -> None:
        """The cached replica is backed up as the database: only this user may change it. Its
        directory (made 0700) must be this user's and writable by no one else; if others may enter
        it, so must its files. Else the replica is dropped and the dump read, saying why."""
        uid = os.geteuid()
        rdir = self.replica_dir
        try:
            for p in (rdir, *(sorted(rdir.glob("replica.db*")) if rdir.stat().st_mode & 0o011 else ())):
                st = p.lstat()
                if st.st_uid != uid or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
                    self._wipe_replica()  # whatever is in it may not be the database's: never read it again
                    raise _ReplicaUnavailable(
                        f"the replica cache {p} can be changed by others (owner uid {st.st_uid}, mode "
                        f"{stat.S_IMODE(st.st_mode):o}): make it this user's alone (chmod 700 {rdir})")
        except OSError as err:
            raise _ReplicaUnavailable(f"cannot check the replica cache {rdir}: {err.strerror}") from None

    def _lock(self, lock: IO[str]) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise SourceError(
                    f"source {self.url}: the replica cache {self.replica_dir} is locked by another process",
                    "wait for the other backup of this database to finish",
                )
            time.sleep(0.2)

    def _write_meta(self) -> None:
        meta = {"url": self.url, "base_url": self.base_url, "namespace": self.namespace,
                "replica_url": self.replica_base,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            (self.replica_dir / "source.json").write_text(json.dumps(meta, indent=1) + "\n")
        except OSError:
            pass

    def _wipe_replica(self) -> None:
        for p in self.replica_dir.glob("replica.db*"):
            try:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
            except OSError:
                pass

    def sync_env(self) -> dict[str, str]:
        """The environment of a sync child process: libsql's own log off unless RUST_LOG asks for it."""
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "off")
        return env

    def sync_request(self) -> str:
        """The line a sync child reads first (path, URL, token): sent over its stdin, never argv."""
        return json.dumps({"path": str(self.replica_path), "url": self.replica_base or self.base_url,
                           "token": self._token_str()})

    def _sync_once(self) -> str | None:
        """One sync in a child process; None on success, else libsql's error message."""
        env = self.sync_env()
        request = self.sync_request()
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _SYNC_CHILD],
                input=request + "\n",
                stdout=subprocess.PIPE,
                # a RUST_LOG of the user's shows libsql's own log; else keep stderr for a panic
                stderr=None if "RUST_LOG" in os.environ else subprocess.PIPE,
                text=True,
                timeout=self.sync_timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SourceError(
                f"source {self.url}: the replica sync did not finish within {self.sync_timeout:g}s",
                "check the network and the server; raise the sync timeout for a first sync of a big database",
            ) from None
        except OSError as err:
            raise _ReplicaUnavailable(f"cannot start the sync process: {err.strerror}") from None
        lines = proc.stdout.strip().splitlines()
        try:
            result = json.loads(lines[-1]) if lines else {}
        except ValueError:
            result = {}
        if result.get("ok") and proc.returncode == 0:
            return None
        if "error" in result:
            return str(result["error"]) or str(result.get("type", "error"))
        tail = " ".join((proc.stderr or "").strip().splitlines()[-3:])  # e.g. a Rust panic
        return f"sync process exited with status {proc.returncode}: {tail}"

    def auth_failure(self, msg: str) -> SourceError | None:
        """When a failed sync's message (scrubbed) reads as an authentication failure and the server
        does refuse the token (one request checks), the error to report; else None."""
        if not _AUTH_FAILURE.search(msg.lower()):
            return None
        try:
            self._probe_auth()
        except SourceError as err:
            return err
        return None

    def sync_failure(self, msg: str) -> SourceError | None:
        """The error a failed sync's message (scrubbed) means when trying again soon cannot help: the
        server unreachable, the connection failing, the token refused; None when a retry may pass."""
        low = msg.lower()
        if "tcp connect error" in low or "dns error" in low or "connection refused" in low:
            return self._unreachable(_after_colon(msg))
        if _AUTH_FAILURE.search(low):
            return self.auth_failure(msg)  # (None: the token is accepted, something else failed)
        if "error trying to connect" in low:
            hint = ("is it plain HTTP? use http:// or libsql://...?tls=0"
                    if self.base_url.startswith("https") else _REACH_HINT)
            return SourceError(f"source {self.url}: connection failed: {_after_colon(msg)}", hint)
        return None

    def sync_replica(self) -> None:
        """Sync the embedded replica at ``replica_path`` once (created by the first sync), in a child
        process: "snapshot not found" retried, a damaged or foreign replica started over once.
        The caller holds the replica directory (no other process syncs it meanwhile)."""
        wiped = False
        attempt = 0
        while True:
            attempt += 1
            error = self._sync_once()
            if error is None:
                return
            msg = self.scrub(error)
            low = msg.lower()
            if re.search(r"snapshot.{0,3}not.{0,3}found", low) and attempt <= _SNAPSHOT_RETRIES:
                log.info("source %s: %s; retrying sync (%d)", self.url, msg, attempt)
                time.sleep(0.3 * attempt)
                continue
            failure = self.sync_failure(msg)
            if failure is not None and self.replica_base and not _AUTH_FAILURE.search(low):
                # the namespace's own hostname does not answer (DNS, routing): the source's URL may
                raise _ReplicaUnavailable(f"the replica URL {self.replica_base} cannot be reached: "
                                          f"{_after_colon(msg)}") from None
            if failure is not None:
                raise failure from None
            if _AUTH_FAILURE.search(low):  # the token is accepted: something else went wrong
                raise _ReplicaUnavailable(msg)
            if not wiped:  # a damaged or foreign replica: start it over once
                log.warning("source %s: replica sync failed (%s); resyncing from scratch", self.url, msg)
                wiped = True
                self._wipe_replica()
                continue
            raise _ReplicaUnavailable(msg)

    def _check_replica_database(self) -> None:
        """The replica synced from ``replica_url`` (another hostname: DNS decides which server answers)
        holds the database id the source itself reports for the namespace (its replication Hello); else it is another
        database's (e.g. a staging sqld behind the same wildcard record): wiped, and the dump is read."""
        try:
            meta = (self.replica_dir / "replica.db-client_wal_index").read_bytes()
            mine: str | None = str(uuid.UUID(int=int.from_bytes(meta[:16], "little"))) if len(meta) >= 16 else None
        except OSError:
            mine = None
        try:
            theirs = self._source_database_id()
        except (OSError, ValueError, ssl.SSLError) as err:
            raise _ReplicaUnavailable(f"cannot check that {self.replica_base} serves the source's namespace: "
                                      f"{self.scrub(str(err)) or type(err).__name__}") from None
        if mine is None or theirs is None or mine != theirs:
            self._wipe_replica()
            raise _ReplicaUnavailable(
                f"the replica URL {self.replica_base} serves another database than the source (database id "
                f"{mine or 'unknown'}, the source's {theirs or 'unknown'}): check its DNS record")

    def _source_database_id(self) -> str | None:
        """The database id (what a replica's ``-client_wal_index`` starts with) the source reports for
        the namespace (addressed by header, as /dump): one gRPC ``Hello`` of sqld's replication
        service over HTTP/2 (httpx: prior knowledge on http, ALPN over TLS); None if it gives none."""
        import httpx

        headers = {"content-type": "application/grpc", "te": "trailers",
                   **{k.lower(): v for k, v in self._headers().items() if k.lower() in ("authorization",
                                                                                       "x-namespace-bin")}}
        try:
            # (plain http has no TLS to verify: skipping the context's CA load saves ~50-100 ms a backup)
            with httpx.Client(http1=False, http2=True, timeout=min(self.timeout, 15.0),
                              verify=self.base_url.startswith("https://")) as client:
                body = client.post(self.base_url + "/wal_log.ReplicationLog/Hello", content=b"\x00" * 5,
                                   headers=headers).content  # (an empty HelloRequest, gRPC-framed)
        except httpx.HTTPError as err:
            raise ValueError(f"no answer to a replication Hello: {type(err).__name__}") from None
        if len(body) < 5:
            raise ValueError("no answer to a replication Hello (a refused token, or no such namespace)")
        try:
            return _proto_string(body[5:5 + int.from_bytes(body[1:5], "big")], 3)  # HelloResponse.database_id
        except (IndexError, UnicodeDecodeError):
            raise ValueError("an unreadable answer to a replication Hello") from None

    def check(self) -> None:
        """Fail before anything is created for this source: the server must answer and accept
        the token (one tiny authenticated request; the backup's own sync comes after)."""
        self._probe_auth(unreachable_is_error=True)

    def _probe_auth(self, *, unreachable_is_error: bool = False) -> None:
        """A tiny authenticated request, to tell a refused token from other failures."""
        body = json.dumps({"baton": None, "requests": [{"type": "close"}]}).encode()
        req = urllib.request.Request(self.base_url + "/v2/pipeline", data=body, headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=min(self.timeout, 15.0)) as resp:
                resp.read()
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                raise self._auth_error(err.code) from None
            # any other answer comes from a live server: the caller decides what works
        except (urllib.error.URLError, OSError) as err:
            if unreachable_is_error:
                raise self._net_error(err) from None

    # ------------------------------------------------------------------ dump

    def _open_dump(self, stack: ExitStack) -> apsw.Connection:
        tmp_parent = self.cache_root / "tmp"
        _remove_stale(tmp_parent, "dump-*", max_age=86400)  # left by a killed process
        try:
            tmp_parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmpdir = Path(tempfile.mkdtemp(prefix="dump-", dir=tmp_parent))
        except OSError:
            tmpdir = Path(tempfile.mkdtemp(prefix="dbre-dump-"))
        stack.callback(shutil.rmtree, tmpdir, True)
        path = tmpdir / "dump.db"

        started = time.monotonic()
        req = urllib.request.Request(self.base_url + "/dump", headers=self._headers())
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise self._http_error(err) from None
        except (urllib.error.URLError, OSError) as err:
            raise self._net_error(err) from None
        with resp:
            conn = apsw.Connection(str(path))
            try:
                self._load_dump(conn, resp)
            except BaseException:
                conn.close()
                raise
        stack.callback(conn.close)
        self.last_seconds = time.monotonic() - started
        self.last_method = "dump"
        log.info("source %s: /dump loaded in %.2fs", self.url, self.last_seconds)
        return conn

    def _load_dump(self, conn: apsw.Connection, resp: http.client.HTTPResponse) -> None:
        conn.execute("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF")
        buf: list[str] = []
        size = 0
        seen_any = False

        def run(text: str) -> None:
            try:
                for _row in conn.execute(text):
                    pass
            except apsw.Error as err:
                raise SourceError(
                    f"source {self.url}: the /dump SQL did not load: {self.scrub(str(err))}",
                    "try --method replica, or check the server version",
                ) from None

        try:
            for raw in resp:
                seen_any = True
                line = raw.decode("utf-8")
                buf.append(line)
                size += len(line)
                if size >= _DUMP_CHUNK and line.rstrip().endswith(";"):
                    text = "".join(buf)
                    if apsw.complete(text):
                        run(text)
                        buf, size = [], 0
        except UnicodeDecodeError:
            raise SourceError(f"source {self.url}: /dump is not UTF-8 SQL", "check the URL") from None
        except (http.client.HTTPException, OSError) as err:
            raise SourceError(
                f"source {self.url}: /dump broke off: {self.scrub(str(err)) or type(err).__name__}",
                "retry; check the network and the server's logs",
            ) from None
        text = "".join(buf)
        if text.strip():
            if not apsw.complete(text):
                raise SourceError(f"source {self.url}: /dump ended mid-statement", "retry the backup")
            run(text)
        if not seen_any:
            raise SourceError(f"source {self.url}: /dump returned nothing", "check the URL and the server")
        if conn.in_transaction:
            raise SourceError(
                f"source {self.url}: /dump ended before its COMMIT (truncated)", "retry the backup"
            )

    # ------------------------------------------------------------------ helpers

    def _token_str(self) -> str:
        if not self._token:
            return ""
        value = self._token.reveal()
        return value.decode() if isinstance(value, bytes) else value

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "dbre"}
        tok = self._token_str()
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        if self.namespace:
            headers["x-namespace-bin"] = base64.b64encode(self.namespace.encode()).decode().rstrip("=")
        return headers

    def scrub(self, text: str) -> str:
        """``text`` with the token redacted and whitespace folded, at most 300 characters."""
        tok = self._token_str()
        if tok and tok in text:
            text = text.replace(tok, "**redacted**")
        text = " ".join(text.split())
        return text if len(text) <= 300 else text[:297] + "..."

    def _open_file(self, path: Path) -> apsw.Connection:
        """Open the synced replica for reading; read-only if SQLite allows it for this WAL file."""
        last: Exception | None = None
        for flags in (apsw.SQLITE_OPEN_READONLY, apsw.SQLITE_OPEN_READWRITE):
            try:
                conn = apsw.Connection(str(path), flags=flags)
                # the replica is dbre's own file, but libsql's sync owns its WAL: never checkpoint it here
                conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                conn.set_busy_timeout(10_000)
                conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
                if flags == apsw.SQLITE_OPEN_READWRITE:
                    conn.execute("PRAGMA query_only=ON")
                return conn
            except apsw.Error as err:
                last = err
        raise _ReplicaUnavailable(f"cannot open the synced replica file: {last}")

    def _auth_error(self, code: int | None = None) -> SourceError:
        what = f"refused the token (HTTP {code})" if self._token else "requires a token and none was given"
        if code is not None and not self._token:
            what = f"requires a token and none was given (HTTP {code})"
        return SourceError(f"source {self.url}: the server {what}", _TOKEN_HINT)

    def _unreachable(self, reason: str) -> SourceError:
        return SourceError(f"source {self.url}: cannot reach the server: {reason}", _REACH_HINT)

    def _http_error(self, err: urllib.error.HTTPError) -> SourceError:
        if err.code in (401, 403):
            return self._auth_error(err.code)
        try:
            detail = err.read(500).decode("utf-8", "replace")
            detail = json.loads(detail).get("error", detail) if detail.startswith("{") else detail
        except (OSError, ValueError, AttributeError):
            detail = ""
        detail = self.scrub(str(detail)) or (err.reason if isinstance(err.reason, str) else "")
        if err.code == 404:
            hint = ("check the namespace exists" if self.namespace
                    else "check the URL names a database; the server may not offer /dump")
            return SourceError(f"source {self.url}: /dump not found (HTTP 404): {detail}", hint)
        return SourceError(f"source {self.url}: /dump failed with HTTP {err.code}: {detail}",
                           "check the server's logs; retry later")

    def _net_error(self, err: BaseException) -> SourceError:
        reason: Any = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, ssl.SSLError):
            hint = ("is it plain HTTP? use http:// or libsql://...?tls=0"
                    if self.base_url.startswith("https") else _REACH_HINT)
            return SourceError(f"source {self.url}: TLS handshake failed: {reason.reason or reason}", hint)
        if isinstance(reason, socket.gaierror):
            return self._unreachable(f"unknown host ({reason.strerror})")
        if isinstance(reason, TimeoutError | socket.timeout):
            return self._unreachable(f"no answer within {self.timeout:g}s")
        if isinstance(reason, OSError) and reason.strerror:
            return self._unreachable(reason.strerror)
        return self._unreachable(self.scrub(str(reason)) or type(reason).__name__)


def _after_colon(msg: str) -> str:
    """``sync error: error trying to connect: tcp connect error: Connection refused (os error 111)``
    -> ``Connection refused (os error 111)``"""
    quoted = re.search(r'message: "((?:[^"\\]|\\.)*)"', msg)  # (a gRPC status: its message, not its metadata)
    if quoted:
        msg = quoted.group(1)
    tail = msg.rsplit(": ", 1)[-1]
    return tail if re.search(r"[A-Za-z]", tail) else (msg[:200] or tail)


def _proto_string(msg: bytes, field: int) -> str | None:
    """The string field ``field`` of a protobuf message (None if absent)."""
    i = 0

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            b = msg[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value

    while i < len(msg):
        key = varint()
        wire = key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n = varint()
            if key >> 3 == field:
                return msg[i:i + n].decode()
            i += n
        else:
            raise ValueError("not a protobuf message")
    return None


def _remove_stale(parent: Path, pattern: str, max_age: float) -> None:
    cutoff = time.time() - max_age
    try:
        for p in parent.glob(pattern):
            if p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass
