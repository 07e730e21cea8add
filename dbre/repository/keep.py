"""Keep rules: which snapshots a restic-style ``--keep-*`` policy keeps, in a chosen time zone.

The semantics are restic's ``forget`` (internal/data/snapshot_policy.go), so a restic user's policy
means the same here:

- Walking the snapshots newest first, ``last`` keeps the N newest; ``hourly`` ... ``yearly`` each
  count the hours, days, ISO weeks (Monday to Sunday), months or years that have a snapshot and
  keep the newest snapshot of each, until N of them are kept. Only periods with a snapshot count.
- A count of -1 (``unlimited`` on the command line) never runs out.
- If a count rule still has counts left when the walk reaches the oldest snapshot, the oldest is
  kept too (reason ``oldest <rule>``): the longest history the rule allows.
- ``within`` (restic's ``--keep-within``) keeps every snapshot newer than the latest snapshot's
  time minus a calendar duration such as ``2y5m7d3h`` (m is months); the latest snapshot is the
  newest one not in the future, so a paused schedule never ages snapshots out.
- A snapshot kept by several rules lists them all; the rules are ORed.
- Safety snapshots (tag ``safety``: the live database just before restore-table replaced a table)
  are not points of the backup history: the count rules neither count nor keep them, so three
  repairs in a day never push three regular snapshots out of ``--keep-last 7``. ``within`` keeps
  them like any snapshot, and each is kept at least ``SAFETY_KEEP`` (7 days) after it was taken,
  measured like ``within`` from the latest snapshot (reason ``safety 7d``), so the undo of a repair
  survives the next nightly forget.

Periods are computed on the wall clock of the policy's time zone (restic uses the zone each
snapshot was taken in): a snapshot at 02:00 UTC belongs to the previous day in New York.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from dbre.errors import UsageError
from dbre.repository.manifest import Manifest

UNLIMITED = -1
COUNT_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

_DURATION = re.compile(r"(\d+)([ymdh])")
DURATION_HINT = "use years, months, days and hours like restic, e.g. 7d, 12h or 2y5m7d3h (m is months)"


@dataclass(frozen=True)
class KeepDuration:
    """A calendar duration in restic's format (``2y5m7d3h``): years, months and days move the
    calendar, hours are exact."""

    years: int = 0
    months: int = 0
    days: int = 0
    hours: int = 0

    @classmethod
    def parse(cls, text: str) -> KeepDuration:
        """``"2y5m7d3h"`` -> KeepDuration(2, 5, 7, 3); ValueError on anything else or on zero."""
        s = text.strip().lower()
        parts = _DURATION.findall(s)
        units = [u for _, u in parts]
        if not parts or "".join(n + u for n, u in parts) != s or len(set(units)) != len(units):
            raise ValueError(f"cannot parse duration {text!r} ({DURATION_HINT})")
        fields = {"y": "years", "m": "months", "d": "days", "h": "hours"}
        d = cls(**{fields[u]: int(n) for n, u in parts})
        if d == cls():
            raise ValueError(f"duration {text!r} is zero (a keep-within rule must keep something)")
        return d

    def __str__(self) -> str:
        return "".join(f"{n}{u}" for n, u in zip((self.years, self.months, self.days, self.hours), "ymdh",
                                                 strict=True) if n)

    def longest_seconds(self) -> float:
        """An upper bound of the span in seconds (for estimates, never for deciding what to keep)."""
        return self.years * 366 * 86400.0 + self.months * 31 * 86400.0 + self.days * 86400.0 + self.hours * 3600.0

    def before(self, t: datetime, tz: ZoneInfo) -> datetime:
        """``t`` moved back by this duration: years, months and days on ``tz``'s calendar (a day
        past a month's end rolls over, as Go's AddDate does: 31 March - 1m = 3 March), then hours."""
        local = t.astimezone(tz)
        year, month0 = divmod(local.year * 12 + local.month - 1 - self.years * 12 - self.months, 12)
        if year < 1:
            return datetime.min.replace(tzinfo=UTC)
        try:  # (days or hours past year 1, or past what timedelta holds: everything is within)
            day = date(year, month0 + 1, 1) + timedelta(days=local.day - 1 - self.days)
            wall = datetime.combine(day, local.time(), tzinfo=tz)
            return wall.astimezone(UTC) - timedelta(hours=self.hours)
        except (OverflowError, ValueError):
            return datetime.min.replace(tzinfo=UTC)


SAFETY_KEEP = KeepDuration(days=7)  # every safety snapshot is kept at least this long (see the module doc)


@dataclass
class KeepPolicy:
    """restic's keep rules: counts (0 = rule off, -1 = unlimited), a keep-within duration in
    restic's format, and the IANA time zone whose calendar defines hours, days, weeks..."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    within: str | None = None
    timezone: str | None = None  # None: UTC

    def empty(self) -> bool:
        return not any(getattr(self, name) for name in COUNT_RULES) and not self.within

    def check(self) -> None:
        """Raise UsageError (one line, with the fix) unless the policy keeps something and every
        value is valid."""
        if self.empty():
            raise UsageError("no retention rule given",
                             "pass at least one --keep-* option, e.g. --keep-daily 7 or --keep-within 30d")
        for name in COUNT_RULES:
            if getattr(self, name) < UNLIMITED:
                raise UsageError(f"--keep-{name} is negative", "use 0 or more, or unlimited to keep all")
        self.within_duration()
        self.zone()

    def within_duration(self) -> KeepDuration | None:
        if not self.within:
            return None
        try:
            return KeepDuration.parse(self.within)
        except ValueError as err:
            raise UsageError(f"--keep-within: {err}".replace(f" ({DURATION_HINT})", ""), DURATION_HINT) from None

    def zone(self) -> ZoneInfo:
        return parse_zone(self.timezone or "UTC")


