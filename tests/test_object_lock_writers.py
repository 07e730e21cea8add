"""Object Lock followed by every writer without flags: an offsite copy made immutable with `dbre copy
--object-lock`, replication's bases and segments, and the order of a backup's requests (every
extension answered before the manifest is put: a kill -9 never leaves a manifest less protected
than it says). On the session's moto server, buckets created with Object Lock enabled."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbre.replicate.shipper import Replicator
from dbre.repository.backup import backup
from dbre.repository.immutable import ObjectLock, enable, snapshot_keys, verify_immutable
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from dbre.storage.s3 import S3Store
from tests.conftest import unique_bucket_name
from tests.dbfactory import change_rows, cli, make_db


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBRE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def lock_bucket(s3_client: Any) -> str:
    name = unique_bucket_name("dbre-lock")
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def _until(s3_client: Any, bucket: str, key: str) -> tuple[str | None, float]:
    head = s3_client.head_object(Bucket=bucket, Key=key)
    until = head.get("ObjectLockRetainUntilDate")
    return head.get("ObjectLockMode"), until.timestamp() if until else 0.0


def test_offsite_copy_is_locked_and_its_reused_packs_extended(lock_bucket: str, tmp_path: Path,
                                                              s3_client: Any) -> None:
    primary = tmp_path / "primary"
    off = f"s3://{lock_bucket}/off"
    db = make_db(tmp_path / "app.db", mb=0.5)
    for i in range(2):
        assert cli("backup", db, "--repo", primary, "--db", "app").returncode == 0
        out = cli("copy", "--repo", primary, "--to", off, "--object-lock", "compliance:1d")
        assert out.returncode == 0, out
        change_rows(db, 5, seed=i)
    dst = Repository.open(off)
    for m in dst.snapshots("app"):
        for key in snapshot_keys(dst, m):
            mode, until = _until(s3_client, lock_bucket, f"off/{key}")
            assert mode == "COMPLIANCE" and until >= m.time.timestamp() + 86400, key
    assert cli("verify", "--repo", off, "--immutable").returncode == 0
    # the copy keeps its setting; another one is refused, and a local copy cannot have one
    r = cli("copy", "--repo", primary, "--to", off, "--object-lock", "governance:1d")
    assert r.returncode == 2 and "already has Object Lock" in r.stderr, r
    r = cli("copy", "--repo", primary, "--to", tmp_path / "local-off", "--object-lock", "governance:1d")
    assert r.returncode == 2 and "needs an S3 bucket" in r.stderr and not (tmp_path / "local-off").exists(), r


class RecordingS3Store(S3Store):
    """The real S3 store, recording the order of its writes (no behaviour changed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[tuple[str, str]] = []
        self._mutex = threading.Lock()

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        super().put(key, data, if_absent=if_absent)
        with self._mutex:
            self.log.append(("put", key))

    def extend_retention(self, key: str, mode: str, until: float) -> None:
        with self._mutex:
            self.log.append(("extend sent", key))
        super().extend_retention(key, mode, until)
        with self._mutex:
            self.log.append(("extended", key))


def test_extensions_are_answered_before_the_manifest_is_put(lock_bucket: str, tmp_path: Path,
                                                            s3_client: Any) -> None:
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:1d"))
    db = make_db(tmp_path / "app.db", mb=0.5)
    first = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    soon = datetime.now(UTC) + timedelta(seconds=900)
    for key in ["config", *(f"packs/{p[:2]}/{p}" for p in first.packs)]:
        s3_client.put_object_retention(Bucket=lock_bucket, Key=f"repo/{key}",
                                       Retention={"Mode": "GOVERNANCE", "RetainUntilDate": soon})
    for f in (tmp_path / "cache").rglob("*.json"):
        f.unlink()
    change_rows(db, 3)
    store = RecordingS3Store(lock_bucket, "repo")
    second = backup(Repository.open(store), LocalFileSource(db), "app").manifest
    manifest_at = store.log.index(("put", f"snapshots/app/{Repository.open(url).manifest_key(second).split('/')[-1]}"))
    extended = [i for i, (op, _) in enumerate(store.log) if op == "extended"]
    assert len(extended) >= 2  # config and the reused packs
    assert max(extended) < manifest_at
    for key in snapshot_keys(Repository.open(url), second):
        assert _until(s3_client, lock_bucket, f"repo/{key}")[1] >= second.time.timestamp() + 86400, key


def test_replication_bases_and_segments_are_locked(lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:2h"))
    src = tmp_path / "app.db"
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    stop = threading.Event()
    rep = Replicator(Repository.open(url), src, "app", interval=0.2)
    thread = threading.Thread(target=rep.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        i = 0
        while time.monotonic() < deadline:
            conn.execute("INSERT INTO t(v) VALUES (?)", (f"row {i}",))
            i += 1
            time.sleep(0.05)
            keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=lock_bucket, Prefix="repo/segments/")
                    .get("Contents", [])]
            if len([k for k in keys if not k.endswith("/base")]) >= 2:
                break
    finally:
        stop.set()
        thread.join(30)
        conn.close()
    assert not thread.is_alive()
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=lock_bucket, Prefix="repo/").get("Contents", [])]
    segs = [k for k in keys if k.startswith("repo/segments/")]
    assert any(k.endswith("/base") for k in segs) and len(segs) >= 3, keys
    now = time.time()
    for key in keys:
        mode, until = _until(s3_client, lock_bucket, key)
        if key.startswith(("repo/locks/", "repo/leases/")):
            assert mode is None, key  # rewritten and deleted as dbre runs: never locked
        else:
            assert mode == "GOVERNANCE" and until >= now + 7200 - 60, key


def test_a_generation_lasts_at_most_a_lock_step(lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    """Segments are locked for period + step from their own write: a generation the replicator keeps
    for at most a step keeps every state in it restorable from locked objects for the whole period."""
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:20s"))  # step: 2 s
    src = tmp_path / "app.db"
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    stop = threading.Event()
    rep = Replicator(Repository.open(url), src, "app", interval=0.2)
    thread = threading.Thread(target=rep.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and len(rep.stats.generations) < 3:
            conn.execute("INSERT INTO t(v) VALUES ('x')")
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
        conn.close()
    assert not thread.is_alive()
    assert len(rep.stats.generations) >= 3, rep.stats.generations
    # an attacker hides everything: the replicated chains still restore from the locked versions
    for v in s3_client.list_object_versions(Bucket=lock_bucket).get("Versions", []):
        s3_client.delete_object(Bucket=lock_bucket, Key=v["Key"])
    found = verify_immutable(url)
    assert found.ok and found.segments >= 3, found.summary()
