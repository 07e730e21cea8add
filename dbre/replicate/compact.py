"""Compaction: a generation's old small segments merged into one larger segment that keeps every transaction.

A merged segment is an ordinary segment (docs/FORMAT.md *Segments*) whose txid range covers the
small ones it replaces: the same transactions, in order, each with its own txid, observation time,
page count and pages (a restore stays exact to the transaction), the first one's ``state_before``
and ``wal_start``, the last one's ``state_after`` and ``wal_end``. Each small segment is opened and
chain-checked before it is merged, and the merged one is written with one conditional put. The
small ones stay until prune deletes them (past its grace period): while both exist, a listing
drops every segment whose range lies inside another's (``list_generations``), so a restore reads
either form and never applies a transaction twice. A crash leaves the small ones, or both.

Run by prune, before it plans (``forget --prune``), on the generations the window keeps (one it
deletes would only be made young again), or on its own under a shared lock: not by the
replicator, whose steady state is one PUT per interval and no LIST.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field

from dbre.replicate.segment import (
    SEGMENT_CAP,
    Segment,
    SegmentName,
    fetch_segment,
    list_generations,
    open_segment,
    write_segment,
)
from dbre.repository.repo import Repository

COMPACT_AFTER_SECONDS = 300.0  # only segments whose last transaction is older than this are merged
COMPACT_SEGMENTS = 60  # at most this many segments go into one merged segment
COMPACT_BYTES = 64 * 1024 * 1024  # ... and at most this many stored bytes (well under SEGMENT_CAP)


@dataclass
class Compaction:
    merged: list[str] = field(default_factory=list)  # keys of the merged segments written
    replaced: int = 0  # small segments they hold (prune deletes them)
    bytes_written: int = 0


def compact_segments(repo: Repository, db: str, *, older_than: float = COMPACT_AFTER_SECONDS,
                     group: int = COMPACT_SEGMENTS, max_bytes: int = COMPACT_BYTES,
                     now: float | None = None, only: Collection[str] | None = None) -> Compaction:
    """Merge runs of at least two consecutive segments of each generation of ``db`` (of those in
    ``only``, if given) whose last transaction was observed more than ``older_than`` seconds before
    ``now``, in a generation with at least ``group`` such segments; never a generation's last
    listed segment (the replicator resumes from it, and a live one appends only after it: merging
    the others is safe while it runs). The caller holds a repository lock."""
    assert max_bytes <= SEGMENT_CAP
    cutoff_us = int(((now if now is not None else time.time()) - older_than) * 1e6)
    result = Compaction()
    for gen_id, names in list_generations(repo, db).items():
        if only is not None and gen_id not in only:
            continue
        old = [n for n in names[:-1] if n.last_us < cutoff_us]
        if len(old) < group:
            continue  # too few to be worth reading (a compacted generation has far fewer: never read again)
        run: list[tuple[SegmentName, bytes]] = []
        size = 0
        for name in old:
            raw = fetch_segment(repo, name)
            if run and (len(run) >= group or size + len(raw) > max_bytes):
                _merge(repo, run, result)
                run, size = [], 0
            run.append((name, raw))
            size += len(raw)
        _merge(repo, run, result)
    return result


def _merge(repo: Repository, run: list[tuple[SegmentName, bytes]], result: Compaction) -> None:
    if len(run) < 2:
        return
    state = None
    segs: list[Segment] = []
    for name, raw in run:
        seg = open_segment(repo, name, state, raw)  # every page against the chain, linked to the previous
        state = seg.state_after
        segs.append(seg)
    first, last = segs[0], segs[-1]
    merged = Segment(first.db, first.generation, first.page_size, first.state_before, last.state_after,
                     first.wal_start, last.wal_end, last.file_id,
                     [tx for seg in segs for tx in seg.transactions])
    key, written = write_segment(repo, merged)  # one conditional put: whole or not at all
    result.merged.append(key)
    result.replaced += len(run)
    result.bytes_written += written
