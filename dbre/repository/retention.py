"""Retention: which snapshots a keep-policy keeps (restic's rules), and pruning unused packs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dbre.repository.keep import KeepPolicy as KeepPolicy  # re-exported: the keep rules live in keep.py
from dbre.repository.keep import apply_policy as apply_policy
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.storage.local import LocalStore


@dataclass
class ForgetPlan:
    keep: list[tuple[Manifest, list[str]]] = field(default_factory=list)
    remove: list[Manifest] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {
            "keep": [{"id": m.id, "db": m.db, "taken_at": m.taken_at, "reasons": r} for m, r in self.keep],
            "remove": [{"id": m.id, "db": m.db, "taken_at": m.taken_at} for m in self.remove],
        }


def plan_forget(repo: Repository, policy: KeepPolicy, db: str | None = None) -> ForgetPlan:
    policy.check()
    plan = ForgetPlan()
    dbs = [db] if db else repo.databases()
    for name in dbs:
        snaps = repo.require_db(name)
        reasons = apply_policy(snaps, policy)
        for m in snaps:
            if m.id in reasons:
                plan.keep.append((m, reasons[m.id]))
            else:
                plan.remove.append(m)
    return plan


def apply_forget(repo: Repository, plan: ForgetPlan) -> int:
    """Delete the manifests of forgotten snapshots (their data stays until prune)."""
    repo.require_writable("forget")
    with repo.lock("forget"):
        for m in plan.remove:
            repo.store.delete(repo.manifest_key(m))
    return len(plan.remove)


@dataclass
class PrunePlan:
    unused_packs: list[str]
    used_packs: int

    def describe(self) -> dict[str, Any]:
        return {"delete_packs": len(self.unused_packs), "keep_packs": self.used_packs}


def plan_prune(repo: Repository) -> PrunePlan:
    used: set[str] = set()
    for m in repo.snapshots():
        used.update(m.packs)
    present = repo.pack_ids()
    return PrunePlan(sorted(present - used), len(present & used))


def prune(repo: Repository, *, dry_run: bool = False) -> PrunePlan:
    """Delete packs no snapshot needs, under an exclusive lock (no backup can be running)."""
    if dry_run:
        return plan_prune(repo)
    repo.require_writable("prune")
    with repo.lock("prune", exclusive=True):
        plan = plan_prune(repo)  # recomputed under the lock: the only plan that is safe to apply
        for pack in plan.unused_packs:
            repo.store.delete(pack_key(pack))
        if isinstance(repo.store, LocalStore):
            repo.store.clean_temp()
    return plan
