"""The backup engine: stream one consistent snapshot's pages into packs, deduplicated by content.

Pages come from one read transaction on the source, by one of two paths: the direct path
(`dbre.sources.image`) maps the file and its WAL and serves exactly that transaction's pages
in bulk; the fallback copies through SQLite's backup API into an in-process VFS (`_SinkVFS`),
where every page arrives in ``xWrite`` with no temp file (used when the direct path's checks do
not pass, e.g. a database that is not a plain file here). Each page is hashed; pages the parent
snapshot already has are referenced, new ones are batched, sealed (zstd, checksum or AES-GCM) on
worker threads and appended to packs. The manifest is written last, with a conditional put:
until then the snapshot does not exist.
"""

from __future__ import annotations

import logging
import secrets
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import apsw
import numpy as np

from dbre.errors import IntegrityError, RepositoryError, SourceError, UsageError
from dbre.repository.entries import Entries
from dbre.repository.identity import refuse_new_source, same_source, table_names
from dbre.repository.lock import Lock
from dbre.repository.manifest import (
    RECORD,
    SAFETY_TAG,
    Manifest,
    RunRef,
    TableStats,
    check_db_name,
    iso,
    new_snapshot_id,
    now_utc,
)
from dbre.repository.pack import PackWriter, read_index_tail
from dbre.repository.repo import TOOL, Repository
from dbre.repository.sink import LOST, REPACK, PageSink, column, stretches, value
from dbre.repository.tables import CHECKSUM_VERSION, PAGE_SUM, PageSums, Prior, sqlite_engine, table_stats
from dbre.sources.base import Source
from dbre.sources.image import ImageSession, PageImage
from dbre.storage import NotFound
from dbre.vfsfile import InProcessFile

log = logging.getLogger(__name__)

CHECKSUM_AUTO_BYTES = 256 * 1024 * 1024  # table checksums by default up to this database size
# a table's checksum is carried over from the parent at most this many backups in a row, then read
# again: the fast hash that proves its pages unchanged is not keyed, and a crafted collision (a page
# kept with its old bytes while the source holds new ones) is caught by the next checksum read
REUSE_LIMIT = 24
RUN_READERS = 4  # page-map runs fetched at once (a run is one ranged GET of ~20-200 KB)
RUNS_IN_FLIGHT = 8  # runs fetched ahead of the one being used: bounds memory, keeps order
PARENT_CHECKERS = 16  # the parent's pack tails read at once (one small ranged GET each)
REPACK_BELOW = 0.6  # a parent pack whose page slots the parent uses less than this share of is re-stored
REPACK_BUDGET = 0.25  # at most this share of the parent's pages re-stored per backup for repacking
SMALL_PACK_SLOTS = 1024  # a pack of fewer page slots is small (a full 32 MiB pack of 4 KiB pages holds ~8000)
SMALL_PACKS_MAX = 4  # more small packs under one snapshot than this: the smallest are merged (at 16, restore --at
# with 200 snapshots cost 1.5x what it costs with 5: one request per pack)

Progress = Callable[[int, int], None]


@dataclass
class BackupResult:
    manifest: Manifest
    pages_added: int
    bytes_added: int
    seconds: float

    @property
    def chain_note(self) -> str | None:
        """What the backup did about a parent it could not fully reuse (None: nothing to say)."""
        st = self.manifest.stats
        notes = []
        if st.get("skipped_manifests"):
            n = len(st["skipped_manifests"])
            notes.append(f"{n} newer snapshot manifest{'s' if n > 1 else ''} could not be read "
                         f"({', '.join(st['skipped_manifests'])}): run `dbre verify`")
        chain = self._chain_note(st)
        return "; ".join([*notes, chain] if chain else notes) or None

    @staticmethod
    def _chain_note(st: dict[str, Any]) -> str | None:
        missing, repaired = st.get("missing_packs") or [], st.get("repaired_pages", 0)
        if st.get("full"):
            why = st["full"]
            return "full backup (asked): every page stored again" if why == "asked" else \
                f"parent not reused ({why}): every page stored again"
        if missing:
            n = len(missing)
            return f"parent referenced {n} missing or damaged pack{'s' if n > 1 else ''}: {repaired} pages stored again"
        if st.get("repacked_pages"):  # (else "added N pages" reads as N pages changed)
            k = st.get("repacked_packs", 0)
            return (f"{st['repacked_pages']} of the added pages are unchanged pages of {k} sparse "
                    f"pack{'s' if k != 1 else ''}, stored again so that prune can free {'them' if k != 1 else 'it'}")
        return None

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "id": m.id,
            "db": m.db,
            "taken_at": m.taken_at,
            "parent": m.parent,
            "pages": m.page_count,
            "page_size": m.page_size,
            "size": m.size,
            "pages_added": self.pages_added,
            "bytes_added": self.bytes_added,
            "seconds": round(self.seconds, 3),
            "repaired_pages": m.stats.get("repaired_pages", 0),
            "missing_packs": m.stats.get("missing_packs", []),
            "note": self.chain_note,
            # a remote source: read through its embedded replica or /dump, and why not the replica
            "source_method": m.stats.get("source_method"),
            "source_fallback": m.stats.get("source_fallback"),
        }


