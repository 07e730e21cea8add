"""What table and row restores share: the past state they read, the live database, audit records.

The past state (a snapshot, or a replicated point with ``--at``) is read in place: through the
read-only VFS over the repository that `dbre sql` uses (dbre.restore.query), which fetches only the
pages a statement touches and checks each against its keyed hash, under the repository's shared lock
held from the plan to the end of the apply (checked live again before an apply writes anything: a plan
kept past the lock's stale limit is planned again). It is attached read-only to the live connection,
and the rows to write are staged from it into a private temporary database before the write lock (the
application's writers never wait on a repository read), then moved inside one SQLite transaction. A
damaged or missing page, or a store that gives up, fails the statement that reads it: in the plan or
the apply, nothing is written.

One case still restores a scratch copy first (`restore_to_scratch`): a repository read through
offsite copies (``--fallback``). There a damaged object is re-read from the copy and the whole read
starts again (fallback.py), which a write transaction half way through cannot do; the copy is
restored whole, every page checked, before the live database is touched.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import apsw

from dbre.errors import DbreError, RepositoryError, RestoreError, UsageError
from dbre.repository.fallback import FallbackRepository
from dbre.repository.manifest import Manifest, check_db_name, iso, now_utc
from dbre.repository.repo import TOOL, Repository
from dbre.repository.tables import qident
from dbre.restore.full import apply_restore, plan_restore

BUSY_TIMEOUT_MS = 10_000  # wait this long for other writers of the live database
SNAPSHOT_SCHEMA = "dbre_snapshot"  # the name the past state is attached under
_MAGIC = b"SQLite format 3\x00"
# one SQL token: blanks, a comment, a quoted name or string (whole, or to the end when unclosed),
# a word, or one other character
SQL_TOKEN = re.compile(r"""\s+ | --[^\n]* | /\*.*?(?:\*/|$) | "(?:[^"]|"")*"? | `(?:[^`]|``)*`? | \[[^\]]*\]?
                           | '(?:[^']|'')*'? | \w+ | .""", re.S | re.X)
AUDITS = "audits"  # the record kind of audit records: records/audits/<db>/<id>
_REMOTE = ("libsql://", "http://", "https://", "ws://", "wss://")


def is_remote(live: str | os.PathLike[str]) -> bool:
    return str(live).startswith(_REMOTE)


def check_live_file(live: str | os.PathLike[str], operation: str) -> Path:
    """The live database's path, once it is known to be a SQLite file; UsageError otherwise."""
    if is_remote(live):
        raise UsageError(f"{operation}: remote databases are not supported yet ({_redact(str(live))})",
                         "restore the whole database to a file with `dbre restore`, or give a local file")
    path = Path(live).expanduser().absolute()
    if not path.is_file():
        raise UsageError(f"{operation}: live database {path} is not a file", "check --live")
    with open(path, "rb") as f:
        head = f.read(16)
    if head != _MAGIC:
        raise UsageError(f"{operation}: {path} is not a SQLite database", "check --live")
    return path


def _redact(url: str) -> str:
    return url.split("?", 1)[0]


class PastCopy(Protocol):
    """The past state a table or row restore reads: ``connect()`` a read-only connection to it,
    ``attach()`` it read-only to the live connection as ``dbre_snapshot``, ``close()`` when done."""

    @property
    def manifest(self) -> Manifest: ...

    def connect(self) -> apsw.Connection: ...

    def attach(self, conn: apsw.Connection) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def check_alive(self, what: str) -> None: ...

    def settle(self) -> None: ...

    def close(self) -> None: ...


