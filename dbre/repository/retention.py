"""Retention: which snapshots a keep-policy keeps (restic's rules), and pruning unused packs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dbre.errors import UsageError
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository, pack_key
from dbre.storage.local import LocalStore


@dataclass
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly, self.yearly))

    def check(self) -> None:
        if self.empty():
            raise UsageError("no retention rule given", "pass at least one --keep-* option, e.g. --keep-daily 7")
        for name, v in vars(self).items():
            if v < 0:
                raise UsageError(f"--keep-{name} is negative", "use 0 or more")


_BUCKETS: list[tuple[str, Callable[[datetime], tuple[int, ...]]]] = [
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("monthly", lambda t: (t.year, t.month)),
    ("yearly", lambda t: (t.year,)),
]


def apply_policy(snaps: list[Manifest], policy: KeepPolicy) -> dict[str, list[str]]:
    """Map each kept snapshot id to the rules that keep it; snapshots not in the map go.

    Like restic: walking from the newest, each rule keeps the newest snapshot of each of the
    last N periods (hours, days, ...) that have a snapshot.
    """
    newest_first = sorted(snaps, key=lambda m: (m.taken_at, m.id), reverse=True)
    reasons: dict[str, list[str]] = {}
    for m in newest_first[: policy.last]:
        reasons.setdefault(m.id, []).append("last")
    for name, bucket in _BUCKETS:
        n = getattr(policy, name)
        seen: set[tuple[int, ...]] = set()
        for m in newest_first:
            if len(seen) >= n:
                break
            b = bucket(m.time)
            if b not in seen:
                seen.add(b)
                reasons.setdefault(m.id, []).append(name)
    return reasons


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
