"""A fault-injecting HTTP proxy between boto3 and a real S3 server (moto_server), for the storage-fault tests.

Every request is read exactly as the client sent it (Content-Length or chunked framing, aws-chunked
bodies included, ``Expect: 100-continue`` answered here), then forwarded unchanged on a keep-alive
connection of its own to the server, unless the seeded `FaultPlan` picks a fault for it:

- ``reset_before``: the connection is reset (RST) before anything is forwarded;
- ``reset_after``: the request is forwarded (a PUT happened), then the connection is reset: the
  answer is lost;
- ``status_500`` / ``status_503`` / ``status_429``: an S3 error answer (InternalError, SlowDown,
  TooManyRequests) without forwarding;
- ``delay``: forwarded after a pause of up to ``max_delay`` seconds (a slow answer, bounded);
- ``truncate``: forwarded, then the answer's headers with its full Content-Length and only part of
  its body, and the connection closed (a response cut short).

`FaultProxy.log` counts what was injected, per kind and per S3 operation, and every request per
operation. Threads are the stdlib's (`socketserver`); `stop()` closes every connection and joins them.
"""

from __future__ import annotations

import http.client
import random
import socket
import socketserver
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

KINDS = ("reset_before", "reset_after", "status_500", "status_503", "status_429", "delay", "truncate")
_ERRORS = {
    "status_500": (500, "Internal Server Error", "InternalError", "We encountered an internal error."),
    "status_503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "status_429": (429, "Too Many Requests", "TooManyRequests", "Too many requests."),
}
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "expect", "te", "upgrade"}


def s3_operation(method: str, target: str, headers: dict[str, str]) -> str:
    """The S3 operation a request is (enough to count and target faults): "PutObject", "ListObjectsV2", ..."""
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    path = parts.path.strip("/")
    on_object = "/" in path  # path-style: /bucket/key
    for sub, names in (("retention", ("GetObjectRetention", "PutObjectRetention")),
                       ("object-lock", ("GetObjectLockConfiguration", "PutObjectLockConfiguration")),
                       ("versioning", ("GetBucketVersioning", "PutBucketVersioning"))):
        if sub in query:
            return names[0] if method in ("GET", "HEAD") else names[1]
    if method == "GET" and not on_object:
        if "versions" in query:
            return "ListObjectVersions"
        return "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"
    if method == "POST" and "delete" in query:
        return "DeleteObjects"
    if method == "PUT" and on_object:
        return "PutObject(If-None-Match)" if "if-none-match" in headers else "PutObject"
    if method == "GET" and on_object:
        return "GetObject(range)" if "range" in headers else "GetObject"
    return {"HEAD": "HeadObject" if on_object else "HeadBucket", "DELETE": "DeleteObject" if on_object
            else "DeleteBucket", "PUT": "CreateBucket"}.get(method, f"{method} {'object' if on_object else 'bucket'}")


