"""Keep rules (dbre.repository.keep) against restic's own examples, in a time zone, and by property.

The oracle is restic itself (github.com/restic/restic at a80be1478a4c537f8396e0db2b05120aa78f11e0):
``RESTIC_TIMES`` is ``testExpireSnapshots`` from internal/data/snapshot_policy_test.go (all UTC), and
each case in ``RESTIC_CASES`` is the golden file internal/data/testdata/policy_keep_snapshots_<N>
for the N-th policy of that test: the kept snapshots newest first with their reasons (restic's
"daily snapshot" is our "daily", "oldest yearly snapshot" our "oldest yearly"). Tag policies and
--keep-within-{hourly,...} (cases 0, 18-20, 30-35) are not implemented by dbre.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbre.errors import UsageError
from dbre.policy import load_policy, parse_policy
from dbre.repository.backup import backup
from dbre.repository.keep import UNLIMITED, KeepDuration, KeepPolicy, apply_policy, parse_count
from dbre.repository.manifest import Manifest, new_snapshot_id
from dbre.repository.repo import Repository
from dbre.repository.retention import KeepPolicy as ReExported
from dbre.repository.retention import plan_forget
from dbre.sources import open_source
from tests.dbfactory import assert_one_line_error, cli

UTC_ZONE = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")
NOW = datetime(2030, 1, 1, tzinfo=UTC)  # after every snapshot below unless a test says otherwise


def snaps_at(times: Sequence[datetime | str]) -> list[Manifest]:
    """One manifest per time (a string is UTC), id = its position, zero-padded."""
    out = []
    for i, t in enumerate(times):
        when = datetime.fromisoformat(t).replace(tzinfo=UTC) if isinstance(t, str) else t
        out.append(Manifest(id=f"{i:04d}", db="d", taken_at=when.isoformat(), page_size=0, page_count=0, runs=[],
                            packs=[]))
    return out


def show(t: datetime) -> str:
    """restic's test notation: UTC, fractional seconds only when there are some."""
    t = t.astimezone(UTC)
    text = t.strftime("%Y-%m-%d %H:%M:%S")
    return text + ("." + f"{t.microsecond:06d}".rstrip("0") if t.microsecond else "")


def kept(snaps: list[Manifest], policy: KeepPolicy, tz: ZoneInfo | None = None,
         now: datetime = NOW) -> list[tuple[str, list[str]]]:
    """(time, reasons) of the kept snapshots, newest first."""
    reasons = apply_policy(snaps, policy, tz, now=now)
    by_id = {m.id: m for m in snaps}
    rows = sorted(((by_id[i].time, i, r) for i, r in reasons.items()), reverse=True)
    return [(show(t), r) for t, _, r in rows]


def kept_ids(snaps: list[Manifest], policy: KeepPolicy, tz: ZoneInfo | None = None,
             now: datetime = NOW) -> set[str]:
    return set(apply_policy(snaps, policy, tz, now=now))


# -- restic's golden cases -----------------------------------------------------------------------

