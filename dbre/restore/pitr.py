"""Point-in-time restore from segments: a generation's base snapshot plus its transactions up to T, exactly.

Plan first (which generation, which segments: from their names alone, one listing), then apply:
the base snapshot is restored to a temp file beside the target (every page checked, as any
restore), each segment is read, unsealed under its key and its hash chain recomputed over every
page from the previous segment's end, the transactions observed committed at or before T (or up to
``--txid N``) are written over it, the file is cut to the last one's page count, fsynced, and
renamed over the target. Nothing is written to the target unless every object checked.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dbre.replicate.segment as segment_mod
from dbre.errors import IntegrityError, RestoreError, UsageError
from dbre.replicate.segment import (
    Generation,
    Segment,
    SegmentName,
    Transaction,
    base_state,
    check_contiguous,
    check_follows,
    check_times,
    fetch_segment,
    list_generations,
    open_segment,
    read_base,
    to_time,
)
from dbre.repository.fallback import primary_of, retrying
from dbre.repository.manifest import Manifest, iso, micros
from dbre.repository.repo import Repository
from dbre.restore.full import (
    _remove_leftovers,
    _replace,
    _write_restore,
    check_target,
    pitr_scratch_name,
    plan_restore,
    safety_before_replace,
    said_safety,
)
from dbre.storage import NotFound

SEGMENT_READERS = 8  # segments fetched at once (one GET each)
SEGMENTS_AHEAD = 16  # fetched ahead of the one being checked, at most ...
READ_AHEAD_BYTES = 64 * 1024 * 1024  # ... and at most this many bytes of them (see _apply_segments)
MIN_ALLOWANCE = 1024 * 1024  # the least a fetch ahead may read before it is redone whole at its turn
HOLD_BYTES = 64 * 1024 * 1024  # newest page versions held across segments before they are written
OPEN_AHEAD = 2  # segments decoded ahead of the one being applied


@dataclass
class PitrPlan:
    """A generation's base, the segments to read, and where to stop (a time or a txid)."""

    db: str
    target: Path
    force: bool
    generation: Generation
    base: Manifest
    segments: list[SegmentName]
    at: datetime | None = None
    txid: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    only_empty: bool = False  # as RestorePlan.only_empty
    safety: bool = False  # as RestorePlan.safety
    existed: bool = False  # as RestorePlan.existed

    def describe(self) -> dict[str, Any]:
        return {
            "db": self.db,
            "target": str(self.target),
            "replaces_existing": self.existed,  # (as planned)
            "at": iso(self.at) if self.at else None,
            "txid": self.txid,
            "generation": self.generation.id,
            "snapshot": self.base.id,
            "taken_at": self.base.taken_at,
            "segments": len(self.segments),
            "objects": 1 + len(self.segments) + len(self.base.packs) + len(self.base.runs),
            **self.stats,
        }


def plan_pitr(repo: Repository, db: str, target: str | os.PathLike[str], *, at: datetime | None = None,
              txid: int | None = None, force: bool = False, only_empty: bool = False) -> PitrPlan | None:
    """As `_plan_pitr`; ``only_empty`` as in `plan_restore`."""
    plan = _plan_pitr(repo, db, target, at=at, txid=txid, force=force)
    if plan is not None:
        plan.only_empty = only_empty
        plan.existed = plan.target.exists()
    return plan


def _plan_pitr(repo: Repository, db: str, target: str | os.PathLike[str], *, at: datetime | None = None,
               txid: int | None = None, force: bool = False) -> PitrPlan | None:
    """The plan for ``--at`` or ``--txid`` from segments, or with neither for the newest replicated
    state; None when no generation covers ``at`` (or the newest state) better than a snapshot does
    (the caller then restores a snapshot as before)."""
    if at is not None and txid is not None:
        raise UsageError("--at and --txid were both given", "pass one of them")
    path = check_target(target, force)
    point = retrying(repo, lambda: find_point(repo, db, at=at, txid=txid))
    if point is None:
        return None
    return PitrPlan(db, path, force, point.generation, point.base, point.segments, at=at, txid=txid)