@dataclass
class FaultPlan:
    """Which requests get which fault: each request draws once from a seeded generator; ``rates`` maps
    a kind to its probability (their sum at most 1). ``ops``: only these operations get faults (None:
    all); ``paths``: only requests whose path holds one of these strings (None: all); ``after``: the
    first ``after`` requests are forwarded whatever they are (a run that fails midway). ``limit``: at
    most this many faults in all (None: no limit). ``enabled`` off forwards all."""

    rates: dict[str, float] = field(default_factory=dict)
    seed: int | str = 0
    ops: frozenset[str] | None = None
    paths: tuple[str, ...] | None = None
    after: int = 0
    limit: int | None = None
    max_delay: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(KINDS)
        if unknown or sum(self.rates.values()) > 1 + 1e-9:
            raise ValueError(f"bad fault rates {self.rates}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        self.injected = 0
        self.seen = 0

    @classmethod
    def uniform(cls, rate: float, seed: int | str, kinds: Iterable[str] = KINDS, **kw: Any) -> FaultPlan:
        """Faults at ``rate`` in all, shared evenly between ``kinds``."""
        kinds = tuple(kinds)
        return cls({k: rate / len(kinds) for k in kinds}, seed, **kw)

    def draw(self, op: str, path: str = "") -> tuple[str | None, float]:
        """The fault for one request of ``op`` on ``path`` (None: forward it) and, for a delay, its seconds."""
        with self._lock:
            r, pause = self._rng.random(), self._rng.uniform(0.1, self.max_delay)
            self.seen += 1
            if not self.enabled or self.seen <= self.after or (self.ops is not None and op not in self.ops) or \
                    (self.paths is not None and not any(p in path for p in self.paths)) or \
                    (self.limit is not None and self.injected >= self.limit):
                return None, 0.0
            for kind in KINDS:
                r -= self.rates.get(kind, 0.0)
                if r < 0:
                    self.injected += 1
                    return kind, pause
            return None, 0.0


@dataclass
class FaultLog:
    """What the proxy saw and did: requests per operation, faults per kind and per (kind, operation)."""

    requests: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    by_op: Counter[tuple[str, str]] = field(default_factory=Counter)
    framing: Counter[str] = field(default_factory=Counter)  # how request bodies came (see _framing)
    trace: list[tuple[str, str, str | None]] = field(default_factory=list)  # the first 5000: op, path, fault
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: str, kind: str | None, path: str = "") -> None:
        with self.lock:
            if len(self.trace) < 5000:
                self.trace.append((op, path, kind))
            self.requests[op] += 1
            if kind is not None:
                self.faults[kind] += 1
                self.by_op[(kind, op)] += 1

    def lines(self) -> list[str]:
        out = [f"requests {sum(self.requests.values())}, faults {sum(self.faults.values())}: " +
               ", ".join(f"{k} {self.faults[k]}" for k in KINDS if self.faults[k])]
        out.append("  request bodies: " + ", ".join(f"{k} {n}" for k, n in sorted(self.framing.items())))
        for (kind, op), n in sorted(self.by_op.items()):
            out.append(f"  {kind:<13} {op:<26} {n}")
        return out


class _Closed(Exception):
    """The client closed its connection (or sent something that is not HTTP)."""


def _read_line(rfile: Any) -> bytes:
    line: bytes = rfile.readline(65537)
    if not line:
        raise _Closed
    return line


