"""The PITR window: which generations a retention window needs, which prune may delete, and the pruned marker.

The window of a database starts at ``keep-within`` before its newest snapshot (the cutoff of the
keep rule itself; with no ``keep-within`` it starts at the newest snapshot: only "now" must stay
restorable). A time T inside it is restored from the newest generation whose base is at or before
T, so the generations a window needs are the newest restorable one whose base is at or before the
window's start and every later one (all of them when none is that old). A generation is
restorable while its base object and its base snapshot exist. Every other generation goes whole:
its segments newest first, then its base, so a prune cut short leaves a base and a prefix of its
chain (verify stays clean), never a hole.

Before deleting, prune records in ``segments/<db>/pruned`` (sealed under its key) the time from
which the database is still restorable by segments; `restore --at` an earlier time is refused
with one line instead of silently restoring less.

A running replicator holds no repository lock between its bases, so prune runs beside it. By rule,
not by timing: the generation its live lease names (``live_generation``; the newest when the lease
names none) is never deleted, and forget keeps its base snapshot; no generation with an object
(segment, part or base) written within the grace period is deleted either.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dbre.errors import IntegrityError
from dbre.replicate.segment import (
    BASE_CAP,
    Generation,
    SegmentName,
    check_contiguous,
    is_part_key,
    list_generations,
    open_segment,
    read_base,
    to_time,
)
from dbre.repository.keep import KeepPolicy
from dbre.repository.manifest import Manifest, iso, micros
from dbre.repository.repo import Repository
from dbre.storage import NotFound
from dbre.storage.base import get_capped


@dataclass
class GenerationState:
    """One stored generation: its base (None: the base object is gone), segments, and whether its
    base snapshot is still there (so it can restore anything)."""

    db: str
    id: str
    base: Generation | None
    segments: list[SegmentName]
    restorable: bool
    superseded: list[SegmentName] = field(default_factory=list)  # inside a compacted segment: prune deletes them

    @property
    def time(self) -> datetime:
        return to_time(int(self.id[:16], 16))  # the name carries the base's time

    def keys(self) -> list[str]:
        """Deletion order: segments newest first, then the base (a cut-short deletion leaves a prefix)."""
        keys = [n.key for n in self.superseded] + [n.key for n in reversed(self.segments)]
        return keys + [f"segments/{self.db}/{self.id}/base"] if self.base is not None else keys

    def describe(self) -> dict[str, Any]:
        return {"generation": self.id, "base_taken_at": iso(self.time), "segments": len(self.segments),
                "snapshot": self.base.snapshot if self.base else None}


def replicated_dbs(repo: Repository) -> list[str]:
    """The databases with anything under ``segments/`` (one listing)."""
    return sorted({k.split("/")[1] for k in repo.store.list("segments/") if k.count("/") >= 2})


def generations(repo: Repository, db: str, snapshots: Collection[str]) -> list[GenerationState]:
    """Every generation of ``db``, oldest first; ``snapshots``: the ids of ``db``'s snapshots that
    stay (a generation whose base snapshot is not among them restores nothing). A listing or a base
    that cannot be read raises; a missing base (a prune cut short) is a generation without one."""
    out = []
    superseded: dict[str, list[SegmentName]] = {}
    for gen_id, names in list_generations(repo, db, superseded=superseded).items():
        try:
            base: Generation | None = read_base(repo, db, gen_id)
        except NotFound:
            base = None
        out.append(GenerationState(db, gen_id, base, names, base is not None and base.snapshot in snapshots,
                                   superseded.get(gen_id, [])))
    return out


def window_start(snaps: Iterable[Manifest], policy: KeepPolicy | None, now: datetime | None = None) -> datetime | None:
    """Where the window of one database's snapshots starts: ``keep-within`` before the newest
    snapshot not in the future (the keep rule's own cutoff), the newest snapshot without the rule;
    None without a policy (prune alone: only unrestorable generations go)."""
    if policy is None:
        return None
    now = now or datetime.now(UTC)
    past = [m.time for m in snaps if m.time < now]
    if not past:
        return datetime.min.replace(tzinfo=UTC)
    latest = max(past)
    within = policy.within_duration()
    return within.before(latest, policy.zone()) if within is not None else latest


def needed(gens: list[GenerationState], start: datetime | None) -> list[GenerationState]:
    """The generations a window from ``start`` needs: the newest restorable one whose base is at or
    before ``start`` and every later restorable one (every restorable one when ``start`` is None or
    precedes them all)."""
    ok = [g for g in gens if g.restorable]
    if start is None:
        return ok
    older = [i for i, g in enumerate(ok) if g.time <= start]
    return ok[older[-1]:] if older else ok


def live(gens: list[GenerationState], generation: str | None) -> GenerationState | None:
    """The generation a live lease names (``live_generation``: "" names the newest), if stored."""
    if generation is None or not gens:
        return None
    if generation == "":
        return gens[-1]
    return next((g for g in gens if g.id == generation), None)


def protected_bases(repo: Repository, db: str, snaps: list[Manifest], policy: KeepPolicy,
                    live_gen: str | None = None) -> dict[str, str]:
    """Snapshot id -> generation id for the base snapshots forget must keep: those of the generations
    the policy's window needs (judged with every current snapshot), and that of the generation a
    live replicator ships into (``live_gen``, from ``live_generation``)."""
    gens = generations(repo, db, {m.id for m in snaps})
    keep = needed(gens, window_start(snaps, policy))
    running = live(gens, live_gen)
    if running is not None and running not in keep:
        keep.append(running)
    return {g.base.snapshot: g.id for g in keep if g.base is not None}


@dataclass
class SegmentPrune:
    """What prune does to one database's segments."""

    db: str
    window_start: datetime | None
    keep: list[GenerationState] = field(default_factory=list)
    delete: list[GenerationState] = field(default_factory=list)
    grace_kept: list[GenerationState] = field(default_factory=list)  # would go, but an object is young
    superseded: list[str] = field(default_factory=list)  # small segments of kept generations a compacted one holds
    unrestorable: list[GenerationState] = field(default_factory=list)  # kept: newer than a kept one
    unverified: list[str] = field(default_factory=list)  # generations whose compacted chain failed: smalls kept
    live: str | None = None  # the generation a live replicator ships into: never deleted
    restorable_from: datetime | None = None  # the pruned marker written before deleting

    def describe(self) -> dict[str, Any]:
        return {
            "db": self.db,
            "window_start": iso(self.window_start) if self.window_start else None,
            "restorable_from": iso(self.restorable_from) if self.restorable_from else None,
            "keep_generations": [g.id for g in self.keep],
            "delete_generations": [g.describe() for g in self.delete],
            "delete_segments": sum(len(g.segments) for g in self.delete),
            "grace_kept_generations": [g.id for g in self.grace_kept],
            "delete_compacted_segments": len(self.superseded),
            "unrestorable_kept_generations": [g.id for g in self.unrestorable],
            "unverified_generations": self.unverified,
            "live_generation": self.live,
        }


def plan_segment_prune(repo: Repository, db: str, snapshots: Collection[str], start: datetime | None,
                       now: float, grace: float, live_gen: str | None = None) -> SegmentPrune:
    """Which generations of ``db`` go: every one the window from ``start`` does not need (all the
    unrestorable ones when ``start`` is None), unless one of its objects (parts included) was
    written less than ``grace`` seconds before ``now`` (the store's clock), and never the one a live
    replicator ships into (``live_gen``, from ``live_generation``)."""
    plan = SegmentPrune(db, start)
    gens = generations(repo, db, snapshots)
    keep = needed(gens, start)
    kept = {g.id for g in keep}
    plan.keep = keep
    running = live(gens, live_gen)
    plan.live = running.id if running is not None else None
    for g in gens:
        if keep and g.time > keep[0].time and g.id not in kept:
            # unrestorable (its base snapshot gone) amid kept ones: deleting it would let a restore
            # inside it fall back to the generation before and restore less than asked, silently
            plan.unrestorable.append(g)
            continue
        if g.id in kept:
            old = []
            for n in g.superseded:
                try:
                    if now - repo.store.modified(n.key) > grace:
                        old.append(n.key)
                except NotFound:
                    continue
            # a listed name proves nothing (planted, or rotten): the small ones go only once the
            # generation's whole chain, as listed, opens and checks from its base
            if old and _chain_ok(repo, g):
                plan.superseded.extend(old)
            elif old:
                plan.unverified.append(g.id)
            continue
        if g is running:
            continue  # (a replicator ships into it: its segments are written now, whatever their age)
        young = False
        parts = [k for k in repo.store.list(f"segments/{db}/{g.id}/") if is_part_key(k)]
        for key in [*g.keys(), *parts]:
            try:
                young = now - repo.store.modified(key) <= grace
            except NotFound:
                continue
            if young:
                break
        (plan.grace_kept if young else plan.delete).append(g)
    if plan.delete:
        plan.restorable_from = keep[0].time if keep else to_time(
            max((n.last_us for g in plan.delete for n in g.segments), default=micros(plan.delete[-1].time)) + 1)
    return plan


def _chain_ok(repo: Repository, g: GenerationState) -> bool:
    """Every listed segment of ``g`` unsealed under its key and chained from its base, no gap."""
    if g.base is None:
        return False
    try:
        state = bytes.fromhex(g.base.state)
        for name in check_contiguous(g.db, g.base, g.segments):
            state = open_segment(repo, name, state).state_after
    except (IntegrityError, NotFound):
        return False
    return True


def pruned_key(db: str) -> str:
    return f"segments/{db}/pruned"


def read_pruned(repo: Repository, db: str) -> datetime | None:
    """The time before which ``db``'s segments were pruned; None if never."""
    key = pruned_key(db)
    try:
        raw = repo.sealer.unseal(get_capped(repo.store, key, BASE_CAP, "pruned marker"), key)
    except NotFound:
        return None
    d = json.loads(raw)
    if d.get("db") != db:
        raise IntegrityError(f"{key}: marker names database {d.get('db')!r}", "run `dbre verify`")
    return to_time(int(d["restorable_from_us"]))


def write_pruned(repo: Repository, db: str, restorable_from: datetime) -> None:
    """Record (only ever later) the time from which ``db`` is restorable by segments."""
    old = read_pruned(repo, db)
    if old is not None and old >= restorable_from:
        return
    key = pruned_key(db)
    body = json.dumps({"db": db, "restorable_from_us": micros(restorable_from)}, sort_keys=True).encode()
    repo.store.put(key, repo.sealer.seal(body, key))
