"""Recovery drills: restore a snapshot or a point in time to scratch, validate it, measure RTO and RPO, keep a record.

The measures, as the drill record states them:
  RPO  the age of the newest restorable point when the drill starts: the data an incident at
       that moment would lose (the newest snapshot's time, or for a replicated database the
       newest transaction its segments hold, if later).
  RTO  wall time from the start of the drill to a *validated* restore: choosing the snapshot,
       restoring every page (each checked against its hash) and, for a point in time, applying
       the transactions up to it, integrity_check, foreign_key_check, the schema and
       restore-equivalence checks (a snapshot only: a point in time has no manifest to compare
       with), and the GX suites.
For a replicated database the targets mean points in time: ``newest`` is its newest replicated
state, ``random`` a random moment of its PITR window (exact to the transaction), an ISO time that
moment; without segments they mean snapshots, as before.
Both are compared with the policy's targets; the drill passes when every check passes and both
targets are met. The record goes into the repository (kind "drills") so any machine can report.

A drill runs as steps (``begin_drill``, ``restore_step``, ``check_step``, ``expectations_step``,
``finish_drill``) so a Prefect flow can make each a task; ``run_drill`` runs them in order.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre import __version__
from dbre.errors import DbreError, UsageError
from dbre.repository.manifest import Manifest, check_db_name, iso, now_utc, parse_time
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.restore.pitr import apply_pitr, plan_pitr
from dbre.validate.checks import CheckResult, failed, run_checks
from dbre.validate.suites import Suite, load_suites, suites_dir_for

if TYPE_CHECKING:
    from dbre.policy import Policy
    from dbre.validate.crosscheck import CrossCheck, CrossCheckTarget
    from dbre.validate.namespace import NamespaceResult, NamespaceTarget
    from dbre.validate.suites import SuiteRun

RECORD_KIND = "drills"


@dataclass
class DrillTargets:
    """The objectives a drill is measured against; None means no target (never fails)."""

    rpo_seconds: float | None = None
    rto_seconds: float | None = None

    @classmethod
    def from_policy(cls, policy: Policy | None, db: str) -> DrillTargets:
        if policy is None:
            return cls()
        entry = policy.database(db)
        return cls(rpo_seconds=float(entry.rpo), rto_seconds=float(entry.rto))


@dataclass
class PointInTime:
    """The point in time a drill restores from segments (``at`` None: the newest replicated state)
    and, once restored, what the restore applied."""

    at: datetime | None
    newest_replicated: datetime
    generation: str = ""
    segments: int = 0
    transactions: int = 0
    last_txid: int | None = None
    last_committed: str | None = None

    def summary(self) -> dict[str, Any]:
        return {"at": iso(self.at) if self.at else None, "newest_replicated_at": iso(self.newest_replicated),
                "generation": self.generation, "segments": self.segments, "transactions": self.transactions,
                "last_txid": self.last_txid, "last_committed": self.last_committed}


@dataclass
class Drill:
    """A drill in progress: what was chosen, when it started, what each step found."""

    db: str
    repository: str
    target: str
    snapshot: Manifest
    newest: Manifest
    started_at: datetime
    started: float  # time.monotonic() at the start: RTO is measured on this clock
    scratch: Path
    restored: Path
    restore_seconds: float | None = None
    checks_seconds: float | None = None
    checks: list[CheckResult] = field(default_factory=list)
    suite_run: SuiteRun | None = None
    namespace: NamespaceResult | None = None
    error: str | None = None
    ended: float | None = None  # time.monotonic() when validation ended: the RTO's end
    pitr: PointInTime | None = None  # a point in time restored from segments, not a snapshot
    replicated: datetime | None = None  # the newest transaction the segments hold (None: no segments)
    restored_stats: tuple[int, int, int] | None = None  # a point in time: (bytes, tables, rows), after the clock
    cross_check: CrossCheck | None = None  # the provider's history at the same time, compared (after the clock)

    @property
    def newest_point(self) -> datetime:
        return newest_restorable_point(self.newest, self.replicated)

    @property
    def rpo_seconds(self) -> float:
        return max(0.0, (self.started_at - self.newest_point).total_seconds())

    @property
    def data_time(self) -> datetime:
        """The moment the restored data is from (the GX suites' ``snapshot_time``)."""
        if self.pitr is None:
            return self.snapshot.time
        return self.pitr.at or self.pitr.newest_replicated

    def all_checks(self) -> list[CheckResult]:
        return self.checks + (self.suite_run.checks() if self.suite_run else [])


def newest_restorable_point(newest: Manifest, replicated: datetime | None = None) -> datetime:
    """The newest moment a restore can reach: the newest snapshot's time, or the newest transaction
    the segments hold if that is later."""
    return max(newest.time, replicated) if replicated is not None else newest.time


def replication_span(repo: Repository, db: str) -> tuple[datetime, datetime] | None:
    """The PITR window segments give ``db`` (its oldest generation's base, or where prune cut it,
    to the newest transaction observed in its newest generation); None without segments."""
    from dbre.replicate.segment import list_generations, to_time
    from dbre.replicate.window import read_pruned

    gens = {g: names for g, names in list_generations(repo, db).items() if names}
    if not gens:
        return None
    newest = to_time(max(names[-1].last_us for names in gens.values()))
    oldest = to_time(min(int(g[:16], 16) for g in gens))
    pruned = read_pruned(repo, db)
    start = max(oldest, pruned) if pruned is not None else oldest
    return (min(start, newest), newest)


def pick_point(span: tuple[datetime, datetime], newest_snapshot: Manifest, target: str,
               seed: int | None) -> PointInTime | None:
    """The point in time a drill of a replicated database restores (None: a snapshot instead, when
    the newest snapshot is newer than every replicated transaction and ``newest`` is asked)."""
    start, end = span
    if target == "newest":
        return PointInTime(None, end) if end > newest_snapshot.time else None
    if target == "random":
        seconds = random.Random(seed).uniform(0, (end - start).total_seconds())
        return PointInTime(start + timedelta(seconds=seconds), end)
    try:
        at = parse_time(target)
    except UsageError:
        return None  # (pick_snapshot names the mistake)
    return PointInTime(at, end) if start <= at else None


def backup_history(snaps: list[Manifest]) -> list[Manifest]:
    """The snapshots a drill chooses from and measures the RPO by: all but the safety snapshots
    (the undo of a repair, not what the backup schedule produced), unless there is nothing else."""
    return [m for m in snaps if not m.is_safety] or snaps


def pick_snapshot(repo: Repository, db: str, target: str = "newest", *, seed: int | None = None) -> Manifest:
    """``newest``, ``random`` (any snapshot of ``db``), or an ISO time (the newest at or before it);
    safety snapshots are never chosen (see ``backup_history``)."""
    snaps = backup_history(repo.require_db(db))
    if target == "newest":
        return snaps[-1]
    if target == "random":
        return random.Random(seed).choice(snaps)
    try:
        at = parse_time(target)
    except UsageError:
        raise UsageError(f"drill target {target!r} is not newest, random or a time",
                         "e.g. --target newest, --target random or --target 2026-11-01T00:00:00Z") from None
    chosen = repo.find_snapshot(db, at=at)  # (raises when ``at`` is before the first snapshot)
    if chosen.is_safety:
        return next((m for m in reversed(snaps) if m.time <= at), chosen)
    return chosen


def begin_drill(repo: Repository, db: str, target: str = "newest", *, scratch_dir: str | os.PathLike[str] | None = None,
                seed: int | None = None) -> Drill:
    """Start the clock, pick the snapshot, note the newest restorable point, make the scratch folder."""
    check_db_name(db)
    started_at = now_utc()
    started = time.monotonic()
    snaps = backup_history(repo.require_db(db))
    span = replication_span(repo, db)
    point = pick_point(span, snaps[-1], target, seed) if span is not None else None
    # (a point in time restores its generation's base, set by restore_step; until then the newest)
    snapshot = snaps[-1] if point is not None else pick_snapshot(repo, db, target, seed=seed)
    try:
        if scratch_dir is not None:
            Path(scratch_dir).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"dbre-drill-{db}-", dir=scratch_dir))
    except OSError as err:  # (a path under a file, a read-only or full disk: named, not a bare OSError)
        where = scratch_dir if scratch_dir is not None else tempfile.gettempdir()
        raise UsageError(f"drill scratch folder {where}: cannot make a folder there ({err.strerror or err})",
                         "set --scratch-dir (or the policy's drills.scratch_dir) to a writable folder with room "
                         "for a restore") from None
    return Drill(db=db, repository=repo.url, target=target, snapshot=snapshot, newest=snaps[-1],
                 started_at=started_at, started=started, scratch=scratch, restored=scratch / f"{db}.db",
                 pitr=point, replicated=span[1] if span is not None else None)