RESTIC_TIMES = """
    2014-09-01 10:20:30  2014-09-02 10:20:30  2014-09-05 10:20:30  2014-09-06 10:20:30
    2014-09-08 10:20:30  2014-09-09 10:20:30  2014-09-10 10:20:30  2014-09-11 10:20:30
    2014-09-20 10:20:30  2014-09-22 10:20:30  2014-08-08 10:20:30  2014-08-10 10:20:30
    2014-08-12 10:20:30  2014-08-13 10:20:30  2014-08-13 10:20:30.1  2014-08-15 10:20:30
    2014-08-18 10:20:30  2014-08-20 10:20:30  2014-08-21 10:20:30  2014-08-22 10:20:30
    2014-10-01 10:20:30  2014-10-02 10:20:30  2014-10-05 10:20:30  2014-10-06 10:20:30
    2014-10-08 10:20:30  2014-10-09 10:20:30  2014-10-10 10:20:30  2014-10-11 10:20:30
    2014-10-20 10:20:30  2014-10-22 10:20:30  2014-11-08 10:20:30  2014-11-10 10:20:30
    2014-11-12 10:20:30  2014-11-13 10:20:30  2014-11-13 10:20:30.1  2014-11-15 10:20:30
    2014-11-18 10:20:30  2014-11-20 10:20:30  2014-11-21 10:20:30  2014-11-22 10:20:30
    2015-09-01 10:20:30  2015-09-02 10:20:30  2015-09-05 10:20:30  2015-09-06 10:20:30
    2015-09-08 10:20:30  2015-09-09 10:20:30  2015-09-10 10:20:30  2015-09-11 10:20:30
    2015-09-20 10:20:30  2015-09-22 10:20:30  2015-08-08 10:20:30  2015-08-10 10:20:30
    2015-08-12 10:20:30  2015-08-13 10:20:30  2015-08-13 10:20:30.1  2015-08-15 10:20:30
    2015-08-18 10:20:30  2015-08-20 10:20:30  2015-08-21 10:20:30  2015-08-22 10:20:30
    2015-10-01 10:20:30  2015-10-02 10:20:30  2015-10-05 10:20:30  2015-10-06 10:20:30
    2015-10-08 10:20:30  2015-10-09 10:20:30  2015-10-10 10:20:30  2015-10-11 10:20:30
    2015-10-20 10:20:30  2015-10-22 10:20:30  2015-10-22 10:20:30  2015-10-22 10:20:30
    2015-10-22 10:20:30  2015-10-22 10:20:30  2015-11-08 10:20:30  2015-11-10 10:20:30
    2015-11-12 10:20:30  2015-11-13 10:20:30  2015-11-13 10:20:30.1  2015-11-15 10:20:30
    2015-11-18 10:20:30  2015-11-20 10:20:30  2015-11-21 10:20:30  2015-11-22 10:20:30
    2016-01-01 01:02:03  2016-01-01 01:03:03  2016-01-01 07:08:03  2016-01-03 07:02:03
    2016-01-04 10:23:03  2016-01-04 11:23:03  2016-01-04 12:23:03  2016-01-04 12:24:03
    2016-01-04 12:28:03  2016-01-04 12:30:03  2016-01-04 16:23:03  2016-01-05 09:02:03
    2016-01-06 08:02:03  2016-01-07 10:02:03  2016-01-08 20:02:03  2016-01-09 21:02:03
    2016-01-12 21:02:03  2016-01-12 21:08:03  2016-01-18 12:02:03
"""


def restic_snaps() -> list[Manifest]:
    words = RESTIC_TIMES.split()
    return snaps_at([f"{d} {t}" for d, t in zip(words[::2], words[1::2], strict=True)])


def test_restic_input_is_transcribed_whole() -> None:
    snaps = restic_snaps()
    assert len(snaps) == 103
    assert show(min(m.time for m in snaps)) == "2014-08-08 10:20:30"
    assert sum(show(m.time) == "2015-10-22 10:20:30" for m in snaps) == 5


