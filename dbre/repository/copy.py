"""The offsite layer: copy snapshots to a second repository, incrementally, manifest last."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.storage import AlreadyExists

Progress = Callable[[int, int], None]


@dataclass
class CopyPlan:
    snapshots: list[Manifest] = field(default_factory=list)
    packs: list[str] = field(default_factory=list)
    already: int = 0

    def describe(self) -> dict[str, Any]:
        return {
            "snapshots_to_copy": [f"{m.db}/{m.id}" for m in self.snapshots],
            "packs_to_copy": len(self.packs),
            "snapshots_already_there": self.already,
        }


def plan_copy(src: Repository, dst: Repository, db: str | None = None) -> CopyPlan:
    plan = CopyPlan()
    if db:
        src.require_db(db)
    there = {(r.db, r.id) for r in dst.list_snapshot_refs(db)}
    dst_packs = dst.pack_ids()
    wanted: set[str] = set()
    for m in src.snapshots(db):
        if (m.db, m.id) in there:
            plan.already += 1
            continue
        plan.snapshots.append(m)
        wanted.update(p for p in m.packs if p not in dst_packs)
    plan.packs = sorted(wanted)
    return plan


def copy_snapshots(src: Repository, dst: Repository, db: str | None = None,
                   progress: Progress | None = None) -> tuple[CopyPlan, int]:
    """Copy the snapshots (of ``db``) not yet in ``dst``: planned and applied under a shared lock on
    each repository, so no prune on either side runs between the plan and the last manifest.

    Packs go first, as stored (still sealed), then each manifest: a copy cut short leaves only
    unreferenced packs behind, never a snapshot without its data. Before each manifest put the
    destination's lock is checked alive (``Lock.check_alive``; the source's lock only keeps its
    packs from going while they are read). Returns the plan and the bytes copied.
    """
    copied = 0
    dst.require_writable("copy")
    with src.lock("copy (source)"), dst.lock("copy") as dst_lock:
        plan = plan_copy(src, dst, db)
        for i, pack in enumerate(plan.packs):
            data = src.store.get(pack_key(pack))
            dst.store.put(pack_key(pack), data)
            copied += len(data)
            if progress:
                progress(i + 1, len(plan.packs))
        for m in plan.snapshots:
            key = src.manifest_key(m)  # the same name: a manifest is sealed under it
            data = src.store.get(key)
            what = f"copy of {m.db} snapshot {m.id}"
            dst_lock.check_alive(what, consequence="it was not copied", hint="run the copy again")
            try:
                dst.store.put(key, data, if_absent=True)
            except AlreadyExists:
                pass
            copied += len(data)
    return plan, copied