def read_run(repo: Repository, manifest: Manifest, run: RunRef, size: int = RECORD.size) -> bytes:
    """One run of ``size``-byte entries per page (a page-map run, or a fast run of 16-byte
    hashes), checked: sealed under its name, its length, and its hash."""
    raw = repo.read_blob(run.pack, run.offset, run.length, f"run {run.hash}")
    if len(raw) != run.pages * size:
        raise IntegrityError(f"snapshot {manifest.id}: page-map run {run.hash[:12]} "
                             f"(packs/{run.pack}@{run.offset}) has the wrong length")
    if repo.page_hash(raw).hex() != run.hash:
        raise IntegrityError(f"snapshot {manifest.id}: page-map run {run.hash[:12]} "
                             f"(packs/{run.pack}@{run.offset}) does not match its hash",
                             "run `dbre verify --read-data` to find damage")
    return raw


def _run_bytes(repo: Repository, manifest: Manifest, runs: list[RunRef] | None = None,
               size: int = RECORD.size) -> Iterator[bytes]:
    """The snapshot's runs (page map by default) in order, fetched ``RUN_READERS`` at a time, at
    most ``RUNS_IN_FLIGHT`` ahead."""
    runs = manifest.runs if runs is None else runs
    if len(runs) <= 1:
        for run in runs:
            yield read_run(repo, manifest, run, size)
        return
    pool = ThreadPoolExecutor(max_workers=RUN_READERS, thread_name_prefix="dbre-runs")
    try:
        ahead = [pool.submit(read_run, repo, manifest, run, size) for run in runs[:RUNS_IN_FLIGHT]]
        for nxt in range(RUNS_IN_FLIGHT, len(runs) + RUNS_IN_FLIGHT):
            raw = ahead.pop(0).result()
            if nxt < len(runs):
                ahead.append(pool.submit(read_run, repo, manifest, runs[nxt], size))
            yield raw
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_records(repo: Repository, manifest: Manifest) -> Entries:
    """The page records of a snapshot, in page order (each RECORD.size bytes), in one buffer."""
    return Entries(_gather(_run_bytes(repo, manifest), sum(r.pages for r in manifest.runs) * RECORD.size),
                   RECORD.size)


def _gather(parts: Iterator[bytes], size: int) -> bytearray:
    """The runs' bytes in one buffer allocated once (growing it would copy it, twice the memory);
    IntegrityError when they are not ``size`` bytes in all."""
    out = bytearray(size)
    at = 0
    for raw in parts:
        if at + len(raw) > size:
            raise IntegrityError("a page map is longer than its runs say")
        out[at : at + len(raw)] = raw
        at += len(raw)
    if at != size:
        raise IntegrityError("a page map is shorter than its runs say")
    return out


def iter_records(repo: Repository, manifest: Manifest) -> Iterator[tuple[bytes, bytes, int, int, int]]:
    """The page records of a snapshot, unpacked: (hash, pack id, offset, length, slot) per page."""
    for raw in _run_bytes(repo, manifest):
        yield from RECORD.iter_unpack(raw)


_BLOB = struct.Struct("<16sQI")  # the blob part of a record: pack id, offset, length
BLOB_LOCATION = _BLOB  # (public: what `verify.blob_groups` keys its blobs by)


class _SinkFile(InProcessFile):
    """The backup API's destination: each page written goes to the sink; only page 1 is kept (read back)."""

    def __init__(self, sink: PageSink | None) -> None:
        self.sink = sink
        self.size = 0
        self.first = b""  # page 1, the only page the pager may read back (to update the header)

    def xRead(self, amount: int, offset: int) -> bytes:
        return self.first[offset : offset + amount]

    def xWrite(self, data: bytes, offset: int) -> None:
        if self.sink is not None and offset:  # page 1 comes from the source itself: see _copy_pages
            self.sink.page(offset, data)
        if offset == 0:
            self.first = data
        end = offset + len(data)
        if end > self.size:
            self.size = end

    def xFileSize(self) -> int:
        return self.size

    def xTruncate(self, newsize: int) -> None:
        self.size = newsize


class _SinkVFS(apsw.VFS):
    """A VFS whose main database file hands each written page to a sink; other files vanish."""

    def __init__(self, sink: PageSink) -> None:
        self.sink = sink
        self.main: _SinkFile | None = None
        self.vfs_name = f"dbre-sink-{secrets.token_hex(6)}"
        super().__init__(self.vfs_name, "")

    def xOpen(self, name: object, flags: list[int]) -> _SinkFile:  # type: ignore[override]
        main = bool(flags[0] & apsw.SQLITE_OPEN_MAIN_DB)
        f = _SinkFile(self.sink if main else None)
        if main:
            self.main = f
        return f

    def xAccess(self, pathname: str, flags: int) -> bool:
        return False

    def xDelete(self, filename: str, syncdir: bool) -> None:
        pass

    def xFullPathname(self, name: str) -> str:
        return name


def _pragma(conn: apsw.Connection, name: str) -> Any:
    row = conn.execute(f"PRAGMA {name}").fetchone()
    return row[0] if row else None


CLOCK_TOLERANCE = 2.0  # seconds this host's clock may differ from the store's before the store's is used


