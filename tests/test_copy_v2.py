"""Offsite copy in format 2 (review findings 3 and 8): each pending snapshot's structure is checked
on its own, a broken one is named (key and reason) and the healthy ones are copied; a pack is put
only once its index authenticates in the bytes read; and the copy is an anchor that shows when the
primary lost snapshots it once had. Local source; the destination on a local disk and on S3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import dbre.repository.copy as copy_mod
from dbre.errors import IntegrityError
from dbre.repository.backup import backup
from dbre.repository.copy import copy_snapshots, plan_copy
from dbre.repository.manifest import Manifest
from dbre.repository.pack import read_pack_index
from dbre.repository.repo import Repository, pack_key
from dbre.repository.retention import KeepPolicy, forget
from dbre.repository.verify import verify
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.local import LocalFileSource
from dbre.storage import Store
from tests.dbfactory import assert_same_db, change_rows, cli, copy_db, make_db

LOST = "the primary lost history — restore from the offsite copy or investigate"


def _snap(repo_dir: Path, db: Path, name: str) -> Manifest:
    return backup(Repository.open(str(repo_dir)), LocalFileSource(db), name).manifest


def _pack_path(repo_dir: Path, pack: str) -> Path:
    return repo_dir / pack_key(pack)


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def _damage_index(repo_dir: Path, pack: str) -> None:
    """Flip a byte inside the sealed index at the pack's end (before its length and magic)."""
    path = _pack_path(repo_dir, pack)
    _flip(path, path.stat().st_size - 12 - 20)


def _restore(url: str, db: str, snap: str, out: Path) -> Path:
    repo = Repository.open(url)
    apply_restore(repo, plan_restore(repo, db, out, snapshot=snap))
    return out


def _ids(url: str, db: str) -> set[str]:
    return {r.id for r in Repository.open(url).list_snapshot_refs(db)}


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dbre: ")]


# -- finding 3: one broken snapshot does not hold back the others -----------------------------------


def test_lost_pack_of_an_old_snapshot_is_named_and_the_newer_one_copied(store: Store, tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=0.3)
    src = tmp_path / "src"
    Repository.open_or_init(str(src))
    first = _snap(src, db, "app")
    for pack in first.packs:
        _pack_path(src, pack).unlink()  # lost
    change_rows(db, 20, seed=3)
    second = _snap(src, db, "app")  # stores the lost pages again
    ref = copy_db(db, tmp_path / "ref.db")
    first_key = Repository.open(str(src)).manifest_key(first)
    for _ in range(2):  # the next run says the same: nothing is hidden once the rest is copied
        result = cli("copy", "--repo", src, "--to", store.url)
        assert result.returncode == 1, result
        errors = _errors(result.stderr)
        assert len(errors) == 1, result.stderr
        assert errors[0].startswith(f"dbre: {first_key} not copied: packs/") and errors[0].endswith(": missing")
        assert _ids(store.url, "app") == {second.id}
    assert "copied 0 snapshots" in result.stdout and "1 were already there" in result.stdout
    assert_same_db(ref, _restore(store.url, "app", second.id, tmp_path / "out.db"))