# (N of policy_keep_snapshots_N, the policy, the golden file's kept snapshots and reasons)
RESTIC_CASES: list[tuple[int, KeepPolicy, str]] = [
    (1, KeepPolicy(last=10), """
        2016-01-18 12:02:03  last
        2016-01-12 21:08:03  last
        2016-01-12 21:02:03  last
        2016-01-09 21:02:03  last
        2016-01-08 20:02:03  last
        2016-01-07 10:02:03  last
        2016-01-06 08:02:03  last
        2016-01-05 09:02:03  last
        2016-01-04 16:23:03  last
        2016-01-04 12:30:03  last
    """),
    (5, KeepPolicy(hourly=20), """
        2016-01-18 12:02:03  hourly
        2016-01-12 21:08:03  hourly
        2016-01-09 21:02:03  hourly
        2016-01-08 20:02:03  hourly
        2016-01-07 10:02:03  hourly
        2016-01-06 08:02:03  hourly
        2016-01-05 09:02:03  hourly
        2016-01-04 16:23:03  hourly
        2016-01-04 12:30:03  hourly
        2016-01-04 11:23:03  hourly
        2016-01-04 10:23:03  hourly
        2016-01-03 07:02:03  hourly
        2016-01-01 07:08:03  hourly
        2016-01-01 01:03:03  hourly
        2015-11-22 10:20:30  hourly
        2015-11-21 10:20:30  hourly
        2015-11-20 10:20:30  hourly
        2015-11-18 10:20:30  hourly
        2015-11-15 10:20:30  hourly
        2015-11-13 10:20:30.1  hourly
    """),
    (6, KeepPolicy(daily=3), """
        2016-01-18 12:02:03  daily
        2016-01-12 21:08:03  daily
        2016-01-09 21:02:03  daily
    """),
    (8, KeepPolicy(daily=30), """
        2016-01-18 12:02:03  daily
        2016-01-12 21:08:03  daily
        2016-01-09 21:02:03  daily
        2016-01-08 20:02:03  daily
        2016-01-07 10:02:03  daily
        2016-01-06 08:02:03  daily
        2016-01-05 09:02:03  daily
        2016-01-04 16:23:03  daily
        2016-01-03 07:02:03  daily
        2016-01-01 07:08:03  daily
        2015-11-22 10:20:30  daily
        2015-11-21 10:20:30  daily
        2015-11-20 10:20:30  daily
        2015-11-18 10:20:30  daily
        2015-11-15 10:20:30  daily
        2015-11-13 10:20:30.1  daily
        2015-11-12 10:20:30  daily
        2015-11-10 10:20:30  daily
        2015-11-08 10:20:30  daily
        2015-10-22 10:20:30  daily
        2015-10-20 10:20:30  daily
        2015-10-11 10:20:30  daily
        2015-10-10 10:20:30  daily
        2015-10-09 10:20:30  daily
        2015-10-08 10:20:30  daily
        2015-10-06 10:20:30  daily
        2015-10-05 10:20:30  daily
        2015-10-02 10:20:30  daily
        2015-10-01 10:20:30  daily
        2015-09-22 10:20:30  daily
    """),
    (9, KeepPolicy(last=5, daily=5), """
        2016-01-18 12:02:03  last, daily
        2016-01-12 21:08:03  last, daily
        2016-01-12 21:02:03  last
        2016-01-09 21:02:03  last, daily
        2016-01-08 20:02:03  last, daily
        2016-01-07 10:02:03  daily
    """),
    (11, KeepPolicy(weekly=2), """
        2016-01-18 12:02:03  weekly
        2016-01-12 21:08:03  weekly
    """),
    (13, KeepPolicy(daily=3, weekly=4), """
        2016-01-18 12:02:03  daily, weekly
        2016-01-12 21:08:03  daily, weekly
        2016-01-09 21:02:03  daily, weekly
        2016-01-03 07:02:03  weekly
    """),
    (14, KeepPolicy(monthly=6), """
        2016-01-18 12:02:03  monthly
        2015-11-22 10:20:30  monthly
        2015-10-22 10:20:30  monthly
        2015-09-22 10:20:30  monthly
        2015-08-22 10:20:30  monthly
        2014-11-22 10:20:30  monthly
    """),
    (15, KeepPolicy(daily=2, weekly=2, monthly=6), """
        2016-01-18 12:02:03  daily, weekly, monthly
        2016-01-12 21:08:03  daily, weekly
        2015-11-22 10:20:30  monthly
        2015-10-22 10:20:30  monthly
        2015-09-22 10:20:30  monthly
        2015-08-22 10:20:30  monthly
        2014-11-22 10:20:30  monthly
    """),
    (16, KeepPolicy(yearly=10), """
        2016-01-18 12:02:03  yearly
        2015-11-22 10:20:30  yearly
        2014-11-22 10:20:30  yearly
        2014-08-08 10:20:30  oldest yearly
    """),
    (17, KeepPolicy(daily=7, weekly=2, monthly=3, yearly=10), """
        2016-01-18 12:02:03  daily, weekly, monthly, yearly
        2016-01-12 21:08:03  daily, weekly
        2016-01-09 21:02:03  daily
        2016-01-08 20:02:03  daily
        2016-01-07 10:02:03  daily
        2016-01-06 08:02:03  daily
        2016-01-05 09:02:03  daily
        2015-11-22 10:20:30  monthly, yearly
        2015-10-22 10:20:30  monthly
        2014-11-22 10:20:30  yearly
        2014-08-08 10:20:30  oldest yearly
    """),
    (21, KeepPolicy(within="1d"), """
        2016-01-18 12:02:03  within 1d
    """),
    (23, KeepPolicy(within="7d"), """
        2016-01-18 12:02:03  within 7d
        2016-01-12 21:08:03  within 7d
        2016-01-12 21:02:03  within 7d
    """),
    (24, KeepPolicy(within="1m"), """
        2016-01-18 12:02:03  within 1m
        2016-01-12 21:08:03  within 1m
        2016-01-12 21:02:03  within 1m
        2016-01-09 21:02:03  within 1m
        2016-01-08 20:02:03  within 1m
        2016-01-07 10:02:03  within 1m
        2016-01-06 08:02:03  within 1m
        2016-01-05 09:02:03  within 1m
        2016-01-04 16:23:03  within 1m
        2016-01-04 12:30:03  within 1m
        2016-01-04 12:28:03  within 1m
        2016-01-04 12:24:03  within 1m
        2016-01-04 12:23:03  within 1m
        2016-01-04 11:23:03  within 1m
        2016-01-04 10:23:03  within 1m
        2016-01-03 07:02:03  within 1m
        2016-01-01 07:08:03  within 1m
        2016-01-01 01:03:03  within 1m
        2016-01-01 01:02:03  within 1m
    """),
    (27, KeepPolicy(within="13d23h"), """
        2016-01-18 12:02:03  within 13d23h
        2016-01-12 21:08:03  within 13d23h
        2016-01-12 21:02:03  within 13d23h
        2016-01-09 21:02:03  within 13d23h
        2016-01-08 20:02:03  within 13d23h
        2016-01-07 10:02:03  within 13d23h
        2016-01-06 08:02:03  within 13d23h
        2016-01-05 09:02:03  within 13d23h
        2016-01-04 16:23:03  within 13d23h
    """),
    (28, KeepPolicy(within="2m2h"), """
        2016-01-18 12:02:03  within 2m2h
        2016-01-12 21:08:03  within 2m2h
        2016-01-12 21:02:03  within 2m2h
        2016-01-09 21:02:03  within 2m2h
        2016-01-08 20:02:03  within 2m2h
        2016-01-07 10:02:03  within 2m2h
        2016-01-06 08:02:03  within 2m2h
        2016-01-05 09:02:03  within 2m2h
        2016-01-04 16:23:03  within 2m2h
        2016-01-04 12:30:03  within 2m2h
        2016-01-04 12:28:03  within 2m2h
        2016-01-04 12:24:03  within 2m2h
        2016-01-04 12:23:03  within 2m2h
        2016-01-04 11:23:03  within 2m2h
        2016-01-04 10:23:03  within 2m2h
        2016-01-03 07:02:03  within 2m2h
        2016-01-01 07:08:03  within 2m2h
        2016-01-01 01:03:03  within 2m2h
        2016-01-01 01:02:03  within 2m2h
        2015-11-22 10:20:30  within 2m2h
        2015-11-21 10:20:30  within 2m2h
        2015-11-20 10:20:30  within 2m2h
        2015-11-18 10:20:30  within 2m2h
    """),
    (39, KeepPolicy(daily=3, weekly=2, monthly=UNLIMITED, yearly=UNLIMITED), """
        2016-01-18 12:02:03  daily, weekly, monthly, yearly
        2016-01-12 21:08:03  daily, weekly
        2016-01-09 21:02:03  daily
        2015-11-22 10:20:30  monthly, yearly
        2015-10-22 10:20:30  monthly
        2015-09-22 10:20:30  monthly
        2015-08-22 10:20:30  monthly
        2014-11-22 10:20:30  monthly, yearly
        2014-10-22 10:20:30  monthly
        2014-09-22 10:20:30  monthly
        2014-08-22 10:20:30  monthly
        2014-08-08 10:20:30  oldest monthly, oldest yearly
    """),
]