def snapshot_time(lock: Lock) -> datetime:
    """When a snapshot is taken: this host's clock while it agrees with the store's, else the
    store's. The store's clock (``Lock.store_now``: the store's time of this run's newest lock
    write plus the boot-clock time since) is the one every host writing this repository shares,
    but on S3 it has one-second resolution, so while the two agree (NTP) the host's clock gives
    microsecond order between close backups; a host whose clock is off by more than
    ``CLOCK_TOLERANCE`` (plus that resolution) cannot reorder history (newest, parent, ``--at``,
    keep rules): its snapshots take the store's time. Never after the real moment: every commit
    before ``taken_at`` is in the snapshot."""
    host = now_utc()
    store = lock.store_now()  # under-estimates by at most the resolution (1 s) plus one request
    if -CLOCK_TOLERANCE <= host.timestamp() - store <= CLOCK_TOLERANCE + 1.0:
        return host
    log.warning("this host's clock is %.1f s off the repository store's: the snapshot takes the store's time",
                host.timestamp() - store)
    return datetime.fromtimestamp(store, UTC)


def backup(
    repo: Repository,
    source: Source,
    db: str | None = None,
    *,
    checksums: bool | None = None,
    progress: Progress | None = None,
    direct: bool = True,
    full: bool = False,
    replay: Manifest | None = None,
    repack: bool = True,
    tags: Sequence[str] = (),
    accept_new_source: bool = False,
) -> BackupResult:
    """Take one snapshot of ``source`` into ``repo`` as database ``db`` (default: source.name).

    ``checksums``: record per-table content checksums (True), row counts only (False), or
    checksums when the database is at most ``CHECKSUM_AUTO_BYTES`` (None, the default): the
    checksum pass reads every row, about 0.6-1 s per 100 MiB, except in a table none of whose
    pages changed since the parent (``dbre.repository.tables.reusable``): that one keeps the
    parent's count and checksum.
    ``direct``: read pages straight from the file and its WAL when the checks of
    `dbre.sources.image` pass (False: always through SQLite's backup API).
    ``full``: reuse nothing of the parent (every page stored again, in new packs): breaks the chain.
    ``replay``: the snapshot of another repository this one reproduces (`dbre migrate`): its time,
    source and file mode are kept, and ``stats.migrated_from`` names it.
    Without it, parent records that point into a missing or damaged pack are not reused either
    (see ``_parent_records``): those pages are stored again and counted in ``stats.repaired_pages``.
    ``repack``: also store again the pages the parent keeps in sparse packs (``_repack``), counted
    in ``stats.repacked_pages``, so prune can free those packs once older snapshots are forgotten.
    ``tags``: why the snapshot is taken, when not as a regular backup (``["safety"]``: the live
    database before a repair changes it; the default for a source whose identity has a ``purpose``),
    stored as ``stats.tags``; such a snapshot is not compared with the database's source, and is
    skipped by the default choices of restore and drill.
    The source must be the one of the database's newest regular snapshot (``dbre.repository.identity``):
    another one is refused (UsageError, nothing written) unless ``accept_new_source``; then
    ``stats.new_source`` names the previous one.
    """
    db = check_db_name(db or source.name)
    if not tags and "purpose" in source.identity():
        # a source that says why it is snapshotted is the live database a repair is about to change
        # (dbre.restore.table's safety snapshot): its undo, tagged so it stays out of the history
        tags = [SAFETY_TAG]
    started = time.perf_counter()
    repo.require_writable(f"backup {db}")
    with repo.lock(f"backup {db}") as lock:
        # a damaged manifest must not stop the next backup: the newest readable one is the parent
        # (format 2 reads one manifest, or one more per damaged newer one)
        skipped: list[tuple[str, str]] = []  # newer manifests that could not be read: said in the result
        parent_manifest = repo.newest_snapshot(db, damaged=skipped)
        if parent_manifest is None and skipped:
            _refuse_if_no_manifest_opens(repo, skipped)
        # the source must be the one this name's snapshots came from (checked before anything is written);
        # the parent stays the newest snapshot whatever its tags: it is only what the pages dedup against
        reference = _source_reference(repo, db, parent_manifest) if replay is None and not tags else None
        moved = reference is not None and not same_source(reference.source, source.identity())
        if moved and not accept_new_source:
            assert reference is not None
            check = getattr(source, "check", None)
            if check is not None:
                check()  # a missing or unreadable file says so, rather than "another source"
            raise _refusal(db, reference, source)
        # read the parent's page map before the read transaction: in rollback mode writers wait
        # records into lost packs are dropped (their pages are stored again); --full drops them all
        parent_records, chain = _parent_records(repo, parent_manifest, full, repack)
        with ExitStack() as stack:
            session = ImageSession(clock=lambda: snapshot_time(lock))  # looked up at call time (tests fake history)
            stack.callback(session.close)  # after the connection: see dbre.sources.image on POSIX locks
            conn = stack.enter_context(source.connect())
            read_ok = False
            try:
                session.begin(conn)  # the read transaction: everything below sees this one commit
                page_size, page_count = session.page_size, session.page_count
                same_size = parent_manifest is not None and parent_manifest.page_size == page_size
                parent = parent_records if same_size else None
                if checksums is None:
                    checksums = page_size * page_count <= CHECKSUM_AUTO_BYTES
                taken_at = session.started or snapshot_time(lock)  # taken just before BEGIN, never after
                schema = [
                    {"type": r[0], "name": r[1], "tbl_name": r[2], "sql": r[3]}
                    for r in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid")
                ]
                user_version = int(_pragma(conn, "user_version"))
                application_id = int(_pragma(conn, "application_id"))
                encoding = str(_pragma(conn, "encoding"))
                journal_mode = str(_pragma(conn, "journal_mode"))
                writer = PackWriter(repo.store, repo.sealer)
                parent_fast = load_fast_hashes(repo, parent_manifest) if parent is not None else None
                sink = PageSink(repo, writer, parent, page_size, page_count, progress, parent_fast,
                                parent_runs=parent_manifest.runs if parent_manifest is not None else (),
                                parent_fast_runs=parent_manifest.fast_runs if parent_manifest is not None else (),
                                # (fast runs never into a lost pack)
                                avoid_runs={*chain.repacked, *chain.run_packs},
                                avoid_fast={*chain.repacked, *chain.run_packs, *chain.lost})
                # with table checksums the sink tells unchanged pages by the keyed hash, whatever the
                # parent lends: the partial sums this snapshot records are carried over by the next one
                carry = not moved and replay is None
                sink.keyed_same = bool(checksums) and direct and parent is not None
                try:
                    image = session.image() if direct else None
                    # a table none of whose pages changed keeps the parent's count and checksum
                    # (never across sources, in a replay, with --full, or on the backup-API path)
                    reused: list[str] = []
                    # per-leaf partial sums of the checksums (direct path): the next backup re-reads
                    # only the rows of leaves that changed
                    sums = PageSums(_page_of(image), bytearray(PAGE_SUM.size * page_count)) \
                        if checksums and image is not None else None
                    # with nothing of the parent to carry over (a first or --full backup: the sink's
                    # marks are not needed), the checksums are computed while the sink stores the pages
                    early = _checksums_beside(conn, reused, sums) \
                        if image is not None and checksums and not (carry and sink.keyed_same) else None
                    try:
                        if image is not None:
                            sink.feed(image)
                        else:
                            page_one = _copy_pages(conn, sink, session)
                    except BaseException:
                        if early is not None:
                            conn.interrupt()  # (the backup failed: the checksums are not wanted)
                        raise
                    finally:
                        if early is not None:
                            wait([early])  # (conn is the thread's until then)
                    # (nothing of the parent with --full, or when its page map is not usable)
                    parent_sums = load_page_sums(repo, parent_manifest) \
                        if sums is not None and carry and parent is not None else None
                    # (carried only over the keyed sink's marks; without it nothing is, or checksums are off)
                    prior = _priors(parent_manifest, parent_fast, image, encoding, parent_sums, sink.same) \
                        if carry and sink.keyed_same else None
                    stats = early.result() if early is not None else \
                        table_stats(conn, checksums, prior, reused, sums, version=CHECKSUM_VERSION)
                    basis = _basis(conn, image, reused, parent_manifest if prior is not None else None)
                    if sums is not None and sums.used:
                        sink.store_sums(sums.out, PAGE_SUM.size, parent_manifest.sum_runs
                                        if parent_sums is not None and parent_manifest is not None else [])
                    runs, fast_runs = sink.finish()  # (the page map and fast runs went into the packs as they filled)
                    path = "direct" if image is not None else f"backup API ({session.reason or 'asked'})"
                    wal_pages = len(image.overlay) if image is not None else 0
                    page_one = "source" if image is not None else page_one
                except BaseException:
                    sink.abort()
                    writer.abort()
                    raise
                read_ok = True
            except apsw.Error as err:
                # (a failing read can leave SQLite's last message at "not an error": name the kind then)
                what = str(err) if str(err).strip() not in ("", "not an error") else type(err).__name__
                if isinstance(err, (apsw.BusyError, apsw.LockedError)):
                    # (a rollback-mode writer holding its lock past the busy timeout: nothing is wrong with the file)
                    raise SourceError(f"backup of {db}: the source stayed locked by a writer ({what}); nothing was "
                                      "stored", "run the backup again when that write is done (a long transaction "
                                      "or an exclusive lock holds it; WAL mode lets readers in beside "
                                      "writers)") from err
                raise SourceError(f"backup of {db}: SQLite could not read the source ({what}); nothing was stored",
                                  "check that the source is a healthy database, and that nothing but SQLite "
                                  "writes its file or -wal") from err
            finally:
                if conn.in_transaction:
                    try:
                        conn.execute("COMMIT")
                    except apsw.Error:
                        # (a read transaction on a damaged file can fail its COMMIT too: the error above,
                        # which names the cause and the fix, is the one to see; after a good read it is raised)
                        if read_ok:
                            raise
        try:
            packs = writer.finish()
        except BaseException:
            writer.abort()
            raise
        if progress:
            progress(page_count, page_count)
        referenced = set(sink.packs)
        referenced.discard(bytes(16))
        sum_runs = [r for r in sink.sum_runs if r is not None]
        all_packs = sorted({p.hex() for p in referenced} | {r.pack for r in runs} | {r.pack for r in fast_runs}
                           | {r.pack for r in sum_runs})
        manifest = Manifest(
            id=new_snapshot_id(),
            db=db,
            taken_at=replay.taken_at if replay else iso(taken_at),
            page_size=page_size,
            page_count=page_count,
            runs=runs,
            fast_runs=fast_runs,
            packs=all_packs,
            parent=parent_manifest.id if parent_manifest and chain.unused is None else None,
            tool=TOOL,
            source=replay.source if replay else {**source.identity(), "application_id": application_id},
            schema=schema,
            tables={k: TableStats(rows=v[0], checksum=v[1]) for k, v in stats.items()},
            user_version=user_version,
            encoding=encoding,
            journal_mode=journal_mode,
            mode=replay.mode if replay else _file_mode(source),
        )
        seconds = time.perf_counter() - started
        manifest.stats = {
            "pages_added": sink.pages_added,
            "bytes_added": writer.bytes_written + sink.cold_bytes + sink.run_bytes,
            "packs_added": len(packs) + len(sink.cold_packs) + len(sink.run_packs),
            "seconds": round(seconds, 3),
            "read": path,  # how the pages were read (see dbre.sources.image)
            "wal_pages": wal_pages,  # pages taken from WAL frames, not the file (direct path)
            "page1": page_one,  # "source", or "rebuilt header" (backup API path: see ImageSession.page_one)
            "wal": session.wal_position(),  # where in the WAL this snapshot ends (for `dbre replicate`)
        }
        manifest.stats["checksum_version"] = CHECKSUM_VERSION  # what its checksums mean (validation, reuse)
        if getattr(source, "last_method", None):  # a remote source: "replica" (what changed) or "dump" (all)
            manifest.stats["source_method"] = source.last_method  # type: ignore[attr-defined]
            if getattr(source, "last_fallback_reason", None):
                manifest.stats["source_fallback"] = source.last_fallback_reason  # type: ignore[attr-defined]
        if basis is not None:
            manifest.stats["checksum_basis"] = basis  # what the next backup's reuse compares with
            manifest.stats["tables_reused"] = len(reused)
        if sum_runs:  # the checksums' per-page partial sums (a hint for the next backup, like fast runs)
            manifest.stats["checksum_pages"] = {"entry": PAGE_SUM.size, "runs": [asdict(r) for r in sum_runs]}
        if sums is not None and sums.leaves:  # how much of the rowid tables' checksums was read again
            manifest.stats["checksum_leaves"] = {"read": sum(r for r, _ in sums.leaves.values()),
                                                 "of": sum(n for _, n in sums.leaves.values())}
        if tags:
            manifest.stats["tags"] = list(tags)
        if moved and reference is not None:
            manifest.stats["new_source"] = {"from": reference.source, "snapshot": reference.id}
        if replay is not None:
            manifest.stats["migrated_from"] = {"id": replay.id, "format": replay.format, "tool": replay.tool,
                                               "parent": replay.parent}
        if skipped:
            manifest.stats["skipped_manifests"] = [key for key, _ in skipped]
        if chain.unused is not None:
            manifest.stats["full"] = chain.unused  # nothing of the parent reused: "asked", or why
        if chain.lost:
            # pages whose parent record pointed into a lost pack, stored again (if still in the file)
            manifest.stats["missing_packs"] = chain.lost
            manifest.stats["repaired_pages"] = _count(parent, LOST, page_count) if parent is not None else 0
        if chain.repacked and parent is not None:
            # pages of the parent's sparse packs stored again (unless changed anyway): see _repack
            manifest.stats["repacked_packs"] = len(chain.repacked)
            manifest.stats["repacked_pages"] = _count(parent, REPACK, page_count)
        # never commit after the lock stopped being refreshed: another host may have pruned meanwhile
        lock.check_alive(f"backup of {db}", hint="run the backup again")
        repo.write_manifest(manifest)
    # bytes_added counts packs (pages and page-map runs), as the manifest's stats do; the manifest
    # itself (a few hundred bytes) is not counted, so `backup --json` and `snapshots` agree
    return BackupResult(manifest, sink.pages_added, writer.bytes_written + sink.cold_bytes + sink.run_bytes, seconds)


