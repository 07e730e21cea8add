"""Predicted RTO between drills: the last passed drill's phases, split into fixed and size-proportional costs.

A drill records how long each phase of a recovery took (restore, checks, Great Expectations, the
library import) and the size it restored. Restoring and checking grow with the database; starting
the tools does not. So the estimate for a database of ``size`` bytes now is

    fixed + proportional * size / drill_size

where ``fixed`` is the Great Expectations import plus whatever the phases do not account for
(process start, planning, the namespace), and ``proportional`` is the restore, the checks and the
suites. ``dbre status`` warns when it crosses the RTO target (a restore that quietly grew past its
target is caught before the next drill, not during an outage), and the requirements report projects
the 12-month size with it. A point-in-time drill restored segments on top of its snapshot: their
cost is counted in the restore phase, so the estimate assumes as much replication as then.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class RtoEstimate:
    """A predicted time to a validated restore, and what it was predicted from."""

    seconds: float
    fixed_seconds: float
    proportional_seconds: float  # at the drill's size
    drill_size: int
    drill_at: str | None

    def at_size(self, size: float) -> float:
        """The estimate for a database of ``size`` bytes."""
        return self.fixed_seconds + self.proportional_seconds * size / self.drill_size


def _seconds(value: Any) -> float:
    try:
        return max(0.0, float(value)) if value is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


def estimate_rto(drills: list[dict[str, Any]], size: int | None) -> RtoEstimate | None:
    """The estimate for ``size`` bytes from the last passed drill with phases and a size (None if
    there is none, or no size to scale to)."""
    for rec in reversed(drills):
        if not rec.get("passed") or rec.get("rto_seconds") is None:
            continue
        phases = rec.get("phases") or {}
        drill_size = rec.get("size")
        if not isinstance(phases, dict) or not isinstance(drill_size, int) or drill_size <= 0:
            continue
        total = _seconds(rec["rto_seconds"])
        gx = _seconds(phases.get("expectations_seconds"))
        imp = min(_seconds(phases.get("gx_import_seconds")), gx)
        proportional = min(total, _seconds(phases.get("restore_seconds")) + _seconds(phases.get("checks_seconds"))
                           + gx - imp)
        if not size:
            return None
        base = RtoEstimate(0.0, round(total - proportional, 3), round(proportional, 3), drill_size,
                           rec.get("started_at"))
        return replace(base, seconds=round(base.at_size(size), 3))
    return None
