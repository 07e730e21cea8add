"""`dbre restore --into URL`: load a restored database file into a remote libSQL database (a sqld
database or namespace, a Turso database) over Hrana (HTTP), then check the remote copy equals it.

The load is planned first (`plan_load`: the objects to create, rows and bytes per table, what a
``--force`` would drop), then applied (`apply_load`) in SQLite's own order: tables (and
``sqlite_sequence``) first, then the rows in batches, then indexes, views and triggers (after the
data, so no trigger fires on a loaded row and no index is updated row by row), then each
AUTOINCREMENT counter and ``user_version``.

One transaction per batch, not one overall: a transaction stays open on the server between two
requests, and sqld and Turso end an interactive transaction that holds the write lock for long (and
any other writer waits for it). The target is required to be empty (no user object) instead, so a
failed load can be undone exactly: everything the load created is dropped, and the target is empty
again, as it was. ``--force`` first drops every user object (triggers, views, indexes, tables) in one
transaction; after that, a failed load leaves the target empty, not as it was before.

The verification reads every table back (keyset pages, bounded memory) and compares its row count and
a digest of its rows in rowid (or primary-key) order with the same digest of the restored file; the
digest is computed in Python over the typed values both sides return, so it does not depend on either
side's SQLite formatting values the same way."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import apsw
import xxhash

from dbre.errors import RestoreError, UsageError
from dbre.repository.tables import qident
from dbre.restore.connection import exact_floats
from dbre.restore.live import has_rowid, rowid_alias
from dbre.secrets import Secret

__all__ = ["HranaTarget", "LoadPlan", "LoadResult", "plan_load", "apply_load", "table_digests_local",
           "DEFAULT_BATCH_BYTES"]

DEFAULT_BATCH_BYTES = 1 << 20  # rows sent per request (and per transaction), by their size
_ROWS_PER_STATEMENT = 200  # rows of one multi-row INSERT (under SQLite's 32766 bound variables)
_PAGE_ROWS = 2000  # rows read back per request by the verification, at most,
_PAGE_BYTES = 2 << 20  # and about this many bytes (sqld's --max-response-size is 10 MB by default)
_TOKEN_HINT = "check LIBSQL_AUTH_TOKEN / TURSO_AUTH_TOKEN"

Progress = Callable[[int, int], None]


class HranaTarget:
    """A remote libSQL database over Hrana v2 (HTTP ``/v2/pipeline``), one stream per call.

    ``url``: libsql:// (https; ``?tls=0``: http), http(s)://, ws(s)://; ``namespace`` (sqld) is sent as
    ``x-namespace-bin``. Every method raises RestoreError with one line; the token is never in it."""

    def __init__(self, url: str, token: Secret | None, *, namespace: str | None = None,
                 timeout: float = 120.0) -> None:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        query = {k.lower(): v for k, v in parse_qsl(parts.query)}
        if scheme == "libsql":
            http = "http" if query.get("tls") == "0" else "https"
        elif scheme in ("http", "ws"):
            http = "http"
        elif scheme in ("https", "wss"):
            http = "https"
        else:
            raise UsageError(f"--into {self._public(url)}: not a libSQL URL", "use libsql://, https:// or http://")
        if not parts.hostname:
            raise UsageError(f"--into {self._public(url)}: no host", "e.g. libsql://mydb-org.turso.io")
        self.base_url = f"{http}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path.rstrip('/')}"
        self.label = self.base_url + (f" (namespace {namespace})" if namespace else "")
        url_token = query.get("authtoken")
        self._token = token or (Secret(url_token) if url_token else None)
        self.namespace = namespace
        self.timeout = timeout
        self.requests = 0
        self.sent_bytes = 0

    @staticmethod
    def _public(url: str) -> str:
        p = urlsplit(url)
        return f"{p.scheme}://{p.hostname or ''}{':' + str(p.port) if p.port else ''}{p.path}"

    def __repr__(self) -> str:
        return f"HranaTarget({self.label!r}, token={'set' if self._token else 'none'})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "dbre"}
        if self._token:
            value = self._token.reveal()
            headers["Authorization"] = "Bearer " + (value.decode() if isinstance(value, bytes) else value)
        if self.namespace:
            headers["x-namespace-bin"] = base64.b64encode(self.namespace.encode()).decode().rstrip("=")
        return headers

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body, separators=(",", ":")).encode()
        req = urllib.request.Request(self.base_url + "/v2/pipeline", data=data, headers=self._headers())
        self.requests += 1
        self.sent_bytes += len(data)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - the user's server
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                what = "refused the token" if self._token else "requires a token and none was given"
                raise RestoreError(f"load into {self.label}: the server {what} (HTTP {err.code})",
                                   _TOKEN_HINT) from None
            detail = err.read(300).decode("utf-8", "replace").strip()
            raise RestoreError(f"load into {self.label}: HTTP {err.code}: {self._scrub(detail)}",
                               "check the URL (and the namespace) names a database") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", None) or err
            raise RestoreError(f"load into {self.label}: cannot reach the server: {self._scrub(str(reason))}",
                               "check the URL and that the server is up") from None

    def _scrub(self, text: str) -> str:
        if self._token:
            value = self._token.reveal()
            tok = value.decode() if isinstance(value, bytes) else value
            text = text.replace(tok, "**redacted**")
        return " ".join(text.split())[:300]

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[list[Any]]:
        """One statement; its rows with values as SQLite has them (None, int, float, str, bytes)."""
        out = self._post({"baton": None, "requests": [
            {"type": "execute", "stmt": {"sql": sql, "args": [_value(a) for a in args]}}, {"type": "close"}]})
        res = out["results"][0]
        if res.get("type") != "ok":
            raise RestoreError(f"load into {self.label}: {sql.split(' ', 1)[0]}: {_error(res)}",
                               "see the server's log")
        return [[_py(v) for v in row] for row in res["response"]["result"]["rows"]]

    def transaction(self, stmts: Sequence[tuple[str, Sequence[Any]]], *, foreign_keys_off: bool = True) -> None:
        """Run the statements in one transaction (a Hrana batch: BEGIN, each on the previous one's
        success, COMMIT, else ROLLBACK); raises RestoreError naming the first that failed."""
        steps: list[dict[str, Any]] = []
        if foreign_keys_off:  # (a no-op inside a transaction: before BEGIN) rows load in table order
            steps.append({"stmt": {"sql": "PRAGMA foreign_keys=OFF"}})
        steps.append({"stmt": {"sql": "BEGIN"}})
        for sql, args in (exact_floats(sql, args) for sql, args in stmts):
            steps.append({"stmt": {"sql": sql, "args": [_value(a) for a in args]},
                          "condition": {"type": "ok", "step": len(steps) - 1}})
        commit = len(steps)
        steps.append({"stmt": {"sql": "COMMIT"}, "condition": {"type": "ok", "step": commit - 1}})
        steps.append({"stmt": {"sql": "ROLLBACK"},
                      "condition": {"type": "not", "cond": {"type": "ok", "step": commit}}})
        out = self._post({"baton": None, "requests": [{"type": "batch", "batch": {"steps": steps}},
                                                       {"type": "close"}]})
        res = out["results"][0]
        if res.get("type") != "ok":
            raise RestoreError(f"load into {self.label}: {_error(res)}", "see the server's log")
        result = res["response"]["result"]
        errors = result.get("step_errors") or []
        for i, err in enumerate(errors):
            if err is not None and i < commit + 1:
                sql = steps[i]["stmt"]["sql"]
                message = str(err.get("message", err))
                hint = ("a value is larger than the server takes in one request (sqld: about 5 MB): restore to a "
                        "file (--to) instead, or raise the server's limit" if "too big" in message.lower()
                        else "see the server's log")
                raise RestoreError(f"load into {self.label}: {sql[:80]}: {message}", hint)
        if result["step_results"][commit] is None:
            raise RestoreError(f"load into {self.label}: the transaction was not committed", "retry")

    def user_objects(self, also: Collection[str] = ()) -> list[tuple[str, str]]:
        """(type, name) of every user object (not sqlite_* nor libSQL's internal _litestream*/libsql_*, unless
        named in ``also``: a source's own table called libsql_meta is the load's, dropped and checked as any)."""
        rows = self.query("SELECT type, name FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
                          "ORDER BY rowid")
        return [(str(r[0]), str(r[1])) for r in rows
                if str(r[1]) in also or not str(r[1]).lower().startswith(("libsql_", "_litestream"))]


def _value(v: Any) -> dict[str, Any]:
    if v is None:
        return {"type": "null"}
    if isinstance(v, bool | int):
        return {"type": "integer", "value": str(int(v))}
    if isinstance(v, float):
        return {"type": "float", "value": v}
    if isinstance(v, bytes | bytearray | memoryview):
        return {"type": "blob", "base64": base64.b64encode(bytes(v)).decode()}
    return {"type": "text", "value": str(v)}


def _py(v: dict[str, Any]) -> Any:
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


def _error(res: dict[str, Any]) -> str:
    err = res.get("error") or {}
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


# --------------------------------------------------------------------------- the plan


@dataclass
class TablePlan:
    name: str
    sql: str
    columns: list[str]  # the stored columns an INSERT names (no generated ones)
    rowid: bool  # a rowid table whose rowid is loaded too (kept as it is)
    rows: int
    bytes: int  # the size of its values as sent (text as UTF-8, blobs raw, 8 a number)
    # the name its rowid is read by: rowid, or _rowid_ / oid when a column takes that name (None: WITHOUT ROWID,
    # or all three taken; its rows are then read in scan order)
    key: str | None = "rowid"


@dataclass
class LoadPlan:
    """What a load into ``target`` creates, in order, and what a --force drops first."""

    source: str  # what was restored (for the messages)
    tables: list[TablePlan]
    after: list[tuple[str, str, str]]  # (type, name, sql): indexes, views, triggers, in that order
    sequences: list[tuple[str, int]]
    user_version: int
    existing: list[tuple[str, str]]  # user objects in the target now
    force: bool
    batch_bytes: int = DEFAULT_BATCH_BYTES

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    @property
    def names(self) -> list[str]:
        """The names of everything the load creates."""
        return [t.name for t in self.tables] + [name for _, name, _ in self.after]

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.tables)

    def describe(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for kind, _, _ in self.after:
            kinds[kind] = kinds.get(kind, 0) + 1
        return {
            "source": self.source,
            "tables": [{"name": t.name, "rows": t.rows, "bytes": t.bytes} for t in self.tables],
            "indexes": kinds.get("index", 0), "views": kinds.get("view", 0), "triggers": kinds.get("trigger", 0),
            "sequences": dict(self.sequences), "user_version": self.user_version,
            "rows": self.rows, "bytes": self.bytes, "batch_bytes": self.batch_bytes,
            "drops_first": [{"type": k, "name": n} for k, n in self.existing] if self.force else [],
        }


def plan_load(conn: apsw.Connection, target: HranaTarget, *, force: bool, source: str,
              batch_bytes: int = DEFAULT_BATCH_BYTES, new: bool = False) -> LoadPlan:
    """Read the restored file's schema and sizes and the target's user objects; refuses a non-empty
    target without ``force`` (UsageError: nothing changed). ``new``: the target does not exist yet
    (a namespace the load creates), so it holds nothing."""
    schema = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE sql IS NOT NULL "
                          "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY rowid").fetchall()
    existing = [] if new else target.user_objects(also=[str(r[1]) for r in schema])
    if existing and not force:
        names = ", ".join(n for _, n in existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        raise UsageError(f"restore into {target.label}: the target is not empty ({len(existing)} user objects: "
                         f"{names})", "load into an empty database, or pass --force to drop everything in it first")
    tables: list[TablePlan] = []
    after: dict[str, list[tuple[str, str, str]]] = {"index": [], "view": [], "trigger": []}
    for kind, name, _tbl, sql in schema:
        if kind == "table":
            if str(sql).upper().startswith("CREATE VIRTUAL"):
                raise UsageError(f"restore into {target.label}: {name} is a virtual table",
                                 "a remote load copies ordinary tables only; restore to a file (--to)")
            tables.append(_table_plan(conn, str(name), str(sql)))
        else:
            after[str(kind)].append((str(kind), str(name), str(sql)))
    sequences: list[tuple[str, int]] = []
    if conn.execute("SELECT 1 FROM sqlite_schema WHERE name='sqlite_sequence'").fetchone():
        sequences = [(str(n), int(s)) for n, s in conn.execute("SELECT name, seq FROM sqlite_sequence")]
    (user_version,) = conn.execute("PRAGMA user_version").fetchone()  # type: ignore[misc]
    return LoadPlan(source, tables, after["index"] + after["view"] + after["trigger"], sequences,
                    int(user_version), existing, force, batch_bytes)


def _table_plan(conn: apsw.Connection, name: str, sql: str) -> TablePlan:
    info = conn.execute(f"PRAGMA table_xinfo({qident(name)})").fetchall()
    columns = [str(r[1]) for r in info if r[6] == 0]
    pks = [r for r in info if r[5]]
    alias = len(pks) == 1 and str(pks[0][2]).upper() == "INTEGER"  # (the rowid is that column: loaded with it)
    key = rowid_alias(str(r[1]) for r in info) if has_rowid(conn, name) else None
    rowid = key is not None and not alias
    sizes = "+".join(f"CASE typeof({qident(c)}) WHEN 'text' THEN length(CAST({qident(c)} AS BLOB)) "
                     f"WHEN 'blob' THEN length({qident(c)}) WHEN 'null' THEN 0 ELSE 8 END" for c in columns) or "0"
    rows, size = conn.execute(f"SELECT count(*), total({sizes}) FROM {qident(name)}").fetchone()  # type: ignore[misc]
    return TablePlan(name, sql, columns, rowid, int(rows), int(size), key)


# --------------------------------------------------------------------------- the load


@dataclass
class TableCheck:
    name: str
    rows: int
    remote_rows: int
    digest: str
    remote_digest: str

    @property
    def equal(self) -> bool:
        return self.rows == self.remote_rows and self.digest == self.remote_digest


@dataclass
class LoadResult:
    plan: LoadPlan
    seconds: float = 0.0
    load_seconds: float = 0.0
    verify_seconds: float = 0.0
    batches: int = 0
    dropped: int = 0
    checks: list[TableCheck] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return all(c.equal for c in self.checks)

    def summary(self) -> dict[str, Any]:
        rate = self.load_seconds or 1e-9
        return {**self.plan.describe(), "seconds": round(self.seconds, 3), "load_seconds": round(self.load_seconds, 3),
                "verify_seconds": round(self.verify_seconds, 3), "batches": self.batches, "dropped": self.dropped,
                "rows_per_second": round(self.plan.rows / rate),
                "mib_per_second": round(self.plan.bytes / rate / 2**20, 2),
                "equal": self.equal,
                "checks": [{"table": c.name, "rows": c.rows, "remote_rows": c.remote_rows, "digest": c.digest,
                            "remote_digest": c.remote_digest, "equal": c.equal} for c in self.checks]}


def apply_load(conn: apsw.Connection, target: HranaTarget, plan: LoadPlan,
               progress: Progress | None = None) -> LoadResult:
    """Drop what --force replaces, create and fill the tables in batches, add the rest of the schema,
    then verify. A failure after the first creation drops everything the load created (the target is
    empty again) and raises RestoreError saying so."""
    started = time.perf_counter()
    result = LoadResult(plan)
    if plan.force:
        now = target.user_objects(also=plan.names)  # (again: what is there now, not what was planned)
        if now:
            target.transaction(_drops(now))
            result.dropped = len(now)
    elif target.user_objects(also=plan.names):
        raise RestoreError(f"restore into {target.label}: the target is no longer empty", "nothing was loaded")
    try:
        target.transaction([(t.sql, ()) for t in plan.tables])
        done = 0
        for stmts, rows in _batches(conn, plan):
            target.transaction(stmts)
            result.batches += 1
            done += rows
            if progress:
                progress(done, plan.rows)
        tail: list[tuple[str, Sequence[Any]]] = [(sql, ()) for _, _, sql in plan.after]
        for name, seq in plan.sequences:
            tail += [("DELETE FROM sqlite_sequence WHERE name=?", (name,)),
                     ("INSERT INTO sqlite_sequence(name, seq) VALUES (?, ?)", (name, seq))]
        target.transaction(tail)
        # (always: a --force over a target whose user_version was 42 must leave the snapshot's 0)
        target.query(f"PRAGMA user_version={int(plan.user_version)}")
        result.load_seconds = time.perf_counter() - started
    except BaseException as err:
        undo = _undo(target, plan.names)
        if isinstance(err, RestoreError):
            raise RestoreError(f"{err.message}; {undo}", err.hint) from None
        raise
    verify_started = time.perf_counter()
    local = table_digests_local(conn, plan.tables)
    try:
        for t in plan.tables:
            rows, digest = local[t.name]
            remote_rows, remote_digest = table_digest_remote(target, t)
            result.checks.append(TableCheck(t.name, rows, remote_rows, digest, remote_digest))
    except RestoreError as err:  # (the load is complete: what is there must be said, not "nothing changed")
        raise RestoreError(f"{err.message}; every row was loaded and committed, but the check after the load "
                           "did not finish: the target holds the whole load, unchecked",
                           "run the same restore with --force to load and check it again") from None
    result.verify_seconds = time.perf_counter() - verify_started
    result.seconds = time.perf_counter() - started
    return result


def _drops(objects: Sequence[tuple[str, str]]) -> list[tuple[str, Sequence[Any]]]:
    order = {"trigger": 0, "view": 1, "index": 2, "table": 3}
    out: list[tuple[str, Sequence[Any]]] = []
    for kind, name in sorted(objects, key=lambda o: order.get(o[0], 4)):
        if kind == "index" and any(k == "table" for k, _ in objects):
            continue  # (dropped with its table; an index on a table kept would be listed with it anyway)
        out.append((f"DROP {kind.upper()} IF EXISTS {qident(name)}", ()))
    return out


def _undo(target: HranaTarget, names: Collection[str] = ()) -> str:
    """Drop every user object (the target was empty before the load): the words that say what happened."""
    try:
        objects = target.user_objects(also=names)
        if objects:
            target.transaction(_drops(objects))
    except RestoreError as err:
        return f"dropping what was loaded failed too ({err.message}): the target holds a partial load, delete it"
    return "what was loaded was dropped: the target is empty"


def _batches(conn: apsw.Connection, plan: LoadPlan) -> Iterator[tuple[list[tuple[str, Sequence[Any]]], int]]:
    """(statements, rows) of about ``plan.batch_bytes`` each, table by table in rowid (or key) order."""
    stmts: list[tuple[str, Sequence[Any]]] = []
    size = rows = 0
    for t in plan.tables:
        cols = ([t.key] if t.rowid and t.key else []) + t.columns
        select = ", ".join(qident(c) for c in cols)
        order = f" ORDER BY {t.key}" if t.key else ""
        head = f"INSERT INTO {qident(t.name)} ({select}) VALUES "
        one = "(" + ", ".join("?" * len(cols)) + ")"
        per = max(1, min(_ROWS_PER_STATEMENT, 30000 // max(1, len(cols))))
        pending: list[Any] = []
        n = 0
        for row in conn.execute(f"SELECT {select} FROM {qident(t.name)}{order}"):
            pending.extend(row)
            n += 1
            size += sum(_size(v) for v in row)
            if n == per or size >= plan.batch_bytes:
                stmts.append((head + ", ".join([one] * n), pending))
                rows += n
                pending, n = [], 0
            if size >= plan.batch_bytes:
                yield stmts, rows
                stmts, size, rows = [], 0, 0
        if n:
            stmts.append((head + ", ".join([one] * n), pending))
            rows += n
    if stmts:
        yield stmts, rows


def _size(v: Any) -> int:
    if isinstance(v, str):
        return len(v.encode("utf-8", "surrogatepass"))
    if isinstance(v, bytes):
        return len(v) * 4 // 3  # (base64 on the wire)
    return 8


# --------------------------------------------------------------------------- the verification


def _update(h: Any, row: Sequence[Any]) -> None:
    for v in row:
        if v is None:
            h.update(b"n")
        elif isinstance(v, int):
            h.update(b"i" + str(v).encode())
        elif isinstance(v, float):
            h.update(b"f" + repr(v).encode())
        elif isinstance(v, bytes):
            h.update(b"b" + len(v).to_bytes(8, "little") + v)
        else:
            b = str(v).encode("utf-8", "surrogatepass")
            h.update(b"t" + len(b).to_bytes(8, "little") + b)
    h.update(b"\x1e")


def table_digests_local(conn: apsw.Connection, tables: Sequence[TablePlan]) -> dict[str, tuple[int, str]]:
    """(rows, digest) of each table of a local file: xxh3-128 over its typed values in rowid (or key) order."""
    out = {}
    for t in tables:
        h = xxhash.xxh3_128()
        n = 0
        select = ", ".join(qident(c) for c in t.columns) or "1"
        order = f" ORDER BY {t.key}" if t.key else ""
        for row in conn.execute(f"SELECT {select} FROM {qident(t.name)}{order}"):
            _update(h, row)
            n += 1
        out[t.name] = (n, h.hexdigest())
    return out


def table_digest_remote(target: HranaTarget, t: TablePlan) -> tuple[int, str]:
    """The same digest of the remote table, read in keyset pages of rowid (OFFSET pages for WITHOUT ROWID)."""
    h = xxhash.xxh3_128()
    n = 0
    select = ", ".join(qident(c) for c in t.columns) or "1"
    # pages of about _PAGE_BYTES by the table's mean row (blobs come back as base64, text as JSON)
    per = max(1, min(_PAGE_ROWS, _PAGE_BYTES * max(1, t.rows) // max(1, 2 * t.bytes)))
    if t.key is None:
        while True:
            page = target.query(f"SELECT {select} FROM {qident(t.name)} LIMIT {per} OFFSET {n}")
            for row in page:
                _update(h, row)
            n += len(page)
            if len(page) < per:
                break
    else:
        last: int | None = None
        while True:
            where = "" if last is None else f" WHERE {t.key} > ?"
            page = target.query(f"SELECT {t.key}, {select} FROM {qident(t.name)}{where} ORDER BY {t.key} "
                                f"LIMIT {per}", () if last is None else (last,))
            for row in page:
                _update(h, row[1:])
            n += len(page)
            if len(page) < per:
                break
            last = int(page[-1][0])
    return n, h.hexdigest()


# --------------------------------------------------------------------------- from a repository


def restore_scratch(repo: Any, db: str, path: Any, *, snapshot: str | None, at: Any,
                    newest_snapshot: bool = False) -> str:
    """Restore ``db`` (a snapshot, or the state at ``at``, or the newest) to the new file ``path`` as
    `dbre restore --to` would; returns what was restored, in words."""
    from dbre.repository.manifest import iso
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.restore.pitr import apply_pitr, plan_pitr

    if not snapshot and not newest_snapshot:
        pitr = plan_pitr(repo, db, path, at=at)
        if pitr is not None:
            s = apply_pitr(repo, pitr).summary()
            return f"{db} at {iso(at) if at else 'its newest replicated state'} (last txid {s['last_txid']})"
    plan = plan_restore(repo, db, path, snapshot=snapshot, at=at)
    apply_restore(repo, plan)
    return f"snapshot {plan.manifest.id} of {db} (taken {plan.manifest.taken_at})"