def _parse_golden(text: str) -> list[tuple[str, list[str]]]:
    rows = []
    for line in text.strip().splitlines():
        when, why = line.strip().split("  ", 1)
        rows.append((when, why.split(", ")))
    return rows


@pytest.mark.parametrize(("n", "policy", "golden"), RESTIC_CASES, ids=[f"restic-{c[0]}" for c in RESTIC_CASES])
def test_restic_golden_case(n: int, policy: KeepPolicy, golden: str) -> None:
    assert kept(restic_snaps(), policy, UTC_ZONE) == _parse_golden(golden)


# Golden files too long to transcribe line by line, given by what defines them.
HOURLY_UNLIMITED_REMOVES = [  # the 13 snapshots policy_keep_snapshots_38 ({Hourly: -1}) does not keep
    "2016-01-12 21:02:03", "2016-01-04 12:28:03", "2016-01-04 12:24:03", "2016-01-04 12:23:03",
    "2016-01-01 01:02:03", "2015-11-13 10:20:30", "2015-10-22 10:20:30", "2015-10-22 10:20:30",
    "2015-10-22 10:20:30", "2015-10-22 10:20:30", "2015-08-13 10:20:30", "2014-11-13 10:20:30",
    "2014-08-13 10:20:30",
]


@pytest.mark.parametrize("policy", [KeepPolicy(last=200), KeepPolicy(last=UNLIMITED)], ids=["restic-4", "restic-36"])
def test_restic_keep_last_beyond_the_count_keeps_all(policy: KeepPolicy) -> None:
    rows = kept(restic_snaps(), policy, UTC_ZONE)
    assert len(rows) == 103 and all(r == ["last"] for _, r in rows)


def test_restic_hourly_unlimited() -> None:  # policy_keep_snapshots_38
    rows = kept(restic_snaps(), KeepPolicy(hourly=UNLIMITED), UTC_ZONE)
    assert len(rows) == 90 and all(r == ["hourly"] for _, r in rows)
    everything = sorted((show(m.time) for m in restic_snaps()), reverse=True)
    for t, _ in rows:
        everything.remove(t)
    assert everything == HOURLY_UNLIMITED_REMOVES


