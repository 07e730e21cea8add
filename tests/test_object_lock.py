"""S3 Object Lock (issue 11, immutability): every object a snapshot needs stays locked while the
snapshot is in its lock window, reused packs are extended before the manifest that needs them,
prune/forget keep what is locked, and after an attacker with full credentials deleted and
overwrote everything, `verify --immutable` proves and `copy --immutable` recovers the data.

All on the session's moto server, on buckets created with Object Lock enabled (moto enforces
retention on DeleteObject with a VersionId, and stores retain-until per version)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import RepositoryError, UsageError
from dbre.repository.backup import backup
from dbre.repository.immutable import (
    LOCK_KEY,
    ObjectLock,
    enable,
    locking_store,
    open_locked,
    snapshot_keys,
    verify_immutable,
)
from dbre.repository.repo import Repository
from dbre.repository.retention import KeepPolicy, forget
from dbre.sources.local import LocalFileSource
from dbre.storage.base import LockingStore, Retention
from dbre.storage.s3 import S3Store
from tests.conftest import unique_bucket_name
from tests.dbfactory import assert_one_line_error, assert_same_db, change_rows, cli, copy_db, make_db, query


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own retain-until cache (the cache saves requests; tests count them)."""
    monkeypatch.setenv("DBRE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def lock_bucket(s3_client: Any) -> str:
    """A fresh bucket with Object Lock enabled (and so versioning)."""
    name = unique_bucket_name("dbre-lock")
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def _versions(s3_client: Any, bucket: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    out = s3_client.list_object_versions(Bucket=bucket)
    return out.get("Versions", []), out.get("DeleteMarkers", [])


def _retention(s3_client: Any, bucket: str, key: str, version: str | None = None) -> tuple[str | None, float]:
    args = {"Bucket": bucket, "Key": key, **({"VersionId": version} if version else {})}
    head = s3_client.head_object(**args)
    until = head.get("ObjectLockRetainUntilDate")
    return head.get("ObjectLockMode"), until.timestamp() if until else 0.0


def _locked_repo(bucket: str, spec: str = "governance:1d") -> Repository:
    repo = Repository.open_or_init(f"s3://{bucket}/repo")
    assert enable(repo, ObjectLock.parse(spec))
    return Repository.open(f"s3://{bucket}/repo")


# -- the store --------------------------------------------------------------------------------------


def test_s3_store_locks_extends_and_reads_versions(lock_bucket: str, s3_bucket: str, s3_client: Any) -> None:
    store = S3Store(lock_bucket, "p")
    assert isinstance(store, LockingStore)
    assert store.lock_enabled() and not S3Store(s3_bucket).lock_enabled()
    store.set_default_retention("COMPLIANCE", 120, ("locks/",))
    before = time.time()
    store.put("packs/aa/x", b"one")
    store.put("locks/l", b"mutable")
    r = store.retention("packs/aa/x")
    assert r is not None and r.mode == "COMPLIANCE" and before + 119 <= r.until <= time.time() + 121
    assert store.written_until("packs/aa/x") == r.until
    assert store.retention("locks/l") is None  # coordination objects are never locked
    store.extend_retention("packs/aa/x", "COMPLIANCE", r.until + 3600)
    assert store.retention("packs/aa/x") == Retention("COMPLIANCE", r.until + 3600)
    # an attacker: a new version on top, then a delete marker; the first version stays, locked
    s3_client.put_object(Bucket=lock_bucket, Key="p/packs/aa/x", Body=b"garbage")
    s3_client.delete_object(Bucket=lock_bucket, Key="p/packs/aa/x")
    versions = [v for v in store.versions("packs/") if v.key == "packs/aa/x"]
    assert [v.delete_marker for v in versions] == [True, False, False]  # newest first
    oldest = versions[-1]
    assert store.get_version("packs/aa/x", oldest.version_id) == b"one"
    assert store.get_version("packs/aa/x", oldest.version_id, 1, 2) == b"ne"
    assert not store.exists("packs/aa/x")


# -- setting it up ----------------------------------------------------------------------------------


def test_init_records_the_setting_and_refuses_bad_places(lock_bucket: str, s3_bucket: str, tmp_path: Path,
                                                          s3_client: Any) -> None:
    url = f"s3://{lock_bucket}/repo"
    r = cli("init", "--repo", url, "--object-lock", "compliance:2d")
    assert r.returncode == 0 and "Object Lock compliance, 2 days" in r.stdout, r
    assert cli("init", "--repo", url, "--object-lock", "compliance:2d").returncode == 0  # same again: fine
    for key in ("repo/config", "repo/object-lock"):
        mode, until = _retention(s3_client, lock_bucket, key)
        assert mode == "COMPLIANCE" and until >= time.time() + 2 * 86400 - 5
    assert_one_line_error(cli("init", "--repo", url, "--object-lock", "governance:2d"), 2, "already has Object Lock")
    assert_one_line_error(cli("init", "--repo", str(tmp_path / "local"), "--object-lock", "governance:30d"), 2,
                          "Object Lock needs an S3 bucket")
    assert not (tmp_path / "local").exists()
    assert_one_line_error(cli("init", "--repo", f"s3://{s3_bucket}/r", "--object-lock", "governance:30d"), 2,
                          "does not have Object Lock enabled", "--object-lock-enabled-for-bucket")
    assert_one_line_error(cli("init", "--repo", url, "--object-lock", "forever:30d"), 2, "not governance or compliance")
    assert_one_line_error(cli("init", "--repo", url, "--object-lock", "governance:soon"), 2, "not a duration")


def test_a_setting_on_a_bucket_without_object_lock_is_refused_on_write(s3_bucket: str, tmp_path: Path) -> None:
    """A repository whose setting asks for Object Lock, moved to a bucket without it: one clear error."""
    repo = Repository.open_or_init(f"s3://{s3_bucket}/repo")
    repo.store.put(LOCK_KEY, repo.sealer.seal(ObjectLock.parse("governance:1d").to_json(), LOCK_KEY))
    db = make_db(tmp_path / "app.db", mb=0.2)
    with pytest.raises(RepositoryError, match="does not have Object Lock enabled") as err:
        backup(Repository.open(f"s3://{s3_bucket}/repo"), LocalFileSource(db), "app")
    assert "--object-lock-enabled-for-bucket" in (err.value.hint or "")
    with pytest.raises(UsageError, match="Object Lock needs an S3 bucket"):
        enable(Repository.open_or_init(str(tmp_path / "local")), ObjectLock.parse("governance:1d"))


def test_policy_entries_may_carry_object_lock(tmp_path: Path, lock_bucket: str, s3_client: Any) -> None:
    from dbre.policy import Repositories

    r = Repositories.model_validate({"primary": str(tmp_path / "p"), "offsite": [
        {"url": f"s3://{lock_bucket}/off", "object_lock": {"mode": "compliance", "period": "30d"}}]})
    assert r.offsite == [f"s3://{lock_bucket}/off"] and r.lock_for(r.primary) is None
    assert r.lock_for(r.offsite[0]) == ObjectLock("compliance", 30 * 86400.0)
    assert Repositories.model_validate({"primary": "a", "offsite": "b"}).offsite == ["b"]  # strings still work
    with pytest.raises(ValueError, match="needs an s3:// repository"):
        Repositories.model_validate({"primary": {"url": str(tmp_path), "object_lock": {"mode": "governance",
                                                                                       "period": "1d"}}})
    # dbre init --policy creates the primary and the locked offsite copy
    policy = tmp_path / "policy.yaml"
    import yaml

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "policy.example.yaml").read_text())
    data["repositories"] = {"primary": str(tmp_path / "p"), "offsite": [
        {"url": f"s3://{lock_bucket}/off", "object_lock": {"mode": "governance", "period": "2d"}}]}
    policy.write_text(yaml.safe_dump(data))
    out = cli("init", "--policy", policy)
    assert out.returncode == 0 and "governance, 2 days" in out.stdout and "no Object Lock" in out.stdout, out
    assert _retention(s3_client, lock_bucket, "off/object-lock")[0] == "GOVERNANCE"


