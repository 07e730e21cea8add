"""One small interface over the two kinds of live database a row repair writes to.

``LocalDb`` wraps an apsw connection to a file; ``RemoteDb`` a libSQL server (sqld or Turso)
through libsql-client, over a WebSocket so that a transaction can span several statements.
Both run a statement and return its rows as tuples (values as SQLite has them: None, int,
float, str, bytes), report how many rows a write touched, and tell a bad statement from one
with parameters, so the row repair need not know which it talks to.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import apsw

from dbre.errors import RestoreError, UsageError
from dbre.restore.live import SQL_TOKEN  # (quoted text, identifiers and comments: one token each)
from dbre.secrets import Secret

Row = tuple[Any, ...]
_WS_SCHEME = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}


def exact_floats(sql: str, args: Sequence[Any]) -> tuple[str, list[Any]]:
    """``sql`` and ``args`` with each REAL argument sent as its shortest exact text under ``CAST(? AS REAL)``.

    A libSQL server reads a float argument from JSON inexactly (sqld 0.24: 1 to 2 ulp off for ~20% of
    random doubles, so a restore into it or a row repair wrote other values than the snapshot's), while
    SQLite's own text-to-REAL conversion is exact (6,000 random values through sqld 0.24.32, SQLite 3.45.1;
    tests/test_review_s16_libsql.py).
    Only the ``?`` placeholders outside quoted text, identifiers and comments are counted."""
    if not any(isinstance(a, float) for a in args):
        return sql, list(args)
    tokens = [m.group() for m in SQL_TOKEN.finditer(sql)]
    values = list(args)
    n = 0
    for i, tok in enumerate(tokens):
        if tok != "?":
            continue
        if i + 1 < len(tokens) and tokens[i + 1][:1].isdigit():
            return sql, list(args)  # (numbered parameters: never in the statements dbre writes; left as they are)
        v = values[n] if n < len(values) else None
        if isinstance(v, float) and v == v:
            values[n] = repr(v) if abs(v) != float("inf") else ("9e999" if v > 0 else "-9e999")
            tokens[i] = "CAST(? AS REAL)"
        n += 1
    return "".join(tokens), values


class BadSql(Exception):
    """A statement the database would not prepare; ``parameters`` when it wanted bound values."""

    def __init__(self, message: str, parameters: bool = False) -> None:
        super().__init__(message)
        self.parameters = parameters


class TextNotUtf8(RestoreError):
    """A TEXT value read as text is not valid UTF-8 (see ``text_as_utf8``)."""


@contextlib.contextmanager
def text_as_utf8(what: str) -> Iterator[None]:
    """A TEXT value that is not valid UTF-8 (legacy data; apsw reads TEXT as str) becomes one line naming
    the way round, not an unexpected error."""
    try:
        yield
    except UnicodeDecodeError as err:
        bad = err.object[err.start : err.start + 1].hex() if isinstance(err.object, bytes) else "?"
        raise TextNotUtf8(f"{what}: a TEXT value is not valid UTF-8 (byte 0x{bad}), so it cannot be read as text",
                           "read that column in SQL as CAST(column AS BLOB) or hex(column); `dbre restore` and "
                           "`restore-table` copy such values byte for byte") from None


class LocalDb:
    """A database file through apsw."""

    remote = False

    def __init__(self, conn: apsw.Connection, label: str) -> None:
        self.conn = conn
        self.label = label

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        with text_as_utf8(self.label):
            return [tuple(r) for r in self.conn.execute(sql, tuple(params))]

    def scan(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        """Rows one at a time, for selections too large to hold twice."""
        with text_as_utf8(self.label):
            yield from self.conn.execute(sql, tuple(params))  # apsw rows are tuples already

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        self.conn.execute(sql, tuple(params))
        return int(self.conn.changes())

    def check(self, sql: str) -> None:
        try:
            self.conn.execute("EXPLAIN " + sql).fetchall()
        except UnicodeDecodeError:
            pass  # (it compiled: the program lists a blob literal, x'9f..', as text that is not UTF-8)
        except apsw.BindingsError as err:
            raise BadSql(str(err), parameters=True) from None
        except apsw.Error as err:
            raise BadSql(str(err)) from None


class RemoteDb:
    """A libSQL server through libsql-client: the client itself, or one transaction of it."""

    remote = True

    def __init__(self, target: Any, label: str) -> None:
        self.target = target  # ClientSync or TransactionSync: both have execute(sql, args)
        self.label = label

    def _run(self, sql: str, params: Sequence[Any]) -> Any:
        from libsql_client import LibsqlError

        try:
            return self.target.execute(*exact_floats(sql, params))
        except LibsqlError as err:
            raise RestoreError(f"{self.label}: {err}") from err

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return [tuple(r) for r in self._run(sql, params).rows]

    def scan(self, sql: str, params: Sequence[Any] = ()) -> Iterator[Row]:
        yield from self.rows(sql, params)

    def write(self, sql: str, params: Sequence[Any] = ()) -> int:
        return int(self._run(sql, params).rows_affected)

    def check(self, sql: str) -> None:
        from libsql_client import LibsqlError

        try:
            self.target.execute(f"SELECT * FROM ({sql}) LIMIT 0")
        except LibsqlError as err:
            raise BadSql(str(err), parameters=getattr(err, "code", "") == "ARGS_INVALID") from None


def redact(url: str) -> str:
    """The URL without its query (which may hold a token)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def connect_remote(url: str, token: Secret | None) -> Any:
    """A libsql-client sync client over a WebSocket to ``url``; fails now, not at the first query.

    ``libsql://host`` means ``wss://host`` (``?tls=0``: ``ws://``), ``http(s)://`` means ``ws(s)://``,
    as in the libSQL clients; a token comes as ``token`` or as ``?authToken=`` in the URL.
    """
    import libsql_client

    parts = urlsplit(url)
    query = {k.lower(): v for k, v in parse_qsl(parts.query)}
    scheme = ("ws" if query.get("tls") == "0" else "wss") if parts.scheme == "libsql" else _WS_SCHEME.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise UsageError(f"live database {redact(url)}: not a libSQL URL", "use libsql://, https:// or wss://")
    secret = token.reveal() if token else query.get("authtoken")
    auth = secret.decode() if isinstance(secret, bytes) else secret
    try:
        client = libsql_client.create_client_sync(urlunsplit((scheme, parts.netloc, parts.path, "", "")),
                                                  auth_token=auth or None)
    except Exception as err:  # noqa: BLE001 - the client raises its own and aiohttp's errors
        raise RestoreError(f"live database {redact(url)}: cannot connect ({err.__class__.__name__})",
                           "check the URL and that the server is up") from None
    try:
        client.execute("SELECT 1")
    except Exception as err:  # noqa: BLE001
        client.close()
        text = str(err)
        hint = ("check LIBSQL_AUTH_TOKEN / TURSO_AUTH_TOKEN" if "401" in text or "auth" in text.lower()
                else "check the URL and that the server is up")
        raise RestoreError(f"live database {redact(url)}: cannot reach it ({_first_line(text)})", hint) from None
    return client


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else "no answer"