def _checksums_beside(conn: apsw.Connection, reused: list[str],
                      sums: PageSums | None) -> Future[dict[str, tuple[int, str | None]]]:
    """``table_stats`` with checksums and nothing of a parent, on a thread of its own, in ``conn``'s
    read transaction, while the caller stores the pages of the same snapshot from its image (which
    never touches ``conn``). SQLite (its memory statistics off: see ``dbre``) and zstd work without
    the GIL, but both sides' per-row and per-page Python work still takes turns on it: at 100 MiB the
    backup went from 0.88 to 0.78 s, not down to the copy's 0.3 s. The caller must not use ``conn``
    before the future is done (it waits for it, even on failure)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbre-checksums")
    try:
        return pool.submit(table_stats, conn, True, None, reused, sums, version=CHECKSUM_VERSION)
    finally:
        pool.shutdown(wait=False)  # (the one job still runs; its thread ends with it)


def _page_of(image: PageImage) -> Callable[[int], memoryview]:
    """Page ``pageno`` (1-based) read again after the sink's pass (the table checksums' leaves), into
    memory of its own (``PageImage.read_page``, not through the map: see there)."""
    return lambda pageno: image.read_page(pageno - 1)


def _lends_checksums(parent: Manifest) -> bool:
    """The parent's table checksums can be reused: they have this dbre's meaning
    (``stats.checksum_version``) and came from this SQLite (another may render a REAL differently
    in quote(): 3.43 changed it)."""
    basis = parent.checksum_basis
    return basis is not None and parent.checksum_version == CHECKSUM_VERSION \
        and parent.stats["checksum_basis"].get("sqlite") == _engine()


def load_page_sums(repo: Repository, parent: Manifest | None) -> bytearray | None:
    """A snapshot's per-page partial sums of its table checksums (``PAGE_SUM`` entries), checked
    like page-map runs; None when it has none or they cannot be read (then every table is read)."""
    if parent is None or not parent.sum_runs or not _lends_checksums(parent):
        return None  # (a parent whose checksums ``_priors`` would not reuse: its sums are not read)
    try:
        return _gather(_run_bytes(repo, parent, parent.sum_runs, PAGE_SUM.size), PAGE_SUM.size * parent.page_count)
    except (IntegrityError, NotFound) as err:
        log.warning("snapshot %s: %s; every table's checksum is read whole", parent.id, err.message)
        return None


def _priors(parent: Manifest | None, parent_fast: Entries | None, image: PageImage | None,
            encoding: str, parent_sums: bytearray | None, same: bytearray) -> Callable[[str], Prior | None] | None:
    """What the parent recorded of each table, for ``table_stats`` to reuse when none of the
    table's pages changed: "unchanged" is ``same``, the keyed sink's marks (``PageSink.keyed_same``:
    the page's keyed hash is the parent's record, so the bytes the parent stored and summed; the
    unkeyed xxh3 alone can be collided by someone who writes part of a page). None (every table
    read) without a parent, its fast hashes or its ``checksum_basis`` (older snapshots), without
    the direct image, when the page size, reserved bytes or text encoding differ, or when the
    parent's checksums have another meaning (``stats.checksum_version``) or came from another SQLite."""
    if parent is None or parent_fast is None or image is None or parent.page_size != image.page_size \
            or parent.encoding != encoding:
        return None
    basis = parent.checksum_basis
    if basis is None or basis[0] != image.view(0)[20] or not _lends_checksums(parent):
        return None
    roots = basis[1]
    schema = {o.get("name"): o for o in parent.schema if isinstance(o, dict) and o.get("type") == "table"}
    limit = min(len(parent_fast), image.page_count)

    def unchanged(pageno: int) -> bool:
        i = pageno - 1
        return 0 <= i < limit and same[i] == 1

    ages = _reuse_ages(parent)

    def prior(name: str) -> Prior | None:
        t, root, row = parent.tables.get(name), roots.get(name), schema.get(name)
        if t is None or root is None or row is None or type(t.rows) is not int or t.rows < 0 \
                or ages.get(name, 0) >= REUSE_LIMIT \
                or not (t.checksum is None or isinstance(t.checksum, str) and len(t.checksum) == 32):
            return None
        return Prior(t.rows, t.checksum, row, root, unchanged, parent_sums, same)

    return prior


