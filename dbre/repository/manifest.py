"""The snapshot manifest: what a restore must reproduce, written last to make a backup visible."""

from __future__ import annotations

import json
import re
import secrets
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dbre.errors import UsageError

# A page record in a run: page hash, pack id, blob offset and length in the pack, slot in the blob.
RECORD = struct.Struct("<16s16sQIH")
RUN_PAGES = 4096  # pages per run: an unchanged 16 MiB stretch (4 KiB pages) costs nothing next time
# The tag of a snapshot taken by restore-table (and any other repair) of the live database before
# changing it: the undo of that change, not a point of the database's backup history (see Manifest.tags)
SAFETY_TAG = "safety"

_DB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_db_name(name: str) -> str:
    if not _DB_NAME.match(name):
        raise UsageError(
            f"database name {name!r} is not allowed",
            "use letters, digits, '.', '_' and '-' (pass --db NAME)",
        )
    return name


def new_snapshot_id() -> str:
    return secrets.token_hex(8)


# Format 2 names a snapshot "<inv>-<id>": inv is 16 hex digits of 2^64-1 minus taken_at in µs since
# the epoch, so ascending key order (S3's only listing order) is newest first.
_INV_MAX = 2**64 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_KEY_ID = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})$")


def micros(t: datetime) -> int:
    """Microseconds since the epoch, exactly (no float on the way)."""
    return (t - _EPOCH) // timedelta(microseconds=1)


def inv_time(t: datetime) -> str:
    """The 16 hex digits that put snapshots taken at ``t`` in newest-first key order."""
    return f"{_INV_MAX - micros(t):016x}"


def snapshot_key_id(taken_at: datetime, snap_id: str) -> str:
    """A format-2 snapshot's name under ``snapshots/<db>/``."""
    return f"{inv_time(taken_at)}-{snap_id}"


def parse_key_id(name: str) -> tuple[str, datetime] | None:
    """(id, taken_at) of a format-2 snapshot name; None when ``name`` is not one (also a name of
    the right shape whose time is past year 9999: planted, never written by dbre)."""
    m = _KEY_ID.match(name)
    if m is None:
        return None
    try:
        return m.group(2), _EPOCH + timedelta(microseconds=_INV_MAX - int(m.group(1), 16))
    except OverflowError:
        return None


def now_utc() -> datetime:
    return datetime.now(UTC)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 time; a time without a zone is taken as UTC."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"cannot parse time {text!r}", "use ISO-8601, e.g. 2026-11-27T03:00:00Z"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


@dataclass
class RunRef:
    """Where one run of page records is stored: a blob in a pack."""

    hash: str
    pack: str
    offset: int
    length: int
    pages: int


_HEX32 = re.compile(r"^[0-9a-f]{32}$")


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _run_ref(d: Any) -> RunRef:
    """A RunRef from its JSON; its pack and hash are 32 hex digits, its numbers whole and not negative."""
    r = RunRef(**d)
    if not (isinstance(r.pack, str) and _HEX32.match(r.pack) and isinstance(r.hash, str) and _HEX32.match(r.hash)):
        raise ValueError("a run names no pack id or hash")
    if not all(_natural(v) for v in (r.offset, r.length, r.pages)):
        raise TypeError("a run's offset, length or pages is not a whole number")
    return r


@dataclass
class TableStats:
    rows: int
    checksum: str | None = None