def parse_zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; UsageError naming the fix if there is no such zone."""
    try:
        return ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"unknown time zone {name!r}",
                         "use an IANA name such as UTC, Europe/Paris or America/New_York") from None


def parse_count(text: str, option: str) -> int:
    """A rule's count as restic's CLI reads it: a number, or ``unlimited`` (-1); never negative."""
    if text.strip().lower() == "unlimited":
        return UNLIMITED
    try:
        n = int(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not a count", "use a number or unlimited") from None
    if n < 0:
        raise UsageError(f"{option} is negative", "use 0 or more, or unlimited to keep all")
    return n


# Period keys on the policy zone's wall clock; consecutive snapshots share a period iff keys are equal.
_PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}


def _latest(times: Sequence[datetime], now: datetime) -> datetime | None:
    """The newest time that is not in the future (restic's findLatestTimestamp)."""
    past = [t for t in times if t < now]
    return max(past) if past else None


def apply_policy(snaps: Sequence[Manifest], policy: KeepPolicy, tz: ZoneInfo | None = None, *,
                 now: datetime | None = None) -> dict[str, list[str]]:
    """Map each kept snapshot id to the rules that keep it; snapshots not in the map go.

    ``tz`` (default: the policy's zone, else UTC) defines the hours, days, weeks, months and years;
    ``now`` (default: the current time) only decides which snapshots are in the future."""
    zone = tz or policy.zone()
    within = policy.within_duration()
    # newest first; equal times newest id first, so the order (and so the choice) is deterministic
    by_time = sorted(snaps, key=lambda m: (m.time, m.id), reverse=True)
    latest = _latest([m.time for m in by_time], now or datetime.now(UTC))
    reasons: dict[str, list[str]] = {}
    safety_cutoff = SAFETY_KEEP.before(latest, zone) if latest is not None else datetime.min.replace(tzinfo=UTC)
    for m in by_time:
        if m.is_safety and m.time > safety_cutoff:
            reasons[m.id] = [f"safety {SAFETY_KEEP}"]
    newest_first = [m for m in by_time if not m.is_safety]  # the count rules walk the backup history only
    times = [m.time for m in newest_first]
    cutoff: datetime | None = None
    if within is not None:
        cutoff = within.before(latest, zone) if latest is not None else datetime.min.replace(tzinfo=UTC)
        for m in by_time:
            if m.is_safety and m.time > cutoff:
                reasons.setdefault(m.id, []).insert(0, f"within {within}")
    left = {name: getattr(policy, name) for name in COUNT_RULES}
    previous: dict[str, object] = {}
    for nr, (m, t) in enumerate(zip(newest_first, times, strict=True)):
        why: list[str] = []
        if cutoff is not None and t > cutoff:
            why.append(f"within {within}")
        local = t.astimezone(zone)
        oldest = nr == len(newest_first) - 1
        for name in COUNT_RULES:
            if left[name] == 0:
                continue
            key: object = nr if name == "last" else _PERIODS[name](local)
            if key != previous.get(name) or oldest:
                # a new period; or the oldest snapshot while the rule has counts left
                why.append(f"oldest {name}" if key == previous.get(name) else name)
                previous[name] = key
                if left[name] > 0:
                    left[name] -= 1
        if why:
            reasons[m.id] = why
    return reasons