def _basis(conn: apsw.Connection, image: PageImage | None, reused: list[str],
           parent: Manifest | None) -> dict[str, Any] | None:
    """What a later backup needs to reuse this one's table checksums: the reserved bytes per
    page, each table's root page (direct path only: page 1 is in hand), the SQLite that read them,
    and how many backups in a row each reused table's checksum has been carried (``REUSE_LIMIT``)."""
    if image is None:
        return None
    roots = {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, rootpage FROM sqlite_schema WHERE type='table'")
             if isinstance(r[1], int) and r[1] > 0}
    ages = _reuse_ages(parent) if parent is not None else {}
    return {"reserved": image.view(0)[20], "roots": roots, "sqlite": _engine(),
            "reused": {name: ages.get(name, 0) + 1 for name in reused}}


def _refuse_if_no_manifest_opens(repo: Repository, skipped: list[tuple[str, str]], tries: int = 32) -> None:
    """Every manifest of this database failed to open: if no other manifest of the repository opens
    either (up to ``tries`` of them; two or more in all), the likely cause is the config, not the
    manifests (one copied from another repository, or replaced), and a full backup on top of it would
    only add snapshots no one can restore with the right config. Refused, nothing written. One that
    opens, or a repository whose only manifest is damaged: the backup goes on (its result says what
    it skipped)."""
    seen = {key for key, _ in skipped}
    others = [r for r in repo.list_snapshot_refs() if r.key not in seen][:tries]
    for ref in others:
        try:
            repo.load_ref(ref)
            return
        except RepositoryError:
            continue
    n = len(seen) + len(others)
    if n < 2:
        return  # (one damaged manifest, the only one: the backup starts again with a full snapshot)
    raise IntegrityError(f"no snapshot manifest in {repo.url} opens ({n} tried, e.g. {skipped[0][1]})",
                         "the config may be another repository's or replaced: put this repository's config back "
                         "(`dbre copy` keeps one offsite) and run `dbre verify`; nothing was written")