@dataclass
class PitrPoint:
    """A replicated state: a generation's base snapshot and the segments whose transactions up to
    ``at`` (or ``txid``; with neither, all of them) make it."""

    generation: Generation
    base: Manifest
    segments: list[SegmentName]
    at: datetime | None = None
    txid: int | None = None


def find_point(repo: Repository, db: str, *, at: datetime | None = None, txid: int | None = None) -> PitrPoint | None:
    """Which generation and segments hold the state at ``at`` (or up to ``txid``; with neither, the
    newest replicated state), chosen as `restore --at` chooses; None when a snapshot holds it as well
    or better (or nothing is replicated): the caller then takes the snapshot at or before ``at``.
    Reads names, generation bases and at most one segment; writes nothing."""
    if at is not None and txid is not None:
        raise UsageError("--at and --txid were both given", "pass one of them")
    gens = list_generations(repo, db)
    if at is None and txid is None:
        return _newest_point(repo, db, gens)
    if at is not None and gens:
        from dbre.replicate.window import read_pruned

        pruned = read_pruned(repo, db)
        if pruned is not None and at < pruned:
            raise UsageError(f"restore --at {iso(at)}: {db}'s transactions before {iso(pruned)} were pruned "
                             "(outside the retention window)",
                             "pick a time at or after it, or restore a kept snapshot with --snapshot")
    chosen: tuple[Generation, list[SegmentName]] | None = None
    for gen_id in reversed(gens):
        if at is not None and int(gen_id[:16], 16) > micros(at):
            continue  # the name carries the base's time: a newer generation is skipped unread
        names = gens[gen_id]
        if txid is not None and not (names and names[0].first <= txid <= names[-1].last):
            try:
                candidate = read_base(repo, db, gen_id)
            except NotFound:
                continue  # (a generation that does not hold txid: its lost base is verify's to report)
        else:
            candidate = _read_base_or_refuse(repo, db, gen_id)
        if micros(candidate.time) != int(gen_id[:16], 16):
            raise IntegrityError(f"{candidate.key}: base taken at {candidate.taken_at}, its name says otherwise",
                                 "the base was moved or replaced: restore it from the offsite copy")
        if at is not None and candidate.time <= at:
            chosen = (candidate, names)
            break
        if txid is not None and candidate.base_txid <= txid <= (names[-1].last if names else candidate.base_txid):
            chosen = (candidate, names)
            break
    if chosen is None:
        if txid is not None:
            raise UsageError(f"no replicated transaction {txid} of {db!r}", "list segments with `dbre verify`")
        return None
    gen, names = chosen
    if at is not None:
        check_times(db, gen, names)  # (from the names alone: which segments are "at or before T" is sound)
        limit = micros(at)
        needed = [n for n in names if n.first_us <= limit]
        newer = repo.find_snapshot(db, at=at)
        if newer.id != gen.snapshot and micros(newer.time) > _last_seen(repo, gen, needed, limit, micros(newer.time)):
            # a snapshot taken (at or before T) after the last transaction the segments observed by T
            # holds every one of them and maybe more: commits made while no replicator ran are only
            # stamped when one resumes, after T. (A snapshot's time is taken just before its read
            # transaction begins, so it holds every commit observed before that time.)
            return None
    else:
        assert txid is not None
        needed = [n for n in names if n.first <= txid]
    # a gap among them, or right after them (before the next segment stored), is refused; one
    # further on does not matter to this restore
    following = names[len(needed) : len(needed) + 1] if names[: len(needed)] == needed else []
    needed = check_contiguous(db, gen, needed + following)[: len(needed)]
    return PitrPoint(gen, base_snapshot(repo, gen), needed, at=at, txid=txid)


