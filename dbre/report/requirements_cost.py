"""Cost per RPO: what each way of protecting a database gives as RPO and costs per month.

The options an engineer chooses between: continuous replication (`dbre replicate`) at an interval,
on top of the policy's backups, and backups alone every 15 min, 1 h, 1 day or the policy's
interval. Replication is modelled from what the repository measured: when segments exist, their
transactions and shipping intervals are counted from their names (`SegmentName`: txid and
observation-time ranges, no GET) and their stored bytes per transaction from a sample of them;
without segments, from the snapshots' change rate, every interval assumed to ship. Backups reuse
the storage projection (``requirements.project_storage``). Each assumption is a line of
``CostPerRpo.assumptions``, printed under the table.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from dbre.replicate.compact import COMPACT_SEGMENTS
from dbre.replicate.lease import REFRESH_SECONDS
from dbre.replicate.segment import SegmentName, fetch_segment, list_generations, part_keys
from dbre.replicate.shipper import GENERATION_SEGMENTS
from dbre.report.requirements_model import DAY, GIB, Prices, StorageProjection, fmt_seconds
from dbre.repository.repo import Repository

MONTH_DAYS = 30.44
REPLICATION_INTERVALS = (0.75, 1.0, 10.0)  # `dbre replicate --interval`: the default and two cheaper ones
BACKUP_INTERVALS = (15 * 60.0, 3600.0, DAY)
SEGMENT_SAMPLE = 48  # segments read to measure stored bytes per transaction...
SAMPLE_BYTES = 256 * 1024 * 1024  # ... until this much was read (compacted segments reach 64 MiB)
LEASE_HEADS = 3  # a refresh: its own object, epoch + 1, the rewrite's store time (docs/FORMAT.md *Leases*)
BASE_PUTS = 11.0  # a generation's base: an incremental backup, lock, lease (docs/FORMAT.md *Requests*)
BASE_GETS = 17.0  # ... of its ~28 requests
US = 1_000_000


@dataclass
class SegmentRate:
    """What a database's stored segments say, over ``span_days`` from the first observation to the last."""

    segments: int
    generations: int
    transactions: int
    span_days: float
    sampled: int
    sampled_bytes: int
    sampled_transactions: int
    ships_per_day: dict[str, float] = field(default_factory=dict)  # by interval in seconds (str keys: JSON)

    @property
    def transactions_per_day(self) -> float:
        return self.transactions / self.span_days

    @property
    def bytes_per_transaction(self) -> float:
        return self.sampled_bytes / max(self.sampled_transactions, 1)

    @property
    def bytes_per_day(self) -> float:
        return self.bytes_per_transaction * self.transactions_per_day


@dataclass
class CostOption:
    """One way to protect a database: its RPO and its monthly storage (all copies) and requests."""

    label: str
    kind: str  # "replication" or "backups"
    interval_seconds: float
    rpo_seconds: float
    bytes_kept: float
    puts_per_month: float
    gets_per_month: float
    storage_cost_month: float
    request_cost_month: float
    current: bool = False

    @property
    def total_month(self) -> float:
        return self.storage_cost_month + self.request_cost_month


@dataclass
class CostPerRpo:
    options: list[CostOption]
    assumptions: list[str]
    measured: SegmentRate | None = None

    def cheapest_within(self, rpo: float, kind: str | None = None) -> CostOption | None:
        """The cheapest option whose RPO is at most ``rpo`` (of ``kind`` when given)."""
        fits = [o for o in self.options if o.rpo_seconds <= rpo and (kind is None or o.kind == kind)]
        return min(fits, key=lambda o: o.total_month) if fits else None


# -- measuring segments --------------------------------------------------------------------------


def active_intervals(names: Sequence[SegmentName], interval: float) -> int:
    """How many shipments a replicator at ``interval`` makes for these commits: windows of that
    length, each opened by the first commit after the previous one closed (a segment shipped at that
    interval is one window). A segment spanning k windows with n transactions takes min(n, k) of
    them (a compacted segment spans many, a sparse one holds fewer commits than windows)."""
    step = max(round(interval * US), 1)
    count, end = 0, None
    for n in sorted(names, key=lambda n: (n.first_us, n.first)):
        if end is not None and n.last_us < end:
            continue  # shipped with the previous window
        start = n.first_us if end is None else max(n.first_us, end)
        windows = (n.last_us - start) // step + 1
        count += min(n.last - n.first + 1, windows)
        end = start + windows * step
    return count