def _reuse_ages(parent: Manifest) -> dict[str, int]:
    """For each table whose checksum the parent carried over, in how many backups in a row (absent: read)."""
    basis = parent.stats.get("checksum_basis") if isinstance(parent.stats, dict) else None
    ages = basis.get("reused") if isinstance(basis, dict) else None
    if not isinstance(ages, dict):
        return {}
    return {k: v for k, v in ages.items() if isinstance(k, str) and isinstance(v, int) and v >= 0}


def _engine() -> str:
    """The SQLite that computed a snapshot's checksums (version and platform): a parent's are reused
    only by the same one, so a reused checksum is the one this SQLite would compute."""
    return sqlite_engine()


def _source_reference(repo: Repository, db: str, newest: Manifest | None) -> Manifest | None:
    """The snapshot whose source a new backup of ``db`` must match: the newest regular (untagged)
    one. A safety snapshot's source is whatever live file a repair was given, not the chain's.
    Walks past tagged (and damaged) manifests only when the newest is tagged."""
    if newest is None or not newest.tags:
        return newest
    refs = sorted((r for r in repo.list_snapshot_refs(db) if r.time is not None),
                  key=lambda r: (r.time, r.id), reverse=True)  # type: ignore[arg-type,return-value]
    for ref in refs:
        try:
            m = repo.load_ref(ref)
        except IntegrityError:
            continue  # a damaged manifest is reported by verify; it names no source
        if not m.tags:
            return m
    return None  # only tagged snapshots: nothing to compare with


