"""Segments and generations: the stored form of shipped transactions (format 2, docs/FORMAT.md *Segments*).

A *generation* is one unbroken run of a database's history: a base snapshot (an ordinary dbre
snapshot whose WAL position is known exactly) and the transactions committed after it. Its base
object ``segments/<db>/<gen>/base`` is written once, before any segment. A *segment* holds the
transactions of one shipping interval, each with its txid, commit observation time, page count
after commit and pages, and is stored under its position::

    segments/<db>/<gen>/<first txid 016x>-<last txid 016x>-<first observed µs 016x>-<last observed µs 016x>

Every object is sealed under its key (`repo.sealer.seal(data, name=key)`) and written with a
conditional put: one object, all or nothing. A hash chain, keyed by the repository's page hash,
runs from the generation's base through every transaction:
``state_i = page_hash(state_(i-1) ‖ txid ‖ observed ‖ page count ‖ n ‖ (pgno ‖ page_hash(page))*)``;
each segment carries the state before its first and after its last transaction, so a gap, an
overlap, a reordering or a segment moved from another generation is found.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from dbre.errors import IntegrityError
from dbre.repository.manifest import Manifest, check_db_name, micros
from dbre.repository.repo import Repository
from dbre.storage import AlreadyExists, NotFound
from dbre.storage.base import get_capped

MAGIC = b"DBRESEG1"
PARTS_MAGIC = b"DBRESEGP"  # a segment too large for one object: its body in parts (see write_segment)
_PARTS = struct.Struct("<8sIQ")  # magic, number of parts, body length
SEGMENT_CAP = 256 * 1024 * 1024  # a segment is shipped before it grows past ~64 MiB of pages
BASE_CAP = 64 * 1024
_TX = struct.Struct("<QqII")  # txid, observed µs since the epoch, page count after commit, pages in it
_PGNO = struct.Struct("<I")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})-([0-9a-f]{16})$")
_GEN = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{8}$")
_HINT = "restore it from the offsite copy; `dbre restore --at` an earlier time still works"

PageHash = Callable[[bytes | memoryview], bytes]


def to_time(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


@dataclass(frozen=True)
class WalPos:
    """A position in a WAL: its salts, the number of frames up to a commit, that frame's checksum."""

    salt: bytes
    frame: int
    cksum: tuple[int, int] = (0, 0)
    # the WAL was wholly backfilled here and no other process held a read mark: the next write
    # restarts it at this very frame (so a replicator resuming after a kill follows one restart)
    restart_next: bool = False

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"salt": self.salt.hex(), "frame": self.frame, "cksum": list(self.cksum)}
        if self.restart_next:
            d["restart_next"] = True
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> WalPos:
        ck = d.get("cksum") or (0, 0)
        return cls(bytes.fromhex(str(d["salt"])), int(d["frame"]), (int(ck[0]), int(ck[1])),
                   bool(d.get("restart_next", False)))


@dataclass
class Transaction:
    """One committed transaction: its pages (page number -> bytes) and where it ended in the WAL."""

    txid: int
    observed_us: int
    page_count: int
    pages: dict[int, bytes]
    end: WalPos | None = None  # not stored: the segment's header holds the end of its last one

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.pages.values())


def chain_step(page_hash: PageHash, state: bytes, tx: Transaction) -> bytes:
    """The chain state after ``tx``: binds its txid, time, page count and every page, in order."""
    parts = [state, _TX.pack(tx.txid, tx.observed_us, tx.page_count, len(tx.pages))]
    for pgno in sorted(tx.pages):
        parts.append(_PGNO.pack(pgno) + page_hash(tx.pages[pgno]))
    return page_hash(b"".join(parts))