def _newest_point(repo: Repository, db: str, gens: dict[str, list[SegmentName]]) -> PitrPoint | None:
    """Every transaction of the newest generation, unless a snapshot taken after the last of them
    was observed holds as much or more (None: restore that snapshot). A generation that cannot be
    restored (its base lost, a gap) is refused, the hint naming ``--snapshot latest``."""
    if not gens:
        return None
    gen_id, names = next(reversed(gens.items()))
    if not names:
        return None  # (the base is a snapshot: the newest snapshot holds at least as much)
    if micros(repo.find_snapshot(db).time) > names[-1].last_us:
        return None  # (taken after the last transaction was observed: it holds every one of them)
    try:
        gen = _read_base_or_refuse(repo, db, gen_id)
        if micros(gen.time) != int(gen_id[:16], 16):
            raise IntegrityError(f"{gen.key}: base taken at {gen.taken_at}, its name says otherwise",
                                 "the base was moved or replaced: restore it from the offsite copy")
        names = check_contiguous(db, gen, check_times(db, gen, names))
        return PitrPoint(gen, base_snapshot(repo, gen), names)
    except IntegrityError as err:
        raise IntegrityError(err.message, f"{err.hint}; or --snapshot latest: the newest snapshot, without the "
                             "transactions replicated after it") from err


def _read_base_or_refuse(repo: Repository, db: str, gen_id: str) -> Generation:
    """The base of the generation a restore needs; a lost one is refused (its transactions are in
    the repository: restoring an older state instead would drop them silently)."""
    try:
        return read_base(repo, db, gen_id)
    except NotFound:
        since = iso(to_time(int(gen_id[:16], 16)))
        raise IntegrityError(f"segments/{db}/{gen_id}/base is missing: the transactions of {db} since {since} "
                             "cannot be restored", f"restore --at a time before {since}, or restore the base "
                             "from the offsite copy (`dbre verify` reports the generation)") from None


def _last_seen(repo: Repository, gen: Generation, needed: list[SegmentName], limit: int, newer_us: int) -> int:
    """The observation time (µs) of the last transaction the segments saw at or before ``limit``
    (the base's time when none): from the names, or from the one segment that straddles the limit
    when the snapshot at ``newer_us`` falls inside it."""
    if not needed:
        return micros(gen.time)
    last = needed[-1]
    if last.last_us <= limit or newer_us <= last.first_us:
        return min(last.last_us, limit)
    seg = open_segment(repo, last, None)  # (checked in full again when applied)
    return max(tx.observed_us for tx in seg.transactions if tx.observed_us <= limit)


def base_snapshot(repo: Repository, gen: Generation) -> Manifest:
    """A generation's base snapshot, checked to be the one its chain starts from."""
    ref = repo._ref(gen.snapshot_key)
    if ref is None or not repo.store.exists(gen.snapshot_key):
        raise IntegrityError(f"{gen.key}: base snapshot {gen.snapshot_key} is missing",
                             "restore an earlier time or from the offsite copy")
    base = repo.load_ref(ref)
    if base.id != gen.snapshot or base_state(repo.page_hash, gen.db, gen.id, base, gen.base_txid).hex() != gen.state:
        raise IntegrityError(f"{gen.key}: base snapshot {base.id} is not the one this generation started from",
                             "restore an earlier time or from the offsite copy")
    return base


@dataclass
class PitrResult:
    plan: PitrPlan
    seconds: float
    transactions: int
    last_txid: int
    last_observed: str | None
    safety_snapshot: str | None = None  # as RestoreResult.safety_snapshot

    def summary(self) -> dict[str, Any]:
        return {**self.plan.describe(), "transactions": self.transactions, "last_txid": self.last_txid,
                "last_committed": self.last_observed, "seconds": round(self.seconds, 3),
                "safety_snapshot": self.safety_snapshot}


