"""Retention: which snapshots a keep-policy keeps (restic's rules) and the PITR window's base snapshots;
pruning unused packs and the generations of segments no restorable time needs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from dbre.errors import DbreError, IntegrityError, LockedError, RepositoryError, UsageError
from dbre.replicate.lease import live_generation
from dbre.replicate.segment import is_part_key
from dbre.replicate.window import (
    SegmentPrune,
    generations,
    live,
    needed,
    plan_segment_prune,
    protected_bases,
    replicated_dbs,
    window_start,
    write_pruned,
)
from dbre.repository.immutable import delete_for_good, iso_utc, locked_until
from dbre.repository.keep import KeepPolicy as KeepPolicy  # re-exported: the keep rules live in keep.py
from dbre.repository.keep import apply_policy as apply_policy
from dbre.repository.lock import Lock
from dbre.repository.manifest import Manifest, iso
from dbre.repository.repo import Repository, pack_key
from dbre.storage import NotFound
from dbre.storage.local import LocalStore

log = logging.getLogger(__name__)

PRUNE_GRACE_SECONDS = 2 * 3600.0  # prune never deletes an object younger than this (store's clock)
LIVE_TEMP_SECONDS = 600.0  # with a replicator live, .tmp files go only once untouched this long, whatever --grace


@dataclass
class ForgetPlan:
    keep: list[tuple[Manifest, list[str]]] = field(default_factory=list)
    remove: list[Manifest] = field(default_factory=list)
    # per replicated database: the window's start and the generations a prune then deletes
    segments: list[dict[str, Any]] = field(default_factory=list)
    # not kept by the policy, but their manifest is under an Object Lock still in force: kept, and named
    locked: list[tuple[Manifest, float]] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "keep": [{"id": m.id, "db": m.db, "taken_at": m.taken_at, "reasons": r} for m, r in self.keep],
            "remove": [{"id": m.id, "db": m.db, "taken_at": m.taken_at} for m in self.remove],
            "segments": self.segments,
            "locked": [{"id": m.id, "db": m.db, "taken_at": m.taken_at, "locked_until": iso_utc(u)}
                       for m, u in self.locked],
        }


def plan_forget(repo: Repository, policy: KeepPolicy, db: str | None = None,
                now: float | None = None) -> ForgetPlan:
    """``now``: the store's time (``Lock.store_now``), to judge replicators' leases: the base
    snapshot of the generation a live one ships into is kept."""
    policy.check()
    plan = ForgetPlan()
    dbs = [db] if db else repo.databases()
    replicated = set(replicated_dbs(repo))
    for name in dbs:
        snaps = repo.require_db(name)
        reasons = apply_policy(snaps, policy)
        if name in replicated:
            # the base of every generation a time inside the window restores from stays
            running = live_generation(repo.store, name, now) if now is not None else None
            for snap_id, gen_id in protected_bases(repo, name, snaps, policy, running).items():
                reasons.setdefault(snap_id, []).append(f"pitr base {gen_id}")
        kept: set[str] = set()
        for m in snaps:
            if m.id in reasons:
                plan.keep.append((m, reasons[m.id]))
                kept.add(m.id)
            else:
                plan.remove.append(m)
        if name in replicated:
            start = window_start([m for m in snaps if m.id in kept], policy)
            gens = generations(repo, name, kept)
            stay = {g.id for g in needed(gens, start)}
            if (shipping := live(gens, running)) is not None:
                stay.add(shipping.id)  # a live replicator ships into it: prune never deletes it
            plan.segments.append({
                "db": name, "window_start": iso(start) if start else None,
                "keep_generations": sorted(stay),
                "prune_deletes_generations": [g.describe() for g in gens if g.id not in stay],
            })
    return plan


def forget(repo: Repository, policy: KeepPolicy, db: str | None = None, *, dry_run: bool = False,
           prune: bool = False, grace: float = PRUNE_GRACE_SECONDS) -> tuple[ForgetPlan, PrunePlan | None]:
    """Forget the snapshots ``policy`` does not keep (their data stays until prune); with ``prune``,
    then delete the packs nothing needs (``plan_prune``).

    Planned and applied under one exclusive lock, so the plan is of the repository as it is when
    applied. A dry run plans the same way under a shared lock (its clock judges the grace period)
    and deletes nothing. A listing or a manifest that cannot be read aborts before any deletion.
    """
    policy.check()
    if not dry_run:
        repo.require_writable("forget")
    repo.attach_object_lock("forget")
    # (a dry run writes nothing: a repository that refuses the lock object is planned on without one)
    with (repo.read_lock("forget") if dry_run else repo.lock("forget", exclusive=True)) as lock:
        plan = _reading("forget", "no snapshot was forgotten", lambda: plan_forget(repo, policy, db, lock.store_now()))
        if prune and db:
            # the prune reads every database's manifests: one that does not open stops it, so it is read
            # before anything is forgotten (the plan above read only ``db``'s), and the command fails whole
            _reading("forget", "no snapshot was forgotten", repo.snapshots)
        if repo.object_lock is not None:
            # a manifest still locked is never deleted nor hidden by a delete marker: it stays, named
            now, remove = lock.store_now(), []
            for m in plan.remove:
                until = locked_until(repo, repo.manifest_key(m), now)
                if until is None:
                    remove.append(m)
                else:
                    plan.locked.append((m, until))
            plan.remove = remove
        if not dry_run:
            for m in plan.remove:
                lock.check_alive("forget", consequence="the remaining snapshots were not forgotten")
                _delete(repo, repo.manifest_key(m))
        pruned = None
        if prune:
            try:
                pruned = _prune(repo, lock, grace, dry_run, forgotten=plan.remove if dry_run else [], policy=policy)
            except DbreError as err:
                if dry_run or not plan.remove:
                    raise
                # the snapshots are forgotten already: the failure must not read as "nothing happened"
                gone = ", ".join(f"{m.db}/{m.id}" for m in plan.remove[:5]) + (" ..." if len(plan.remove) > 5 else "")
                raise type(err)(f"{err.message} (forget had already forgotten {len(plan.remove)} snapshots: "
                                f"{gone}; their packs go at the next prune)", err.hint) from err
    return plan, pruned


@dataclass
class PrunePlan:
    unused_packs: list[str]  # to delete: no snapshot names them and they are older than the grace period
    used_packs: int
    grace_kept: int = 0  # unused, but younger than the grace period: maybe a running backup's
    grace: float = PRUNE_GRACE_SECONDS
    segments: list[SegmentPrune] = field(default_factory=list)  # per replicated database
    compacted: int = 0  # small segments merged into larger ones by this prune (deleted past the grace period)
    locked: list[tuple[str, float]] = field(default_factory=list)  # unused, but under Object Lock: (key, until)

    def describe(self) -> dict[str, Any]:
        return {"delete_packs": len(self.unused_packs), "keep_packs": self.used_packs,
                "grace_kept_packs": self.grace_kept, "grace_seconds": self.grace,
                "segments": [s.describe() for s in self.segments], "compacted_segments": self.compacted,
                "locked_kept": [{"object": k, "locked_until": iso_utc(u)} for k, u in self.locked]}


def plan_prune(repo: Repository, lock: Lock, *, grace: float = PRUNE_GRACE_SECONDS,
               forgotten: Collection[Manifest] = (), policy: KeepPolicy | None = None) -> PrunePlan:
    """The packs no snapshot (but those in ``forgotten``) names and whose last write, by the store's
    clock (``lock.store_now()``), is more than ``grace`` seconds ago; and per replicated database
    the generations no time inside ``policy``'s PITR window needs (without a policy: those whose
    base snapshot is gone), none with an object younger than ``grace``.

    Every manifest is read: one that cannot be read, or a listing that fails, raises.
    """
    skip = {(m.db, m.id) for m in forgotten}
    used: set[str] = set()
    staying: dict[str, list[Manifest]] = {}
    for m in repo.snapshots():
        if (m.db, m.id) not in skip:
            used.update(m.packs)
            staying.setdefault(m.db, []).append(m)
    present = repo.pack_ids()
    now = lock.store_now()
    old: list[str] = []
    young = 0
    for pack in sorted(present - used):
        try:
            age = now - repo.store.modified(pack_key(pack))
        except NotFound:
            continue  # deleted meanwhile (a prune that lost its lock): nothing to do
        if age > grace:
            old.append(pack)
        else:
            young += 1
    segments = []
    for db in replicated_dbs(repo):
        snaps = staying.get(db, [])
        start: datetime | None = window_start(snaps, policy) if policy is not None else None
        segments.append(plan_segment_prune(repo, db, {m.id for m in snaps}, start, now, grace,
                                           live_generation(repo.store, db, now)))
    plan = PrunePlan(old, len(present & used), young, grace, segments)
    if repo.object_lock is not None:
        _keep_locked(repo, plan, now)
    return plan


def _keep_locked(repo: Repository, plan: PrunePlan, now: float) -> None:
    """Take out of ``plan`` every object whose Object Lock is still in force (one HEAD per object):
    kept and named in ``plan.locked``. A generation with any locked object stays whole (deleting
    the rest would cut its chain)."""
    packs = []
    for pack in plan.unused_packs:
        until = locked_until(repo, pack_key(pack), now)
        if until is None:
            packs.append(pack)
        else:
            plan.locked.append((pack_key(pack), until))
    plan.unused_packs = packs
    for seg in plan.segments:
        going = []
        for gen in seg.delete:
            untils = [u for k in gen.keys() if (u := locked_until(repo, k, now)) is not None]
            if untils:
                plan.locked.append((f"segments/{gen.db}/{gen.id}/", max(untils)))
            else:
                going.append(gen)
        seg.delete = going
        superseded = []
        for key in seg.superseded:
            until = locked_until(repo, key, now)
            if until is None:
                superseded.append(key)
            else:
                plan.locked.append((key, until))
        seg.superseded = superseded


def prune(repo: Repository, *, dry_run: bool = False, grace: float = PRUNE_GRACE_SECONDS) -> PrunePlan:
    """Delete packs no snapshot needs and older than ``grace``, under an exclusive lock (a dry run:
    a shared one, deleting nothing)."""
    if not dry_run:
        repo.require_writable("prune")
    with (repo.read_lock("prune") if dry_run else repo.lock("prune", exclusive=True)) as lock:
        return _prune(repo, lock, grace, dry_run)


def _prune(repo: Repository, lock: Lock, grace: float, dry_run: bool,
           forgotten: Collection[Manifest] = (), policy: KeepPolicy | None = None) -> PrunePlan:
    if grace < 0:
        raise UsageError("the grace period is negative", "use 0 or more")
    repo.attach_object_lock("prune")  # objects under Object Lock are kept, not deleted nor hidden
    compacted = 0
    if not dry_run:
        # old small segments merged first (each merged one a conditional put); the small ones go
        # below once past the grace period, or at a later prune
        from dbre.replicate.compact import compact_segments

        # only generations the window keeps: merging one that goes would only make it young again
        # (the grace period would keep it, its base snapshot already forgotten)
        staying: dict[str, list[Manifest]] = {}
        for m in _reading("prune", "no pack was deleted", repo.snapshots):
            staying.setdefault(m.db, []).append(m)

        def compact_all() -> int:
            done = 0
            for db in replicated_dbs(repo):
                snaps = staying.get(db, [])
                start = window_start(snaps, policy) if policy is not None else None
                keep = needed(generations(repo, db, {m.id for m in snaps}), start)
                done += compact_segments(repo, db, only={g.id for g in keep}).replaced
            return done

        compacted = _reading("prune", "nothing was deleted", compact_all)
    # planned under the lock: the only plan that is safe to apply
    plan = _reading("prune", "no pack was deleted",
                    lambda: plan_prune(repo, lock, grace=grace, forgotten=forgotten, policy=policy))
    plan.compacted = compacted
    if dry_run:
        return plan
    for seg in plan.segments:
        if seg.restorable_from is not None:
            # first the marker (restores before it are refused), then the generations, each
            # segments newest first and its base last: a prune cut short leaves chains with no hole
            lock.check_alive("prune", consequence="no segment was deleted")
            write_pruned(repo, seg.db, seg.restorable_from)
        for gen in seg.delete:
            keys = gen.keys()
            if keys and keys[-1].endswith("/base"):  # the parts of segments stored in parts go before the base
                parts = [k for k in repo.store.list(f"segments/{gen.db}/{gen.id}/") if is_part_key(k)]
                keys = keys[:-1] + parts + keys[-1:]
            for key in keys:
                lock.check_alive("prune", consequence="the remaining segments were not deleted")
                _delete(repo, key)
        for key in seg.superseded:
            lock.check_alive("prune", consequence="the remaining compacted segments were not deleted")
            _delete(repo, key)
    for pack in plan.unused_packs:
        lock.check_alive("prune", consequence="the remaining packs were not deleted")
        _delete(repo, pack_key(pack))
    if isinstance(repo.store, LocalStore):
        # a live backup's pack still growing in .tmp stays (it holds a lock, and is touched at every
        # blob); a live replicator's segment put may be there at any moment (it holds no lock)
        now = lock.store_now()
        live = any(live_generation(repo.store, d, now) is not None
                   for d in {k.split("/")[1] for k in repo.store.list("leases/") if k.count("/") == 2})
        repo.store.clean_temp(older_than=max(grace, LIVE_TEMP_SECONDS) if live else grace)
    return plan


def _delete(repo: Repository, key: str) -> None:
    """Delete ``key``; under Object Lock every version of it, so the space is freed (FORMAT.md, *Object Lock*)."""
    if not delete_for_good(repo, key):
        log.warning("%s: only hidden by a delete marker: these credentials may not delete versions "
                    "(s3:DeleteObjectVersion), so its space is not freed", key)


T = TypeVar("T")


def _reading(what: str, consequence: str, read: Callable[[], T]) -> T:
    """Run ``read``; a listing or object that cannot be read aborts ``what`` with a message naming it."""
    try:
        return read()
    except (LockedError, UsageError):
        raise
    except RepositoryError as err:
        hint = err.hint or "check it with `dbre verify`, then run again"
        if isinstance(err, IntegrityError) and err.message.startswith("snapshots/"):
            # (forget and prune must know every snapshot's packs: one manifest that does not open stops them)
            key = err.message.split(":", 1)[0]
            hint = (f"{key} holds no restorable snapshot: put it back from the offsite copy (`dbre copy` keeps "
                    "one), or delete that object, then run this again; `dbre verify` lists every such one")
        raise type(err)(f"{what}: {err.message}; {consequence}", hint) from err
