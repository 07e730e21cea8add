"""A segment stored in parts (one transaction larger than the cap) is copied offsite whole and
pruned whole: no part is left behind in the source, and the copy restores it exactly."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import dbre.replicate.compact as compact_mod
import dbre.replicate.segment as segment_mod
from dbre.repository.copy import copy_snapshots
from dbre.repository.repo import Repository
from dbre.repository.retention import prune
from tests.replication import make_source, restore_at, restored_seq
from tests.test_review_restore_pitr import LATER, commit, replicating


def test_segment_parts_are_copied_and_pruned_with_their_segment(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_mod, "SEGMENT_CAP", 256 * 1024)
    monkeypatch.setattr(compact_mod, "COMPACT_BYTES", 64 * 1024)  # (well under the cap, as in production)
    src = tmp_path / "src.db"
    make_source(src, 3000)
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        commit(conn, 3001, pad=400 * 1024)  # one transaction of ~100 pages: a segment in parts
        time.sleep(0.5)
        commit(conn, 3002)
    conn.close()
    parts = [k for k in repo.store.list("segments/app/") if segment_mod.is_part_key(k)]
    assert parts

    offsite = Repository.init_copy_of(repo, str(tmp_path / "offsite"), None)
    plan, _ = copy_snapshots(repo, offsite, "app")
    assert not plan.broken, plan.broken
    assert [k for k in offsite.store.list("segments/app/") if segment_mod.is_part_key(k)] == parts
    out = tmp_path / "offsite.db"
    restore_at(offsite, "app", LATER(), out)
    assert restored_seq(out)[1] == 3002

    # the generation's base snapshot forgotten: prune deletes the generation, parts included
    for key in list(repo.store.list("snapshots/app/")):
        repo.store.delete(key)
    prune(repo, grace=0)
    left = [k for k in repo.store.list("segments/app/") if not k.endswith("/pruned")]
    assert left == [], left