class InPlace:
    """A past state read in place through the repository's VFS (dbre.restore.query.PastState)."""

    def __init__(self, repo: Repository, db: str, operation: str, *, snapshot: str | None = None,
                 at: datetime | None = None) -> None:
        from dbre.restore.query import PastState

        # no choice: the newest snapshot (the newest replicated state is the live database, mistakes and all)
        self.past = PastState(repo, db, operation, snapshot=snapshot or (None if at else "latest"), at=at)

    @property
    def manifest(self) -> Manifest:
        return self.past.manifest

    @property
    def stats(self) -> Any:
        """What was read from the repository so far (dbre.restore.query.FetchStats)."""
        return self.past.stats

    def connect(self) -> apsw.Connection:
        return self.past.connect()

    def attach(self, conn: apsw.Connection) -> None:
        conn.execute(f"ATTACH DATABASE ? AS {SNAPSHOT_SCHEMA}", (self.past.uri,))

    def describe(self) -> dict[str, Any]:
        """The state (its replicated point, if any) and what reading it has cost."""
        s = self.past.state
        out: dict[str, Any] = {"read": "in place", "repository_reads": self.past.stats.describe()}
        if s.point is not None:
            out.update(generation=s.point.generation.id, transactions=s.transactions, last_txid=s.last_txid,
                       last_committed=s.last_committed)
        return out

    def check_alive(self, what: str) -> None:
        """LockLostError unless the shared lock taken with the plan is still live (refreshed now): a plan
        kept past the lock's stale limit (a paused VM) may have had the packs it reads pruned meanwhile."""
        self.past.lock.check_alive(what, consequence="nothing was changed",
                                   hint="plan again: the plan was kept too long before its apply")

    def settle(self) -> None:
        """End the reads in flight (a read-ahead): called before the live write lock."""
        self.past.source.settle()

    def close(self) -> None:
        self.past.close()


@dataclass
class Scratch:
    """A snapshot restored into a private temp folder; ``close()`` removes it."""

    manifest: Manifest
    folder: Path
    path: Path

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def connect(self) -> apsw.Connection:
        return apsw.Connection(str(self.path), flags=apsw.SQLITE_OPEN_READWRITE)

    def attach(self, conn: apsw.Connection) -> None:
        """Attach the copy read-only as ``dbre_snapshot`` (outside any transaction)."""
        conn.execute(f"ATTACH DATABASE ? AS {SNAPSHOT_SCHEMA}", (self.path.as_uri() + "?mode=ro",))

    def describe(self) -> dict[str, Any]:
        return {"read": "scratch copy"}

    def check_alive(self, what: str) -> None:
        """Nothing to check: the copy was restored whole, every page checked, and holds no lock."""

    def settle(self) -> None:
        """Nothing in flight: the copy is a local file."""


def open_past(repo: Repository, db: str, operation: str, *, snapshot: str | None = None,
              at: datetime | None = None, scratch_dir: str | os.PathLike[str] | None = None) -> PastCopy:
    """The state a table or row restore reads: ``snapshot`` (an id prefix), else the state at ``at`` (a
    replicated point when segments hold it better than a snapshot, as `restore --at`), else the newest
    snapshot. Read in place, except through offsite copies (``--fallback``): a scratch copy of the
    snapshot (``at``: the newest snapshot at or before it), as the module docstring says."""
    check_db_name(db)
    if isinstance(repo, FallbackRepository):
        return restore_to_scratch(repo, db, snapshot=snapshot, at=at, scratch_dir=scratch_dir)
    return InPlace(repo, db, operation, snapshot=snapshot, at=at)


class PastPlan:
    """A plan holding the past state open: use it in a ``with`` block, or call ``close()``."""

    past: PastCopy

    @property
    def manifest(self) -> Manifest:
        return self.past.manifest

    def close(self) -> None:
        self.past.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def restore_to_scratch(repo: Repository, db: str, *, snapshot: str | None = None, at: datetime | None = None,
                       scratch_dir: str | os.PathLike[str] | None = None) -> Scratch:
    """Restore the snapshot (an id prefix, the newest at ``at``, or the newest) into a temp folder."""
    check_db_name(db)
    manifest = repo.find_snapshot(db, snapshot, at)
    if scratch_dir is not None:
        Path(scratch_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"dbre-scratch-{db}-", dir=scratch_dir))
    scratch = Scratch(manifest, folder, folder / f"{db}.db")
    try:
        with repo.read_lock(f"restore {db} to scratch"):  # shared: keeps a prune from removing packs mid-restore
            apply_restore(repo, plan_restore(repo, db, scratch.path, snapshot=manifest.id))
        conn = scratch.connect()
        try:
            # a rollback-journal copy can be attached read-only; a WAL one would need its -shm
            conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            conn.close()
    except BaseException:
        scratch.close()
        raise
    return scratch


def open_live(path: Path) -> apsw.Connection:
    """A read-write connection to the live file that waits for other writers up to BUSY_TIMEOUT_MS."""
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    except apsw.Error as err:
        raise RestoreError(f"live database {path}: cannot open ({err})", "check the file and its permissions") from err
    return conn