def test_restic_last_and_hourly_unlimited() -> None:  # policy_keep_snapshots_37
    rows = kept(restic_snaps(), KeepPolicy(last=UNLIMITED, hourly=UNLIMITED), UTC_ZONE)
    assert len(rows) == 103
    assert sum(r == ["last", "hourly"] for _, r in rows) == 90
    assert sorted(t for t, r in rows if r == ["last"]) == sorted(HOURLY_UNLIMITED_REMOVES)


@pytest.mark.parametrize(("within", "label", "count", "oldest"), [
    ("1y1d1m", "1y1m1d", 63, "2015-08-08 10:20:30"),  # policy_keep_snapshots_26
    ("1y2m3d3h", "1y2m3d3h", 68, "2014-11-15 10:20:30"),  # policy_keep_snapshots_29
])
def test_restic_long_keep_within(within: str, label: str, count: int, oldest: str) -> None:
    rows = kept(restic_snaps(), KeepPolicy(within=within), UTC_ZONE)
    newest_first = sorted((show(m.time) for m in restic_snaps()), reverse=True)
    assert [t for t, _ in rows] == newest_first[:count]  # within keeps a run of the newest
    assert rows[-1][0] == oldest and all(r == [f"within {label}"] for _, r in rows)


def test_restic_documentation_example() -> None:
    """doc/060_forget.rst, "Removing snapshots according to a policy": weekday backups with a missed
    Wednesday and a second backup on Fridays; ``forget --keep-daily 5`` keeps these five."""
    snaps = snaps_at(["2025-04-21 11:00:00", "2025-04-22 11:00:00", "2025-04-23 11:00:00", "2025-04-24 11:00:00",
                      "2025-04-25 11:00:00", "2025-04-25 23:00:00", "2025-04-28 11:00:00", "2025-04-29 11:00:00",
                      "2025-05-01 11:00:00", "2025-05-02 11:00:00", "2025-05-02 23:00:00"])
    assert [t for t, _ in kept(snaps, KeepPolicy(daily=5))] == [
        "2025-05-02 23:00:00", "2025-05-01 11:00:00", "2025-04-29 11:00:00", "2025-04-28 11:00:00",
        "2025-04-25 23:00:00"]


# -- time zone -----------------------------------------------------------------------------------

# 2025-03-10 03:00 UTC is 23:00 on Sunday 9 March in New York (EDT since that morning)
ZONE_TIMES = ["2025-03-09 12:00:00", "2025-03-10 03:00:00", "2025-03-10 05:00:00"]


def test_time_zone_decides_which_snapshots_share_a_day() -> None:
    snaps = snaps_at(ZONE_TIMES)
    assert kept_ids(snaps, KeepPolicy(daily=2), UTC_ZONE) == {"0002", "0000"}
    assert kept_ids(snaps, KeepPolicy(daily=2), NEW_YORK) == {"0002", "0001"}
    assert kept_ids(snaps, KeepPolicy(daily=2, timezone="America/New_York")) == {"0002", "0001"}  # the policy's zone
    # and which share an ISO week: 03:00 UTC is on Monday in UTC, still on Sunday in New York
    assert kept_ids(snaps, KeepPolicy(weekly=2), UTC_ZONE) == {"0002", "0000"}
    assert kept_ids(snaps, KeepPolicy(weekly=2), NEW_YORK) == {"0002", "0001"}


def test_hours_are_wall_clock_hours_like_restic() -> None:
    # New York falls back at 06:00 UTC on 2 November 2025: 05:30 and 06:30 UTC are both 01:30 there
    snaps = snaps_at(["2025-11-02 04:30:00", "2025-11-02 05:30:00", "2025-11-02 06:30:00"])
    assert kept_ids(snaps, KeepPolicy(hourly=2), NEW_YORK) == {"0002", "0000"}
    assert kept_ids(snaps, KeepPolicy(hourly=2), UTC_ZONE) == {"0002", "0001"}


def test_keep_within_counts_calendar_days_in_the_zone() -> None:
    # the day before 12:00 EDT on 9 March 2025 is 12:00 EST on 8 March: 23 hours, not 24
    snaps = snaps_at(["2025-03-08 16:30:00", "2025-03-09 16:00:00"])
    assert kept_ids(snaps, KeepPolicy(within="1d"), UTC_ZONE) == {"0000", "0001"}
    assert kept_ids(snaps, KeepPolicy(within="1d"), NEW_YORK) == {"0001"}


# -- keep-within ---------------------------------------------------------------------------------

DAILY_JANUARY = [datetime(2014, 1, d, 12, tzinfo=UTC) for d in range(1, 21)]