@dataclass
class Generation:
    """A generation's base: the snapshot it starts from, its WAL position, the chain's first state."""

    db: str
    id: str
    snapshot: str
    snapshot_key: str
    taken_at: str
    base_txid: int  # the snapshot's own txid: the generation's first transaction is base_txid + 1
    page_size: int
    wal: WalPos
    file_id: str
    state: str  # hex chain state of the base (see base_state)
    created: str = ""

    @property
    def key(self) -> str:
        return generation_key(self.db, self.id)

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.taken_at.replace("Z", "+00:00"))

    def to_json(self) -> bytes:
        d = {k: v for k, v in self.__dict__.items() if k != "wal"}
        d["wal"] = self.wal.to_json()
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Generation:
        """Parse a base; ValueError, TypeError or KeyError when it is not one (a field missing, of the wrong type,
        a state or time that does not parse)."""
        d = json.loads(raw)
        if not isinstance(d, dict):
            raise TypeError("a generation base is a JSON object")
        d["wal"] = WalPos.from_json(d["wal"])
        gen = cls(**d)
        texts = (gen.db, gen.id, gen.snapshot, gen.snapshot_key, gen.taken_at, gen.file_id, gen.state, gen.created)
        if not all(isinstance(v, str) for v in texts) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (gen.base_txid, gen.page_size)):
            raise TypeError("a field of the generation base has the wrong type")
        bytes.fromhex(gen.state)
        gen.time  # noqa: B018 - a time that does not parse is a damaged base
        return gen


def new_generation_id(taken_at: datetime) -> str:
    """``<base snapshot time µs 016x>-<random 8 hex>``: ascending names are oldest first."""
    return f"{micros(taken_at):016x}-{secrets.token_hex(4)}"


def generation_key(db: str, gen: str) -> str:
    return f"segments/{db}/{gen}/base"


def base_state(page_hash: PageHash, db: str, gen: str, manifest: Manifest, base_txid: int) -> bytes:
    """The chain's first state: binds the generation to its base snapshot's page-map root."""
    root = bytes.fromhex(manifest.root or "")
    return page_hash(b"dbre generation\x00" + f"{db}\x00{gen}\x00{manifest.id}\x00".encode() + root
                     + struct.pack("<Q", base_txid))


@dataclass(frozen=True)
class SegmentName:
    """What a segment's key says: generation, txid range, observation-time range."""

    db: str
    generation: str
    first: int
    last: int
    first_us: int
    last_us: int

    @property
    def key(self) -> str:
        return (f"segments/{self.db}/{self.generation}/"
                f"{self.first:016x}-{self.last:016x}-{self.first_us:016x}-{self.last_us:016x}")