def restore_step(repo: Repository, drill: Drill) -> float:
    """Restore the drill's snapshot, or its point in time (its generation's base, then the
    transactions up to that moment), into scratch; every page is checked against its hash."""
    if drill.pitr is not None:
        started = time.perf_counter()
        pitr_plan = plan_pitr(repo, drill.db, drill.restored, at=drill.pitr.at)
        if pitr_plan is not None:  # (apply_pitr holds a shared lock itself)
            done = apply_pitr(repo, pitr_plan)
            drill.snapshot = pitr_plan.base
            p = drill.pitr
            p.generation, p.segments = pitr_plan.generation.id, len(pitr_plan.segments)
            p.transactions, p.last_txid, p.last_committed = done.transactions, done.last_txid, done.last_observed
            drill.restore_seconds = time.perf_counter() - started
            return drill.restore_seconds
        # a snapshot holds that moment at least as well (taken after its last transaction was seen)
        drill.snapshot = drill.newest if drill.pitr.at is None else repo.find_snapshot(drill.db, at=drill.pitr.at)
        drill.pitr = None
    with repo.lock(f"drill {drill.db}"):  # shared: keeps a prune from removing packs mid-restore
        plan = plan_restore(repo, drill.db, drill.restored, snapshot=drill.snapshot.id)
        result = apply_restore(repo, plan)
    drill.restore_seconds = result.seconds
    return result.seconds