def _refusal(db: str, reference: Manifest, source: Source) -> UsageError:
    """The refusal of a source that is not ``reference``'s, worded by what the new source holds
    (a local file's tables and application_id, read without writing it; a remote one is not read)."""
    current = source.identity()
    app_id: int | None = None
    tables: list[str] | None = None
    if current.get("kind") == "file":
        try:
            with source.connect() as conn:
                app_id = int(_pragma(conn, "application_id"))
                tables = table_names([{"type": r[0], "name": r[1]} for r in
                                      conn.execute("SELECT type, name FROM sqlite_schema")])
        except (apsw.Error, SourceError):
            pass  # the refusal stands; it just cannot say what the file holds
    return refuse_new_source(db, reference.source, current, table_names(reference.schema), app_id, tables)


@dataclass
class ParentCheck:
    """What of the parent a backup may reuse."""

    lost: list[str]  # packs the parent needs that are missing (or, when checked, damaged)
    unused: str | None = None  # why nothing of the parent is reused: "asked" (--full), or the cause
    repacked: set[str] = field(default_factory=set)  # sparse packs whose pages (some or all) are stored again
    # sparse packs that hold some of the parent's runs: those runs are written again, not reused (a
    # run shares its pack with page batches, and must not keep an emptied pack from being pruned)
    run_packs: set[str] = field(default_factory=set)


def _parent_records(repo: Repository, parent: Manifest | None, full: bool,
                    repack: bool = True) -> tuple[Entries | None, ParentCheck]:
    """The parent's page records to dedup against, each record into a lost pack replaced by LOST
    (whose hash matches no page, so the page is stored again), and with ``repack`` each record into
    a sparse pack chosen by ``_repack`` replaced by REPACK. Nothing is reused with ``full``, or
    when the parent's page map cannot be read or lies in a lost pack. A store error other than
    not-found raises: nothing is concluded from a failed read or listing."""
    if parent is None:
        return None, ParentCheck([])
    if full:
        return None, ParentCheck([], "asked")
    try:
        records = load_records(repo, parent)
    except (IntegrityError, NotFound) as err:
        return None, ParentCheck([], f"its page map cannot be read: {err.message}")
    lost, slots = _lost_packs(repo, parent, records)
    if any(run.pack in lost for run in parent.runs):
        return None, ParentCheck(sorted(lost), "its page map is in a missing or damaged pack")
    if lost:
        gone = np.array([bytes.fromhex(p) for p in lost], dtype="S16")
        _rows(records)[np.isin(_column(records, 16, 16), gone)] = np.frombuffer(LOST, dtype=np.uint8)
    repacked = _repack(records, slots) if repack else set()
    run_packs = _sparse_run_packs(parent, records, slots) if repack else set()
    return records, ParentCheck(sorted(lost), repacked=repacked, run_packs=run_packs)


def _sparse_run_packs(parent: Manifest, records: Entries, slots: dict[str, int]) -> set[str]:
    """The packs of the parent's runs (page map, fast and page sums) in which fewer than
    ``REPACK_BELOW`` of the page slots are still used by the parent's records: a run reused there
    would keep the pack alive after its pages die, so the run is written again instead (a few KB)."""
    packs = {run.pack for run in (*parent.runs, *parent.fast_runs, *parent.sum_runs)}
    refs: Counter[str] = Counter()
    for pack, start, stop in stretches(_column(records, 16, 16)):
        p = value(pack, 16).hex()
        if p in packs:
            refs[p] += stop - start  # (records, an upper bound of the slots they use)
    return {p for p in packs if slots.get(p) and refs[p] < REPACK_BELOW * slots[p]}


def _column(records: Entries, start: int, width: int) -> np.ndarray:
    return column(records.buf, records.size, start, width)


def _rows(records: Entries) -> np.ndarray:
    """The records as a writable (n, 46) array of bytes over the same buffer."""
    return np.frombuffer(records.buf, dtype=np.uint8).reshape(-1, records.size)


def _count(records: Entries, marker: bytes, limit: int) -> int:
    """How many of the first ``limit`` records are ``marker``."""
    rows = _rows(records)[:limit]
    return int(np.count_nonzero((rows == np.frombuffer(marker, dtype=np.uint8)).all(axis=1)))