def stored_bytes(repo: Repository, name: SegmentName) -> int:
    """The bytes a segment occupies; one stored in parts counts n times its first object (each
    part holds as many body bytes, but the last)."""
    raw = fetch_segment(repo, name)
    return len(raw) * (1 + len(part_keys(repo, name.key, raw)))


def measure_segments(repo: Repository, db: str, intervals: Sequence[float] = REPLICATION_INTERVALS,
                     sample: int = SEGMENT_SAMPLE) -> SegmentRate | None:
    """The segment rate of ``db`` (one listing plus at most ``sample`` GETs, stopping past
    ``SAMPLE_BYTES``), None without segments."""
    gens = list_generations(repo, db)
    names = [n for g in gens.values() for n in g]
    if not names:
        return None
    span = max(max(n.last_us for n in names) - min(n.first_us for n in names), US) / US / DAY
    step = max(len(names) / sample, 1.0)
    picked = sorted({names[int(i * step)] for i in range(min(sample, len(names)))}, key=lambda n: n.key)
    random.Random(0).shuffle(picked)  # spread over the history even when the byte budget stops early
    read, read_tx, count = 0, 0, 0
    for n in picked:
        if count and read >= SAMPLE_BYTES:
            break
        read += stored_bytes(repo, n)
        read_tx += n.last - n.first + 1
        count += 1
    return SegmentRate(
        segments=len(names), generations=len(gens), transactions=sum(n.last - n.first + 1 for n in names),
        span_days=span, sampled=count, sampled_bytes=read, sampled_transactions=read_tx,
        ships_per_day={_key(i): active_intervals(names, i) / span for i in intervals},
    )


def every(seconds: float) -> str:
    """An interval in a label: 1 s, 10 s, 15 min, 1 h, 1 d (whole units), else as `fmt_seconds`."""
    if 0 < seconds < 1:
        return f"{seconds * 1000:g} ms"
    for unit, name in ((DAY, "d"), (3600.0, "h"), (60.0, "min"), (1.0, "s")):
        if seconds >= unit and seconds % unit == 0:
            return f"{seconds / unit:g} {name}"
    return fmt_seconds(seconds)


def _key(interval: float) -> str:
    return f"{interval:g}"


# -- pricing the options -------------------------------------------------------------------------


@dataclass
class CostInputs:
    """What every option of one database is priced from."""

    prices: Prices
    copies: int
    window_days: float  # the PITR window: keep-within (0 without it: only the newest state)
    change_bytes_per_day: float  # from snapshots (stored bytes of the pages added per day)
    snapshot_restore_gets: float  # GETs of restoring the newest snapshot
    restores_per_month: float  # the drills
    backup_p95: float  # seconds a backup takes (adds to a backup option's RPO)


def backup_option(s: StorageProjection, inputs: CostInputs, *, current: bool = False) -> CostOption:
    """Backups alone every ``s.interval_seconds``: the retention projection plus the drills' restores."""
    puts = s.backups_per_month * s.puts_per_backup * s.copies
    gets = s.backups_per_month * s.gets_per_backup + inputs.restores_per_month * inputs.snapshot_restore_gets
    p = inputs.prices
    requests = (puts * p.put_per_1000 + gets * p.get_per_1000) / 1000
    return CostOption(label=f"backups every {every(s.interval_seconds)}", kind="backups",
                      interval_seconds=s.interval_seconds, rpo_seconds=s.interval_seconds + inputs.backup_p95,
                      bytes_kept=s.bytes_kept_now * s.copies, puts_per_month=puts, gets_per_month=gets,
                      storage_cost_month=s.storage_cost_month_now, request_cost_month=requests, current=current)


def ships_per_day(interval: float, rate: SegmentRate | None) -> float:
    """Segments a replicator at ``interval`` puts a day: measured when segments exist, else one per interval."""
    if rate is not None and _key(interval) in rate.ships_per_day:
        return rate.ships_per_day[_key(interval)]
    return DAY / interval


def segment_bytes_kept(bytes_per_day: float, ships: float, window_days: float) -> float:
    """Segments kept: the PITR window plus, on average, half a generation before its start (prune
    keeps the generation straddling it whole)."""
    if ships <= 0:
        return 0.0
    return bytes_per_day * (window_days + GENERATION_SEGMENTS / ships / 2)