@contextmanager
def write_transaction(live: Path, past: PastCopy, stage: Callable[[apsw.Connection], None] | None = None
                      ) -> Iterator[apsw.Connection]:
    """A live connection with foreign keys off (checked by hand), the past state attached, BEGIN IMMEDIATE.

    ``stage(conn)`` runs before BEGIN IMMEDIATE, the past state attached: what it reads from the repository
    (network reads, retried for up to minutes when the store fails) does not hold the application's writers.
    Commits when the block ends normally, rolls back otherwise."""
    conn = open_live(live)
    try:
        conn.execute("PRAGMA foreign_keys=OFF")  # a DROP TABLE must not cascade into other tables
        past.attach(conn)
        if stage is not None:
            stage(conn)
            past.settle()  # a read-ahead the staging started ends before the write lock, not under it
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            raise
    except apsw.BusyError as err:
        raise RestoreError(f"live database {live} stayed locked by another writer ({err})",
                           "try again when it is quieter; nothing was changed") from err
    finally:
        conn.close()


def rolled_back(err: RepositoryError, where: str) -> RepositoryError:
    """``err`` (the past state could not be read: a damaged or missing object, a store that gave up) as an
    apply says it: the operation and live database named, and that nothing was changed; its class kept (a
    transient one may be retried: nothing was written)."""
    return type(err)(f"{where}: {err.message}; rolled back, nothing was changed", err.hint)


def stored_columns(conn: apsw.Connection, table: str, schema: str = "main") -> list[str]:
    """The columns a row stores (generated columns left out), in table order."""
    rows = conn.execute("SELECT name, hidden FROM pragma_table_xinfo(?, ?) ORDER BY cid", (table, schema))
    return [str(r[0]) for r in rows if r[1] == 0]


def rowid_alias(columns: Iterable[str]) -> str | None:
    """A name for the rowid that no column shadows, or None when all three are columns."""
    taken = {c.lower() for c in columns}
    return next((a for a in ("rowid", "_rowid_", "oid") if a not in taken), None)


def has_rowid(conn: apsw.Connection, table: str, schema: str = "main") -> bool:
    row = conn.execute("SELECT wr FROM pragma_table_list WHERE schema=? AND name=?", (schema, table)).fetchone()
    return row is not None and not row[0]


def table_names(conn: apsw.Connection, schema: str = "main") -> dict[str, str]:
    """Ordinary tables of ``schema`` by lower-cased name (SQLite names are case-insensitive)."""
    rows = conn.execute("SELECT name FROM pragma_table_list WHERE schema=? AND type='table' "
                        "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'", (schema,))
    return {str(r[0]).lower(): str(r[0]) for r in rows}


def referencing_tables(conn: apsw.Connection, parents: Iterable[str]) -> set[str]:
    """Tables of main whose foreign keys point at any of ``parents``."""
    wanted = {p.lower() for p in parents}
    out = set()
    for name in table_names(conn).values():
        for (parent,) in conn.execute("SELECT \"table\" FROM pragma_foreign_key_list(?, 'main')", (name,)):
            if str(parent).lower() in wanted:
                out.add(name)
    return out


Violation = tuple[str, Any, str, int]  # PRAGMA foreign_key_check's row: table, rowid, parent, foreign key id


def fk_violations(conn: apsw.Connection, tables: Iterable[str]) -> Counter[Violation]:
    """The rows ``PRAGMA foreign_key_check`` reports in ``tables`` of main (tables that do not exist are skipped)."""
    names = table_names(conn)
    out: Counter[Violation] = Counter()
    for t in sorted(set(tables), key=str.lower):
        name = names.get(t.lower())
        if name is not None:
            out.update(violation(r) for r in conn.execute("SELECT * FROM pragma_foreign_key_check(?, 'main')",
                                                           (name,)))
    return out


def violation(row: Any) -> Violation:
    return (str(row[0]), row[1], str(row[2]), int(row[3]))


def new_fk_violations(before: Counter[Violation], after: Counter[Violation]) -> dict[str, int]:
    """New violations per table: rows reported after and not before, so a violation the change fixes
    does not hide one it makes (rows of a WITHOUT ROWID table, reported without a rowid, are counted)."""
    out: dict[str, int] = {}
    for (table, *_), n in (after - before).items():
        out[table] = out.get(table, 0) + n
    return out


def fk_message(new: dict[str, int]) -> str:
    return ", ".join(f"{n} in {qident(t)}" for t, n in sorted(new.items()))


