"""Backup health per database: the seed's metrics, the alerts they raise, Prometheus text, webhooks.

Metrics (targets and warning levels from the seed's table):
  backup success rate   target 100 %, warn below 99 %. Two sources, in this order:
                        1. records of kind "backups" ({"ok": bool, ...}, see ``record_backup``) that
                           the backup flow writes for every attempt, failed ones included;
                        2. without such records, snapshots against the expected schedule: each
                           complete interval of the policy's backup crons (hourly and nightly)
                           that holds a snapshot counts as a success. Only the span in which the
                           retention keeps every snapshot is counted (older intervals would look
                           missed because retention forgot them on purpose).
                        ``backup_success_basis`` says which one a figure comes from.
  RPO attainment        share of the window in which the newest restorable point was no older
                        than the RPO (from snapshot times, over the same span as above).
  RTO attainment        share of the last 12 drills whose time to a validated restore met the RTO.
  predicted RTO         the time a validated restore would take now: the last passed drill's fixed
                        costs plus its size-proportional ones scaled to the newest snapshot's size
                        (``dbre.validate.rto``); warns when over the RTO between drills.
  drill frequency       days since the last passed drill; warn after ``drills.warn_after_days`` (90).
  storage               bytes used (exact for a local repository or a store offering ``usage()``,
                        else estimated from the bytes each kept snapshot added), bytes added per
                        day over the last 7 days, and days until a quota fills at that pace.
  replication lag       per database with segments (``dbre replicate``): now minus the newest point
                        the segments certainly hold. That is the newest segment's last observed
                        time, or the replicator's heartbeat (its lease's last write, store clock)
                        when later: the lease is rewritten through the same ordered uploader as the
                        segments, so a live heartbeat means everything committed a moment before it
                        was shipped. When the policy's source is a local file whose WAL ends where
                        the newest segment does (its wal-index header; without -shm: file and -wal
                        not modified since), or where the lease says the replicator stood with
                        nothing unshipped (a WAL emptied by a TRUNCATE checkpoint), nothing is
                        unshipped: lag 0.
Alerts: backup_failure, backup_delay (newest restorable point older than the RPO),
replication_lag (replication lag over the RPO), rto_at_risk (predicted RTO over the RTO),
storage_capacity (over ``storage_threshold`` of the quota), drill_missed, drill_failure. Any
alert makes ``dbre status`` exit 1 and the status flow fail, with one line per alert.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre.errors import DbreError, UsageError
from dbre.repository.manifest import Manifest, iso, now_utc, parse_time
from dbre.repository.repo import Repository
from dbre.storage import overlap
from dbre.units import human_bytes as _size
from dbre.validate.rto import estimate_rto

if TYPE_CHECKING:
    from dbre.policy import Policy

SUCCESS_WARN = 0.99
DRILL_WARN_DAYS = 90
RTO_DRILLS = 12  # RTO attainment over this many recent drills (a year of monthly drills)
GROWTH_DAYS = 7
DEFAULT_WINDOW = timedelta(days=30)
OFFSITE_MAX_LAG = 86400.0  # an offsite copy that lacks a snapshot older than this has stopped (alert)
BACKUPS_KIND = "backups"


def record_backup(repo: Repository, db: str, *, ok: bool, started_at: datetime, seconds: float | None = None,
                  snapshot: str | None = None, error: str | None = None) -> str:
    """Note one backup attempt (kind "backups"): what the success rate counts. Returns the record id."""
    return repo.put_record(BACKUPS_KIND, db, {"ok": ok, "started_at": iso(started_at), "seconds": seconds,
                                               "snapshot": snapshot, "error": error})


# -- what the metrics are measured against -------------------------------------------------------


@dataclass
class Expectations:
    """Targets for one database: from the policy, or defaults that never alert on RPO/RTO."""

    rpo_seconds: float | None = None
    rto_seconds: float | None = None
    drill_warn_days: float = DRILL_WARN_DAYS
    schedules: list[tuple[str, str]] = field(default_factory=list)  # (cron, time zone) of backups
    dense_seconds: float | None = None  # how far back retention keeps every scheduled snapshot
    source: str | None = None  # the policy's source (a local file: its mtimes bound the replication lag)

    @classmethod
    def from_policy(cls, policy: Policy | None, db: str) -> Expectations:
        if policy is None:
            return cls()
        entry = next((d for d in policy.databases if d.name == db), None)
        schedules = [(s.cron, s.timezone or policy.schedules.timezone)
                     for name, s in policy.schedules.items() if name.startswith("backup_") and s.enabled]
        interval = _shortest_interval(schedules)
        r = policy.retention
        dense = None
        if interval:
            spans = [r.keep_last * interval]
            for keep, bucket in ((r.keep_hourly, 3600), (r.keep_daily, 86400), (r.keep_weekly, 7 * 86400),
                                 (r.keep_monthly, 30 * 86400), (r.keep_yearly, 365 * 86400)):
                if interval * 1.01 >= bucket:  # one kept per bucket is every snapshot only if one is taken
                    spans.append(keep * bucket)
            dense = max(spans) or None
        return cls(rpo_seconds=float(entry.rpo) if entry else None, rto_seconds=float(entry.rto) if entry else None,
                   drill_warn_days=float(policy.drills.warn_after_days), schedules=schedules, dense_seconds=dense,
                   source=entry.source if entry else None)


def _shortest_interval(schedules: list[tuple[str, str]]) -> float | None:
    best = None
    for cron, tz in schedules:
        times = _fire_times(cron, tz, now_utc() - timedelta(days=2), now_utc())
        gaps = [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]
        if gaps:
            best = min(best or math.inf, min(gaps))
    return best


def _fire_times(cron: str, tz: str, start: datetime, end: datetime) -> list[datetime]:
    """When a cron fires between ``start`` and ``end`` (UTC datetimes), in UTC; [] without cronsim."""
    from zoneinfo import ZoneInfo

    try:
        from cronsim import CronSim  # a small pure-Python cron evaluator (comes with Prefect)
    except ImportError:
        return []  # no schedule to compare with: the success rate then needs "backups" records

    zone = ZoneInfo(tz)
    out = []
    for t in CronSim(cron, start.astimezone(zone)):
        t_utc = t.astimezone(start.tzinfo)
        if t_utc > end:
            break
        out.append(t_utc)
    return out


# -- results -------------------------------------------------------------------------------------


@dataclass
class Alert:
    event: str  # backup_failure | backup_delay | storage_capacity | drill_missed | drill_failure
    severity: str  # critical | warning
    message: str
    db: str | None = None


@dataclass
class OffsiteStatus:
    """How far an offsite copy (the fourth layer) is behind the primary for one database."""

    repository: str
    snapshots: int = 0  # of this database, in the offsite copy
    newest_snapshot_at: str | None = None
    missing_snapshots: int = 0  # the primary's (schedule) snapshots the copy lacks
    oldest_missing_at: str | None = None
    behind_seconds: float | None = None  # the primary's newest snapshot time minus the copy's (0: current)
    error: str | None = None  # the copy could not be read


@dataclass
class DatabaseStatus:
    db: str
    snapshots: int = 0
    newest_snapshot_at: str | None = None
    newest_restorable_age_seconds: float | None = None
    size_bytes: int | None = None
    rpo_target_seconds: float | None = None
    rto_target_seconds: float | None = None
    backup_success_rate: float | None = None
    backup_success_basis: str | None = None  # "records" | "schedule"
    backups_expected: int | None = None
    backups_succeeded: int | None = None
    backups_failed: int | None = None
    rpo_attainment: float | None = None
    rto_attainment: float | None = None
    drills: int = 0
    last_drill_at: str | None = None
    last_drill_passed: bool | None = None
    last_drill_rto_seconds: float | None = None
    predicted_rto_seconds: float | None = None
    last_successful_drill_at: str | None = None
    days_since_successful_drill: float | None = None
    storage_bytes: int | None = None
    added_bytes_per_day: float | None = None
    window_start: str | None = None
    replication_newest_segment_at: str | None = None
    replication_heartbeat_at: str | None = None
    replication_lag_seconds: float | None = None
    offsite: list[OffsiteStatus] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.alerts


@dataclass
class Status:
    repository: str
    generated_at: str
    databases: list[DatabaseStatus]
    storage_bytes: int
    storage_exact: bool
    quota_bytes: int | None = None
    storage_threshold: float | None = None
    days_until_quota: float | None = None
    alerts: list[Alert] = field(default_factory=list)

    @property
    def all_alerts(self) -> list[Alert]:
        return self.alerts + [a for d in self.databases for a in d.alerts]

    @property
    def ok(self) -> bool:
        return not self.all_alerts

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["alerts"] = [asdict(a) for a in self.all_alerts]
        for db in d["databases"]:
            db.pop("alerts", None)
        return d


# -- computing -----------------------------------------------------------------------------------


def compute_status(repo: Repository, *, policy: Policy | None = None, dbs: list[str] | None = None,
                   now: datetime | None = None, window: timedelta = DEFAULT_WINDOW, quota_bytes: int | None = None,
                   storage_threshold: float = 0.8,
                   offsite: Sequence[tuple[str, Repository | Exception]] = (),
                   offsite_max_lag: float = OFFSITE_MAX_LAG) -> Status:
    """Status of every database in the repository (and every database the policy lists). ``offsite``: the
    offsite copies (url, the opened repository, or why it could not be opened), each compared with the
    primary per database (`offsite_status`)."""
    now = now or now_utc()
    names = set(repo.databases())
    if policy is not None:
        names |= {d.name for d in policy.databases}
    if dbs:
        names = set(dbs)
    storage, exact, per_db = storage_used(repo)
    statuses = [database_status(repo, db, Expectations.from_policy(policy, db), now=now, window=window,
                                storage=per_db.get(db))
                for db in sorted(names)]
    for url, copy in offsite:
        for st in statuses:
            offsite_status(repo, st, url, copy, now, offsite_max_lag)
    status = Status(repository=repo.url, generated_at=iso(now), databases=statuses, storage_bytes=storage,
                    storage_exact=exact, quota_bytes=quota_bytes,
                    storage_threshold=storage_threshold if quota_bytes else None)
    growth = sum(s.added_bytes_per_day or 0.0 for s in statuses)
    if quota_bytes:
        if growth > 0:
            status.days_until_quota = round(max(0.0, quota_bytes - storage) / growth, 1)
        used = storage / quota_bytes
        if used >= storage_threshold:
            status.alerts.append(Alert(
                "storage_capacity", "critical" if used >= 1 else "warning",
                f"repository {repo.url} uses {_size(storage)} of its {_size(quota_bytes)} quota ({used:.0%}, "
                f"threshold {storage_threshold:.0%})" + (f"; full in {status.days_until_quota:.0f} days at the "
                                                         f"current pace" if status.days_until_quota else "")))
    return status


def database_status(repo: Repository, db: str, exp: Expectations, *, now: datetime, window: timedelta,
                    storage: int | None = None) -> DatabaseStatus:
    st = DatabaseStatus(db=db, rpo_target_seconds=exp.rpo_seconds, rto_target_seconds=exp.rto_seconds,
                        storage_bytes=storage)
    every = [m for m in repo.snapshots(db) if m.time <= now]
    st.snapshots = len(every)
    # the schedule's snapshots: a safety snapshot (the undo of a repair) must not hide a stalled schedule
    snaps = [m for m in every if not m.is_safety] or every
    if snaps:
        newest = snaps[-1]
        st.newest_snapshot_at = newest.taken_at
        st.newest_restorable_age_seconds = round((now - newest.time).total_seconds(), 3)
        st.size_bytes = newest.size
        recent = [m for m in snaps if m.time >= now - timedelta(days=GROWTH_DAYS)]
        st.added_bytes_per_day = round(sum(int(m.stats.get("bytes_added", 0)) for m in recent) / GROWTH_DAYS, 1)
    start = now - window
    if exp.dense_seconds:
        start = max(start, now - timedelta(seconds=exp.dense_seconds))
    if snaps:
        start = max(start, snaps[0].time)
    st.window_start = iso(start)
    _backup_rate(repo, st, exp, snaps, start, now)
    if exp.rpo_seconds and snaps:
        st.rpo_attainment = rpo_attainment([m.time for m in snaps], exp.rpo_seconds, start, now)
    _drills(repo, st, exp, snaps, now)
    _alerts(st, exp)
    _replication(repo, st, exp, now)
    return st


def open_offsite(urls: Sequence[str], key: Any) -> list[tuple[str, Repository | Exception]]:
    """Each offsite copy opened with the primary's key (`dbre copy` keeps its config), or why it could not be:
    for ``compute_status``, which reports that as an alert of each database, not a failed run."""
    copies: list[tuple[str, Repository | Exception]] = []
    for url in urls:
        try:
            copies.append((url, Repository.open(url, key)))
        except DbreError as err:
            copies.append((url, err))
    return copies


def offsite_status(repo: Repository, st: DatabaseStatus, url: str, copy: Repository | Exception, now: datetime,
                   max_lag: float = OFFSITE_MAX_LAG) -> OffsiteStatus:
    """Compare the offsite copy with the primary for one database: the primary's snapshots (safety ones aside)
    the copy lacks (`dbre copy` keeps ids), the oldest of them, and how far the copy's newest is behind. An alert
    when a missing snapshot is older than ``max_lag`` (the copy has stopped), or when the copy cannot be read."""
    off = OffsiteStatus(repository=url)
    st.offsite.append(off)
    fix = f"run `dbre copy --repo {repo.url} --to {url}` (the backup flow's copy_offsite does it after each backup)"
    if isinstance(copy, Exception):
        off.error = str(copy)
        st.alerts.append(Alert("offsite_unreadable", "critical", f"{st.db}: the offsite copy {url} cannot be read: "
                               f"{copy}; the fourth layer is not there", st.db))
        return off
    where = overlap(repo.store, copy.store)
    if where is not None:
        # (a policy or --offsite naming the primary, or a folder inside it, would otherwise read "current")
        off.error = ("no copy: it is the primary repository itself" if where == "same"
                     else f"no copy: it and the primary repository {repo.url} lie one inside the other")
        st.alerts.append(Alert("offsite_unreadable", "critical", f"{st.db}: the offsite copy {url} is {off.error}; "
                               "the fourth layer is not there (name another disk or bucket)", st.db))
        return off
    try:
        theirs = {m.id: m for m in copy.snapshots(st.db)} if st.db in set(copy.databases()) else {}
    except Exception as err:  # noqa: BLE001 - a listing that fails is reported as the alert, not a traceback
        off.error = str(err)
        st.alerts.append(Alert("offsite_unreadable", "critical",
                               f"{st.db}: the offsite copy {url} cannot be listed: {err}", st.db))
        return off
    ours = [m for m in repo.snapshots(st.db) if m.time <= now and not m.is_safety]
    off.snapshots = len(theirs)
    kept = sorted(theirs.values(), key=lambda m: m.time)
    if kept:
        off.newest_snapshot_at = kept[-1].taken_at
    newest_copied = kept[-1].time if kept else None
    # what the copy lacks: the primary's snapshots newer than the copy's newest (older ones the copy may have
    # forgotten by its own retention; they are not a lag)
    missing = [m for m in ours if m.id not in theirs and (newest_copied is None or m.time > newest_copied)]
    off.missing_snapshots = len(missing)
    if missing:
        off.oldest_missing_at = missing[0].taken_at
    if ours:
        off.behind_seconds = round(max(0.0, (ours[-1].time - newest_copied).total_seconds()), 3) \
            if newest_copied is not None else None
    if missing and (now - missing[0].time).total_seconds() > max_lag:
        age = (now - missing[0].time).total_seconds()
        st.alerts.append(Alert(
            "offsite_behind", "critical" if not kept else "warning",
            f"{st.db}: the offsite copy {url} " + ("holds no snapshot of it; " if not kept else
                                                   f"misses {len(missing)} snapshot{'s' if len(missing) != 1 else ''}"
                                                   f", the oldest taken {_dur(age)} ago; ") + fix, st.db))
    return off


def _unchanged_since(repo: Repository, db: str, gen_id: str, names: list[Any], source: str, newest: float,
                     leases: list[str]) -> bool:
    """The source has committed nothing after the newest segment: its WAL (wal-index header) ends
    exactly where that segment does, or where the replicator's lease says it stood with nothing
    unshipped (``wal``: a WAL restarted empty, as by a TRUNCATE checkpoint, after the segment), or,
    with no -shm to read, neither the file nor its -wal was modified after it. Either way the file must
    be the one the replicator followed (its device and inode, the segment's ``file_id``): a file
    restored or copied over the path, with an old -wal and -shm beside it, may show a recorded
    position and hold other commits. A position with salts of zeros is a wal-index rebuilt over an
    empty WAL (every connection closed, the commits checkpointed into the file, -wal and -shm
    deleted, then opened again): it reads the same whatever the file holds, so it is judged by the
    files' times, as without -shm."""
    from dbre.replicate.segment import open_segment, read_base
    from dbre.replicate.wal import WalTail

    try:
        if os.path.exists(source + "-shm") and os.path.exists(source + "-wal"):
            ref = open_segment(repo, names[-1], None) if names else read_base(repo, db, gen_id)
            end = ref.wal_end if names else ref.wal  # type: ignore[union-attr]
            tail = WalTail(source)
            try:
                pos, file_id = tail.position(), tail.file_id()
            finally:
                tail.close()
            if file_id != ref.file_id:
                return False  # another file than the one followed: nothing known of its commits
            if any(pos.salt):  # (salts of zeros: a wal-index rebuilt over an empty WAL, for any content)
                if (pos.salt, pos.frame, pos.cksum) == (end.salt, end.frame, end.cksum):
                    return True
                # (a WAL emptied and restarted after the segment, by a live replicator or before a clean stop)
                return any((pos.salt, pos.frame, pos.cksum) == (f.salt, f.frame, f.cksum)
                           for f in _followed(repo, db, gen_id, leases))
        changed = max(os.stat(source + sfx).st_mtime for sfx in ("", "-wal") if os.path.exists(source + sfx))
        return changed <= newest
    except Exception:  # noqa: BLE001 - unreadable: judged by the segments and the heartbeat alone
        return False


def _followed(repo: Repository, db: str, gen_id: str, leases: list[str]) -> list[Any]:
    """The WAL positions recorded for generation ``gen_id`` as standing with nothing unshipped: the
    newest of ``leases``' (``Lease.followed``) and the last clean stop's (``Lease.stopped``); none when
    they record none (or are unreadable). Either record is trusted no more than a segment is: someone
    who can write leases can also hide or delete segments."""
    from dbre.replicate.lease import stopped_key
    from dbre.replicate.segment import WalPos
    from dbre.storage.base import LOCK_CAP, get_capped

    out = []
    for key in [*leases[-1:], stopped_key(db)]:
        try:
            record = json.loads(get_capped(repo.store, key, LOCK_CAP, "lease"))
            if record.get("generation") == gen_id and isinstance(record.get("wal"), dict):
                out.append(WalPos.from_json(record["wal"]))
        except Exception:  # noqa: BLE001 - gone, damaged or of an older dbre: no position recorded
            continue
    return out


@dataclass
class ReplicationLag:
    """How far behind the source a replicated database's segments are (module doc)."""

    seconds: float
    newest_segment: datetime
    heartbeat: datetime | None


def replication_lag(repo: Repository, db: str, now: datetime, source: str | None = None) -> ReplicationLag | None:
    """The replication lag of ``db`` (None: no segments): now minus the newest point the segments
    certainly hold (the newest segment's last observed commit, or the replicator's heartbeat if
    later); 0 when the local ``source`` has committed nothing since the newest segment."""
    from dbre.replicate.lease import lease_keys
    from dbre.replicate.segment import list_generations, read_base, to_time
    from dbre.storage import NotFound

    gens = list_generations(repo, db)
    if not gens:
        return None
    gen_id, names = next(reversed(gens.items()))
    if names:
        newest = to_time(names[-1].last_us)
    else:
        try:
            newest = read_base(repo, db, gen_id).time
        except NotFound:
            return None
    known, beat = newest, None
    leases = lease_keys(repo.store, db)  # (one listing: the heartbeat, and the positions they record)
    if leases:
        try:
            beat = datetime.fromtimestamp(repo.store.modified(leases[-1]), newest.tzinfo)
            known = max(known, beat)
        except NotFound:
            pass
    lag = max(0.0, (now - known).total_seconds())
    if source and "://" not in source and \
            _unchanged_since(repo, db, gen_id, names, source, newest.timestamp(), leases):
        lag = 0.0  # nothing committed since the newest segment
    return ReplicationLag(round(lag, 3), newest, beat)


def _replication(repo: Repository, st: DatabaseStatus, exp: Expectations, now: datetime) -> None:
    """Replication lag of a database with segments, and its alert against the RPO."""
    found = replication_lag(repo, st.db, now, exp.source)
    if found is None:
        return
    lag = found.seconds
    st.replication_newest_segment_at = iso(found.newest_segment)
    st.replication_heartbeat_at = iso(found.heartbeat) if found.heartbeat else None
    st.replication_lag_seconds = lag
    if st.newest_restorable_age_seconds is None or lag < st.newest_restorable_age_seconds:
        st.newest_restorable_age_seconds = lag  # segments restore to a newer point than snapshots
        st.alerts = [a for a in st.alerts if a.event != "backup_delay"]  # replication_lag below says it
    if exp.rpo_seconds and lag > exp.rpo_seconds:
        st.alerts.append(Alert("replication_lag", "critical",
                               f"{st.db}: replication lag {_dur(lag)}, over the RPO of {_dur(exp.rpo_seconds)} "
                               f"(newest segment {st.replication_newest_segment_at}, replicator heartbeat "
                               f"{st.replication_heartbeat_at or 'none'})", st.db))


def _backup_rate(repo: Repository, st: DatabaseStatus, exp: Expectations, snaps: list[Manifest],
                 start: datetime, now: datetime) -> None:
    attempts = [r for r in repo.records(BACKUPS_KIND, st.db) if _time(r.get("started_at")) is not None]
    in_window = [r for r in attempts if start <= _time(r["started_at"]) <= now]  # type: ignore[operator]
    if in_window:
        ok = sum(1 for r in in_window if r.get("ok"))
        st.backup_success_basis = "records"
        st.backups_expected = len(in_window)
        st.backups_succeeded = ok
        st.backups_failed = len(in_window) - ok
        st.backup_success_rate = round(ok / len(in_window), 4)
        last = attempts[-1]
        if not last.get("ok"):
            st.alerts.append(Alert("backup_failure", "critical",
                                   f"{st.db}: the last backup ({last.get('started_at')}) failed: "
                                   f"{last.get('error') or 'no reason recorded'}", st.db))
        return
    if not exp.schedules or not snaps:
        return
    slots = sorted({t for cron, tz in exp.schedules for t in _fire_times(cron, tz, start, now)})
    times = [m.time for m in snaps]
    expected = hit = 0
    for a, b in zip(slots, slots[1:], strict=False):  # complete intervals only
        expected += 1
        i = bisect.bisect_left(times, a)
        if i < len(times) and times[i] < b:
            hit += 1
    if expected:
        st.backup_success_basis = "schedule"
        st.backups_expected = expected
        st.backups_succeeded = hit
        st.backups_failed = expected - hit
        st.backup_success_rate = round(hit / expected, 4)


def rpo_attainment(times: list[datetime], rpo_seconds: float, start: datetime, end: datetime) -> float | None:
    """Share of [start, end] in which the newest snapshot at or before each moment was at most RPO old."""
    span = (end - start).total_seconds()
    if span <= 0:
        return None
    times = sorted(times)
    bad = 0.0
    for i, t in enumerate(times):
        nxt = times[i + 1] if i + 1 < len(times) else end
        late_from = max(t + timedelta(seconds=rpo_seconds), start)
        late_to = min(nxt, end)
        if late_to > late_from:
            bad += (late_to - late_from).total_seconds()
    first = times[0] if times else end
    if first > start:  # before the first snapshot nothing was restorable
        bad += (min(first, end) - start).total_seconds()
    return round(max(0.0, 1 - bad / span), 4)


def _drills(repo: Repository, st: DatabaseStatus, exp: Expectations, snaps: list[Manifest], now: datetime) -> None:
    drills = [r for r in repo.records("drills", st.db) if _time(r.get("started_at")) is not None]
    st.drills = len(drills)
    if drills:
        last = drills[-1]
        st.last_drill_at = last["started_at"]
        st.last_drill_passed = bool(last.get("passed"))
        st.last_drill_rto_seconds = last.get("rto_seconds")
        recent = drills[-RTO_DRILLS:]
        st.rto_attainment = round(sum(1 for r in recent if r.get("rto_met")) / len(recent), 4)
        if not last.get("passed"):
            why = "; ".join((last.get("failures") or [])[:3]) or "see its report"
            st.alerts.append(Alert("drill_failure", "critical",
                                   f"{st.db}: the last drill ({last['started_at']}) failed: {why}", st.db))
    est = estimate_rto(drills, st.size_bytes)
    if est is not None:
        st.predicted_rto_seconds = est.seconds
        if exp.rto_seconds and est.seconds > exp.rto_seconds and st.last_drill_passed:
            st.alerts.append(Alert(
                "rto_at_risk", "warning",
                f"{st.db}: a validated restore of its {_size(st.size_bytes)} would now take about "
                f"{_dur(est.seconds)}, over the RTO of {_dur(exp.rto_seconds)} (the drill of "
                f"{(est.drill_at or '?')[:10]} at {_size(est.drill_size)}: {est.fixed_seconds:.1f} s fixed + "
                f"{est.proportional_seconds:.1f} s growing with size); run a drill to measure it", st.db))
    passed = [r for r in drills if r.get("passed")]
    if passed:
        st.last_successful_drill_at = passed[-1]["started_at"]
        st.days_since_successful_drill = round((now - _time(passed[-1]["started_at"])).total_seconds()  # type: ignore[operator]
                                               / 86400, 2)
        if st.days_since_successful_drill > exp.drill_warn_days:
            st.alerts.append(Alert("drill_missed", "warning",
                                   f"{st.db}: no drill has passed for {st.days_since_successful_drill:.0f} days "
                                   f"(warn after {exp.drill_warn_days:.0f})", st.db))
    elif snaps and (now - snaps[0].time).total_seconds() > exp.drill_warn_days * 86400:
        st.alerts.append(Alert("drill_missed", "warning",
                               f"{st.db}: backed up since {snaps[0].taken_at[:10]} and no drill has ever passed "
                               f"(warn after {exp.drill_warn_days:.0f} days)", st.db))


def _alerts(st: DatabaseStatus, exp: Expectations) -> None:
    if st.snapshots == 0:
        st.alerts.append(Alert("backup_delay", "critical", f"{st.db}: no snapshot in the repository", st.db))
    elif exp.rpo_seconds and (st.newest_restorable_age_seconds or 0) > exp.rpo_seconds:
        st.alerts.append(Alert("backup_delay", "critical",
                               f"{st.db}: the newest restorable point is {_dur(st.newest_restorable_age_seconds)} "
                               f"old, over the RPO of {_dur(exp.rpo_seconds)} (snapshot {st.newest_snapshot_at})",
                               st.db))
    if st.backup_success_rate is not None and st.backup_success_rate < SUCCESS_WARN \
            and not any(a.event == "backup_failure" for a in st.alerts):
        what = "attempts failed" if st.backup_success_basis == "records" else "scheduled backups missing"
        st.alerts.append(Alert("backup_failure", "warning",
                               f"{st.db}: backup success rate {st.backup_success_rate:.1%} since "
                               f"{(st.window_start or '')[:16]} ({st.backups_failed} of {st.backups_expected} "
                               f"{what}; warn below {SUCCESS_WARN:.0%})", st.db))


def _time(text: Any) -> datetime | None:
    if not text:
        return None
    try:
        return parse_time(str(text))
    except DbreError:
        return None


def _dur(seconds: float | None) -> str:
    s = float(seconds or 0)
    if s >= 2 * 86400:
        return f"{s / 86400:.1f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.0f} min"
    return f"{s:.0f} s"


# -- storage -------------------------------------------------------------------------------------


def storage_used(repo: Repository) -> tuple[int, bool, dict[str, int]]:
    """(bytes used, exact?, bytes added by each database's kept snapshots).

    Exact when the store can say (a ``usage()`` method returning bytes, or a local directory);
    otherwise the sum of what the kept snapshots added, a lower bound that misses packs of
    forgotten snapshots still shared by kept ones."""
    per_db: dict[str, int] = {}
    for m in repo.snapshots():
        per_db[m.db] = per_db.get(m.db, 0) + int(m.stats.get("bytes_added", 0))
    total = store_bytes(repo)
    if total is not None:
        return total, True, per_db
    return sum(per_db.values()), False, per_db


def store_bytes(repo: Repository) -> int | None:
    """The bytes the repository's store holds, when it can say (a ``usage()`` method, or a local directory)."""
    store: Any = repo.store
    inner = getattr(store, "store", None)  # RetryingStore wraps the backend
    for s in (store, inner):
        usage = getattr(s, "usage", None)
        if callable(usage):
            return int(usage())
        root = getattr(s, "root", None)
        if isinstance(root, Path) and root.is_dir():
            total = 0
            for dirpath, _, files in os.walk(root):  # (links to folders are not walked)
                for f in files:
                    try:
                        st = os.lstat(os.path.join(dirpath, f))
                    except OSError:
                        continue  # removed meanwhile (a prune, a temp file renamed)
                    if stat.S_ISREG(st.st_mode):  # (a link planted in the repository points at bytes it does not hold)
                        total += st.st_size
            return total
    return None


# -- output --------------------------------------------------------------------------------------


def _labels(**kv: Any) -> str:
    parts = []
    for k, v in kv.items():
        text = str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{k}="{text}"')
    return "{" + ",".join(parts) + "}"


_HELP = {
    "dbre_backup_success_ratio": ("gauge", "Share of backups that succeeded in the window (target 1, warn < 0.99)"),
    "dbre_rpo_attainment_ratio": ("gauge", "Share of the window in which the newest restorable point met the RPO"),
    "dbre_rto_attainment_ratio": ("gauge", "Share of the last 12 drills that met the RTO"),
    "dbre_newest_restorable_age_seconds": ("gauge", "Age of the newest restorable point"),
    "dbre_rpo_target_seconds": ("gauge", "RPO from the policy"),
    "dbre_rto_target_seconds": ("gauge", "RTO from the policy"),
    "dbre_last_drill_rto_seconds": ("gauge", "Time to a validated restore in the last drill"),
    "dbre_predicted_rto_seconds": ("gauge", "Time a validated restore would take now (last passed drill, scaled)"),
    "dbre_last_drill_passed": ("gauge", "1 when the last drill passed"),
    "dbre_days_since_successful_drill": ("gauge", "Days since the last drill that passed (warn after 90)"),
    "dbre_snapshots": ("gauge", "Snapshots kept in the repository"),
    "dbre_database_size_bytes": ("gauge", "Size of the database in its newest snapshot"),
    "dbre_storage_added_bytes_per_day": ("gauge", "Bytes added to the repository per day over the last 7 days"),
    "dbre_repository_storage_bytes": ("gauge", "Bytes the repository uses"),
    "dbre_repository_quota_bytes": ("gauge", "Storage quota of the repository"),
    "dbre_replication_lag_seconds": ("gauge", "Now minus the newest point the replicated segments hold"),
    "dbre_offsite_behind_seconds": ("gauge", "The primary's newest snapshot time minus the offsite copy's newest"),
    "dbre_offsite_missing_snapshots": ("gauge", "Snapshots of the primary newer than the offsite copy's newest"),
    "dbre_alert": ("gauge", "1 for each active alert"),
    "dbre_status_timestamp_seconds": ("gauge", "When this status was computed"),
}


def prometheus_text(status: Status) -> str:
    """The status in Prometheus text exposition format (for a node-exporter textfile collector)."""
    series: dict[str, list[str]] = {name: [] for name in _HELP}

    def add(name: str, labels: dict[str, Any], value: float | int | bool | None) -> None:
        if value is None:
            return
        # integers as integers, floats in full (shortest round-trip): a timestamp in 6 digits is 5,000 s off
        number = float(value)
        text = str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)
        series[name].append(f"{name}{_labels(**labels)} {text}")

    repo = {"repository": status.repository}
    for d in status.databases:
        lab = {**repo, "db": d.db}
        add("dbre_backup_success_ratio", lab, d.backup_success_rate)
        add("dbre_rpo_attainment_ratio", lab, d.rpo_attainment)
        add("dbre_rto_attainment_ratio", lab, d.rto_attainment)
        add("dbre_newest_restorable_age_seconds", lab, d.newest_restorable_age_seconds)
        add("dbre_rpo_target_seconds", lab, d.rpo_target_seconds)
        add("dbre_rto_target_seconds", lab, d.rto_target_seconds)
        add("dbre_last_drill_rto_seconds", lab, d.last_drill_rto_seconds)
        add("dbre_predicted_rto_seconds", lab, d.predicted_rto_seconds)
        add("dbre_last_drill_passed", lab, None if d.last_drill_passed is None else int(d.last_drill_passed))
        add("dbre_days_since_successful_drill", lab, d.days_since_successful_drill)
        add("dbre_snapshots", lab, d.snapshots)
        add("dbre_database_size_bytes", lab, d.size_bytes)
        add("dbre_storage_added_bytes_per_day", lab, d.added_bytes_per_day)
        add("dbre_replication_lag_seconds", lab, d.replication_lag_seconds)
        for o in d.offsite:
            add("dbre_offsite_behind_seconds", {**lab, "offsite": o.repository}, o.behind_seconds)
            add("dbre_offsite_missing_snapshots", {**lab, "offsite": o.repository},
                None if o.error else o.missing_snapshots)
    add("dbre_repository_storage_bytes", {**repo, "exact": str(status.storage_exact).lower()}, status.storage_bytes)
    add("dbre_repository_quota_bytes", repo, status.quota_bytes)
    for a in status.all_alerts:
        add("dbre_alert", {**repo, "db": a.db or "", "event": a.event, "severity": a.severity}, 1)
    add("dbre_status_timestamp_seconds", repo, parse_time(status.generated_at).timestamp())
    out = []
    for name, lines in series.items():
        if lines:
            kind, help_text = _HELP[name]
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"


