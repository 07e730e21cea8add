"""Export one table of a past state of a database to Parquet or CSV, streamed from the repository without a restore.

The rows are read through the read-only query VFS (dbre/restore/query.py: only the pages the table's scan
touches are fetched, under the repository's shared lock) and written in batches (at most ``BATCH_ROWS`` rows
or about ``BATCH_BYTES`` of values each: one Parquet row group, or CSV lines), so memory holds one batch and
the query's bounded caches whatever the table's size. The file is written beside the target under a temporary
name, synced and renamed at the end: a failure leaves nothing at the target.

Parquet column types come from the declared types by SQLite's affinity rules (INTEGER -> int64, REAL ->
double, TEXT -> string, BLOB -> binary); a NUMERIC column or one without a type takes the type of its
values. SQLite is dynamically typed: a column holding values its type cannot hold exactly falls back to
string (or binary when it holds blobs) and the export starts again with that type (the rows read again),
said through ``warn``. CSV has a header line; NULL is an empty field, blobs are hex.
"""

from __future__ import annotations

import csv
import errno
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from pathlib import Path
from typing import Any

import apsw
import apsw.ext

from dbre.errors import DbreError, RestoreError, UsageError
from dbre.repository.repo import Repository
from dbre.restore.query import CACHE_BYTES, FetchStats, QueryState, open_query

FORMATS = ("parquet", "csv")
BATCH_ROWS = 65536  # rows per batch (a Parquet row group)
BATCH_BYTES = 32 * 1024 * 1024  # a batch ends sooner when its values reach this (rows of large blobs)
CHUNK_ROWS = 1024  # rows taken from the cursor at a time
PROGRESS_ROWS = 8192  # progress is reported every this many rows, about
_SAMPLE = 8  # a batch's size is estimated from every this-many-th row

# Arrow types, in the order an inferred column widens (a declared one falls back to string or binary)
_ORDER = ("int64", "double", "string", "binary")
_EXACT = 2**53  # the largest integer a double holds exactly


@dataclass
class Column:
    """One column of the table: its name, its declared type, and the Arrow type it is written as."""

    name: str
    declared: str
    affinity: str  # SQLite's: INTEGER, REAL, TEXT, BLOB or NUMERIC
    arrow: str | None = None  # None until the first batch for a column whose type comes from its values

    @property
    def inferred(self) -> bool:
        """Whether the type comes from the values (NUMERIC, or no declared type), not the declaration."""
        return self.affinity == "NUMERIC" or not self.declared


@dataclass
class ExportResult:
    """What an export wrote, from which state, and what reading it cost."""

    state: QueryState
    table: str
    fmt: str
    out: Path
    columns: list[Column]
    rows: int
    bytes_written: int
    seconds: float
    stats: FetchStats
    fallbacks: dict[str, str] = field(default_factory=dict)  # column -> what it fell back to, as said
    restarts: int = 0

    def describe(self) -> dict[str, Any]:
        return {**self.state.describe(), **self.stats.describe(), "table": self.table, "format": self.fmt,
                "out": str(self.out), "rows": self.rows, "bytes_written": self.bytes_written,
                "seconds": round(self.seconds, 3), "restarts": self.restarts, "fallbacks": self.fallbacks,
                "columns": {c.name: c.arrow or "text" for c in self.columns}}


def affinity(declared: str | None) -> str:
    """SQLite's type affinity of a declared column type (https://sqlite.org/datatype3.html, 3.1)."""
    t = (declared or "").upper()
    if "INT" in t:
        return "INTEGER"
    if "CHAR" in t or "CLOB" in t or "TEXT" in t:
        return "TEXT"
    if "BLOB" in t or not t:
        return "BLOB"
    if "REAL" in t or "FLOA" in t or "DOUB" in t:
        return "REAL"
    return "NUMERIC"


_DECLARED_ARROW = {"INTEGER": "int64", "REAL": "double", "TEXT": "string", "BLOB": "binary"}