def check_step(drill: Drill) -> list[CheckResult]:
    """integrity_check, foreign_key_check, schema and restore-equivalence against the manifest."""
    t = time.perf_counter()
    drill.checks = run_checks(drill.restored, None if drill.pitr is not None else drill.snapshot)
    drill.checks_seconds = time.perf_counter() - t
    return drill.checks


def drill_suites(expectations: str | os.PathLike[str], db: str) -> list[Suite]:
    """The suites of ``db`` under ``expectations`` (``DIR/<db>/`` or ``DIR``); UsageError if there are none."""
    folder = suites_dir_for(expectations, db)
    suites = load_suites(folder)
    if not suites:
        raise UsageError(f"no expectation suites in {folder}",
                         f"write some with `dbre expectations profile SOURCE --out {folder}`")
    return suites


def expectations_step(drill: Drill, suites: list[Suite]) -> SuiteRun:
    """Run the GX suites on the restored file."""
    from dbre.validate.suites import run_suites

    drill.suite_run = run_suites(drill.restored, suites, snapshot_time=drill.data_time)
    return drill.suite_run


def validate_step(drill: Drill, suites: list[Suite] | None) -> None:
    """The checks, then the GX suites. One after the other on purpose: the checksums hash rows in
    Python and GX's import is Python too, so on threads they fight for the GIL and were slower
    together (measured on the demo database) than in turn."""
    check_step(drill)
    if suites:
        expectations_step(drill, suites)