def replication_option(interval: float, backups: StorageProjection, inputs: CostInputs,
                       rate: SegmentRate | None, *, current: bool = False) -> CostOption:
    """Continuous replication at ``interval`` on top of the policy's backups (``backups``)."""
    ships = ships_per_day(interval, rate)
    per_day = rate.bytes_per_day if rate is not None else inputs.change_bytes_per_day
    seg_kept = segment_bytes_kept(per_day, ships, inputs.window_days)
    bases = ships / GENERATION_SEGMENTS
    lease = DAY / REFRESH_SECONDS  # refreshes a day, idle or not: a PUT and LEASE_HEADS HEADs each
    extra = inputs.copies - 1
    restore = 1 + GENERATION_SEGMENTS + 1  # base object, at most a generation of segments (and a LIST, PUT-class)
    puts = (MONTH_DAYS * (ships * inputs.copies + lease + bases * BASE_PUTS + ships / COMPACT_SEGMENTS)
            + inputs.restores_per_month)
    gets = (MONTH_DAYS * (lease * LEASE_HEADS + bases * BASE_GETS + ships * (1 + extra))
            + inputs.restores_per_month * restore)
    base = backup_option(backups, inputs)
    p = inputs.prices
    storage = seg_kept * inputs.copies / GIB * p.storage_gb_month
    requests = (puts * p.put_per_1000 + gets * p.get_per_1000) / 1000
    return CostOption(label=f"replication every {every(interval)} + {base.label}", kind="replication",
                      interval_seconds=interval, rpo_seconds=interval, bytes_kept=base.bytes_kept
                      + seg_kept * inputs.copies, puts_per_month=base.puts_per_month + puts,
                      gets_per_month=base.gets_per_month + gets,
                      storage_cost_month=base.storage_cost_month + storage,
                      request_cost_month=base.request_cost_month + requests, current=current)


def assumptions(rate: SegmentRate | None, inputs: CostInputs, replicated: bool) -> list[str]:
    """One line per assumption of the model, for under the table."""
    if rate is not None:
        seg = (f"segments measured: {rate.segments:,} in {rate.generations} generation(s) over "
               f"{fmt_seconds(rate.span_days * DAY)}, {rate.transactions_per_day:,.0f} transactions/day; "
               f"{rate.bytes_per_transaction:,.0f} B stored per transaction (read {rate.sampled} segments)")
        ships = ("segments per month: the measured intervals that held commits (names' time ranges; a compacted "
                 "segment counts as many intervals as it has transactions, at most)")
    else:
        seg = ("no segments in the repository: segment bytes = the snapshots' change rate, a lower bound (a page "
               "rewritten by n transactions is stored n times)")
        ships = "segments per month: one per interval (every interval assumed to have commits: an upper bound)"
    window = (f"segments kept for the PITR window ({fmt_seconds(inputs.window_days * DAY)}, keep-within)"
              if inputs.window_days else "no keep-within: segments kept for the newest state only")
    lines = [
        seg, ships,
        f"{window} plus half a generation ({GENERATION_SEGMENTS} segments) on average; × {inputs.copies} "
        "cop" + ("ies" if inputs.copies > 1 else "y") + " (each segment PUT to each, read once to copy)",
        f"replication adds to the policy's backups: a base per {GENERATION_SEGMENTS} segments "
        f"(~{BASE_PUTS:.0f} PUT, ~{BASE_GETS:.0f} GET; its pages counted in the backups), a lease PUT + "
        f"{LEASE_HEADS} HEAD every "
        f"{REFRESH_SECONDS:.0f} s, compaction (a PUT per {COMPACT_SEGMENTS}, a GET per segment); its RPO = the "
        "interval (observation lag ~10 ms, plus the upload)",
        "backup rows: retention projection at that interval, change rate as measured between snapshots (a shorter "
        "interval stores more page versions: a lower bound); RPO = interval + p95 backup duration",
        f"restores: {inputs.restores_per_month:.2f} a month (the drills): the newest snapshot "
        f"({inputs.snapshot_restore_gets:,.0f} GET), plus at most {GENERATION_SEGMENTS} segments when replicated",
    ]
    if replicated:
        lines.append("the policy replicates this database (`replicate: true`): the interval is assumed to be the "
                     "default, 1 s")
    return lines