def test_keep_within_is_relative_to_the_latest_snapshot_not_now() -> None:
    snaps = snaps_at(DAILY_JANUARY)
    rows = kept(snaps, KeepPolicy(within="7d"), now=datetime(2025, 6, 1, tzinfo=UTC))
    # strictly newer than 13 January 12:00, the latest (20 January 12:00) minus 7 days
    assert [t for t, _ in rows] == [f"2014-01-{d:02d} 12:00:00" for d in range(20, 13, -1)]
    assert all(r == ["within 7d"] for _, r in rows)


def test_snapshots_in_the_future_neither_count_as_latest_nor_go() -> None:
    snaps = snaps_at(DAILY_JANUARY)
    now = datetime(2014, 1, 19, tzinfo=UTC)  # 19 and 20 January are in the future
    assert sorted(kept_ids(snaps, KeepPolicy(within="2d"), now=now)) == ["0016", "0017", "0018", "0019"]
    # nothing in the past: the latest is unknown and every snapshot is kept
    assert len(kept_ids(snaps, KeepPolicy(within="1h"), now=datetime(2000, 1, 1, tzinfo=UTC))) == 20


def test_months_roll_over_like_gos_add_date() -> None:
    # restic moves the calendar back with Go's AddDate: 31 March - 1 month = "31 February" = 2 March (2016)
    snaps = snaps_at(["2016-03-01 12:00:00", "2016-03-02 12:00:00", "2016-03-02 13:00:00", "2016-03-31 12:00:00"])
    assert kept_ids(snaps, KeepPolicy(within="1m")) == {"0002", "0003"}
    assert KeepDuration.parse("1m").before(datetime(2016, 3, 31, 12, tzinfo=UTC), UTC_ZONE) == \
        datetime(2016, 3, 2, 12, tzinfo=UTC)


@pytest.mark.parametrize(("text", "parsed"), [
    ("2y5m7d3h", KeepDuration(2, 5, 7, 3)), ("30d", KeepDuration(days=30)), ("12h", KeepDuration(hours=12)),
    ("1y1d1m", KeepDuration(1, 1, 1, 0)), (" 6M ", KeepDuration(months=6)),
])
def test_durations_in_restics_format(text: str, parsed: KeepDuration) -> None:
    assert KeepDuration.parse(text) == parsed


@pytest.mark.parametrize("text", ["", "7", "1w", "7x", "d", "-1d", "1d1d", "0d", "1.5d", "1 d 2h"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        KeepDuration.parse(text)


# -- unlimited counts and the oldest snapshot ----------------------------------------------------

TWO_A_DAY = ["2025-01-01 06:00:00", "2025-01-01 18:00:00", "2025-01-02 06:00:00", "2025-01-02 18:00:00",
             "2025-01-03 06:00:00", "2025-01-03 18:00:00"]


def test_a_rule_with_counts_left_keeps_the_oldest_snapshot() -> None:
    snaps = snaps_at(TWO_A_DAY)
    assert kept(snaps, KeepPolicy(daily=5)) == [
        ("2025-01-03 18:00:00", ["daily"]), ("2025-01-02 18:00:00", ["daily"]),
        ("2025-01-01 18:00:00", ["daily"]), ("2025-01-01 06:00:00", ["oldest daily"])]
    # the count used up on the third day: the oldest goes
    assert kept_ids(snaps, KeepPolicy(daily=3)) == {"0005", "0003", "0001"}
    # the oldest alone in its period is kept by the rule itself, not as "oldest"
    assert kept(snaps_at(TWO_A_DAY[1:]), KeepPolicy(daily=5))[-1] == ("2025-01-01 18:00:00", ["daily"])


def test_unlimited_keeps_every_period_and_the_oldest() -> None:
    snaps = snaps_at(TWO_A_DAY)
    assert kept_ids(snaps, KeepPolicy(daily=UNLIMITED)) == {"0005", "0003", "0001", "0000"}
    assert kept_ids(snaps, KeepPolicy(last=UNLIMITED)) == {m.id for m in snaps}


def test_rules_or_together_and_name_every_reason() -> None:
    snaps = snaps_at(TWO_A_DAY)
    assert kept(snaps, KeepPolicy(last=2, daily=2, within="1d")) == [
        ("2025-01-03 18:00:00", ["within 1d", "last", "daily"]),
        ("2025-01-03 06:00:00", ["within 1d", "last"]),
        ("2025-01-02 18:00:00", ["daily"])]  # exactly 1d before the latest: not within (restic: After)


def test_counts_as_restics_cli_reads_them() -> None:
    assert parse_count("unlimited", "--keep-daily") == UNLIMITED and parse_count("7", "--keep-daily") == 7
    for bad in ("-1", "x"):
        with pytest.raises(UsageError, match="--keep-daily"):
            parse_count(bad, "--keep-daily")


@pytest.mark.parametrize(("policy", "needle"), [
    (KeepPolicy(), "no retention rule"), (KeepPolicy(daily=-2), "negative"),
    (KeepPolicy(within="7x"), "--keep-within"), (KeepPolicy(daily=1, timezone="Mars/Olympus"), "Mars/Olympus"),
])
def test_policy_check_refuses(policy: KeepPolicy, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        policy.check()


def test_retention_module_reexports_the_keep_rules() -> None:
    assert ReExported is KeepPolicy


# -- properties ----------------------------------------------------------------------------------

ZONES = [UTC_ZONE, NEW_YORK, ZoneInfo("Europe/Paris"), ZoneInfo("Asia/Kolkata")]
times_st = st.lists(st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2026, 1, 1),
                                 timezones=st.just(UTC)), min_size=1, max_size=40)
count_st = st.integers(min_value=-1, max_value=6)
policy_st = st.builds(KeepPolicy, last=count_st, hourly=count_st, daily=count_st, weekly=count_st, monthly=count_st,
                      yearly=count_st, within=st.none() | st.sampled_from(["1h", "12h", "1d", "7d", "1m", "1y2m"]))
PERIOD = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour), "daily": lambda t: t.date(),
    "weekly": lambda t: t.isocalendar()[:2], "monthly": lambda t: (t.year, t.month), "yearly": lambda t: t.year,
}