# -- backups, extension, prune ----------------------------------------------------------------------


def test_every_object_a_snapshot_needs_is_locked_and_reused_packs_are_extended(
        lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    repo = _locked_repo(lock_bucket, "governance:1d")
    db = make_db(tmp_path / "app.db", mb=1)
    first = backup(repo, LocalFileSource(db), "app").manifest
    period = 86400
    for key in snapshot_keys(repo, first):
        mode, until = _retention(s3_client, lock_bucket, f"repo/{key}")
        assert mode == "GOVERNANCE" and until >= first.time.timestamp() + period, key
    # a second backup (a new process: nothing known but the host's cache) within the step: no request
    change_rows(db, 3)
    repo2 = Repository.open(f"s3://{lock_bucket}/repo")
    second = backup(repo2, LocalFileSource(db), "app").manifest
    reused = set(first.packs) & set(second.packs)
    assert reused
    assert [(e.checked, e.extended) for e in repo2.lock_extensions] == [(0, 0)]
    # shorten the locks of the reused packs (moto lets governance be shortened), forget the cache:
    # the next backup finds them short (a HEAD each) and extends them before its manifest
    soon = datetime.now(UTC) + timedelta(seconds=600)
    for pack in reused:
        s3_client.put_object_retention(Bucket=lock_bucket, Key=f"repo/packs/{pack[:2]}/{pack}",
                                       Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon})
    for f in (tmp_path / "cache").rglob("*.json"):
        f.unlink()
    change_rows(db, 3, seed=2)
    repo3 = Repository.open(f"s3://{lock_bucket}/repo")
    third = backup(repo3, LocalFileSource(db), "app").manifest
    ext = repo3.lock_extensions[0]
    assert ext.extended >= len(reused & set(third.packs)) > 0
    for key in snapshot_keys(repo3, third):
        assert _retention(s3_client, lock_bucket, f"repo/{key}")[1] >= third.time.timestamp() + period, key


