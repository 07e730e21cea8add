"""Targets against measurements: each target of a database (RPO, RTO, backup duration, retention,
drill frequency, offsite copy) marked met, at risk or not met with its reason, and the
recommendations that follow from the checks and the evidence.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import TYPE_CHECKING, Any

from dbre.report.requirements_model import (
    AT_RISK,
    AT_RISK_SHARE,
    ATTAINMENT_WARN,
    CADENCE_DAYS,
    DAY,
    DEFAULT_RETENTION,
    MET,
    NO_TARGET,
    NOT_MET,
    TIER_GUIDANCE,
    Check,
    DatabaseReport,
    Recommendation,
    RequirementsReport,
    fmt_keep,
    fmt_seconds,
)
from dbre.repository.manifest import parse_time
from dbre.units import human_bytes as fmt_bytes

if TYPE_CHECKING:
    from dbre.policy import DatabasePolicy, Policy

# -- checks --------------------------------------------------------------------------------------


REPLICATION_WORST = 1.7  # s: lag p99 at 1000 commits/s, paced 750 ms default: 0.87 s quiet, 1.69 s loaded (README)


def _check_rpo(d: DatabaseReport) -> Check:
    objective = f"lose at most {fmt_seconds(d.rpo)} of writes" if d.rpo else "none in the policy"
    if d.replication_lag_seconds is not None:
        return _check_rpo_replicated(d, objective, d.replication_lag_seconds)
    if not d.history:
        return Check(d.name, "RPO", objective, "no snapshot", NOT_MET if d.rpo else NO_TARGET,
                     "nothing has been backed up: every write would be lost")
    if d.interval_seconds is None or d.rpo_achieved is None:
        return Check(d.name, "RPO", objective, "one snapshot", AT_RISK if d.rpo else NO_TARGET,
                     "a single snapshot: no interval between backups measured yet")
    iv, bs = d.interval_seconds, d.backup_seconds
    measured = (f"p95 interval {fmt_seconds(iv.p95)} + p95 backup {fmt_seconds(bs.p95 if bs else 0)} "
                f"= {fmt_seconds(d.rpo_achieved)}")
    if d.rpo_attainment is not None:
        measured += f"; attainment {d.rpo_attainment:.1%}"
    if d.rpo is None:
        return Check(d.name, "RPO", objective, measured, NO_TARGET, "set rpo for this database in the policy")
    if d.newest_age_seconds is not None and d.newest_age_seconds > d.rpo:
        return Check(d.name, "RPO", objective, measured, NOT_MET,
                     f"the newest snapshot is {fmt_seconds(d.newest_age_seconds)} old: backups stopped or fall behind")
    if d.rpo_achieved > d.rpo:
        return Check(d.name, "RPO", objective, measured, NOT_MET,
                     f"snapshots come every {fmt_seconds(iv.p50)} (p95 {fmt_seconds(iv.p95)}): a failure just before "
                     f"the next one loses up to {fmt_seconds(d.rpo_achieved)}")
    if d.rpo_achieved > AT_RISK_SHARE * d.rpo:
        return Check(d.name, "RPO", objective, measured, AT_RISK,
                     f"worst case uses {d.rpo_achieved / d.rpo:.0%} of the target: a slow or skipped backup breaks it")
    if d.rpo_attainment is not None and d.rpo_attainment < ATTAINMENT_WARN:
        return Check(d.name, "RPO", objective, measured, AT_RISK,
                     f"{1 - d.rpo_attainment:.1%} of intervals exceeded the target (max {fmt_seconds(iv.max)}); "
                     f"the seed warns below {ATTAINMENT_WARN:.0%}")
    return Check(d.name, "RPO", objective, measured, MET,
                 f"worst case {fmt_seconds(d.rpo_achieved)} is within {fmt_seconds(d.rpo)}")


def _check_rpo_replicated(d: DatabaseReport, objective: str, lag: float) -> Check:
    """A database with segments: its RPO is the replication lag, not the snapshot interval."""
    measured = f"replicated (dbre replicate): lag {fmt_seconds(lag)} when this report was made"
    if d.rpo is None:
        return Check(d.name, "RPO", objective, measured, NO_TARGET, "set rpo for this database in the policy")
    if lag > d.rpo:
        return Check(d.name, "RPO", objective, measured, NOT_MET,
                     f"the newest replicated transaction is {fmt_seconds(lag)} old: is `dbre replicate` running? "
                     "(`dbre status` shows its heartbeat)")
    if d.rpo < REPLICATION_WORST:
        return Check(d.name, "RPO", objective, measured, AT_RISK,
                     f"a commit ships within about the interval (750 ms by default); under heavy writes the lag "
                     f"p99 reached "
                     f"{fmt_seconds(REPLICATION_WORST)} in benchmarks, over this target")
    return Check(d.name, "RPO", objective, measured, MET,
                 f"continuous replication: an incident loses about the shipping interval plus one upload, "
                 f"within {fmt_seconds(d.rpo)}")


def _check_rto(d: DatabaseReport, warn_days: int, now: datetime) -> Check:
    r = d.restore
    objective = f"restore within {fmt_seconds(d.rto)}" if d.rto else "none in the policy"
    if r.seconds is None:
        return Check(d.name, "RTO", objective, "nothing measured", NOT_MET if d.rto else NO_TARGET, r.detail)
    measured = f"{fmt_seconds(r.seconds)} ({'drill' if r.basis == 'drill' else 'estimate'})"
    if r.projected_seconds is not None:
        measured += f"; {fmt_seconds(r.projected_seconds)} at the 12-month size"
    if d.rto is None:
        return Check(d.name, "RTO", objective, measured, NO_TARGET, "set rto for this database in the policy")
    if r.basis == "drill":
        if not r.last_drill_validated:
            return Check(d.name, "RTO", objective, measured, NOT_MET, "the last drill failed its validation")
        if r.seconds > d.rto:
            return Check(d.name, "RTO", objective, measured, NOT_MET,
                         f"the last drill took {fmt_seconds(r.seconds)}, over the {fmt_seconds(d.rto)} target")
        if r.seconds > AT_RISK_SHARE * d.rto:
            return Check(d.name, "RTO", objective, measured, AT_RISK,
                         f"the last drill used {r.seconds / d.rto:.0%} of the target")
        if r.projected_seconds is not None and r.projected_seconds > d.rto:
            return Check(d.name, "RTO", objective, measured, AT_RISK,
                         f"at the projected size in 12 months a restore would take {fmt_seconds(r.projected_seconds)}")
        age = (now - parse_time(r.last_drill_at)).days if r.last_drill_at else None
        if age is not None and age > warn_days:
            return Check(d.name, "RTO", objective, measured, AT_RISK,
                         f"the last drill was {age} days ago (warn after {warn_days})")
        return Check(d.name, "RTO", objective, measured, MET,
                     f"the last drill restored and validated in {fmt_seconds(r.seconds)}")
    if r.seconds > d.rto:
        return Check(d.name, "RTO", objective, measured, NOT_MET,
                     f"even the bare restore would take {fmt_seconds(r.seconds)} ({r.detail})")
    return Check(d.name, "RTO", objective, measured, AT_RISK,
                 f"estimate only ({r.detail}): no drill has measured the whole recovery with validation")


def _check_backup_duration(d: DatabaseReport) -> Check | None:
    bs, iv = d.backup_seconds, d.interval_seconds
    if bs is None or iv is None:
        return None
    objective = "p95 backup time at most half the snapshot interval"
    measured = f"p50 {fmt_seconds(bs.p50)}, p95 {fmt_seconds(bs.p95)}, max {fmt_seconds(bs.max)}"
    if bs.p95 > iv.p50:
        return Check(d.name, "backup duration", objective, measured, NOT_MET,
                     f"backups take longer than the {fmt_seconds(iv.p50)} between them: they queue up")
    if bs.p95 > iv.p50 / 2:
        return Check(d.name, "backup duration", objective, measured, AT_RISK,
                     f"backups take over half of the {fmt_seconds(iv.p50)} interval")
    share = bs.p95 / iv.p50
    return Check(d.name, "backup duration", objective, measured, MET,
                 f"{'under 0.1%' if share < 0.001 else f'{share:.1%}'} of the {fmt_seconds(iv.p50)} interval")


def _check_drills(d: DatabaseReport, cadence: str, warn_days: int, now: datetime) -> Check:
    objective = f"a passing drill at least {cadence} (warn after {warn_days} days)"
    r = d.restore
    if r.basis != "drill" or not r.last_drill_at:
        return Check(d.name, "drill frequency", objective, "no drill recorded", NOT_MET,
                     "RTO has never been measured end to end")
    age = (now - parse_time(r.last_drill_at)).total_seconds() / DAY
    measured = f"last drill {age:.0f} days ago; {r.drills_passed}/{r.drills} passed"
    if not r.last_drill_passed:
        return Check(d.name, "drill frequency", objective, measured, NOT_MET, "the last drill failed")
    if age > warn_days:
        return Check(d.name, "drill frequency", objective, measured, NOT_MET, f"no drill for over {warn_days} days")
    if age > CADENCE_DAYS.get(cadence, 31):
        return Check(d.name, "drill frequency", objective, measured, AT_RISK, f"the {cadence} drill is overdue")
    return Check(d.name, "drill frequency", objective, measured, MET, f"drilled within the {cadence} cadence")


def _check_retention(d: DatabaseReport, pdb: DatabasePolicy | None) -> Check | None:
    s = d.storage
    if s is None:
        return None
    minimum = getattr(pdb, "min_retention", None) if pdb else None
    oldest = d.history.days[-1] if d.history else 0.0
    measured = f"{s.retention}: restore points back {s.window_days:.0f} days; history now spans {oldest:.0f} days"
    if not minimum:
        return Check(d.name, "retention", "no minimum set (compliance)", measured, NO_TARGET,
                     "add min_retention to the policy if a regulation or contract requires one")
    objective = f"keep restore points for {fmt_seconds(minimum)}"
    if s.window_days * DAY < minimum:
        return Check(d.name, "retention", objective, measured, NOT_MET,
                     f"the retention rules keep only {s.window_days:.0f} days")
    if oldest * DAY < minimum:
        return Check(d.name, "retention", objective, measured, AT_RISK,
                     "the rules would keep enough, but the history is still shorter than the minimum")
    return Check(d.name, "retention", objective, measured, MET, "the retention window covers the minimum")


def _check_offsite(d: DatabaseReport, policy: Policy | None, now: datetime,
                   offsite_newest: dict[str, dict[str, Any]]) -> list[Check]:
    objective = "an offsite copy at most a day behind (nightly copy)"
    if policy is None:
        return []
    if not policy.repositories.offsite:
        return [Check(d.name, "offsite copy", objective, "no offsite repository", NOT_MET,
                      "the policy has no offsite repository: a lost primary loses every backup")]
    out = []
    for url, info in offsite_newest.items():
        if "error" in info:
            out.append(Check(d.name, "offsite copy", objective, f"{url}: not readable", NO_TARGET,
                             f"could not open it: {info['error']}"))
            continue
        newest = info["newest"].get(d.name)
        if newest is None:
            out.append(Check(d.name, "offsite copy", objective, f"{url}: no snapshot", NOT_MET,
                             "nothing of this database has been copied"))
            continue
        lag = (now - newest).total_seconds()
        measured = f"{url}: newest {fmt_seconds(lag)} old"
        status = MET if lag <= DAY + 2 * 3600 else AT_RISK if lag <= 2 * DAY else NOT_MET
        reason = {MET: "the copy keeps up", AT_RISK: "the copy is more than a day behind",
                  NOT_MET: "the copy is more than two days behind"}[status]
        out.append(Check(d.name, "offsite copy", objective, measured, status, reason))
    return out


def checks_for(d: DatabaseReport, pdb: DatabasePolicy | None, policy: Policy | None, now: datetime,
            offsite_newest: dict[str, dict[str, Any]]) -> list[Check]:
    cadence = policy.drills.cadence if policy else "monthly"
    warn_days = policy.drills.warn_after_days if policy else 90
    out = [_check_rpo(d), _check_rto(d, warn_days, now)]
    for extra in (_check_backup_duration(d), _check_retention(d, pdb)):
        if extra is not None:
            out.append(extra)
    out.append(_check_drills(d, cadence, warn_days, now))
    out.extend(_check_offsite(d, policy, now, offsite_newest))
    return out


# -- recommendations -----------------------------------------------------------------------------

_INTERVALS: list[tuple[int, str]] = [
    (5 * 60, "*/5 * * * *"), (15 * 60, "*/15 * * * *"), (30 * 60, "*/30 * * * *"), (3600, "0 * * * *"),
    (2 * 3600, "0 */2 * * *"), (4 * 3600, "0 */4 * * *"), (6 * 3600, "0 */6 * * *"), (12 * 3600, "0 */12 * * *"),
    (86400, "30 1 * * *"),
]


def suggest_schedule(rpo: float, backup_p95: float) -> tuple[int, str] | None:
    """The longest standard interval whose worst case (interval + backup) stays within 80% of the RPO."""
    fitting = [(s, cron) for s, cron in _INTERVALS if s + backup_p95 <= AT_RISK_SHARE * rpo]
    return fitting[-1] if fitting else None


def cron_interval(cron: str) -> float | None:
    """Seconds between runs of a simple cron schedule (every N minutes, hourly, every N hours,
    daily or a few times a day); None for anything fancier."""
    fields = cron.split()
    if len(fields) != 5 or fields[2:4] != ["*", "*"] or fields[4] != "*":
        return None
    minute, hour = fields[0], fields[1]
    if minute == "*" and hour == "*":
        return 60.0
    if minute.startswith("*/") and minute[2:].isdigit() and hour == "*":
        return int(minute[2:]) * 60.0
    if not minute.isdigit():
        return None
    if hour == "*":
        return 3600.0
    if hour.startswith("*/") and hour[2:].isdigit():
        return int(hour[2:]) * 3600.0
    if all(h.isdigit() for h in hour.split(",")):
        return 86400.0 / len(hour.split(","))
    return None


def scheduled_interval(policy: Policy | None) -> float | None:
    """How often the policy's backup schedules take a snapshot (the shortest enabled one)."""
    if policy is None:
        return None
    found = [cron_interval(s.cron) for name, s in policy.schedules.items()
             if name.startswith("backup_") and s.enabled]
    known = [f for f in found if f is not None]
    return min(known) if known else None


