"""Which packs this week's integrity validation reads: a rotating subset, restic's --read-data-subset.

Reading every byte of a large repository every week costs as much as a full restore. Instead the
packs are split into ``m`` buckets by a hash of the pack id, and each run reads one bucket, so
every pack is read once per cycle of ``m`` runs. ``n/m`` picks bucket ``n`` (1-based) explicitly;
a cycle of ``m`` weeks picks bucket ``week % m + 1`` from a week count that never resets (an ISO
week number does at new year, and would skip or repeat buckets).

A pack's bucket depends only on its id, so a pack written after this week's run is read in its
own bucket's week, and a cycle covers everything present at its start.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime

import xxhash

from dbre.errors import UsageError

_EPOCH_MONDAY = date(1970, 1, 5)
_SUBSET = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def week_index(when: datetime | date) -> int:
    """Whole weeks (Monday to Sunday, UTC) since 1970-01-05."""
    d = when.astimezone(UTC).date() if isinstance(when, datetime) else when
    return (d - _EPOCH_MONDAY).days // 7


def parse_subset(text: str) -> tuple[int, int]:
    """``"2/5"`` -> (2, 5); UsageError unless 1 <= n <= m."""
    m = _SUBSET.match(text)
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise UsageError(f"read-data subset {text!r} is not n/m with 1 <= n <= m", "e.g. --read-data-subset 1/4")
    return int(m.group(1)), int(m.group(2))


def subset_for_week(cycle: int, when: datetime | date | None = None) -> tuple[int, int]:
    """The (n, m) a run in the week of ``when`` (default: now) reads, for a cycle of ``cycle`` weeks."""
    if cycle < 1:
        raise UsageError(f"read-data cycle of {cycle} weeks", "use 1 (read everything weekly) or more")
    return week_index(when or datetime.now(UTC)) % cycle + 1, cycle


def pack_bucket(pack_id: str, m: int) -> int:
    """The 1-based bucket of ``pack_id`` among ``m``."""
    return xxhash.xxh3_64_intdigest(pack_id.encode()) % m + 1


def subset_filter(n: int, m: int) -> Callable[[str], bool]:
    """A ``packs_filter`` for ``dbre.repository.verify.verify`` accepting the packs of bucket n of m."""
    if not 1 <= n <= m:
        raise UsageError(f"read-data subset {n}/{m} is not valid", "use 1 <= n <= m")
    return lambda pack_id: pack_bucket(pack_id, m) == n