@dataclass
class Manifest:
    """One snapshot of one database."""

    id: str
    db: str
    taken_at: str
    page_size: int
    page_count: int
    runs: list[RunRef]
    packs: list[str]
    parent: str | None = None
    tool: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    run_pages: int = RUN_PAGES
    schema: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, TableStats] = field(default_factory=dict)
    user_version: int = 0
    encoding: str = "UTF-8"
    journal_mode: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    format: int = 1
    mode: int | None = None  # the source file's permission bits (st_mode & 0o7777); None: not a local file
    root: str | None = None  # format 2: page_hash over the runs (see run_root)
    # format 2: runs of 16-byte xxh3-128 hashes, one per page: the next backup's quick "unchanged
    # at this place" test, so only changed pages pay for the keyed hash (a hint: never restored from)
    fast_runs: list[RunRef] = field(default_factory=list)

    @property
    def time(self) -> datetime:
        return parse_time(self.taken_at)

    @property
    def size(self) -> int:
        return self.page_size * self.page_count

    @property
    def tags(self) -> list[str]:
        """Why the snapshot was taken, when not by a regular backup (``["safety"]``). Stored as
        ``stats.tags``: a format-2 reader older than tags refuses unknown top-level fields (the
        manifest would read as damaged), but keeps ``stats`` as it is."""
        tags = self.stats.get("tags") if isinstance(self.stats, dict) else None
        return [str(t) for t in tags] if isinstance(tags, list) else []

    @property
    def checksum_basis(self) -> tuple[int, dict[str, int]] | None:
        """(reserved bytes per page, {table: root page}) as this snapshot's tables were read, from
        ``stats.checksum_basis`` (kept in ``stats`` so that older readers load the manifest); None
        when absent (an older snapshot) or malformed: then the next backup reads every table."""
        basis = self.stats.get("checksum_basis") if isinstance(self.stats, dict) else None
        if not isinstance(basis, dict) or not _natural(basis.get("reserved")):
            return None
        roots = basis.get("roots")
        if not isinstance(roots, dict) or not all(isinstance(k, str) and _natural(v) and v > 0
                                                  for k, v in roots.items()):
            return None
        return basis["reserved"], dict(roots)

    @property
    def sum_runs(self) -> list[RunRef]:
        """Runs of this snapshot's per-page partial sums of its table checksums (``PAGE_SUM``
        entries, see dbre.repository.tables), from ``stats.checksum_pages``: the next backup's way
        to re-read only the changed leaves (a hint, never restored from); [] when absent, malformed,
        or not covering every page (then the next backup reads every table whole)."""
        pages = self.stats.get("checksum_pages") if isinstance(self.stats, dict) else None
        runs = pages.get("runs") if isinstance(pages, dict) else None
        if not isinstance(runs, list) or not runs:
            return []
        try:
            out = [_run_ref(r) for r in runs]
        except (TypeError, ValueError):
            return []
        return out if sum(r.pages for r in out) == self.page_count else []

    @property
    def checksum_version(self) -> int | None:
        """What this snapshot's table checksums mean (``stats.checksum_version``, see
        ``dbre.repository.tables.CHECKSUM_VERSION``); None when absent (written before it: a WITHOUT
        ROWID table was read in SQLite's scan order) or malformed."""
        v = self.stats.get("checksum_version") if isinstance(self.stats, dict) else None
        return v if isinstance(v, int) and _natural(v) and v > 0 else None

    @property
    def is_safety(self) -> bool:
        """A safety snapshot: skipped by the default choices of restore and drill, and by keep counts."""
        return SAFETY_TAG in self.tags

    def run_root(self, page_hash: Callable[[bytes], bytes]) -> str:
        """The root hash over the page map: page_hash(run hashes in order ‖ u64 page_size ‖ u64 page_count)."""
        body = b"".join(bytes.fromhex(r.hash) for r in self.runs)
        return page_hash(body + struct.pack("<QQ", self.page_size, self.page_count)).hex()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse a manifest; ValueError or TypeError when a field has the wrong type, or a pack or run name is
        not the 32 hex digits dbre writes (a name that is a path, `../x` or holds a NUL, never reaches a store)."""
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise TypeError("a manifest is a JSON object")
        d["runs"] = [_run_ref(r) for r in d["runs"]]
        d["fast_runs"] = [_run_ref(r) for r in d.get("fast_runs", [])]
        d["tables"] = {k: TableStats(**v) for k, v in d.get("tables", {}).items()}
        m = cls(**d)
        for name in ("id", "db", "taken_at"):
            if not isinstance(getattr(m, name), str):
                raise TypeError(f"{name} is not a string")
        for name in ("page_size", "page_count", "run_pages", "user_version"):
            if not _natural(getattr(m, name)):
                raise TypeError(f"{name} is not a whole number")
        if not isinstance(m.packs, list) or not all(isinstance(p, str) and _HEX32.match(p) for p in m.packs):
            raise ValueError("packs are not pack ids")
        if not isinstance(m.source, dict) or not isinstance(m.stats, dict) or not isinstance(m.schema, list):
            raise TypeError("source, stats or schema has the wrong type")
        return m

    def summary(self) -> dict[str, Any]:
        """The fields `dbre snapshots --json` prints."""
        return {
            "id": self.id,
            "db": self.db,
            "taken_at": self.taken_at,
            "parent": self.parent,
            "pages": self.page_count,
            "page_size": self.page_size,
            "size": self.size,
            "pages_added": self.stats.get("pages_added", 0),
            "bytes_added": self.stats.get("bytes_added", 0),
            "seconds": self.stats.get("seconds"),
            "tables": len(self.tables),
            "source": self.source,  # kind, path or URL (no secrets), application_id
            "tags": self.tags,
        }