def apply_pitr(repo: Repository, plan: PitrPlan) -> PitrResult:
    """Restore the base to a temp file, apply the transactions up to the plan's limit, rename."""
    started = time.perf_counter()
    target = plan.target
    safety = safety_before_replace(primary_of(repo), plan.db, target, plan.force and plan.safety, plan.base.size)
    _remove_leftovers(target)  # a killed restore's scratch copy (and its base restore's temp file)
    scratch = target.parent / pitr_scratch_name(target, secrets.token_hex(4))
    fd = -1

    def release() -> None:
        nonlocal fd
        if fd >= 0:
            os.close(fd)
            fd = -1

    def attempt() -> tuple[int, int, int]:
        nonlocal fd
        release()  # (again after an object was routed to an offsite copy: from the base restore on)
        scratch.unlink(missing_ok=True)
        _write_restore(repo, plan_restore(repo, plan.db, scratch, snapshot=plan.base.id), None)
        # flocked until the rename, as restore's temp files: a later restore's _remove_leftovers
        # removes it only once this process is gone
        fd = os.open(scratch, os.O_WRONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _apply_segments(repo, plan, scratch, fd)

    try:
        with said_safety(safety):
            try:
                with repo.read_lock(f"restore {plan.db}"):
                    applied, last, last_obs = retrying(repo, attempt)
                _replace(scratch, target, plan.force, release, only_empty=plan.only_empty)
            except OSError as err:
                raise RestoreError(f"restore to {target}: {err.strerror}") from err
    except BaseException:
        scratch.unlink(missing_ok=True)
        release()
        raise
    release()
    return PitrResult(plan, time.perf_counter() - started, applied, last,
                      iso(to_time(last_obs)) if last_obs else None, safety)


def _fetch_within(repo: Repository, name: SegmentName, allowance: int) -> bytes | None:
    """A segment's bytes if it holds at most ``allowance``; None if it is larger (it is then fetched
    whole, up to the cap, when its turn comes and nothing else is read ahead of it)."""
    if allowance >= segment_mod.SEGMENT_CAP:
        return fetch_segment(repo, name)
    data = repo.store.get_range(name.key, 0, allowance + 1)
    return data if len(data) <= allowance else None


def _open_fetched(repo: Repository, name: SegmentName, fetched: Future[bytes | None]) -> tuple[int, Segment | None]:
    """A segment fetched ahead (see `_fetch_within`), opened and its own chain checked; (0, None) if
    it was larger than its allowance."""
    raw = fetched.result()
    return (0, None) if raw is None else (len(raw), open_segment(repo, name, None, raw))


def _apply_segments(repo: Repository, plan: PitrPlan, scratch: Path, fd: int) -> tuple[int, int, int]:
    """Write the pages of the transactions up to the limit over the base, then cut the file to the
    last one's page count. The newest version of each page is held across segments, up to
    ``HOLD_BYTES``, and written once (a page rewritten by every transaction is written once per
    hold, not once per segment); memory holds those pages and the segments read ahead."""
    gen = plan.generation
    limit_us = micros(plan.at) if plan.at is not None else None
    page_count = plan.base.page_count
    applied, last, last_obs = 0, gen.base_txid, 0
    ps = plan.base.page_size
    held: dict[int, bytes] = {}
    for seg in checked_segments(repo, gen, plan.segments):
        found = segment_pages(seg, ps, limit_us, plan.txid)
        del seg
        if found is None:
            continue
        pages, n, tx = found
        held.update(pages)
        page_count, applied, last, last_obs = tx.page_count, applied + n, tx.txid, tx.observed_us
        if len(held) * ps >= HOLD_BYTES:
            _write_pages(fd, held, ps)
    _write_pages(fd, held, ps)  # (pages past a later shrink are cut below)
    os.ftruncate(fd, page_count * ps)
    os.fsync(fd)
    if page_count * ps != scratch.stat().st_size:
        raise RestoreError(f"restore to {plan.target}: size mismatch after applying segments")
    return applied, last, last_obs


def _write_pages(fd: int, pages: dict[int, bytes], ps: int) -> None:
    """Write ``pages`` (page number from 1 -> bytes) in file order, and forget them."""
    for pgno in sorted(pages):
        os.pwrite(fd, pages[pgno], (pgno - 1) * ps)
    pages.clear()


def checked_segments(repo: Repository, gen: Generation, names: list[SegmentName]) -> Iterator[Segment]:
    """Each of ``names`` (a generation's segments, in order) opened and checked against the hash
    chain from the generation's base, one at a time.

    Reader threads fetch ahead; one opener thread unseals, decodes and checks the chain inside the
    next ``OPEN_AHEAD`` segments (their decompression runs beside the caller's writes), and each is
    checked here to start where the previous one ended. Memory holds the compressed bytes read
    ahead, at most ``OPEN_AHEAD`` decoded segments and the caller's one. Read-ahead is bounded by
    bytes: the first segment is fetched alone (a planted object is refused before anything else is
    read); then each fetch ahead may take at most twice the largest segment checked so far (at
    least ``MIN_ALLOWANCE``), and at most ``READ_AHEAD_BYTES`` of them are in flight. A segment
    larger than its allowance is fetched again, whole, at its turn."""
    state = bytes.fromhex(gen.state)
    with ThreadPoolExecutor(SEGMENT_READERS, thread_name_prefix="dbre-segments") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="dbre-segment-open") as opener:
        ahead: deque[tuple[SegmentName, Future[bytes | None], int]] = deque()
        opened: deque[tuple[SegmentName, Future[tuple[int, Segment | None]], int]] = deque()
        nxt, in_flight, largest = 0, 0, 0

        def fill() -> None:
            nonlocal nxt, in_flight
            while nxt < len(names) and len(ahead) + len(opened) < SEGMENTS_AHEAD:
                cap = segment_mod.SEGMENT_CAP
                allowance = cap if not largest else min(cap, max(2 * largest, MIN_ALLOWANCE))
                if (ahead or opened) and (not largest or in_flight + allowance > READ_AHEAD_BYTES):
                    break
                ahead.append((names[nxt], pool.submit(_fetch_within, repo, names[nxt], allowance), allowance))
                nxt, in_flight = nxt + 1, in_flight + allowance
            while ahead and len(opened) < OPEN_AHEAD:
                name, fut, allowance = ahead.popleft()
                opened.append((name, opener.submit(_open_fetched, repo, name, fut), allowance))

        try:
            fill()
            while opened:
                name, ofut, allowance = opened.popleft()
                size, seg = ofut.result()
                in_flight -= allowance
                if seg is None:
                    raw = fetch_segment(repo, name)
                    size, seg = len(raw), open_segment(repo, name, state, raw)  # every page against the chain
                    del raw
                else:
                    check_follows(seg, state)
                largest = max(largest, size)
                state = seg.state_after
                yield seg
                del seg
                fill()
        finally:
            for _, f, _ in ahead:
                f.cancel()
            for _, g, _ in opened:
                g.cancel()


def segment_pages(seg: Segment, page_size: int, limit_us: int | None,
                  txid: int | None) -> tuple[dict[int, bytes], int, Transaction] | None:
    """The newest version of each page (number from 1 -> bytes) among the segment's transactions
    observed at or before ``limit_us`` and up to ``txid``, how many transactions those are, and the
    last of them; None when none qualifies. A page size other than the base's ``page_size`` is refused."""
    if seg.page_size != page_size:
        raise IntegrityError(f"{seg.name.key}: page size {seg.page_size}, the base's {page_size}")
    pages: dict[int, bytes] = {}
    applied, last = 0, None
    for tx in seg.transactions:
        if (limit_us is not None and tx.observed_us > limit_us) or (txid is not None and tx.txid > txid):
            break
        pages.update(tx.pages)
        applied, last = applied + 1, tx
    if last is None:
        return None
    return pages, applied, last