@settings(max_examples=150, deadline=None)
@given(times_st, policy_st, st.sampled_from(ZONES))
def test_something_is_kept_whenever_a_rule_is_set(times: list[datetime], policy: KeepPolicy, tz: ZoneInfo) -> None:
    if not policy.empty():
        assert kept_ids(snaps_at(times), policy, tz)


@settings(max_examples=150, deadline=None)
@given(times_st, policy_st, st.sampled_from(ZONES))
def test_a_policy_keeps_the_union_of_its_rules(times: list[datetime], policy: KeepPolicy, tz: ZoneInfo) -> None:
    snaps = snaps_at(times)
    singles = [KeepPolicy(**{name: getattr(policy, name)}) for name in ("last", *PERIOD) if getattr(policy, name)]
    singles += [KeepPolicy(within=policy.within)] if policy.within else []
    assert kept_ids(snaps, policy, tz) == set().union(*(kept_ids(snaps, p, tz) for p in singles))


@settings(max_examples=150, deadline=None)
@given(times_st, st.integers(min_value=1, max_value=30), st.sampled_from(["d", "h"]))
def test_every_snapshot_within_the_duration_is_kept(times: list[datetime], n: int, unit: str) -> None:
    snaps = snaps_at(times)
    cutoff = max(times) - (timedelta(days=n) if unit == "d" else timedelta(hours=n))
    assert kept_ids(snaps, KeepPolicy(within=f"{n}{unit}"), UTC_ZONE) == {m.id for m in snaps if m.time > cutoff}


@settings(max_examples=150, deadline=None)
@given(times_st, st.integers(min_value=1, max_value=50))
def test_keep_last_keeps_exactly_the_newest(times: list[datetime], n: int) -> None:
    snaps = snaps_at(times)
    newest = sorted(snaps, key=lambda m: (m.time, m.id), reverse=True)[:n]
    assert kept_ids(snaps, KeepPolicy(last=n)) == {m.id for m in newest}


@settings(max_examples=200, deadline=None)
@given(times_st, st.sampled_from(list(PERIOD)), count_st.filter(bool), st.sampled_from(ZONES))
def test_a_period_rule_keeps_the_newest_of_the_newest_periods(times: list[datetime], rule: str, n: int,
                                                               tz: ZoneInfo) -> None:
    """The rule stated as sets: the newest snapshot of each of the n newest periods that have one,
    plus the oldest snapshot if the rule had counts left (fewer than n periods, or unlimited)."""
    snaps = sorted(snaps_at(times), key=lambda m: (m.time, m.id), reverse=True)
    newest_of: dict[object, str] = {}
    for m in snaps:
        newest_of.setdefault(PERIOD[rule](m.time.astimezone(tz)), m.id)
    periods = list(newest_of.values())  # newest period first
    expect = set(periods if n == UNLIMITED else periods[:n])
    if n == UNLIMITED or len(periods) < n:
        expect.add(snaps[-1].id)
    assert kept_ids(snaps, KeepPolicy(**{rule: n}), tz) == expect


# -- the policy file -----------------------------------------------------------------------------

POLICY: dict[str, object] = {
    "repositories": {"primary": "/var/lib/dbre/repo"},
    "databases": [{"name": "orders", "source": "/data/orders.db", "rpo": "1h", "rto": "15m"}],
    "retention": {"keep_daily": 7},
}


