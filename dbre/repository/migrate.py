"""Convert a format-1 repository into a new format-2 one: every snapshot replayed, every record re-sealed.

Format 2 changes what a page hash is (keyed BLAKE3 instead of xxh3), how every object is sealed
(bound to its name) and how snapshots are named (by time), so nothing of a format-1 repository
can be reused byte for byte. `dbre migrate` therefore *replays* history into a new repository:
each snapshot, oldest first, is restored to a scratch file (every page checked against its
format-1 hash), backed up into the new repository with its original time, source and lineage,
and the new snapshot is restored again and compared with the scratch file (SHA-256) before the
next one starts. Records (drills, verifications, backup attempts, audits) are re-sealed under
the same names. The old repository is only read.

Crash safety is that of a backup: a snapshot appears in the new repository only when its
manifest is written, last. A migration cut short is resumed by running it again: snapshots
already migrated (found by their ``stats.migrated_from`` id) are skipped, and the newest of them
(the one a kill could have caught between its commit and its comparison) is compared again.
A damaged format-1 snapshot (its manifest unreadable, a pack lost) does not stop the others: it
is named in the result and the command exits 1 (format 1 cannot be written, so migrating past
it is the way out).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbre.errors import IntegrityError, RepositoryError, UsageError
from dbre.repository.manifest import Manifest
from dbre.repository.repo import Repository
from dbre.storage.base import RECORD_CAP, get_capped

Progress = Callable[[int, int], None]


@dataclass
class MigratePlan:
    """What a migration will do: the snapshots still to replay, oldest first, and the records."""

    source: str
    target: str
    snapshots: list[Manifest] = field(default_factory=list)
    already: int = 0
    records: list[str] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (key, why): manifests that cannot be read
    recheck: tuple[Manifest, Manifest] | None = None  # (old, new): the newest migrated, compared again

    @property
    def bytes_to_replay(self) -> int:
        return sum(m.size for m in self.snapshots)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "snapshots_to_migrate": [f"{m.db}/{m.id}" for m in self.snapshots],
            "snapshots_already_migrated": self.already,
            "records_to_migrate": len(self.records),
            "damaged": [{"key": k, "why": why} for k, why in self.damaged],
            "bytes_to_replay": self.bytes_to_replay,
        }


@dataclass
class MigrateResult:
    plan: MigratePlan
    migrated: list[tuple[str, str, str]] = field(default_factory=list)  # (db, old id, new id)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (db/old id, why)
    records: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            **self.plan.describe(),
            "migrated": [{"db": db, "from": old, "to": new} for db, old, new in self.migrated],
            "failed": [{"snapshot": what, "why": why} for what, why in self.failed],
            "records_migrated": self.records,
            "seconds": round(self.seconds, 3),
        }


def _migrated(dst: Repository) -> dict[tuple[str, str], Manifest]:
    """Snapshots already migrated into ``dst``, by (db, old id)."""
    done: dict[tuple[str, str], Manifest] = {}
    for m in dst.snapshots():
        old = (m.stats or {}).get("migrated_from")
        if isinstance(old, dict) and old.get("id"):
            done[(m.db, str(old["id"]))] = m
    return done


def plan_migrate(src: Repository, dst: Repository) -> MigratePlan:
    """Check both repositories and list what is left to migrate; writes nothing."""
    if src.version != 1:
        raise UsageError(
            f"repository {src.url} already uses format {src.version}", "nothing to migrate; use it as it is"
        )
    if dst.version < 2:
        raise UsageError(f"target {dst.url} is a format-1 repository", "migrate into a new, empty location")
    if dst.id == src.id:
        raise UsageError("the target is the source repository", "migrate into a new, empty location")
    plan = MigratePlan(src.url, dst.url)
    done = _migrated(dst)
    newest: tuple[Manifest, Manifest] | None = None
    for m in src.snapshots(damaged=plan.damaged):  # oldest first; damaged manifests are named, not fatal
        new = done.get((m.db, m.id))
        if new is not None:
            plan.already += 1
            if newest is None or (new.taken_at, new.id) > (newest[1].taken_at, newest[1].id):
                newest = (m, new)
        else:
            plan.snapshots.append(m)
    plan.recheck = newest
    there = set(dst.store.list("records/"))
    plan.records = sorted(k for k in src.store.list("records/") if k not in there)
    return plan


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def apply_migrate(src: Repository, dst: Repository, plan: MigratePlan,
                  progress: Progress | None = None) -> MigrateResult:
    """Replay every planned snapshot into ``dst`` (restore, back up, restore again, compare)."""
    import time

    from dbre.repository.backup import backup
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.sources.local import LocalFileSource

    started = time.perf_counter()
    result = MigrateResult(plan)
    total = plan.bytes_to_replay
    done_bytes = 0
    with tempfile.TemporaryDirectory(prefix="dbre-migrate-") as scratch_dir:
        scratch = Path(scratch_dir)

        def compare(old: Manifest, new: Manifest, expected: str | None = None) -> None:
            """Restore ``new`` from the new repository and compare it with ``old`` (its SHA-256
            ``expected``, or restored again from the old repository)."""
            a, b = scratch / f"{old.db}.db", scratch / f"{old.db}.check.db"
            if expected is None:
                apply_restore(src, plan_restore(src, old.db, a, snapshot=old.id, force=True, safety=False))
                expected = _sha256(a)
                a.unlink(missing_ok=True)
            apply_restore(dst, plan_restore(dst, new.db, b, snapshot=new.id, force=True, safety=False))
            same = _sha256(b) == expected
            b.unlink(missing_ok=True)
            if not same:
                raise IntegrityError(
                    f"migrate {old.db}/{old.id}: the new snapshot {new.id} does not restore to the same bytes",
                    "keep using the old repository and report this",
                )

        if plan.recheck is not None:  # a kill may have come between its commit and its comparison
            compare(*plan.recheck)
        for m in plan.snapshots:
            old_file = scratch / f"{m.db}.db"
            try:
                apply_restore(src, plan_restore(src, m.db, old_file, snapshot=m.id, force=True,
                                                safety=False))
            except RepositoryError as err:  # a lost pack, a damaged run: name it, go on with the others
                result.failed.append((f"{m.db}/{m.id}", err.message))
                old_file.unlink(missing_ok=True)
                continue
            expected = _sha256(old_file)
            made = backup(dst, LocalFileSource(old_file), m.db, checksums=bool(m.tables) and any(
                t.checksum for t in m.tables.values()), replay=m)
            old_file.unlink(missing_ok=True)
            compare(m, made.manifest, expected)
            result.migrated.append((m.db, m.id, made.manifest.id))
            done_bytes += m.size
            if progress:
                progress(done_bytes, total)
    for key in plan.records:
        body = src.sealer.unseal(get_capped(src.store, key, RECORD_CAP, "record"), key)
        json.loads(body)  # a record is JSON: refuse to carry anything else over
        dst.require_writable("migrate")
        dst.store.put(key, dst.sealer.seal(body, key), if_absent=True)
        result.records += 1
    result.seconds = time.perf_counter() - started
    return result