def parse_key(key: str) -> SegmentName | None:
    """The segment a key names; None for a base object or anything else."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "segments":
        return None
    m = _NAME.match(parts[3])
    if m is None:
        return None
    first, last, t0, t1 = (int(g, 16) for g in m.groups())
    return SegmentName(parts[1], parts[2], first, last, t0, t1)


@dataclass
class Segment:
    """The transactions of one shipping interval, with the chain states around them."""

    db: str
    generation: str
    page_size: int
    state_before: bytes
    state_after: bytes
    wal_start: WalPos
    wal_end: WalPos
    file_id: str
    transactions: list[Transaction] = field(default_factory=list)

    @property
    def name(self) -> SegmentName:
        t = self.transactions
        return SegmentName(self.db, self.generation, t[0].txid, t[-1].txid, t[0].observed_us, t[-1].observed_us)

    def encode(self) -> bytes:
        head = json.dumps({
            "db": self.db, "generation": self.generation, "page_size": self.page_size,
            "first_txid": self.transactions[0].txid, "last_txid": self.transactions[-1].txid,
            "state_before": self.state_before.hex(), "state_after": self.state_after.hex(),
            "wal_start": self.wal_start.to_json(), "wal_end": self.wal_end.to_json(),
            "file_id": self.file_id, "transactions": len(self.transactions),
        }, sort_keys=True).encode()
        parts = [MAGIC, struct.pack("<I", len(head)), head]
        for tx in self.transactions:
            parts.append(_TX.pack(tx.txid, tx.observed_us, tx.page_count, len(tx.pages)))
            for pgno in sorted(tx.pages):
                page = tx.pages[pgno]
                if len(page) != self.page_size:
                    raise ValueError(f"page {pgno} of txid {tx.txid} has {len(page)} bytes")
                parts.append(_PGNO.pack(pgno))
                parts.append(page)
        return b"".join(parts)

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Segment:
        bad = IntegrityError(f"{where}: segment is damaged", _HINT)
        if raw[:8] != MAGIC:
            raise bad
        try:
            (n,) = struct.unpack_from("<I", raw, 8)
            head = json.loads(raw[12 : 12 + n])
            ps = int(head["page_size"])
            seg = cls(head["db"], head["generation"], ps, bytes.fromhex(head["state_before"]),
                      bytes.fromhex(head["state_after"]), WalPos.from_json(head["wal_start"]),
                      WalPos.from_json(head["wal_end"]), str(head["file_id"]))
            off = 12 + n
            for _ in range(int(head["transactions"])):
                txid, obs, count, npages = _TX.unpack_from(raw, off)
                off += _TX.size
                pages = {}
                for _ in range(npages):
                    (pgno,) = _PGNO.unpack_from(raw, off)
                    page = raw[off + 4 : off + 4 + ps]
                    if len(page) != ps:
                        raise bad
                    pages[pgno] = page
                    off += 4 + ps
                seg.transactions.append(Transaction(txid, obs, count, pages))
            first, last = head["first_txid"], head["last_txid"]
        except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError):
            raise bad from None
        if off != len(raw) or not seg.transactions or seg.transactions[0].txid != first \
                or seg.transactions[-1].txid != last:
            raise bad
        return seg


def write_base(repo: Repository, gen: Generation) -> None:
    """Store a generation's base (conditional put: a name is used once)."""
    repo.store.put(gen.key, repo.sealer.seal(gen.to_json(), gen.key), if_absent=True)


def read_base(repo: Repository, db: str, gen: str) -> Generation:
    key = generation_key(db, gen)
    raw = repo.sealer.unseal(get_capped(repo.store, key, BASE_CAP, "generation base"), key)
    try:
        base = Generation.from_json(raw)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError) as err:
        raise IntegrityError(f"{key}: generation base is damaged ({err.__class__.__name__})", _HINT) from None
    if base.db != db or base.id != gen:
        raise IntegrityError(f"{key}: generation base names {base.db}/{base.id}", _HINT)
    return base


def part_key(key: str, i: int) -> str:
    """The object holding part ``i`` (1, 2, ...) of a segment stored in parts."""
    return f"{key}.{i}"


def part_bytes() -> int:
    """The most body bytes one stored object holds: half the cap, so sealing never takes it past."""
    return SEGMENT_CAP // 2


def write_segment(repo: Repository, seg: Segment) -> tuple[str, int]:
    """Seal and store a segment under its position: one conditional put, so a crash leaves the
    whole segment or none. A put that finds the key taken is a conflict (two replicators),
    unless the object there is this very segment (a retried put): (key, bytes written).

    A body larger than `part_bytes` (one transaction larger than the cap) is stored in parts, so
    no object is ever one a reader refuses: parts 1..n-1 under ``<key>.<i>`` first, each sealed
    under its own name, then the object at ``<key>`` (the one a listing sees) holding
    ``PARTS_MAGIC ‖ u32 n ‖ u64 body length`` and the first part. Until that last put the
    segment does not exist."""
    key = seg.name.key
    body = seg.encode()
    step = part_bytes()
    chunks = [body[i : i + step] for i in range(0, len(body), step)] if len(body) > step else [body]
    written = 0
    for i, chunk in enumerate(chunks[1:], 1):
        pkey = part_key(key, i)
        data = repo.sealer.seal(chunk, pkey)
        try:
            repo.store.put(pkey, data, if_absent=True)
        except AlreadyExists:
            if repo.store.exists(key):
                _same_segment(repo, key, body)
                return key, 0
            repo.store.put(pkey, data)  # a part left by a put killed before its segment existed
        written += len(data)
    head = chunks[0] if len(chunks) == 1 else _PARTS.pack(PARTS_MAGIC, len(chunks), len(body)) + chunks[0]
    data = repo.sealer.seal(head, key)
    try:
        repo.store.put(key, data, if_absent=True)
    except AlreadyExists:
        _same_segment(repo, key, body)
    return key, written + len(data)