def test_retention_zone_defaults_to_the_schedules_zone_then_utc() -> None:
    assert parse_policy(POLICY).retention.keep_policy().timezone == "UTC"
    berlin = parse_policy({**POLICY, "schedules": {"timezone": "Europe/Berlin"}})
    assert berlin.retention.keep_policy().timezone == "Europe/Berlin"
    own = parse_policy({**POLICY, "schedules": {"timezone": "Europe/Berlin"},
                        "retention": {"keep_daily": 7, "timezone": "America/New_York", "keep_within": "1y6m"}})
    assert own.retention.keep_policy() == KeepPolicy(daily=7, within="1y6m", timezone="America/New_York")
    example = load_policy(Path(__file__).parent.parent / "docs" / "policy.example.yaml")
    assert example.retention.keep_policy().timezone == "Europe/Berlin"


def test_keep_within_alone_is_a_policy_and_a_bad_one_is_named() -> None:
    assert parse_policy({**POLICY, "retention": {"keep_within": "30d"}}).retention.keep_within == "30d"
    with pytest.raises(UsageError, match=r"retention\.keep_within.*2w"):
        parse_policy({**POLICY, "retention": {"keep_within": "2w"}})
    with pytest.raises(UsageError, match=r"retention\.timezone"):
        parse_policy({**POLICY, "retention": {"keep_daily": 1, "timezone": "Mars/Olympus"}})


# -- through the repository and the CLI ----------------------------------------------------------


@pytest.fixture
def zone_repo(tmp_path: Path) -> Repository:
    """A repository whose database ``a`` has snapshots at ZONE_TIMES (and no other)."""
    src = tmp_path / "a.db"
    with sqlite3.connect(src) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
    conn.close()
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    real = backup(repo, open_source(str(src)), "a").manifest
    for t in ZONE_TIMES:
        repo.write_manifest(dataclasses.replace(real, id=new_snapshot_id(),
                                                taken_at=datetime.fromisoformat(t).replace(tzinfo=UTC).isoformat()))
    for key in list(repo.store.list("snapshots/a/")):
        if real.id in key:
            repo.store.delete(key)
    return Repository.open(repo.url)


def _kept_times(repo: Repository) -> list[str]:
    return sorted(show(m.time) for m in repo.snapshots("a"))


def test_plan_forget_uses_the_policys_zone(zone_repo: Repository) -> None:
    plan = plan_forget(zone_repo, KeepPolicy(daily=2, timezone="America/New_York"), "a")
    assert sorted(show(m.time) for m, _ in plan.keep) == ZONE_TIMES[1:]
    assert [show(m.time) for m in plan.remove] == ZONE_TIMES[:1]


def test_cli_forget_in_a_time_zone(zone_repo: Repository) -> None:
    dry = cli("forget", "--repo", zone_repo.url, "--keep-daily", "2", "--keep-tz", "America/New_York", "--dry-run",
              "--json")
    assert dry.returncode == 0, dry
    assert len(json.loads(dry.stdout)["remove"]) == 1 and _kept_times(zone_repo) == ZONE_TIMES
    done = cli("forget", "--repo", zone_repo.url, "--keep-daily", "2", "--keep-tz", "America/New_York")
    assert done.returncode == 0, done
    assert _kept_times(Repository.open(zone_repo.url)) == ZONE_TIMES[1:]  # UTC would have kept 9 March instead


def test_cli_forget_keep_within_and_unlimited(zone_repo: Repository) -> None:
    r = cli("forget", "--repo", zone_repo.url, "--keep-within", "3h", "--json")
    assert r.returncode == 0, r
    assert {row["taken_at"][:19] for row in json.loads(r.stdout)["keep"]} == {"2025-03-10T03:00:00",
                                                                              "2025-03-10T05:00:00"}
    assert cli("forget", "--repo", zone_repo.url, "--keep-daily", "unlimited").returncode == 0
    assert len(_kept_times(Repository.open(zone_repo.url))) == 2


@pytest.mark.parametrize(("args", "needles"), [
    (["--keep-within", "7x"], ("--keep-within", "7d")),
    (["--keep-within", "1w"], ("--keep-within", "m is months")),
    (["--keep-daily", "1", "--keep-tz", "Mars/Olympus"], ("Mars/Olympus", "IANA")),
    (["--keep-daily", "-1"], ("--keep-daily", "unlimited")),
    (["--keep-weekly", "some"], ("--keep-weekly", "number")),
])
def test_cli_refuses_bad_rules_in_one_line(zone_repo: Repository, args: list[str], needles: tuple[str, ...]) -> None:
    r = cli("forget", "--repo", zone_repo.url, *args)
    assert_one_line_error(r, 2, *needles)
    assert _kept_times(Repository.open(zone_repo.url)) == ZONE_TIMES