def _read_request(rfile: Any, wfile: Any) -> tuple[str, str, list[tuple[str, str]], bytes, bool]:
    """One request: method, target, headers (in order), the body exactly as framed, and whether it was chunked."""
    line = _read_line(rfile)
    while line in (b"\r\n", b"\n"):
        line = _read_line(rfile)
    try:
        method, target, _version = line.decode("latin-1").split()
    except ValueError:
        raise _Closed from None
    headers: list[tuple[str, str]] = []
    while True:
        h = _read_line(rfile)
        if h in (b"\r\n", b"\n"):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers.append((name.strip(), value.strip()))
    lower = {k.lower(): v for k, v in headers}
    if lower.get("expect", "").lower() == "100-continue":
        wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        wfile.flush()
    chunked = "chunked" in lower.get("transfer-encoding", "").lower()
    if chunked:  # the framing is kept as sent (the server decodes it): read it chunk by chunk
        raw = bytearray()
        while True:
            size_line = _read_line(rfile)
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = _read_line(rfile)
                    raw += t
                    if t in (b"\r\n", b"\n"):
                        break
                break
            data = rfile.read(size + 2)
            if len(data) < size + 2:
                raise _Closed
            raw += data
        body = bytes(raw)
    else:
        n = int(lower.get("content-length", "0") or 0)
        body = rfile.read(n) if n else b""
        if len(body) < n:
            raise _Closed
    return method, target, headers, body, chunked


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        proxy = self.server.proxy
        rfile, wfile = sock.makefile("rb"), sock.makefile("wb")
        upstream: http.client.HTTPConnection | None = None
        try:
            while not proxy.stopping:
                try:
                    method, target, headers, body, chunked = _read_request(rfile, wfile)
                except (_Closed, OSError, ValueError):
                    return
                lower = {k.lower(): v for k, v in headers}
                op = s3_operation(method, target, lower)
                with proxy.log.lock:
                    proxy.log.framing[_framing(lower, chunked, body)] += 1
                kind, pause = proxy.plan.draw(op, urlsplit(target).path)
                if kind == "truncate" and method == "HEAD":
                    kind = None  # no body to cut
                if kind != "truncate":
                    proxy.log.add(op, kind, urlsplit(target).path)
                if kind == "reset_before":
                    _reset(sock)
                    return
                if kind in _ERRORS:
                    status, reason, code, message = _ERRORS[kind]
                    xml = b"" if method == "HEAD" else (
                        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                        f"</Message><RequestId>faultproxy</RequestId></Error>").encode()
                    wfile.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                                f"Content-Length: {len(xml)}\r\n\r\n".encode() + xml)
                    wfile.flush()
                    continue
                if kind == "delay":
                    time.sleep(pause)
                try:
                    upstream = upstream or http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                                                      timeout=120)
                    status, reason, rheaders, rbody = _forward(upstream, method, target, headers, body, chunked)
                except (OSError, http.client.HTTPException):
                    if upstream is not None:
                        upstream.close()
                    _reset(sock)  # the server is gone: the client sees its connection fail
                    return
                if kind == "reset_after":
                    _reset(sock)
                    return
                head = [f"HTTP/1.1 {status} {reason}"]
                for k, v in rheaders:
                    if k.lower() not in _HOP and (k.lower() != "content-length" or method == "HEAD"):
                        head.append(f"{k}: {v}")
                if method != "HEAD" and status not in (204, 304):
                    head.append(f"Content-Length: {len(rbody)}")
                out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
                if kind == "truncate":
                    cut = len(rbody) > 1
                    proxy.log.add(op, kind if cut else None, urlsplit(target).path)  # an empty body cannot be cut
                    if cut:
                        wfile.write(out + rbody[: len(rbody) // 2])
                        wfile.flush()
                        return  # the connection closes with the body cut short
                wfile.write(out + rbody)
                wfile.flush()
                if lower.get("connection", "").lower() == "close":
                    return
        except OSError:
            return
        finally:
            if upstream is not None:
                upstream.close()
            for f in (rfile, wfile):
                try:
                    f.close()
                except OSError:
                    pass


def _framing(headers: dict[str, str], chunked: bool, body: bytes) -> str:
    """How a request's body came: "none", "content-length", "chunked", and "+aws-chunked" / "+streaming"
    when botocore signed it in chunks (x-amz-content-sha256: STREAMING-...)."""
    kind = "chunked" if chunked else ("content-length" if body else "none")
    if "aws-chunked" in headers.get("content-encoding", ""):
        kind += "+aws-chunked"
    if headers.get("x-amz-content-sha256", "").startswith("STREAMING-"):
        kind += "+streaming"
    return kind


def _forward(conn: http.client.HTTPConnection, method: str, target: str, headers: list[tuple[str, str]],
             body: bytes, chunked: bool) -> tuple[int, str, list[tuple[str, str]], bytes]:
    """Send the request as it came (headers in order, the body as framed) and read the whole answer."""
    for attempt in (1, 2):  # a kept-alive server connection may have been closed meanwhile: reconnect once
        try:
            conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                if k.lower() not in ("expect", "connection"):
                    conn.putheader(k, v)
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            data = resp.read() if method != "HEAD" else b""
            return resp.status, resp.reason, resp.getheaders(), data
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            conn.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = True
    proxy: FaultProxy

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.proxy.conn_lock:
            self.proxy.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.proxy.conn_lock:
            self.proxy.conns.discard(request)
        super().shutdown_request(request)


class FaultProxy:
    """The proxy on ``127.0.0.1:port`` in front of ``upstream`` (``http://host:port``); ``endpoint`` is
    what AWS_ENDPOINT_URL should name. ``plan`` may be replaced or switched off at any time."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.plan = plan or FaultPlan(enabled=False)
        self.log = FaultLog()
        self.stopping = False
        self.conns: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self.port = int(self._server.server_address[1])
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"FaultProxy({self.endpoint!r})"

    def stop(self) -> None:
        """Stop serving, close every client connection, join the threads."""
        self.stopping = True
        self._server.shutdown()
        with self.conn_lock:
            conns = list(self.conns)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()  # joins the handler threads (block_on_close)
        self._thread.join(10)


