"""Format 1 stays readable and converts: the golden v1 repositories (tests/data/v1, made by the
release before format 2) restore, refuse writes, and migrate into a format-2 repository on a
local disk and on S3 with every snapshot byte-identical, resumably."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dbre.errors import IntegrityError, RepositoryError, UsageError
from dbre.repository.backup import backup
from dbre.repository.migrate import apply_migrate, plan_migrate
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.secrets import Secret
from dbre.sources.local import LocalFileSource

V1 = Path(__file__).parent / "data" / "v1"
PASSPHRASE = "v1-golden-passphrase"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _v1_copy(tmp_path: Path, kind: str) -> tuple[Path, Secret | None]:
    dst = tmp_path / f"v1-{kind}"
    shutil.copytree(V1 / kind, dst)
    return dst, (Secret(PASSPHRASE) if kind == "encrypted" else None)


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_v1_repository_is_read_and_refuses_writes(tmp_path: Path, kind: str) -> None:
    repo_dir, key = _v1_copy(tmp_path, kind)
    repo = Repository.open(str(repo_dir), key)
    assert repo.version == 1
    snaps = repo.snapshots("app")
    assert len(snaps) == 2
    out = tmp_path / "restored.db"
    apply_restore(repo, plan_restore(repo, "app", out))
    assert _sha(out) == _sha(V1 / "app-final.db")
    before = sorted(p.relative_to(repo_dir) for p in repo_dir.rglob("*") if p.is_file())
    with pytest.raises(RepositoryError, match="format 1"):
        backup(repo, LocalFileSource(out), "app")
    after = sorted(p.relative_to(repo_dir) for p in repo_dir.rglob("*") if p.is_file())
    assert after == before  # nothing written, not even a lock


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_migrate_replays_every_snapshot_into_format_2(tmp_path: Path, kind: str, s3_repo_url: str) -> None:
    repo_dir, key = _v1_copy(tmp_path, kind)
    src = Repository.open(str(repo_dir), key)
    old = {m.id: m for m in src.snapshots("app")}
    for target in (str(tmp_path / "v2"), s3_repo_url):
        dst = Repository.open_or_init(target, key)
        assert dst.version == 2
        assert dst.sealer.encrypted == (key is not None)
        plan = plan_migrate(src, dst)
        assert len(plan.snapshots) == 2 and plan.already == 0
        result = apply_migrate(src, dst, plan)
        assert len(result.migrated) == 2
        new = dst.snapshots("app")
        assert [m.taken_at for m in new] == sorted(m.taken_at for m in old.values())
        for m in new:
            origin = old[m.stats["migrated_from"]["id"]]
            assert m.source == origin.source
            assert {t: s.rows for t, s in m.tables.items()} == {t: s.rows for t, s in origin.tables.items()}
            a, b = tmp_path / "a.db", tmp_path / "b.db"
            apply_restore(src, plan_restore(src, "app", a, snapshot=origin.id, force=True))
            apply_restore(dst, plan_restore(dst, "app", b, snapshot=m.id, force=True))
            assert _sha(a) == _sha(b)
        # newest and --at answer the same in both
        newest = tmp_path / "newest.db"
        apply_restore(dst, plan_restore(dst, "app", newest, force=True))
        assert _sha(newest) == _sha(V1 / "app-final.db")
        # run again: nothing left to do (resumable after a crash: done snapshots are skipped)
        again = plan_migrate(src, Repository.open(target, key))
        assert again.snapshots == [] and again.already == 2
    # the source was only read
    assert Repository.open(str(repo_dir), key).version == 1


def test_migrate_refuses_a_v2_source_and_the_same_target(tmp_path: Path) -> None:
    v2 = Repository.open_or_init(str(tmp_path / "v2"))
    other = Repository.open_or_init(str(tmp_path / "other"))
    with pytest.raises(UsageError, match="already uses format 2"):
        plan_migrate(v2, other)


def test_migrate_cli(tmp_path: Path) -> None:
    repo_dir, _ = _v1_copy(tmp_path, "plain")
    target = tmp_path / "v2"
    cmd = [sys.executable, "-m", "dbre.cli", "migrate", "--repo", str(repo_dir), "--to", str(target)]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "2 snapshots" in dry.stdout
    assert not (target / "snapshots").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "migrated 2 snapshots" in done.stdout
    # a v1 repository's write is refused with the command that fixes it
    db = tmp_path / "x.db"
    shutil.copy(V1 / "app-final.db", db)
    refused = subprocess.run([sys.executable, "-m", "dbre.cli", "backup", str(db), "--repo", str(repo_dir),
                              "--db", "app"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "dbre migrate" in refused.stderr and "Traceback" not in refused.stderr


def test_migrate_names_a_snapshot_with_a_lost_pack_and_migrates_the_rest(tmp_path: Path) -> None:
    """A format-1 snapshot that cannot be restored (its pack lost) is named; the others migrate."""
    repo_dir, _ = _v1_copy(tmp_path, "plain")
    src = Repository.open(str(repo_dir))
    oldest, newest = src.snapshots("app")
    only_newest = set(newest.packs) - set(oldest.packs)
    assert only_newest, "the newer golden snapshot has a pack of its own"
    for pack in only_newest:
        (repo_dir / "packs" / pack[:2] / pack).unlink()
    dst = Repository.open_or_init(str(tmp_path / "v2"))
    result = apply_migrate(src, dst, plan_migrate(src, dst))
    assert [old for _, old, _ in result.migrated] == [oldest.id]
    assert [what for what, _ in result.failed] == [f"app/{newest.id}"]


def test_resumed_migration_compares_the_newest_migrated_snapshot_again(tmp_path: Path) -> None:
    """A kill between a snapshot's commit and its comparison: the resumed run compares it, and a
    difference stops it (here the new snapshot is made to differ by replaying the wrong one)."""
    repo_dir, _ = _v1_copy(tmp_path, "plain")
    src = Repository.open(str(repo_dir))
    oldest, newest = src.snapshots("app")
    dst = Repository.open_or_init(str(tmp_path / "v2"))
    # as if killed right after committing the first snapshot, before comparing it: and that commit
    # holds the wrong bytes (the newest state under the oldest's name)
    scratch = tmp_path / "wrong.db"
    apply_restore(src, plan_restore(src, "app", scratch, snapshot=newest.id))
    backup(dst, LocalFileSource(scratch), "app", replay=oldest)
    plan = plan_migrate(src, dst)
    assert plan.recheck is not None and plan.recheck[0].id == oldest.id
    with pytest.raises(IntegrityError, match="does not restore to the same bytes"):
        apply_migrate(src, dst, plan)
