"""The offsite layer: copy snapshots to a second repository, incrementally, manifest last; then the
replicated generations (base objects and segments) whose base snapshot is there, each checked first.

Each pending snapshot's structure is checked on its own first (verify's structure check): a broken
one is reported and left behind, the healthy ones are copied. Copy also compares each database's
newest snapshot on both sides: an offsite copy holding newer snapshots than the primary is the
outside anchor that shows the primary lost history (docs/FORMAT.md, "Threat model").
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from dbre.errors import IntegrityError, RepositoryError
from dbre.repository.immutable import ensure_snapshot_locked
from dbre.repository.lock import Lock
from dbre.repository.manifest import Manifest, check_db_name, iso
from dbre.repository.pack import MAX_PACK, read_pack_index
from dbre.repository.repo import Repository, SnapshotRef, pack_key
from dbre.repository.verify import check_structure
from dbre.storage import AlreadyExists
from dbre.storage.base import MANIFEST_CAP, NotFound, get_capped

Progress = Callable[[int, int], None]


@dataclass
class BrokenSnapshot:
    """A pending snapshot that is not copied: its key in the source and why."""

    key: str
    reason: str

    @property
    def message(self) -> str:
        return f"{self.key} not copied: {self.reason}"


@dataclass
class LostHistory:
    """Evidence in the destination that the source lost snapshots of ``db`` it once had."""

    db: str
    detail: str

    @property
    def message(self) -> str:
        return f"{self.detail}: the primary lost history — restore from the offsite copy or investigate"


@dataclass
class CopyPlan:
    """What a copy does: ``snapshots`` (healthy, oldest first) and their ``packs`` not yet there;
    ``broken`` pending snapshots left behind; ``lost_history`` databases the source lost history of.
    Applying it moves a snapshot from ``snapshots`` to ``broken`` when one of its packs fails its
    check as it is copied, so after ``copy_snapshots`` the plan says what was copied."""

    snapshots: list[Manifest] = field(default_factory=list)
    packs: list[str] = field(default_factory=list)
    already: int = 0
    broken: list[BrokenSnapshot] = field(default_factory=list)
    lost_history: list[LostHistory] = field(default_factory=list)
    generations: int = 0  # replicated generations whose base object was copied
    segments: int = 0  # segments copied

    @property
    def ok(self) -> bool:
        return not self.broken and not self.lost_history

    @property
    def problems(self) -> list[str]:
        """One line per problem: every broken snapshot, every database the source lost history of."""
        return [b.message for b in self.broken] + [h.message for h in self.lost_history]

    def describe(self) -> dict[str, Any]:
        return {
            "snapshots_to_copy": [f"{m.db}/{m.id}" for m in self.snapshots],
            "packs_to_copy": len(self.packs),
            "snapshots_already_there": self.already,
            "broken_snapshots": [{"key": b.key, "reason": b.reason} for b in self.broken],
            "lost_history": [{"db": h.db, "message": h.message} for h in self.lost_history],
            "generations_copied": self.generations,
            "segments_copied": self.segments,
        }


def _why(err: RepositoryError) -> str:
    if isinstance(err, NotFound):  # "get packs/37/…: not found" -> "packs/37/…: missing"
        return err.message.removeprefix("get ").replace(": not found", ": missing")
    return err.message


def _n(count: int) -> str:
    return f"{count} snapshot" + ("" if count == 1 else "s")


def _newest(refs: list[SnapshotRef]) -> dict[str, datetime]:
    """Per database: the time of its newest format-2 name (the name carries it: no manifest read)."""
    out: dict[str, datetime] = {}
    for r in refs:
        if r.time is not None and (r.db not in out or r.time > out[r.db]):
            out[r.db] = r.time
    return out


def _lost_history(src_refs: list[SnapshotRef], dst: Repository, dst_refs: list[SnapshotRef],
                  source_newest: dict[str, datetime], pending: list[Manifest]) -> list[LostHistory]:
    """What the destination proves the source lost, per database:
    - the destination's newest snapshot is newer than the source's newest (deleted newest
      snapshots, a rollback of the bucket, a database deleted whole);
    - a pending snapshot's parent is older than a snapshot the destination holds, the source no
      longer has, and that was committed (taken_at + its seconds) before the pending one began:
      the backup did not see it because it was gone — caught even after backups went on."""
    out: list[LostHistory] = []
    for db, offsite_newest in sorted(_newest(dst_refs).items()):
        mine = source_newest.get(db)
        if mine is None:
            n = sum(1 for r in dst_refs if r.db == db)
            out.append(LostHistory(db, f"offsite has {_n(n)} of {db} (newest taken {iso(offsite_newest)}) "
                                       "but the primary has none"))
        elif offsite_newest > mine:
            n = sum(1 for r in dst_refs if r.db == db and r.time is not None and r.time > mine)
            out.append(LostHistory(db, f"offsite has {_n(n)} of {db} newer than the primary's newest (taken "
                                       f"{iso(mine)}; newest offsite taken {iso(offsite_newest)})"))
    flagged = {h.db for h in out}
    in_source = {(r.db, r.id) for r in src_refs}
    time_of = {(r.db, r.id): r.time for r in src_refs + dst_refs if r.time is not None}
    for m in pending:
        parent_time = time_of.get((m.db, m.parent)) if m.parent else None
        if m.db in flagged or parent_time is None:
            continue
        for r in sorted(dst_refs, key=lambda r: r.key):  # newest first
            if (r.db != m.db or r.time is None or not parent_time < r.time < m.time
                    or (r.db, r.id) in in_source):
                continue
            try:
                gone = dst.load_ref(r)
            except RepositoryError:
                continue  # proves nothing here; `dbre verify` of the copy names it
            committed = r.time + timedelta(seconds=float(gone.stats.get("seconds") or 0))
            if committed < m.time:  # done before m began: m would have taken it as its parent
                out.append(LostHistory(m.db, f"offsite has snapshot {r.id} of {m.db} (taken {iso(r.time)}), which "
                                             f"the primary no longer has; its snapshot {m.id} (taken {iso(m.time)}) "
                                             f"was taken after it on an older parent {m.parent}"))
                flagged.add(m.db)
                break
    return out


def plan_copy(src: Repository, dst: Repository, db: str | None = None) -> CopyPlan:
    """Work out what to copy; reads manifests, page-map runs and pack index tails of the pending
    snapshots only, and writes nothing."""
    plan = CopyPlan()
    if db:
        check_db_name(db)
    # the destination is listed first: everything in it was copied from the source before, so a
    # backup and copy running meanwhile cannot make the destination look newer than the source
    dst_refs = dst.list_snapshot_refs(db)
    src_refs = src.list_snapshot_refs(db)
    if db and not src_refs and not any(r.db == db for r in dst_refs):
        src.require_db(db)  # raises, naming the known databases
    there = {(r.db, r.id) for r in dst_refs}
    pending = [r for r in src_refs if (r.db, r.id) not in there]
    plan.already = len(src_refs) - len(pending)

    healthy: list[Manifest] = []
    source_newest = _newest(src_refs)
    for ref in sorted(pending, key=lambda r: r.key):
        try:
            m = src.load_ref(ref)
            check_structure(src, m)
        except (IntegrityError, NotFound) as err:
            plan.broken.append(BrokenSnapshot(ref.key, _why(err)))
            continue
        healthy.append(m)
    if src.version < 2:  # format-1 names carry no time: the manifests do (those already there too)
        for m in src.snapshots(db, damaged=[]):
            if m.db not in source_newest or m.time > source_newest[m.db]:
                source_newest[m.db] = m.time

    plan.lost_history = _lost_history(src_refs, dst, dst_refs, source_newest, healthy)
    healthy.sort(key=lambda m: (m.taken_at, m.id))
    plan.snapshots = healthy
    dst_packs = dst.pack_ids()
    plan.packs = sorted({p for m in healthy for p in m.packs if p not in dst_packs})
    return plan


def copy_snapshots(src: Repository, dst: Repository, db: str | None = None,
                   progress: Progress | None = None) -> tuple[CopyPlan, int]:
    """Copy the healthy snapshots (of ``db``) not yet in ``dst``: planned and applied under a shared
    lock on each repository, so no prune on either side runs between the plan and the last manifest.

    Packs go first, as stored (still sealed), each only once its index authenticates in the bytes
    read; then each manifest: a copy cut short leaves only unreferenced packs behind, never a
    snapshot without its data. A pack that fails (missing, or its index damaged) is not copied and
    its snapshots move to ``plan.broken``. Before each manifest put the destination's lock is
    checked alive (``Lock.check_alive``; the source's lock only keeps its packs from going while
    they are read). Returns the plan (``plan.problems`` lists what was not copied and any history
    the source lost: the caller reports them) and the bytes copied.
    """
    copied = 0
    dst.require_writable("copy")
    with src.read_lock("copy (source)"), dst.lock("copy") as dst_lock:
        plan = plan_copy(src, dst, db)
        failed: dict[str, str] = {}
        for i, pack in enumerate(plan.packs):
            key = pack_key(pack)
            try:
                data = get_capped(src.store, key, MAX_PACK, "pack")  # a planted giant is refused, not read
                read_pack_index(data, src.sealer, key)  # what is put is what was checked
            except (IntegrityError, NotFound, struct.error) as err:
                failed[pack] = _why(err) if isinstance(err, RepositoryError) else f"{key}: index is malformed"
                continue
            dst.store.put(key, data)
            copied += len(data)
            if progress:
                progress(i + 1, len(plan.packs))
        if failed:
            plan.packs = [p for p in plan.packs if p not in failed]
            keep = []
            for m in plan.snapshots:
                bad = [p for p in m.packs if p in failed]
                if bad:
                    plan.broken.append(BrokenSnapshot(src.manifest_key(m), failed[bad[0]] + " (pack not copied)"))
                else:
                    keep.append(m)
            plan.snapshots = keep
        for m in plan.snapshots:
            key = src.manifest_key(m)  # the same name: a manifest is sealed under it
            data = get_capped(src.store, key, MANIFEST_CAP, "manifest")
            what = f"copy of {m.db} snapshot {m.id}"
            dst_lock.check_alive(what, consequence="it was not copied", hint="run the copy again")
            ensure_snapshot_locked(dst, m)  # Object Lock: its packs locked long enough before it exists
            try:
                dst.store.put(key, data, if_absent=True)
            except AlreadyExists:
                pass
            copied += len(data)
        copied += copy_segments(src, dst, dst_lock, plan, db)
    return plan, copied


def copy_segments(src: Repository, dst: Repository, dst_lock: Lock, plan: CopyPlan, db: str | None = None) -> int:
    """Copy every replicated generation (of ``db``) whose base snapshot the destination holds: its
    base object, then its segments in txid order, each as stored (same key: still sealed), each only
    after it was unsealed under its key and chained from the previous one's end (the base's state,
    recomputed from the base snapshot, for the first). A generation that fails a check stops there
    (the prefix copied restores as far as it goes) and is reported in ``plan.broken``. Returns the
    bytes copied."""
    from dbre.replicate.segment import BASE_CAP, SEGMENT_CAP, check_contiguous, open_segment, part_keys
    from dbre.replicate.window import generations, replicated_dbs
    from dbre.restore.pitr import base_snapshot

    copied = 0
    dbs = [db] if db else replicated_dbs(src)
    for name in dbs:
        there_snaps = {r.id for r in dst.list_snapshot_refs(name)}
        there = set(dst.store.list(f"segments/{name}/"))
        for gen in generations(src, name, there_snaps):
            if gen.base is None or not gen.restorable:
                continue  # its base snapshot is not there (forgotten, or broken and left behind)
            base_key = gen.base.key
            try:
                state = bytes.fromhex(gen.base.state)
                if base_key not in there:
                    base_snapshot(src, gen.base)  # the chain's first state, recomputed from the snapshot
                    data = get_capped(src.store, base_key, BASE_CAP, "generation base")
                    dst.sealer.unseal(data, base_key)
                    dst_lock.check_alive(f"copy of {name} generation {gen.id}", consequence="it was not copied",
                                         hint="run the copy again")
                    _put_same(dst, base_key, data)
                    copied += len(data)
                    plan.generations += 1
                names = check_contiguous(name, gen.base, gen.segments)
                known = True  # state is the end of every segment before this one
                for i, seg in enumerate(names):
                    if seg.key in there:
                        known = False
                        continue
                    if not known:  # the previous one is there already: its end, checked on its own
                        state = open_segment(src, names[i - 1], None).state_after
                    data = get_capped(src.store, seg.key, SEGMENT_CAP, "segment")
                    state = open_segment(src, seg, state, data).state_after  # every page against the chain
                    dst.sealer.unseal(data, seg.key)
                    dst_lock.check_alive(f"copy of {seg.key}", consequence="it was not copied",
                                         hint="run the copy again", refresh=False)
                    for pkey in part_keys(src, seg.key, data):  # a segment in parts: the parts first
                        part = get_capped(src.store, pkey, SEGMENT_CAP, "segment part")
                        _put_same(dst, pkey, part)
                        copied += len(part)
                    _put_same(dst, seg.key, data)
                    copied += len(data)
                    plan.segments += 1
                    known = True
            except (IntegrityError, NotFound) as err:
                plan.broken.append(BrokenSnapshot(f"segments/{name}/{gen.id}", _why(err) + " (copied up to it)"))
    return copied


def _put_same(dst: Repository, key: str, data: bytes) -> None:
    """A conditional put; an object already there must be these very bytes (a copy run before)."""
    try:
        dst.store.put(key, data, if_absent=True)
    except AlreadyExists:
        if get_capped(dst.store, key, len(data) + 1, "object") != data:
            raise IntegrityError(f"{key}: the copy holds another object under this name",
                                 "run `dbre verify` on the copy") from None