def _same_segment(repo: Repository, key: str, body: bytes) -> None:
    name = parse_key(key)
    assert name is not None
    if _unseal_body(repo, name, fetch_segment(repo, name)) != body:
        raise IntegrityError(f"{key}: another segment is already stored there",
                             "another replicator ships this database: stop one of them") from None


def _unseal_body(repo: Repository, name: SegmentName, raw: bytes) -> bytes:
    """A segment's body: the object at its key unsealed, and its parts after it if it has any (the
    count and length, sealed in the first, bind them: a lost, cut or moved part is refused)."""
    key = name.key
    head = repo.sealer.unseal(raw, key)
    if head[:8] != PARTS_MAGIC:
        return head
    try:
        _, n, length = _PARTS.unpack_from(head)
    except struct.error:
        raise IntegrityError(f"{key}: segment is damaged", _HINT) from None
    pieces = [head[_PARTS.size :]]
    for i in range(1, n):
        pkey = part_key(key, i)
        try:
            pieces.append(repo.sealer.unseal(get_capped(repo.store, pkey, SEGMENT_CAP, "segment part"), pkey))
        except NotFound:
            raise IntegrityError(f"{pkey}: part {i} of {n} of the segment is missing", _HINT) from None
    body = b"".join(pieces)
    if len(body) != length:
        raise IntegrityError(f"{key}: segment parts hold {len(body)} bytes, not {length}", _HINT)
    return body


def part_keys(repo: Repository, key: str, raw: bytes) -> list[str]:
    """The keys of the parts of the segment stored at ``key`` as ``raw`` (none for one stored whole)."""
    head = repo.sealer.unseal(raw, key)
    if head[:8] != PARTS_MAGIC:
        return []
    try:
        _, n, _ = _PARTS.unpack_from(head)
    except struct.error:
        raise IntegrityError(f"{key}: segment is damaged", _HINT) from None
    return [part_key(key, i) for i in range(1, n)]


def is_part_key(key: str) -> bool:
    """A part of a segment stored in parts (``<segment key>.<i>``)."""
    head, _, tail = key.rpartition(".")
    return bool(head) and tail.isdigit() and "/" in head


def fetch_segment(repo: Repository, name: SegmentName) -> bytes:
    """A segment's stored bytes (never more than ``SEGMENT_CAP``), not yet checked."""
    return get_capped(repo.store, name.key, SEGMENT_CAP, "segment")


def open_segment(repo: Repository, name: SegmentName, state_before: bytes | None,
                 raw: bytes | None = None) -> Segment:
    """Read (or take ``raw``, from `fetch_segment`), unseal and check a segment: its header against
    its name, its txids consecutive, its chain recomputed over every page from ``state_before``
    (the previous segment's end)."""
    key = name.key
    seg = Segment.decode(_unseal_body(repo, name, raw if raw is not None else fetch_segment(repo, name)), key)
    if seg.name != name:
        raise IntegrityError(f"{key}: segment holds {seg.name.key}", _HINT)
    if state_before is not None:
        check_follows(seg, state_before)
    state = seg.state_before
    for i, tx in enumerate(seg.transactions):
        if tx.txid != name.first + i:
            raise IntegrityError(f"{key}: transactions out of order", _HINT)
        if i and tx.observed_us < seg.transactions[i - 1].observed_us:
            raise IntegrityError(f"{key}: observation times go backwards", _HINT)
        state = chain_step(repo.page_hash, state, tx)
    if state != seg.state_after:
        raise IntegrityError(f"{key}: pages do not match the segment's hash chain (damaged or altered)", _HINT)
    return seg