def namespace_step(drill: Drill, target: NamespaceTarget) -> NamespaceResult:
    """Load the restored file into a new sqld namespace and check its row counts (remote databases)."""
    from dbre.validate.namespace import load_into_namespace

    drill.namespace = load_into_namespace(drill.restored, drill.snapshot, target, drill.scratch)
    drill.checks += drill.namespace.checks
    return drill.namespace


def cross_check_step(drill: Drill, target: CrossCheckTarget, suites: list[Suite] | None) -> CrossCheck:
    """Restore the provider's history at the drill's time, run the same checks, compare per table
    (after the clock stopped: evidence about the backups, not part of the recovery)."""
    from dbre.validate.crosscheck import CrossCheck, cross_check

    if drill.error is not None or not drill.restored.exists():
        drill.cross_check = CrossCheck(target, drill.data_time, error="dbre's restore failed: nothing to compare")
        return drill.cross_check
    drill.cross_check = cross_check(drill.restored, drill.data_time, target, drill.scratch,
                                    manifest=None if drill.pitr is not None else drill.snapshot,
                                    dbre_checks=drill.checks, suites=suites, dbre_gx=drill.suite_run)
    return drill.cross_check


def finish_drill(repo: Repository, drill: Drill, targets: DrillTargets, *, keep_scratch: bool = False,
                 write: bool = True) -> dict[str, Any]:
    """Stop the clock, compare with the targets, write the drill record, remove scratch."""
    rto = (drill.ended or time.monotonic()) - drill.started
    finished_at = now_utc()
    if drill.pitr is not None and drill.restored.exists():  # (a snapshot's come from its manifest)
        drill.restored_stats = _count(drill.restored)
    if not keep_scratch:
        shutil.rmtree(drill.scratch, ignore_errors=True)
    record = drill_record(drill, targets, rto, finished_at)
    if write:
        record["record_id"] = repo.put_record(RECORD_KIND, drill.db, record)
    return record


def drill_record(drill: Drill, targets: DrillTargets, rto: float, finished_at: datetime) -> dict[str, Any]:
    checks = drill.all_checks()
    bad = failed(checks)
    rpo = drill.rpo_seconds
    # a failed restore or check means the restore was not validated: no RTO was achieved
    validated = drill.error is None and not bad
    rto_met = validated and (targets.rto_seconds is None or rto <= targets.rto_seconds)
    rpo_met = targets.rpo_seconds is None or rpo <= targets.rpo_seconds
    failures = []
    if drill.error:
        failures.append(f"drill: {drill.error}")
    failures += [c.describe() for c in bad]
    if validated and not rto_met:
        failures.append(f"RTO target missed: {rto:.1f} s to a validated restore, target {targets.rto_seconds:.0f} s")
    if not rpo_met:
        failures.append(f"RPO target missed: newest restorable point {rpo:.0f} s old, target "
                        f"{targets.rpo_seconds:.0f} s")
    cc = drill.cross_check
    if cc is not None:
        failures += cc.failures()
    gx = drill.suite_run.summary() if drill.suite_run else None
    m = drill.snapshot
    return {
        "kind": "drill",
        "db": drill.db,
        "repository": drill.repository,
        "target": drill.target,
        "snapshot": m.id,
        "snapshot_taken_at": m.taken_at,
        "newest_snapshot": drill.newest.id,
        "newest_restorable_at": iso(drill.newest_point),
        "point_in_time": drill.pitr.summary() if drill.pitr is not None else None,
        "started_at": iso(drill.started_at),
        "finished_at": iso(finished_at),
        "rto_seconds": round(rto, 3),
        "rpo_seconds": round(rpo, 3),
        "rto_target_seconds": targets.rto_seconds,
        "rpo_target_seconds": targets.rpo_seconds,
        "rto_met": rto_met,
        "rpo_met": rpo_met,
        "validated": validated,
        "passed": validated and rto_met and rpo_met and (cc is None or cc.agree),
        "cross_check": cc.summary() if cc is not None else None,
        "phases": {
            "restore_seconds": _round(drill.restore_seconds),
            "checks_seconds": _round(drill.checks_seconds),
            "expectations_seconds": gx["seconds"] if gx else None,
            "gx_import_seconds": gx["import_seconds"] if gx else None,
            "namespace_seconds": _round(drill.namespace.seconds) if drill.namespace else None,
            "cross_check_seconds": _round(cc.seconds) if cc is not None else None,
        },
        "namespace": drill.namespace.summary() if drill.namespace else None,
        **({"size": drill.restored_stats[0], "tables": drill.restored_stats[1], "rows": drill.restored_stats[2]}
           if drill.restored_stats is not None else
           {"size": m.size, "tables": len(m.tables), "rows": sum(t.rows for t in m.tables.values())}),
        "checks": {"total": len(checks), "failed": len(bad)},
        "failed_checks": [c.to_dict() for c in bad],
        "failures": failures,
        "expectations": gx,
        "error": drill.error,
        "host": socket.gethostname(),
        "tool": f"dbre {__version__}",
    }