def unknown_table(operation: str, manifest: Manifest, missing: list[str], known: Iterable[str]) -> UsageError:
    names = ", ".join(sorted(k for k in known if not k.startswith("sqlite_"))) or "none"
    return UsageError(f"{operation}: no table {', '.join(map(repr, missing))} in snapshot {manifest.id} of "
                      f"{manifest.db} (taken {manifest.taken_at})",
                      f"its tables: {names}; pick another snapshot with --snapshot or --at (`dbre snapshots`)")


def manifest_tables(manifest: Manifest) -> list[str]:
    """The table names the manifest's schema lists (empty for old manifests without a schema)."""
    return [str(s["name"]) for s in manifest.schema if s.get("type") == "table"]


def rollback(conn: apsw.Connection) -> None:
    if not conn.in_transaction:
        return
    try:
        conn.execute("ROLLBACK")
    except apsw.Error:
        pass  # SQLite rolled back already (e.g. after an I/O error)


def actor() -> str:
    """Who runs this, for the audit record: the OS user on this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


def write_audit(repo: Repository, db: str, record: dict[str, Any], who: str | None = None) -> str:
    """Store the audit record of a change to a live database; returns its id.

    The change is committed by then: a failure here is reported as such, never as a failed restore.
    """
    full = {"time": iso(now_utc()), "who": who or actor(), "tool": TOOL, **record}
    try:
        return repo.put_record(AUDITS, db, full)
    except (DbreError, OSError) as err:
        why = err.message if isinstance(err, DbreError) else str(err)
        # not chained: a retry that saw a transient cause would apply the change a second time
        raise DbreError(f"{record.get('operation')}: applied to {record.get('live')}, but the audit record "
                        f"could not be written ({why})", "the change stands; note it by hand") from None


def read_audits(repo: Repository, db: str | None = None, last: int | None = None) -> list[dict[str, Any]]:
    """Audit records (of ``db``, or of every database), oldest first; only the ``last`` newest when given.

    Read as ``Repository.records`` reads them (sealed JSON named by time), listing first so that
    only the records shown are fetched. Each gets its "record_id" and "db"."""
    keys = _audit_keys(repo, db)
    out = []
    for key in keys[-last:] if last else keys:
        try:
            out.append(_read_audit(repo, key))
        except (RepositoryError, ValueError) as err:  # (damaged: shown as such, the others still listed)
            _, _, kdb, rec_id = key.split("/", 3)
            why = err.message if isinstance(err, RepositoryError) else f"not a record ({err})"
            out.append({"record_id": rec_id, "db": kdb, "damaged": why})
    return out


def find_audit(repo: Repository, record_id: str, db: str | None = None) -> dict[str, Any]:
    """The audit record whose id is ``record_id`` or starts with it; UsageError when none or several."""
    wanted = record_id.strip()
    matches = [k for k in _audit_keys(repo, db) if wanted and k.rsplit("/", 1)[1].startswith(wanted)]
    if len(matches) != 1:
        where = f" of {db}" if db else ""
        if not matches:
            raise UsageError(f"audit: no audit record{where} has the id {record_id!r}",
                             "list them with `dbre audit --repo R`")
        raise UsageError(f"audit: {len(matches)} audit records{where} have ids starting {record_id!r}",
                         "give more of the id")
    return _read_audit(repo, matches[0])


def _audit_keys(repo: Repository, db: str | None) -> list[str]:
    if db is not None:
        check_db_name(db)
    prefix = f"records/{AUDITS}/{db}/" if db else f"records/{AUDITS}/"
    return sorted(repo.store.list(prefix), key=lambda k: k.rsplit("/", 1)[1])


def _read_audit(repo: Repository, key: str) -> dict[str, Any]:
    from dbre.storage.base import RECORD_CAP, get_capped

    record = json.loads(repo.sealer.unseal(get_capped(repo.store, key, RECORD_CAP, "record"), key))
    _, _, db, rec_id = key.split("/", 3)
    return {"record_id": rec_id, **record, "db": record.get("db", db)}


def show_value(v: Any, width: int = 40) -> str:
    """A short display form of a stored value: NULL, numbers, text cut at ``width``, blobs as x'..'."""
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        text = "x'" + v[: width // 2].hex() + ("…'" if len(v) > width // 2 else "'")
        return text
    text = str(v)
    return text if len(text) <= width else text[: width - 1] + "…"