def test_damaged_page_batch_is_copied_as_stored_and_verify_read_data_names_it(store: Store, tmp_path: Path) -> None:
    """Copy checks structure (manifest, runs, pack index), not every batch: a flipped byte inside a
    page batch of an old snapshot goes offsite as stored; `verify --read-data` is the data check."""
    db = make_db(tmp_path / "app.db", mb=0.3)
    src = tmp_path / "src"
    Repository.open_or_init(str(src))
    first = _snap(src, db, "app")
    repo = Repository.open(str(src))
    batches = [(p, b) for p in first.packs
               for b in read_pack_index(_pack_path(src, p).read_bytes(), repo.sealer, pack_key(p)) if b.kind == b"d"]
    pack, blob = batches[0]
    _flip(_pack_path(src, pack), blob.offset + blob.length // 2)
    change_rows(db, 20, seed=3)
    second = _snap(src, db, "app")
    result = cli("copy", "--repo", src, "--to", store.url)
    assert result.returncode == 0, result
    assert _ids(store.url, "app") == {first.id, second.id}
    assert store.get(pack_key(pack)) == _pack_path(src, pack).read_bytes()  # as stored, damage included
    dst = Repository.open(store.url)
    assert verify(dst).ok  # the structure holds ...
    report = verify(dst, read_data=True)  # ... the data does not
    assert f"app/{first.id}" in report.damaged, report.summary()


def test_pack_with_damaged_index_is_not_copied_and_its_snapshot_named(store: Store, tmp_path: Path) -> None:
    app = make_db(tmp_path / "app.db", mb=0.3)
    other = make_db(tmp_path / "other.db", mb=0.2, seed=5)
    src = tmp_path / "src"
    Repository.open_or_init(str(src))
    bad = _snap(src, app, "app")
    good = _snap(src, other, "other")
    assert not set(bad.packs) & set(good.packs)
    for pack in bad.packs:
        _damage_index(src, pack)
    result = cli("copy", "--repo", src, "--to", store.url)
    assert result.returncode == 1, result
    errors = _errors(result.stderr)
    key = Repository.open(str(src)).manifest_key(bad)
    assert len(errors) == 1 and errors[0].startswith(f"dbre: {key} not copied: packs/"), result.stderr
    assert "index" in errors[0]
    dst = Repository.open(store.url)
    assert _ids(store.url, "app") == set() and _ids(store.url, "other") == {good.id}
    assert not dst.pack_ids() & set(bad.packs) and set(good.packs) <= dst.pack_ids()
    assert_same_db(other, _restore(store.url, "other", good.id, tmp_path / "out.db"))


def test_pack_damaged_after_the_plan_is_checked_in_hand_and_not_copied(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index is checked again in the bytes that would be put: damage between plan and copy
    (or a read that returns other bytes) is caught there."""
    app = make_db(tmp_path / "app.db", mb=0.3)
    other = make_db(tmp_path / "other.db", mb=0.2, seed=5)
    src_dir = tmp_path / "src"
    Repository.open_or_init(str(src_dir))
    bad = _snap(src_dir, app, "app")
    good = _snap(src_dir, other, "other")
    src = Repository.open(str(src_dir))
    dst = Repository.init_copy_of(src, store, None)

    def plan_then_damage(s: Repository, d: Repository, db: str | None = None) -> Any:
        plan = plan_copy(s, d, db)
        assert [m.id for m in plan.snapshots] == [bad.id, good.id] and not plan.broken  # the check passed
        for pack in bad.packs:
            _damage_index(src_dir, pack)
        return plan

    monkeypatch.setattr(copy_mod, "plan_copy", plan_then_damage)
    plan, copied = copy_snapshots(src, dst)
    assert [b.key for b in plan.broken] == [src.manifest_key(bad)]
    assert "(pack not copied)" in plan.broken[0].reason
    assert [m.id for m in plan.snapshots] == [good.id] and copied > 0
    assert not dst.pack_ids() & set(bad.packs)
    assert _ids(store.url, "app") == set() and _ids(store.url, "other") == {good.id}


# -- finding 8: the offsite copy as an anchor against lost history ---------------------------------


def test_copy_reports_a_primary_that_lost_its_newest_snapshot(tmp_path: Path, s3_repo_url: str) -> None:
    app = make_db(tmp_path / "app.db", mb=0.3)
    other = make_db(tmp_path / "other.db", mb=0.2, seed=5)
    src = tmp_path / "src"
    Repository.open_or_init(str(src))
    _snap(src, app, "app")
    change_rows(app, 10, seed=2)
    newest = _snap(src, app, "app")
    first = cli("copy", "--repo", src, "--to", s3_repo_url)
    assert first.returncode == 0 and not _errors(first.stderr), first
    # the primary loses its newest snapshot of app (deleted, or the bucket rolled back)
    (src / Repository.open(str(src)).manifest_key(newest)).unlink()
    later = _snap(src, other, "other")  # something new to copy all the same
    result = cli("copy", "--repo", src, "--to", s3_repo_url)
    assert result.returncode == 1, result
    errors = _errors(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("dbre: offsite has 1 snapshot of app newer than the primary's newest (taken ")
    assert errors[0].endswith(LOST)
    assert _ids(s3_repo_url, "other") == {later.id}  # copied anyway
    assert newest.id in _ids(s3_repo_url, "app")  # and the offsite copy still has what the primary lost
    # the Prefect task fails the same way, after copying
    from tasks.backup import copy_to_offsite

    with pytest.raises(IntegrityError, match="primary lost history"):
        copy_to_offsite.fn(str(src), s3_repo_url)


def test_copy_reports_lost_history_after_backups_went_on(tmp_path: Path, s3_repo_url: str) -> None:
    """Once backups go on, the primary's newest is newer again, so comparing newest with newest no
    longer shows the loss: the next snapshot's parent does (it skipped a snapshot the offsite
    copy holds and that was committed before it began). A forget that removes old snapshots is not
    a loss."""
    app = make_db(tmp_path / "app.db", mb=0.3)
    src = tmp_path / "src"
    Repository.open_or_init(str(src))
    _snap(src, app, "app")
    change_rows(app, 10, seed=2)
    s2 = _snap(src, app, "app")
    assert cli("copy", "--repo", src, "--to", s3_repo_url).returncode == 0
    forget(Repository.open(str(src)), KeepPolicy(last=1))  # retention: only s2 stays
    change_rows(app, 10, seed=3)
    s3 = _snap(src, app, "app")
    assert s3.parent == s2.id
    control = cli("copy", "--repo", src, "--to", s3_repo_url)
    assert control.returncode == 0 and not _errors(control.stderr), control
    # s3 is deleted from the primary; the next backup builds on s2
    (src / Repository.open(str(src)).manifest_key(s3)).unlink()
    change_rows(app, 10, seed=4)
    s4 = _snap(src, app, "app")
    assert s4.parent == s2.id
    ref = copy_db(app, tmp_path / "ref.db")
    result = cli("copy", "--repo", src, "--to", s3_repo_url)
    assert result.returncode == 1, result
    errors = _errors(result.stderr)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"dbre: offsite has snapshot {s3.id} of app (taken ")
    assert f"its snapshot {s4.id}" in errors[0] and errors[0].endswith(LOST)
    assert s4.id in _ids(s3_repo_url, "app")
    assert_same_db(ref, _restore(s3_repo_url, "app", s4.id, tmp_path / "out.db"))