def check_target(out: Path, fmt: str, force: bool) -> None:
    """Options checked before any request: the format, and a target that can be written (its directory
    exists; an existing file only with ``force``; never a directory). UsageError otherwise."""
    if fmt not in FORMATS:
        raise UsageError(f"export: --format {fmt!r} is not a format", "use parquet or csv")
    if out.is_dir():
        raise UsageError(f"export: --out {out} is a directory", "name a file to write")
    if not out.parent.is_dir():
        if out.parent.exists():
            raise UsageError(f"export: --out {out}: {out.parent} is a file, not a directory",
                             "name a file in a directory")
        raise UsageError(f"export: --out {out}: directory {out.parent} does not exist", "create it first")
    if out.exists() and not force:
        raise UsageError(f"export: --out {out} exists", "pass --force to replace it, or choose another file")


class _Widen(Exception):
    """A batch held values a column's type cannot hold: the export starts again with wider types."""


def export_table(repo: Repository, db: str, table: str, out: Path, fmt: str, *, snapshot: str | None = None,
                 at: datetime | None = None, txid: int | None = None, force: bool = False,
                 batch_rows: int = BATCH_ROWS, batch_bytes: int = BATCH_BYTES, cache_bytes: int = CACHE_BYTES,
                 progress: Callable[[int, int], None] | None = None,
                 warn: Callable[[str], None] | None = None) -> ExportResult:
    """Write table ``table`` of the state of ``db`` that `restore` would restore with the same ``snapshot`` /
    ``at`` / ``txid`` to ``out`` as ``fmt`` (parquet or csv), streamed in batches. With ``progress``, the
    table's rows are counted first (a scan of it) and ``progress(done, total)`` is called as rows are
    written. A table the state does not have is a UsageError naming the ones it has; an existing ``out``
    without ``force`` too (checked first and again at the rename, which never replaces it then)."""
    out = Path(out)
    check_target(out, fmt, force)
    started = time.perf_counter()
    with open_query(repo, db, snapshot=snapshot, at=at, txid=txid, cache_bytes=cache_bytes,
                    operation="export") as session:
        conn = session.conn
        name, kind = _find_table(conn, table)
        try:
            columns = _columns(conn, name)
        except apsw.SQLError as err:  # (a view over a table that is gone, a virtual table's missing module)
            raise UsageError(f"export: {kind} {name!r} cannot be read: {err}", "export one of its tables"
                             ) from None
        total = 0
        if progress is not None:
            count: Any = conn.execute(f"SELECT count(*) FROM {_quote(name)}").get
            total = int(count)
            progress(0, total)
        sql = f"SELECT * FROM {_quote(name)}"
        result = ExportResult(session.state, name, fmt, out, columns, 0, 0, 0.0, session.stats)
        with _atomic(out, force) as tmp:
            while True:
                rows = conn.execute(sql)
                try:
                    if fmt == "csv":
                        result.rows = _write_csv(tmp, columns, rows, batch_rows, batch_bytes, progress, total)
                    else:
                        result.rows = _write_parquet(tmp, columns, rows, batch_rows, batch_bytes, progress, total,
                                                     result.fallbacks, warn)
                    break
                except _Widen:
                    result.restarts += 1
                except UnicodeDecodeError:
                    raise DbreError(f"export: table {name!r} holds text that is not valid UTF-8, which cannot be "
                                    "written as text", "read that column with `dbre sql` as CAST(column AS BLOB)"
                                    ) from None
                finally:
                    rows.close()
            result.bytes_written = tmp.stat().st_size
    result.seconds = time.perf_counter() - started
    if kind == "view":
        result.table = f"{name} (a view)"
    return result


# -- the table -------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _find_table(conn: Any, table: str) -> tuple[str, str]:
    """The table (or view) named ``table`` (as SQLite matches names: ASCII case does not matter) and its
    kind; UsageError naming the tables the state has."""
    found = [(r[1], r[2]) for r in conn.execute("PRAGMA table_list") if r[0] == "main"]
    for name, kind in found:
        if name == table:
            return name, kind
    for name, kind in found:
        if name.lower() == table.lower() and kind in ("table", "view", "virtual"):
            return name, kind
    tables = sorted(n for n, k in found if k in ("table", "virtual") and not n.startswith("sqlite_"))
    views = sorted(n for n, k in found if k == "view")
    has = f"tables: {', '.join(tables)}" if tables else "no tables"
    has += f"; views: {', '.join(views)}" if views else ""
    raise UsageError(f"export: no table {table!r} in this state", f"it has {has}")