def _replication_advice(d: DatabaseReport, bs: float) -> str:
    """An RPO periodic snapshots cannot give: replicate, at the cheapest interval that meets it."""
    head = (f"an RPO of {fmt_seconds(d.rpo)} is below what periodic snapshots can give (a backup alone takes "
            f"{fmt_seconds(bs)}): ")
    costs = d.cost_per_rpo
    if costs is not None and any(o.current and o.kind == "replication" for o in costs.options):
        return head + ("the policy replicates it (`replicate: true`): keep `dbre replicate` running and watch its "
                       "lag with `dbre status`")
    pick = costs.cheapest_within(AT_RISK_SHARE * d.rpo, "replication") if costs is not None and d.rpo else None
    if pick is None:
        return head + "it needs continuous WAL shipping (`dbre replicate`) or a relaxed target"
    return head + (f"replicate it continuously (`replicate: true` in the policy, `dbre replicate --interval "
                   f"{pick.interval_seconds:g}s`): RPO {fmt_seconds(pick.rpo_seconds)} for about "
                   f"{pick.total_month:,.2f} a month with the backups, at the report's prices (Cost per RPO), "
                   "or relax the target")


def db_recommendations(d: DatabaseReport, pdb: DatabasePolicy | None, policy: Policy | None) -> list[Recommendation]:
    out: list[Recommendation] = []
    by_target = {c.target: c for c in d.checks}
    rpo_check = by_target.get("RPO")
    scheduled = scheduled_interval(policy) if pdb is not None else None
    bs = d.backup_seconds.p95 if d.backup_seconds else 0.0
    drift = bool(d.interval_seconds and scheduled and d.interval_seconds.p50 > 2 * scheduled)
    if drift and d.interval_seconds and scheduled:
        out.append(Recommendation(d.name, "schedule",
                                  f"snapshots arrive every {fmt_seconds(d.interval_seconds.p50)} although the policy "
                                  f"schedules a backup every {fmt_seconds(scheduled)}: check that the backup "
                                  "deployments run for this database and succeed (`dbre status`)"))
    if d.rpo and rpo_check and rpo_check.status in (NOT_MET, AT_RISK) and d.interval_seconds:
        schedule_is_enough = scheduled is not None and scheduled + bs <= AT_RISK_SHARE * d.rpo
        pick = suggest_schedule(d.rpo, bs)
        if drift and schedule_is_enough:
            pass  # the schedule would meet the RPO: the missing runs are the problem (above)
        elif pick:
            now_every = fmt_seconds(scheduled if scheduled else d.interval_seconds.p50)
            out.append(Recommendation(d.name, "schedule",
                                      f"take a snapshot every {fmt_seconds(pick[0])} (now every {now_every}) to meet "
                                      f"the {fmt_seconds(d.rpo)} RPO", cron=pick[1]))
        else:
            out.append(Recommendation(d.name, "schedule", _replication_advice(d, bs)))
    elif d.rpo and rpo_check and rpo_check.status == MET and d.interval_seconds and \
            d.interval_seconds.p50 * 8 < d.rpo:
        pick = suggest_schedule(d.rpo, bs)
        if pick and pick[0] > d.interval_seconds.p50 * 2:
            out.append(Recommendation(d.name, "schedule",
                                      f"snapshots every {fmt_seconds(d.interval_seconds.p50)} are far inside the "
                                      f"{fmt_seconds(d.rpo)} RPO; every {fmt_seconds(pick[0])} would do and cost fewer "
                                      "requests", cron=pick[1]))
    rto_check = by_target.get("RTO")
    if rto_check and rto_check.status == NOT_MET and d.restore.seconds is not None:
        out.append(Recommendation(d.name, "recovery time",
                                  f"restores take {fmt_seconds(d.restore.seconds)} against an RTO of "
                                  f"{fmt_seconds(d.rto)}: restore onto local disk near the repository, keep a warm "
                                  "standby copy restored nightly, split the database, or agree a longer RTO"))
    retention_check = by_target.get("retention")
    minimum = getattr(pdb, "min_retention", None) if pdb is not None else None
    if retention_check and retention_check.status == NOT_MET and minimum and policy is not None:
        keep = policy.retention.keep_policy()
        days = minimum / DAY
        # the oldest monthly (yearly) point kept by N is at least N-2 whole months (years) old
        if days <= 3 * 366:
            change = f"keep_monthly: {max(keep.monthly, math.ceil(days / 30.44) + 2)}"
        else:
            change = f"keep_yearly: {max(keep.yearly, math.ceil(days / 365.25) + 2)}"
        window = f"keep {d.storage.window_days:.0f} days" if d.storage else "keep too little"
        out.append(Recommendation(d.name, "retention",
                                  f"the rules {window} but {fmt_seconds(minimum)} are required: set retention "
                                  f"{change} (it applies to every database; the cost table shows what it adds)"))
    drill_check = by_target.get("drill frequency")
    if drill_check and drill_check.status != MET:
        out.append(Recommendation(d.name, "drills", f"{drill_check.reason}: run a recovery drill and keep the "
                                  "monthly drill deployment enabled", action="drill"))
    if pdb is not None:
        guide = TIER_GUIDANCE.get(str(pdb.tier))
        if guide and (pdb.rpo > guide[0] or pdb.rto > guide[1]):
            out.append(Recommendation(d.name, "targets",
                                      f"tier {pdb.tier} usually means RPO ≤ {fmt_seconds(guide[0])} and RTO ≤ "
                                      f"{fmt_seconds(guide[1])}; the policy allows {fmt_seconds(pdb.rpo)} / "
                                      f"{fmt_seconds(pdb.rto)}: confirm with the business or lower the tier"))
    for t in d.tables:
        if t.suggestion:
            out.append(Recommendation(d.name, "classification", f"{t.name}: {t.suggestion}"))
    if d.personal_columns and pdb is not None and str(pdb.tier) in ("standard", "low") and not d.compliance:
        cols = f"{d.personal_columns} column{'s hold' if d.personal_columns > 1 else ' holds'}"
        out.append(Recommendation(d.name, "compliance",
                                  f"{cols} personal data but the database is tier "
                                  f"{pdb.tier} with no compliance notes: record the regulation (e.g. GDPR) and how "
                                  "erasure requests reach backups (they expire with retention)"))
    missing = [t.name for t in d.tables if t.has_suite is False]
    if missing:
        out.append(Recommendation(d.name, "suites",
                                  f"no expectation suite for {len(missing)} of {len(d.tables)} tables "
                                  f"({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}): drills can only "
                                  "check integrity and row counts there", action="suites"))
    elif all(t.has_suite is None for t in d.tables) and d.tables:
        out.append(Recommendation(d.name, "suites", "no expectations folder found: drills validate integrity and "
                                  "row counts only; write suites for the critical tables", action="suites"))
    if d.storage and d.size_trend.points >= 2 and d.size_trend.current > 0:
        growth = d.size_trend.projected / d.size_trend.current
        if growth >= 1.5:
            monthly = fmt_bytes(d.size_trend.slope_per_day * 30.44)
            out.append(Recommendation(d.name, "capacity",
                                      f"the database grows {monthly}/month and would be {growth:.1f}x its size in "
                                      f"12 months ({fmt_bytes(d.size_trend.projected)}): re-run drills as it grows, "
                                      "restore time scales with size"))
    return out


def installation_recommendations(report: RequirementsReport, policy: Policy | None) -> list[Recommendation]:
    out: list[Recommendation] = []
    if policy is None:
        out.append(Recommendation(None, "policy", "no policy file: targets are unknown and retention was assumed "
                                  f"({fmt_keep(DEFAULT_RETENTION)}); write one (docs/policy.example.yaml)"))
    else:
        keep = policy.retention.keep_policy()
        if keep.daily + keep.weekly * 7 + keep.monthly * 31 + keep.yearly * 366 < 30 and keep.last < 720:
            out.append(Recommendation(None, "retention", f"retention ({fmt_keep(keep)}) keeps under a month: a "
                                      "mistake noticed later cannot be undone; add keep_weekly/keep_monthly"))
        if not policy.repositories.offsite:
            out.append(Recommendation(None, "offsite", "add an offsite repository (another bucket or region): the "
                                      "fourth layer of the defence-in-depth model"))
        if not getattr(policy, "contacts", None):
            out.append(Recommendation(None, "runbook", "the policy lists no contacts: the runbook's escalation "
                                      "table is empty; add contacts to the policy"))
    for d in report.databases:
        out.extend(d.recommendations)
    return out