def _count(path: Path) -> tuple[int, int, int] | None:
    """(bytes, tables, rows) of a restored file (a point in time has no manifest that says)."""
    from dbre.repository.tables import qident, user_tables
    from dbre.validate.checks import open_restored

    try:
        conn = open_restored(path)
        try:
            tables = [t["name"] for t in user_tables(conn)]
            rows = 0
            for t in tables:
                (n,) = conn.execute(f"SELECT count(*) FROM {qident(t)}").fetchone()  # type: ignore[misc]
                rows += int(n)
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - a file the checks found broken: its size only
        return (path.stat().st_size, 0, 0)
    return (path.stat().st_size, len(tables), rows)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclass
class DrillOutcome:
    """What ``run_drill`` returns: the record as stored, and the full results for a report."""

    record: dict[str, Any]
    checks: list[CheckResult]
    suite_run: SuiteRun | None


def run_drill(repo: Repository, db: str, *, target: str = "newest", targets: DrillTargets | None = None,
              expectations: str | os.PathLike[str] | None = None, scratch_dir: str | os.PathLike[str] | None = None,
              data_docs_dir: str | os.PathLike[str] | None = None, seed: int | None = None,
              keep_scratch: bool = False, write: bool = True, namespace: NamespaceTarget | None = None,
              cross_check: CrossCheckTarget | None = None) -> DrillOutcome:
    """A whole drill. A restore or validation that fails is recorded as a failed drill, not raised;
    bad options (unknown database, unreadable suites) raise UsageError before the clock matters.
    ``cross_check``: after the clock, the provider's history at the same time, checked and compared."""
    suites = drill_suites(expectations, db) if expectations is not None else None
    drill = begin_drill(repo, db, target, scratch_dir=scratch_dir, seed=seed)
    try:
        try:
            restore_step(repo, drill)
            validate_step(drill, suites)
            if namespace is not None:
                namespace_step(drill, namespace)
        except UsageError:
            raise
        except DbreError as err:
            drill.error = str(err)
        drill.ended = time.monotonic()
        if drill.namespace is not None and namespace is not None and not namespace.keep:
            from dbre.validate.namespace import delete_namespace

            drill.namespace.deleted = delete_namespace(namespace)  # before the record, after the clock
        if cross_check is not None:
            cross_check_step(drill, cross_check, suites)
        record = finish_drill(repo, drill, targets or DrillTargets(), keep_scratch=keep_scratch, write=write)
        if data_docs_dir is not None and drill.suite_run is not None:
            from dbre.validate.suites import build_data_docs

            build_data_docs(drill.suite_run, data_docs_dir)  # after the clock stopped: reporting, not recovery
    finally:
        if not keep_scratch:
            shutil.rmtree(drill.scratch, ignore_errors=True)
    return DrillOutcome(record, drill.all_checks(), drill.suite_run)