def check_follows(seg: Segment, state_before: bytes) -> None:
    """Refuse a segment (opened with no ``state_before``) that does not start where the previous one ended."""
    if seg.state_before != state_before:
        raise IntegrityError(f"{seg.name.key}: does not follow the previous segment (hash chain broken: a segment "
                             "is missing, swapped or from another history)", _HINT)


def list_generations(repo: Repository, db: str, *,
                     superseded: dict[str, list[SegmentName]] | None = None) -> dict[str, list[SegmentName]]:
    """Every generation of ``db`` (by id, oldest first) with its segment names in txid order. Where
    segments overlap (the small segments a compacted one replaced, until prune deletes them), the
    fewest that run contiguously through the generation are listed, so no transaction is applied
    twice; ``superseded``, if given, receives the others per generation."""
    check_db_name(db)
    out: dict[str, list[SegmentName]] = {}
    for key in repo.store.list(f"segments/{db}/"):
        parts = key.split("/")
        if len(parts) != 4 or not _GEN.match(parts[2]):
            continue
        names = out.setdefault(parts[2], [])
        name = parse_key(key)
        if name is not None:
            names.append(name)
    result = {}
    for g in sorted(out):
        kept = _fewest(out[g])
        if kept is None:  # no chain through them all: the inner ones out, a gap or overlap left to report
            kept = []
            for n in sorted(out[g], key=lambda n: (n.first, -n.last)):  # a covering one before those it covers
                if not (kept and kept[-1].first <= n.first and n.last <= kept[-1].last):
                    kept.append(n)
        if superseded is not None and len(kept) < len(out[g]):
            chosen = set(kept)
            superseded[g] = sorted((n for n in out[g] if n not in chosen), key=lambda n: (n.first, n.last))
        result[g] = kept
    return result


def _fewest(names: list[SegmentName]) -> list[SegmentName] | None:
    """The fewest segments that run contiguously from the lowest first txid to the highest last one
    (compacted and small forms, even compacted differently by two repositories, mix freely: each
    link is chain-checked when read); None when no such run exists (a gap)."""
    if not names:
        return []
    start, end = min(n.first for n in names), max(n.last for n in names)
    best: dict[int, tuple[int, SegmentName | None]] = {start: (0, None)}
    for n in sorted(names, key=lambda n: (n.first, -n.last)):  # every way into n.first is known by now
        if n.first in best and n.last >= n.first:
            count = best[n.first][0] + 1
            if n.last + 1 not in best or count < best[n.last + 1][0]:
                best[n.last + 1] = (count, n)
    if end + 1 not in best:
        return None
    path: list[SegmentName] = []
    pos = end + 1
    while pos != start:
        seg = best[pos][1]
        assert seg is not None
        path.append(seg)
        pos = seg.first
    return path[::-1]


def check_contiguous(db: str, gen: Generation, names: Iterable[SegmentName]) -> list[SegmentName]:
    """The segments in order; a gap or an overlap in their txid ranges, or observation times that go
    back from one segment to the next (a restore at T would apply part of one and then later ones
    stamped before T: a state that never existed), is an IntegrityError."""
    expected = gen.base_txid + 1
    out: list[SegmentName] = []
    for n in names:
        if n.first != expected or n.last < n.first:
            what = "gap" if n.first > expected else "overlap"
            raise IntegrityError(f"segments/{db}/{gen.id}: {what} before {n.key} (expected a segment from txid "
                                 f"{expected}, {expected:016x})",
                                 "run `dbre verify`; restore an earlier time or from the offsite copy")
        expected = n.last + 1
        out.append(n)
    return check_times(db, gen, out)


def check_times(db: str, gen: Generation, names: list[SegmentName]) -> list[SegmentName]:
    """``names`` (in txid order), if their observation times never go back; else an IntegrityError."""
    for i, n in enumerate(names):
        if n.last_us < n.first_us or (i and n.first_us < names[i - 1].last_us):
            raise IntegrityError(f"segments/{db}/{gen.id}: observation times go back at {n.key}",
                                 "run `dbre verify`; restore an earlier time or from the offsite copy")
    return names