def write_prometheus(path: str | os.PathLike[str], status: Status) -> None:
    """Write the textfile atomically: the collector never reads half a file."""
    p = Path(path)
    check_prometheus_path(p)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(prometheus_text(status))
        os.replace(tmp, p)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"--prom {p}: cannot write it: {err.strerror or err}",
                         "give a file in a folder this user can write (the exporter's textfile folder)") from None


def prepare_prometheus_path(path: str | os.PathLike[str]) -> None:
    """Make the textfile's folder if it is missing (the status flow's way), then check the path."""
    p = Path(path)
    if not p.parent.is_dir():
        if p.parent.exists():
            raise UsageError(f"prom {p}: {p.parent} is a file, not a folder", "give a path in a folder")
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"prom {p}: cannot make its folder {p.parent} ({err.strerror or err})",
                             "give a path in a folder this user can write") from None
    check_prometheus_path(p)


def check_prometheus_path(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a textfile path that cannot be one: a folder, or in a folder that is not there."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--prom {p} is a folder", f"give a file name in it, e.g. --prom {p}/dbre.prom")
    if not p.parent.is_dir():
        raise UsageError(f"--prom {p}: the folder {p.parent} does not exist", "create it, or give another path")


def alert_payload(status: Status, alerts: list[Alert] | None = None) -> dict[str, Any]:
    """The JSON a webhook receives: a one-line summary, each alert, and where they come from."""
    alerts = status.all_alerts if alerts is None else alerts
    worst = "critical" if any(a.severity == "critical" for a in alerts) else "warning"
    return {
        "source": "dbre",
        "repository": status.repository,
        "generated_at": status.generated_at,
        "severity": worst if alerts else "ok",
        "text": f"dbre: {len(alerts)} alert{'s' if len(alerts) != 1 else ''} for {status.repository}: "
                + "; ".join(a.message for a in alerts[:5]) if alerts else f"dbre: {status.repository} is healthy",
        "alerts": [asdict(a) for a in alerts],
    }


class NotifyError(DbreError):
    """A notification could not be delivered."""


def send_webhook(url: str, payload: dict[str, Any], *, timeout: float = 10.0) -> int:
    """POST ``payload`` as JSON to ``url``; returns the HTTP status, NotifyError when it fails.

    The URL is never printed (a webhook URL usually embeds its token)."""
    req = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "User-Agent": "dbre"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the URL is the user's
            return int(resp.status)
    except urllib.error.HTTPError as err:
        raise NotifyError(f"webhook: the server answered HTTP {err.code}", "check the webhook URL") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise NotifyError(f"webhook: cannot reach it ({reason})", "check the webhook URL and the network") from None


_SIZE = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
         "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str) -> int:
    """``"10GiB"`` -> 10737418240, ``"500MB"`` -> 500000000, ``"4096"`` -> 4096; UsageError otherwise."""
    import re

    from dbre.errors import UsageError

    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$", text)
    if not m or m.group(2).lower() not in _SIZE or float(m.group(1)) <= 0:
        raise UsageError(f"cannot parse size {text!r}", "use e.g. 500MB, 10GiB or a number of bytes")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])