def test_forget_and_prune_keep_what_is_locked(lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    repo = _locked_repo(lock_bucket, "governance:1d")
    db = make_db(tmp_path / "app.db", mb=0.5)
    for i in range(3):
        backup(repo, LocalFileSource(db), "app")
        change_rows(db, 40, seed=i)
    versions_before, _ = _versions(s3_client, lock_bucket)
    plan, pruned = forget(Repository.open(f"s3://{lock_bucket}/repo"), KeepPolicy(last=1), prune=True, grace=0)
    assert not plan.remove and len(plan.locked) == 2  # locked manifests stay, named
    assert pruned is not None and not pruned.unused_packs
    _, markers = _versions(s3_client, lock_bucket)
    assert not [m for m in markers if not m["Key"].startswith("repo/locks/")]  # nothing hidden by a marker
    assert len(Repository.open(f"s3://{lock_bucket}/repo").snapshots("app")) == 3
    out = cli("forget", "--repo", f"s3://{lock_bucket}/repo", "--keep-last", "1", "--prune", "--grace", "0")
    assert out.returncode == 0 and out.stdout.count("locked until") == 2, out
    kept = {v["Key"] for v in versions_before}
    assert kept <= {v["Key"] for v in _versions(s3_client, lock_bucket)[0]}


# -- the attack ------------------------------------------------------------------------------------


def test_after_an_attack_verify_immutable_proves_and_copy_immutable_recovers(
        lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    """Back up three times, then act as an attacker with full credentials: a delete marker on every
    object, a delete of every version (locked ones refused), garbage over every object. verify
    --immutable passes, names the snapshot outside the window, and the locked data comes back whole."""
    url = f"s3://{lock_bucket}/repo"
    assert cli("init", "--repo", url, "--object-lock", "governance:60s").returncode == 0
    db = make_db(tmp_path / "app.db", mb=1)
    states = []
    taken = []
    for i in range(3):
        m = backup(Repository.open(url), LocalFileSource(db), "app").manifest
        states.append(copy_db(db, tmp_path / f"state{i}.db"))
        taken.append(m.time.timestamp())
        change_rows(db, 30, seed=i)
        if i == 0:
            time.sleep(6.5)  # past the step (6 s): the next snapshot's reused packs need an extension
    assert cli("verify", "--repo", url, "--immutable").returncode == 0

    # the attack
    versions, _ = _versions(s3_client, lock_bucket)
    for v in versions:
        s3_client.delete_object(Bucket=lock_bucket, Key=v["Key"])
    refused = 0
    for v in versions:
        try:
            s3_client.delete_object(Bucket=lock_bucket, Key=v["Key"], VersionId=v["VersionId"])
        except s3_client.exceptions.ClientError as err:
            assert err.response["Error"]["Code"] == "AccessDenied"
            refused += 1
    assert refused == len([v for v in versions if not v["Key"].startswith("repo/locks/")])
    for v in versions:
        s3_client.put_object(Bucket=lock_bucket, Key=v["Key"], Body=b"garbage")
    ordinary = cli("verify", "--repo", url)
    assert ordinary.returncode != 0  # the current objects are garbage

    r = cli("verify", "--repo", url, "--immutable")
    assert r.returncode == 0 and "ok: 3 snapshots restore from locked versions alone" in r.stdout, r
    # later: the first snapshot has left its window, the others are still proved
    later = verify_immutable(url, now=taken[0] + 60.5)
    assert len(later.outside) == 1 and later.outside[0][0].endswith(
        Repository.open(open_locked(url).store).snapshots("app")[0].id)
    assert later.ok and len(later.protected) == 2

    # recovery: copy the locked versions into a new repository, restore from it
    fresh = tmp_path / "recovered"
    out = cli("copy", "--repo", url, "--to", fresh, "--immutable")
    assert out.returncode == 0, out
    for i, state in enumerate(states):
        snap = Repository.open(str(fresh)).snapshots("app")[i].id
        restored = tmp_path / f"restored{i}.db"
        got = cli("restore", "--repo", fresh, "--db", "app", "--snapshot", snap, "--to", restored)
        assert got.returncode == 0, got
        assert_same_db(state, restored)
        assert query(restored, "SELECT * FROM items ORDER BY id") == query(state, "SELECT * FROM items ORDER BY id")


def test_verify_immutable_names_an_object_locked_too_short(lock_bucket: str, tmp_path: Path,
                                                           s3_client: Any) -> None:
    repo = _locked_repo(lock_bucket, "governance:1d")
    db = make_db(tmp_path / "app.db", mb=0.3)
    m = backup(repo, LocalFileSource(db), "app").manifest
    pack = sorted(m.packs)[0]
    soon = datetime.now(UTC) + timedelta(seconds=600)
    s3_client.put_object_retention(Bucket=lock_bucket, Key=f"repo/packs/{pack[:2]}/{pack}",
                                   Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon})
    out = cli("verify", "--repo", f"s3://{lock_bucket}/repo", "--immutable")
    assert out.returncode == 1 and f"NOT PROTECTED packs/{pack[:2]}/{pack}: locked until" in out.stderr, out
    assert locking_store(repo.store) is not None


def test_a_hidden_setting_is_refused_not_a_silent_downgrade(lock_bucket: str, tmp_path: Path,
                                                            s3_client: Any) -> None:
    """An attacker puts a delete marker on `object-lock` (the only thing a governance lock lets them
    do): the next backup must not write on unlocked, it stops with one line."""
    _locked_repo(lock_bucket, "governance:1d")
    s3_client.delete_object(Bucket=lock_bucket, Key="repo/object-lock")
    db = make_db(tmp_path / "app.db", mb=0.2)
    r = cli("backup", db, "--repo", f"s3://{lock_bucket}/repo", "--db", "app")
    assert r.returncode == 1 and "was deleted (a delete marker)" in r.stderr, r
    assert not s3_client.list_objects_v2(Bucket=lock_bucket, Prefix="repo/snapshots/").get("Contents")


def test_enabling_later_locks_what_new_snapshots_reuse(lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    """Object Lock added to a repository that already has snapshots: the old snapshot is named as
    not protected, the next one is, with the old packs it reuses locked before its manifest."""
    url = f"s3://{lock_bucket}/repo"
    db = make_db(tmp_path / "app.db", mb=0.5)
    old = backup(Repository.open_or_init(url), LocalFileSource(db), "app").manifest
    assert _retention(s3_client, lock_bucket, f"repo/packs/{old.packs[0][:2]}/{old.packs[0]}")[0] is None
    assert cli("init", "--repo", url, "--object-lock", "governance:1d").returncode == 0
    change_rows(db, 3)
    new = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    assert set(old.packs) & set(new.packs)
    for key in snapshot_keys(Repository.open(url), new):
        assert _retention(s3_client, lock_bucket, f"repo/{key}")[1] >= new.time.timestamp() + 86400, key
    found = verify_immutable(url)
    assert found.ok and found.protected == [f"app/{new.id}"]
    assert [name for name, _ in found.outside] == [Repository.open(url).manifest_key(old)]


def test_a_deletion_frees_the_unlocked_versions_and_keeps_a_locked_one(lock_bucket: str, s3_client: Any) -> None:
    """forget and prune delete version by version under Object Lock (a delete marker frees nothing):
    a version whose lock ran out goes, an older one still locked stays and is the current one again
    (the next prune finds it and keeps it while locked); no delete marker is left behind."""
    from dbre.repository.immutable import delete_for_good

    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:1d"))
    repo = Repository.open(url)
    repo.require_writable("test")
    repo.store.put("packs/aa/old", b"locked")  # locked for a day (the repository's setting)
    s3_client.put_object(Bucket=lock_bucket, Key="repo/packs/aa/old", Body=b"unlocked")  # a newer, unlocked version
    s3_client.put_object(Bucket=lock_bucket, Key="repo/packs/bb/gone", Body=b"unlocked")
    assert delete_for_good(repo, "packs/aa/old") and delete_for_good(repo, "packs/bb/gone")
    versions, markers = _versions(s3_client, lock_bucket)
    left = sorted(v["Key"] for v in versions if v["Key"].startswith("repo/packs/"))
    assert left == ["repo/packs/aa/old"] and not markers, (left, markers)
    assert repo.store.get("packs/aa/old") == b"locked"


def test_the_first_setting_version_is_followed_written_back_and_kept_locked(lock_bucket: str, tmp_path: Path,
                                                                           s3_client: Any) -> None:
    """A replayed setting (the offsite copy's, sealed the same way) on top of the primary's: writers
    follow the first version, write it back over the replay, and extend that first version by its id
    whenever a snapshot needs it longer, so it is never left to run out under newer versions."""
    url, off = f"s3://{lock_bucket}/repo", f"s3://{lock_bucket}/off"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:10s"))
    first = s3_client.list_object_versions(Bucket=lock_bucket, Prefix="repo/object-lock")["Versions"][0]["VersionId"]
    offsite = Repository.init_copy_of(Repository.open(url), off, None)
    assert enable(offsite, ObjectLock.parse("compliance:3s"))
    body = s3_client.get_object(Bucket=lock_bucket, Key="off/object-lock")["Body"].read()
    s3_client.put_object(Bucket=lock_bucket, Key="repo/object-lock", Body=body)  # the replay
    time.sleep(2.5)  # past the first version's lock step: the next snapshot needs it longer
    db = make_db(tmp_path / "app.db", mb=0.1)
    m = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    assert Repository.open(url).store.get(LOCK_KEY) != body  # written back
    mode, until = _retention(s3_client, lock_bucket, "repo/object-lock", first)
    assert mode == "GOVERNANCE" and until >= m.time.timestamp() + 10, (mode, until - m.time.timestamp())
    mode, until = _retention(s3_client, lock_bucket, f"repo/{Repository.open(url).manifest_key(m)}")
    assert mode == "GOVERNANCE", mode


def test_verify_immutable_names_a_hidden_snapshot_on_its_own_line(lock_bucket: str, tmp_path: Path,
                                                                  s3_client: Any) -> None:
    """A locked manifest hidden by a delete marker (a rollback: restore takes the older snapshot) is
    named on a HIDDEN line with the way back; it still restores from the locked versions, so the
    check passes (exit 0) and says how many are hidden."""
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:1d"))
    db = make_db(tmp_path / "app.db", mb=0.1)
    backup(Repository.open(url), LocalFileSource(db), "app")
    change_rows(db, 10)
    second = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    s3_client.delete_object(Bucket=lock_bucket, Key=f"repo/{Repository.open(url).manifest_key(second)}")
    r = cli("verify", "--repo", url, "--immutable")
    assert r.returncode == 0, r.stderr
    assert f"HIDDEN app/{second.id}" in r.stderr and "copy --repo URL --to NEW --immutable" in r.stderr, r.stderr
    assert "1 hidden by delete markers" in r.stdout, r.stdout