def _repack(records: Entries, slots: dict[str, int]) -> set[str]:
    """Replace by REPACK, in place, the records into the parent's sparse packs, so their pages are
    stored again densely and prune frees those packs once no kept snapshot uses them.

    A pack is sparse when the page slots the parent's records use in it (distinct blob and slot)
    are fewer than ``REPACK_BELOW`` of the page slots its index lists (``slots``). Sparsest first,
    at most ``REPACK_BUDGET`` of the parent's pages per backup (so an incremental's cost still
    follows change); a pack that does not fit is done in part, in page order, and is sparser still
    at the next backup.

    Pack spread is handled the same way: when the parent's pages lie in more than
    ``SMALL_PACKS_MAX`` small packs (fewer than ``SMALL_PACK_SLOTS`` page slots: what small
    incrementals leave behind, fully live, never sparse), the pages of the smallest are merged into
    a new pack until half that many small packs are left, so the packs a restore and the next
    backup's parent check read stay bounded whatever the history. Returns the packs touched."""
    # (counted with numpy over the records' buffer: no Python object per page)
    packs_col = _column(records, 16, 16)
    refs: Counter[bytes] = Counter()  # pack -> records
    for pack, start, stop in stretches(packs_col):
        refs[value(pack, 16)] += stop - start
    small = sorted((slots[p.hex()], p) for p in refs if 0 < slots.get(p.hex(), 0) < SMALL_PACK_SLOTS)
    merge = [p for _, p in small[: len(small) - SMALL_PACKS_MAX // 2]] if len(small) > SMALL_PACKS_MAX else []
    if not merge and not any(n < REPACK_BELOW * slots.get(p.hex(), 0) for p, n in refs.items()):
        return set()  # distinct slots never outnumber records: no pack can be sparse
    distinct = np.unique(_column(records, 16, 30))  # distinct (pack, blob, slot)
    live_packs, live_counts = np.unique(np.ndarray((len(distinct),), dtype="S16", buffer=distinct, strides=(30,)),
                                        return_counts=True)
    live = {value(p, 16): int(c) for p, c in zip(live_packs.tolist(), live_counts.tolist(), strict=True)}
    sparse = sorted((live[p] / slots[p.hex()], p) for p in live
                    if slots.get(p.hex()) and live[p] < REPACK_BELOW * slots[p.hex()])
    chosen = {p for _, p in sparse}
    sparse += [(1.0, p) for p in merge if p not in chosen]  # after the sparse ones, smallest first
    left = int(REPACK_BUDGET * len(records))
    take: dict[bytes, int] = {}
    for _, pack in sparse:
        if left <= 0:
            break
        take[pack] = min(refs[pack], left)
        left -= take[pack]
    if not take:
        return set()
    rows = _rows(records)
    marker = np.frombuffer(REPACK, dtype=np.uint8)
    for pack, n in take.items():
        rows[np.flatnonzero(packs_col == np.array(pack, dtype="S16"))[:n]] = marker  # the first n, in page order
    return {p.hex() for p in take}


def _lost_packs(repo: Repository, parent: Manifest, records: Entries) -> tuple[set[str], dict[str, int]]:
    """The parent's packs that are missing or whose index does not authenticate, and the number
    of page slots (pages of its 'd' blobs) the index of each other one lists: each pack's tail
    is read, concurrently (about the cost of asking whether it exists, and it checks the index).
    The cost follows the parent's packs, never the repository's: no listing of packs/."""
    packs = set(parent.packs) | {run.pack for run in parent.runs}
    ends = dict.fromkeys(packs, 0)
    blobs = {value(b, 28) for b, _, _ in stretches(_column(records, 16, 28))}  # distinct blobs
    for pack, off, length in map(_BLOB.unpack, blobs):
        p = pack.hex()
        if p in ends and off + length > ends[p]:
            ends[p] = off + length
    for run in parent.runs:
        ends[run.pack] = max(ends[run.pack], run.offset + run.length)

    def page_slots(pack: str) -> int | None:
        try:
            blobs = read_index_tail(repo.store, repo.sealer, pack, ends[pack])
        except (NotFound, IntegrityError):
            return None  # lost
        return sum(len(b.hashes) for b in blobs if b.kind == b"d")  # any other store error raises

    with ThreadPoolExecutor(max_workers=max(1, min(PARENT_CHECKERS, len(ends))),
                            thread_name_prefix="dbre-parent") as pool:
        found = dict(zip(ends, pool.map(page_slots, ends), strict=True))
    return {p for p, n in found.items() if n is None}, {p: n for p, n in found.items() if n is not None}


def _copy_pages(conn: apsw.Connection, sink: PageSink, session: ImageSession) -> str:
    """Copy the read transaction through the backup API; page 1 is the source's own (the backup
    API rewrites its header): returns how it was taken (see ``ImageSession.page_one``)."""
    vfs = _SinkVFS(sink)
    try:
        dest = apsw.Connection(f"dbre-sink-{secrets.token_hex(4)}.db", vfs=vfs.vfs_name)
        try:
            dest.execute("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-16384")
            with dest.backup("main", conn, "main") as b:
                # one step: a stepped backup restarts whenever another connection writes
                b.step(-1)
        finally:
            dest.close()
    finally:
        vfs.unregister()
    if sink.page_count == 0:
        return "source"
    copied = vfs.main.first if vfs.main is not None else b""
    if len(copied) != sink.page_size:
        raise SourceError("backup: the backup API wrote no page 1")
    page, how = session.page_one(copied)
    sink.add(0, page)
    return how


def _file_mode(source: Source) -> int | None:
    file_mode = getattr(source, "file_mode", None)  # a local file's permission bits; None elsewhere
    return file_mode() if callable(file_mode) else None


def load_fast_hashes(repo: Repository, parent: Manifest | None) -> Entries | None:
    """A snapshot's xxh3 per page from its fast runs (None when it has none or they cannot be
    read: then every page gets the keyed hash — in the next backup, as in a first one; in a
    restore, as its check). Each run is checked like a page-map run."""
    if parent is None or not parent.fast_runs:
        return None
    try:
        out = _gather(_run_bytes(repo, parent, parent.fast_runs, 16), 16 * sum(r.pages for r in parent.fast_runs))
    except (IntegrityError, NotFound) as err:
        log.warning("snapshot %s: %s; every page gets the keyed hash", parent.id, err.message)
        return None
    return Entries(out, 16) if len(out) == 16 * parent.page_count else None
