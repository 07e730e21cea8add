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


def apply_copy(src: Repository, dst: Repository, plan: CopyPlan, progress: Progress | None = None) -> int:
    """Copy packs as stored (still sealed), then each manifest: a copy cut short leaves
    only unreferenced packs behind, never a snapshot without its data. Returns bytes copied."""
    copied = 0
    dst.require_writable("copy")
    with src.lock("copy (source)"), dst.lock("copy"):
        for i, pack in enumerate(plan.packs):
            data = src.store.get(pack_key(pack))
            dst.store.put(pack_key(pack), data)
            copied += len(data)
            if progress:
                progress(i + 1, len(plan.packs))
        for m in plan.snapshots:
            key = src.manifest_key(m)  # the same name: a manifest is sealed under it
            data = src.store.get(key)
            try:
                dst.store.put(key, data, if_absent=True)
            except AlreadyExists:
                pass
            copied += len(data)
    return copied