def _columns(conn: Any, name: str) -> list[Column]:
    info = apsw.ext.query_info(conn, f"SELECT * FROM {_quote(name)}")
    columns = []
    for col, declared in info.description:
        aff = affinity(declared)
        c = Column(col, declared or "", aff)
        if not c.inferred:
            c.arrow = _DECLARED_ARROW[aff]
        columns.append(c)
    return columns


# -- the file ----------------------------------------------------------------------------------------


@contextmanager
def _atomic(out: Path, force: bool) -> Iterator[Path]:
    """A temporary file beside ``out`` to write; when the block ends it is synced and renamed to ``out``
    (linked, without ``force``: an ``out`` that appeared meanwhile is never replaced), else removed."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".dbre-export", dir=out.parent)
    except OSError as err:
        raise UsageError(f"export: --out {out}: cannot write in {out.parent}: {err.strerror}",
                         "choose a directory you can write to") from None
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as err:  # (a full disk, a quota, the folder gone: the file is not written)
            full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "No space left" in str(err)
            raise RestoreError(f"export: --out {out}: " + ("disk full" if full else "cannot write")
                               + f" ({err.strerror or err})",
                               ("free space there, or export to another disk" if full else "check the output "
                                "folder") + f"; {out} was not written") from None
        if force:
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise UsageError(f"export: --out {out} exists", "pass --force to replace it, or choose another "
                                 "file") from None
        dirfd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    finally:
        tmp.unlink(missing_ok=True)


def _chunks(rows: Iterator[tuple[Any, ...]], batch_rows: int, batch_bytes: int,
            progress: Callable[[int, int], None] | None, total: int) -> Iterator[list[tuple[Any, ...]]]:
    """The rows in batches of at most ``batch_rows`` rows, ended sooner when their values reach about
    ``batch_bytes`` (estimated from every ``_SAMPLE``-th row), read ``CHUNK_ROWS`` at a time; progress said
    between chunks."""
    n = reported = 0
    batch: list[tuple[Any, ...]] = []
    held = 0
    while True:
        chunk = list(islice(rows, min(CHUNK_ROWS, batch_rows - len(batch))))
        if chunk:
            batch += chunk
            n += len(chunk)
            held += _SAMPLE * sum(len(v) if isinstance(v, (str, bytes)) else 8 for r in chunk[::_SAMPLE] for v in r)
        if batch and (not chunk or len(batch) >= batch_rows or held >= batch_bytes):
            yield batch
            batch, held = [], 0
        if progress is not None and (not chunk or n - reported >= PROGRESS_ROWS):
            progress(n, max(n, total))
            reported = n
        if not chunk:
            return


def _write_csv(tmp: Path, columns: list[Column], rows: Iterator[tuple[Any, ...]], batch_rows: int,
               batch_bytes: int, progress: Callable[[int, int], None] | None, total: int) -> int:
    n = 0
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")  # (None is written as an empty field)
        out.writerow([c.name for c in columns])
        for batch in _chunks(rows, batch_rows, batch_bytes, progress, total):
            out.writerows([v.hex() if type(v) is bytes else v for v in row] for row in batch)
            n += len(batch)
    return n


def _write_parquet(tmp: Path, columns: list[Column], rows: Iterator[tuple[Any, ...]], batch_rows: int,
                   batch_bytes: int, progress: Callable[[int, int], None] | None, total: int,
                   fallbacks: dict[str, str], warn: Callable[[str], None] | None) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer: Any = None
    n = 0

    def write(batch: list[tuple[Any, ...]]) -> None:
        nonlocal writer
        values: list[Any] = list(zip(*batch, strict=True)) if batch else [() for _ in columns]
        batch.clear()  # (the rows' tuples go: their values are held by the columns until each is an array)
        _fit(columns, values, fallbacks, warn, writer is not None)  # (_Widen: the caller starts again)
        arrays = []
        for i, c in enumerate(columns):
            arrays.append(_array(pa, c, values[i]))
            values[i] = None
        if writer is None:
            schema = pa.schema([pa.field(c.name, _arrow_type(pa, c)) for c in columns])
            writer = pq.ParquetWriter(str(tmp), schema)
        writer.write_table(pa.Table.from_arrays(arrays, schema=writer.schema))

    try:
        for batch in _chunks(rows, batch_rows, batch_bytes, progress, total):
            n += len(batch)
            write(batch)
        if writer is None:
            write([])  # (an empty table: a file with its schema)
    finally:
        if writer is not None:
            writer.close()
    return n


def _kind(kinds: set[type]) -> str:
    """The narrowest Arrow type of ``_ORDER`` that holds values of these Python types."""
    if bytes in kinds:
        return "binary"
    if str in kinds:
        return "string"
    if float in kinds:
        return "double"
    return "int64"


def _fit(columns: list[Column], values: list[tuple[Any, ...]], fallbacks: dict[str, str],
         warn: Callable[[str], None] | None, written: bool) -> None:
    """Check each column's values against its type (giving an inferred column its first type from them). A
    column they do not fit gets a wider one, and a string or binary column holding values of other types
    writes them as text: each said once through ``warn`` (and kept in ``fallbacks``). _Widen is raised when
    a type changed after batches were ``written`` (the file's schema is fixed: the export starts again)."""
    changed = False
    for c, vals in zip(columns, values, strict=True):
        kinds = set(map(type, vals)) - {type(None)}
        was = c.arrow
        if c.arrow is None:  # the first batch of a NUMERIC or untyped column: the type of its values
            c.arrow = _kind(kinds) if kinds else ("double" if c.affinity == "NUMERIC" else "string")
        if c.arrow == "int64" and kinds - {int}:
            c.arrow = _kind(kinds) if c.inferred else ("binary" if bytes in kinds else "string")
        elif c.arrow == "double":
            inexact = int in kinds and any(type(v) is int and abs(v) > _EXACT for v in vals)
            if kinds - {int, float} or inexact:
                c.arrow = "binary" if bytes in kinds else "string"
        elif c.arrow == "string" and bytes in kinds:
            c.arrow = "binary"
        held: set[type] = {str} if c.arrow == "string" else {bytes} if c.arrow == "binary" else set()
        note = ""
        if was is not None and c.arrow != was:
            note = f"written as {c.arrow} instead of {was}"
            changed = True
        elif held and kinds - held and c.name not in fallbacks:
            note = f"written as {c.arrow}" + (", numbers as their text" if kinds & {int, float} else "")
        if not note:
            continue
        what = ", ".join(sorted({int: "integer", float: "real", str: "text", bytes: "blob"}[k] for k in kinds))
        line = f"column {c.name!r} ({c.declared or 'no declared type'}) holds {what} values: {note}"
        fallbacks[c.name] = line
        if warn is not None:
            warn(line + ("; the export starts again" if changed and written else ""))
    if changed and written:
        raise _Widen()


def _array(pa: Any, c: Column, vals: tuple[Any, ...]) -> Any:
    """The column's values as an Arrow array of its type (numbers as their text in a string or binary
    column, text as UTF-8 in a binary one)."""
    kind = _arrow_type(pa, c)
    if c.arrow in ("int64", "double"):
        return pa.array(vals, type=kind)  # (_fit checked they are numbers a double holds exactly)
    if c.arrow == "string":
        if not all(v is None or type(v) is str for v in vals):
            vals = tuple(v if v is None or type(v) is str else str(v) for v in vals)
    elif not all(v is None or type(v) is bytes for v in vals):
        vals = tuple(v if v is None or type(v) is bytes else str(v).encode() for v in vals)
    return pa.array(vals, type=kind)


def _arrow_type(pa: Any, c: Column) -> Any:
    return {"int64": pa.int64, "double": pa.float64, "string": pa.string, "binary": pa.binary}[c.arrow or "string"]()
