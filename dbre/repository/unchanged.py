"""Snapshots of a database that did not change since its newest one: a manifest, not a read.

A fleet of sqld namespaces is read through `/dump`, which costs a whole database whatever changed;
most namespaces of a fleet do not change between two hourly rounds. A source that can say what
state its database is in without reading it (``change_marker``: sqld's namespace instance id and
replication index, asked before the read) lets a backup whose marker equals the one its parent
recorded, before that parent's read, write a new snapshot with the parent's page map: no write came
in between, so the database now holds what the parent read. Bounds: never more than
``UNCHANGED_LIMIT`` such snapshots in a row (then the database is read again: a marker is the
server's word, not a check of the rows), never on a parent with tags, a moved source, ``--full``
or a replay, and never when the parent's page map cannot be read whole (the backup that reads the
source repairs that). See docs/FORMAT.md, *Unchanged sources*.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import datetime
from typing import Any

from dbre.repository.manifest import Manifest, iso, new_snapshot_id

log = logging.getLogger(__name__)

UNCHANGED_LIMIT = 24  # unchanged snapshots in a row; the next backup reads the source
# what an unchanged snapshot keeps of its parent's stats: what describes the content, not the read
_CONTENT_STATS = ("checksum_version", "checksum_basis", "checksum_pages", "page1", "wal", "change_marker")


def marker_of(source: object) -> dict[str, Any] | None:
    """The source's change marker, or None (it has none, or could not say)."""
    ask = getattr(source, "change_marker", None)
    if ask is None:
        return None
    marker = ask()
    return marker if isinstance(marker, dict) and marker else None


def unchanged_since(parent: Manifest | None, marker: dict[str, Any] | None) -> bool:
    """Whether ``parent`` recorded this same marker before its read, and fewer than
    ``UNCHANGED_LIMIT`` unchanged snapshots lead to it."""
    if parent is None or marker is None or parent.tags or not isinstance(parent.stats, dict):
        return False
    run = parent.stats.get("unchanged_run", 0)
    return parent.stats.get("change_marker") == marker and type(run) is int and 0 <= run < UNCHANGED_LIMIT


def unchanged_manifest(parent: Manifest, marker: dict[str, Any], taken_at: datetime, seconds: float) -> Manifest:
    """A new snapshot holding ``parent``'s pages, taken at ``taken_at`` (before the marker was asked)."""
    stats: dict[str, Any] = {k: parent.stats[k] for k in _CONTENT_STATS if k in parent.stats}
    run = parent.stats.get("unchanged_run", 0)
    stats.update({
        "pages_added": 0, "bytes_added": 0, "packs_added": 0, "seconds": round(seconds, 3),
        "read": f"unchanged (replication index {marker.get('replication_index')})",
        "change_marker": marker,
        "unchanged_run": (run if type(run) is int else 0) + 1,
        "unchanged_since": parent.stats.get("unchanged_since", parent.id),
    })
    return replace(parent, id=new_snapshot_id(), taken_at=iso(taken_at), parent=parent.id, stats=stats)
