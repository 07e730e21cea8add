"""Review of session 8 (S3 Object Lock, restore --fallback): each finding is a test that fails on the
code as reviewed, marked strict xfail so the suite stays green until it is fixed (then remove the
marker and keep the test). Read as an attacker with write access to the bucket but no key, and as
an operator on a bad day. All on the session's moto server, buckets created with Object Lock enabled;
nothing is mocked."""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import RepositoryError
from dbre.replicate.segment import list_generations, read_base
from dbre.replicate.shipper import Replicator
from dbre.repository.backup import backup
from dbre.repository.immutable import ObjectLock, enable, snapshot_keys, verify_immutable
from dbre.repository.repo import Repository, pack_key
from dbre.repository.retention import KeepPolicy, forget
from dbre.secrets import Secret
from dbre.sources.local import LocalFileSource
from tests.conftest import unique_bucket_name
from tests.dbfactory import change_rows, make_db


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own retain-until cache (as another host would have)."""
    monkeypatch.setenv("DBRE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def lock_bucket(s3_client: Any) -> str:
    name = unique_bucket_name("dbre-review")
    s3_client.create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
    return name


def _head(s3_client: Any, bucket: str, key: str) -> tuple[str | None, float]:
    head = s3_client.head_object(Bucket=bucket, Key=key)
    until = head.get("ObjectLockRetainUntilDate")
    return head.get("ObjectLockMode"), until.timestamp() if until else 0.0


def _forget_cache(tmp_path: Path) -> None:
    for f in (tmp_path / "cache").rglob("*.json"):
        f.unlink()


# -- finding 1 (fixed in ebbd0f6, 145db62): the setting is read from the current version, which anyone can replace ----


def test_a_replayed_weaker_setting_does_not_downgrade_the_writers(lock_bucket: str, tmp_path: Path,
                                                                   s3_client: Any) -> None:
    """Finding 1, fixed: a writer takes the strongest of every authentic version of `object-lock`
    (compliance if any says so, the longest period) and writes it back over a weaker current version,
    so a replayed copy's setting (same master key; a copy's `config`, so its id, is the primary's byte
    for byte) never downgrades the locks: every later backup is still locked compliance for 1 day."""
    key = Secret("correct horse battery staple")
    url, off = f"s3://{lock_bucket}/repo", f"s3://{lock_bucket}/off"
    assert enable(Repository.open_or_init(url, key), ObjectLock.parse("compliance:1d"))
    db = make_db(tmp_path / "app.db", mb=0.3)
    backup(Repository.open(url, key), LocalFileSource(db), "app")
    # the offsite copy, made immutable with a shorter governance lock (`dbre copy --object-lock`)
    offsite = Repository.init_copy_of(Repository.open(url, key), off, key)
    assert enable(offsite, ObjectLock.parse("governance:60s"))
    # the attacker: read the copy's setting, put it over the primary's (a new version; no key needed)
    body = s3_client.get_object(Bucket=lock_bucket, Key="off/object-lock")["Body"].read()
    s3_client.put_object(Bucket=lock_bucket, Key="repo/object-lock", Body=body)
    change_rows(db, 20)
    m = backup(Repository.open(url, key), LocalFileSource(db), "app").manifest
    repo = Repository.open(url, key)
    written = [k for k in snapshot_keys(repo, m) if k not in ("config", "object-lock")]  # its manifest and packs
    for k in written:
        mode, until = _head(s3_client, lock_bucket, f"repo/{k}")
        assert mode == "COMPLIANCE" and until >= m.time.timestamp() + 86400, (k, mode, until - time.time())


# -- finding 2 (fixed in fad0a41): the lock mode is never compared ----------------------------------------------------


def test_a_governance_lock_does_not_satisfy_a_compliance_repository(lock_bucket: str, tmp_path: Path,
                                                                     s3_client: Any) -> None:
    """A compliance repository exists so that nobody, not even bypass credentials, can delete what a
    snapshot in the window needs. Once an old pack's compliance lock ran out, the attacker puts the same
    bytes back as a new version under a long GOVERNANCE lock. Finding 2, fixed: the mode is compared;
    S3 turns governance into compliance only with the bypass header, which dbre never sends, so the
    backup names those packs (a warning) and `verify --immutable` fails on them: "locked in governance
    mode, but the setting is compliance"."""
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("compliance:3s"))
    db = make_db(tmp_path / "app.db", mb=0.3)
    first = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    ran_out = max(_head(s3_client, lock_bucket, f"repo/{k}")[1] for k in snapshot_keys(Repository.open(url), first))
    time.sleep(max(0.0, ran_out + 1.0 - time.time()))  # every compliance lock ran out
    later = datetime.now(UTC) + timedelta(days=1)
    for p in first.packs:
        k = f"repo/{pack_key(p)}"
        body = s3_client.get_object(Bucket=lock_bucket, Key=k)["Body"].read()
        s3_client.put_object(Bucket=lock_bucket, Key=k, Body=body, ObjectLockMode="GOVERNANCE",
                             ObjectLockRetainUntilDate=later)
    _forget_cache(tmp_path)
    change_rows(db, 3)
    second = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    assert set(first.packs) & set(second.packs)
    found = verify_immutable(url)
    assert not found.ok, found.summary()  # not protected: governance where the setting says compliance


# -- finding 3 (fixed in b8fd1f9): a generation's later states outlive its base snapshot's reused packs ---------------


def test_every_replicated_state_keeps_its_base_packs_locked_for_the_period(lock_bucket: str, tmp_path: Path,
                                                                           s3_client: Any) -> None:
    """FORMAT.md: 'Every state of a generation is then at most a step younger than its base object and
    its segments'. Finding 3, fixed: before a generation's base object is written, what its base snapshot
    needs (its reused packs too, here locked a little past the earlier backup's time + period + step) is
    extended until the base's time + period + step, and the generation is replaced once half a step
    old (counted from before its snapshot): every state shipped keeps its base packs locked until at
    least its own time + period."""
    period = 100.0  # step 10 s
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse(f"governance:{period:g}s"))
    src = tmp_path / "app.db"
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.executemany("INSERT INTO t(v) VALUES (randomblob(400))", [() for _ in range(1500)])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    first = backup(Repository.open(url), LocalFileSource(src), "app").manifest
    locked = min(_head(s3_client, lock_bucket, f"repo/{pack_key(p)}")[1] for p in first.packs)
    time.sleep(3.0)  # the replicator's base snapshot (reusing these packs) comes a few seconds later
    stop = threading.Event()
    rep = Replicator(Repository.open(url), src, "app", interval=0.2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rep.run(stop)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        # the first generation (base >= 3 s after the packs were written) ships states for a step (10 s):
        # those after locked - period need the base packs longer than they are locked
        while time.time() < locked - period + 1.5:
            conn.execute("INSERT INTO t(v) VALUES (randomblob(50))")
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
        conn.close()
    assert not thread.is_alive() and not errors, errors
    repo = Repository.open(url)
    checked = 0
    for gen, names in list_generations(repo, "app").items():
        base = read_base(repo, "app", gen)
        manifest = next(m for m in repo.snapshots("app") if m.id == base.snapshot)
        short = min(_head(s3_client, lock_bucket, f"repo/{pack_key(p)}")[1] for p in manifest.packs)
        for name in names:
            checked += 1
            state_time = name.last_us / 1e6
            assert short >= state_time + period, (
                f"state of {iso(state_time)} needs its base packs until {iso(state_time + period)}, "
                f"locked until {iso(short)}")
    assert checked


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


# -- finding 4 (fixed in b0948ab): prune on a versioned bucket hides, never frees -------------------------------------


def test_prune_frees_what_it_deletes_once_unlocked(lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    """Finding 4, fixed: under Object Lock, forget and prune delete every version of what they delete
    (ListObjectVersions of the key, then DeleteObject by version id; a version still locked stays), so
    once the locks ran out the pruned packs leave no noncurrent version behind and their space is freed."""
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:2s"))
    db = make_db(tmp_path / "app.db", mb=0.3)
    first = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    change_rows(db, 400, seed=3)
    second = backup(Repository.open(url), LocalFileSource(db), "app", full=True).manifest
    gone = set(first.packs) - set(second.packs)
    assert gone
    time.sleep(max(0.0, second.time.timestamp() + 4.0 - time.time()))  # every lock ran out
    plan, pruned = forget(Repository.open(url), KeepPolicy(last=1), prune=True, grace=0)
    assert [m.id for m in plan.remove] == [first.id] and pruned is not None
    assert set(pruned.unused_packs) == gone
    left = [v["Key"] for v in s3_client.list_object_versions(Bucket=lock_bucket, Prefix="repo/").get("Versions", [])]
    kept = [k for k in left if k.removeprefix("repo/") in {pack_key(p) for p in gone}]
    assert not kept, f"{len(kept)} pruned packs still stored as noncurrent versions"


# -- finding 5 (fixed in 6fa47be): the retain-until cache is keyed by a URL that does not name the store --------------


def test_the_cache_of_one_store_is_not_taken_for_another(lock_bucket: str, s3_client: Any,
                                                         spawn_moto: Any) -> None:
    """The primary on one S3 (AWS_ENDPOINT_URL), its offsite copy (same id: `config` copied byte
    for byte) under the same bucket and prefix on another provider: both are `s3://bucket/repo`. Finding
    5, fixed: the retain-until cache is keyed by the repository id, URL and S3 endpoint, so the primary's
    entries are not taken for the copy's, and `dbre copy --object-lock`'s extension of the copy's config
    is sent: it is locked for a day."""
    import boto3

    from dbre.storage.s3 import S3Store

    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:1d"))
    other = spawn_moto()
    client = boto3.session.Session().client("s3", endpoint_url=other.endpoint)
    client.create_bucket(Bucket=lock_bucket, ObjectLockEnabledForBucket=True)
    store = S3Store(lock_bucket, "repo", endpoint_url=other.endpoint)
    assert store.url == url  # (the same name for two stores)
    offsite = Repository.init_copy_of(Repository.open(url), store, None)
    assert enable(offsite, ObjectLock.parse("governance:1d"))
    mode, until = _head(client, lock_bucket, "repo/config")
    assert mode == "GOVERNANCE" and until >= time.time() + 86400 - 60, (mode, until)


# -- finding 6 (fixed in 46c3705): verify --immutable does not say that locked manifests are hidden -------------------


def test_verify_immutable_names_a_locked_manifest_hidden_by_a_delete_marker(lock_bucket: str, tmp_path: Path,
                                                                            s3_client: Any) -> None:
    """FORMAT.md: rolling back 'leaves an older, authentic, consistent history, and nothing inside the
    bucket can prove that newer snapshots existed'. Under Object Lock the bucket does prove it. Finding 6,
    fixed: `verify --immutable` names a snapshot inside the window whose locked manifest is hidden by
    a delete marker (a HIDDEN line, and under `hidden` in the summary), while `dbre restore` takes the
    older one; it is still protected (it restores from the locked versions), so it does not fail the check."""
    import json

    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:1d"))
    db = make_db(tmp_path / "app.db", mb=0.3)
    first = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    change_rows(db, 30)
    second = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    repo = Repository.open(url)
    s3_client.delete_object(Bucket=lock_bucket, Key=f"repo/{repo.manifest_key(second)}")  # the attacker
    assert Repository.open(url).find_snapshot("app").id == first.id  # restore now takes the older one
    found = verify_immutable(url)
    said = {k: v for k, v in found.summary().items() if k != "protected"}
    assert not found.ok or second.id in json.dumps(said), found.summary()


# -- finding 7 (fixed in 13cb18c): the copy a fallback restore reads is held by the restore's lock --------


def test_a_fallback_restore_holds_what_it_reads_from_the_copy(tmp_path: Path) -> None:
    """The restore's shared lock is what keeps a prune from deleting a pack while its pages are read
    (full.py, apply_restore). With --fallback the objects come from the copy, whose own retention
    (`forget --prune` on the offsite, FORMAT.md: 'a snapshot removed from the primary on purpose must
    be forgotten offsite too') must see that lock too: it refuses instead of deleting what the
    restore reads (found by the review as finding 7; fixed in 13cb18c)."""
    from dbre.repository.copy import copy_snapshots
    from dbre.repository.fallback import open_with_fallbacks

    primary, offsite = str(tmp_path / "primary"), str(tmp_path / "offsite")
    db = make_db(tmp_path / "app.db", mb=0.3)
    first = backup(Repository.open_or_init(primary), LocalFileSource(db), "app").manifest
    change_rows(db, 30)
    backup(Repository.open(primary), LocalFileSource(db), "app", full=True)
    copy_snapshots(Repository.open(primary), Repository.init_copy_of(Repository.open(primary), offsite, None))
    for p in first.packs:  # lost in the primary: the restore of `first` reads them from the copy
        (tmp_path / "primary" / pack_key(p)).unlink()
    fb = open_with_fallbacks(primary, None, [offsite])
    with fb.lock("restore app"):  # what apply_restore holds while it reads
        try:
            forget(Repository.open(offsite), KeepPolicy(last=1), prune=True, grace=0)
        except RepositoryError:
            pass  # refused: the restore's lock was seen
        missing = [p for p in first.packs if not (tmp_path / "offsite" / pack_key(p)).exists()]
    assert not missing, f"{len(missing)} packs the restore reads were deleted from the copy beside it"


# -- finding 8 (fixed in b8fd1f9): a quiet generation's next commit lands in it, past the step ------------------------


def test_a_state_shipped_after_a_quiet_spell_stays_restorable_for_the_period(lock_bucket: str, tmp_path: Path,
                                                                             s3_client: Any) -> None:
    """FORMAT.md: a restore --at s needs the generation's base object and every segment up to s; each
    is locked for period + step from its own write. Finding 8, fixed: under Object Lock the replicator
    also replaces an idle generation once it is half a step old (and a busy one right after its next
    segment), so the first commit after a quiet spell of 2.5 steps lands in a fresh generation, and
    every state stays restorable from locked objects until its time + period."""
    period = 20.0  # step 2 s
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse(f"governance:{period:g}s"))
    src = tmp_path / "app.db"
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    stop = threading.Event()
    rep = Replicator(Repository.open(url), src, "app", interval=0.2)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            rep.run(stop)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def segments() -> list[str]:
        listed = s3_client.list_objects_v2(Bucket=lock_bucket, Prefix="repo/segments/").get("Contents", [])
        return [o["Key"] for o in listed if not o["Key"].endswith(("/base", "/pruned"))]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not segments() and time.monotonic() < deadline:
            conn.execute("INSERT INTO t(v) VALUES ('before')")  # (the first ones may go into the base)
            time.sleep(0.2)
        assert segments(), "no segment shipped"
        time.sleep(5.0)  # quiet: 2.5 steps
        conn.execute("INSERT INTO t(v) VALUES ('after')")
        shipped = len(segments())
        while len(segments()) == shipped and time.monotonic() < deadline + 10:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(30)
        conn.close()
    assert not thread.is_alive() and not errors, errors
    repo = Repository.open(url)
    checked = 0
    for gen, names in list_generations(repo, "app").items():
        chain = [(f"segments/app/{gen}/base", float("-inf"))] + [(n.key, n.last_us / 1e6) for n in names]
        untils = {k: _head(s3_client, lock_bucket, f"repo/{k}")[1] for k, _ in chain}
        for name in names:
            state_time = name.last_us / 1e6
            needed = [k for k, t in chain if t <= state_time]  # the base object and the segments up to it
            short = min(needed, key=untils.__getitem__)
            checked += 1
            assert untils[short] >= state_time + period, (
                f"state of {iso(state_time)} needs {short} until {iso(state_time + period)}, "
                f"locked until {iso(untils[short])}")
    assert checked >= 2


# -- finding 9 (fixed in ebbd0f6): a damaged setting's hint names a command that does not exist -----------------------


def test_a_damaged_setting_names_a_fix_that_exists(lock_bucket: str, tmp_path: Path, s3_client: Any) -> None:
    """Finding 9, fixed: a setting that does not open stops every writer with one line naming the
    Object Lock setting, whose hint names `dbre copy --immutable`, a command that exists."""
    from tests.dbfactory import cli

    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse("governance:1d"))
    s3_client.put_object(Bucket=lock_bucket, Key="repo/object-lock", Body=b"garbage")  # the attacker
    db = make_db(tmp_path / "app.db", mb=0.1)
    r = cli("backup", db, "--repo", url, "--db", "app")
    assert r.returncode == 1 and "Object Lock" in r.stderr, r.stderr  # says which object stops the writes
    assert "restore --immutable" not in r.stderr or "--immutable" in cli("restore", "--help").stdout, r.stderr


# -- finding 10 (fixed in 1e730c8): retain-until from the host's clock, snapshot time from the store's ----------------


class _SlowClock:
    """The ``time`` module as seen on a host whose clock is ``behind`` seconds behind (a VM resumed
    from a pause before NTP caught up): only ``time()`` differs."""

    def __init__(self, behind: float) -> None:
        self.behind = behind

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def time(self) -> float:
        return time.time() - self.behind


def test_a_slow_host_clock_does_not_shorten_the_manifest_lock(lock_bucket: str, tmp_path: Path, s3_client: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Clocks apart by 10 s against a 20 s period (step 2 s) stand for a host days behind against a 30-day
    period (step 3 days). The snapshot's time is the store's (off by more than CLOCK_TOLERANCE). Finding 10,
    fixed: the S3 store learns from its answers' Date how far the store's clock is ahead and computes
    every retain-until by it, so the manifest (and every new object) is locked until at least the
    snapshot's time + period."""
    import dbre.repository.backup as backup_module
    import dbre.storage.s3 as s3_module

    period, behind = 20.0, 10.0
    url = f"s3://{lock_bucket}/repo"
    assert enable(Repository.open_or_init(url), ObjectLock.parse(f"governance:{period:g}s"))
    db = make_db(tmp_path / "app.db", mb=0.2)
    monkeypatch.setattr(s3_module, "time", _SlowClock(behind))
    monkeypatch.setattr(backup_module, "now_utc", lambda: datetime.now(UTC) - timedelta(seconds=behind))
    m = backup(Repository.open(url), LocalFileSource(db), "app").manifest
    assert abs(m.time.timestamp() - time.time()) < 5  # the store's time was taken
    for k in snapshot_keys(Repository.open(url), m):
        until = _head(s3_client, lock_bucket, f"repo/{k}")[1]
        need = m.time.timestamp() + period
        assert until >= need, f"{k} locked until {iso(until)}, needed until {iso(need)}"


# -- finding 11 (fixed in ebbd0f6): every S3 write now needs s3:ListBucketVersions ------------------------------------


def test_a_repository_without_object_lock_needs_no_new_permission(spawn_moto: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 11, fixed: without a setting, the first write asks for the bucket's Object Lock
    configuration and lists the versions of `object-lock` only on a bucket with Object Lock enabled;
    credentials denied that configuration (s3:GetBucketObjectLockConfiguration, which every writer of a
    locked repository needs) never wrote one and write on as before: the least-privilege policy
    (List/Get/Put/DeleteObject) backs up and reads back."""
    import json

    import boto3

    from dbre.storage.s3 import S3Store

    server = spawn_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "5"})  # the set-up below, then IAM applies
    bucket = unique_bucket_name("dbre-iam")
    boto3.session.Session().client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    iam = boto3.session.Session().client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="backup")
    iam.put_user_policy(UserName="backup", PolicyName="dbre", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    access = iam.create_access_key(UserName="backup")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", access["SecretAccessKey"])
    db = make_db(tmp_path / "app.db", mb=0.1)
    store = S3Store(bucket, "repo", endpoint_url=server.endpoint)
    m = backup(Repository.open_or_init(store), LocalFileSource(db), "app").manifest
    assert Repository.open(S3Store(bucket, "repo", endpoint_url=server.endpoint)).snapshots("app")[0].id == m.id


# -- finding 12 (fixed in 13cb18c): a fallback restore of a ransomed primary plans a few times, not per object


def test_a_fallback_restore_of_a_ransomed_primary_does_not_retry_per_object(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The likeliest attack rewrites every object, not one. Packs are made small here (64 KiB instead
    of 32 MiB: each page batch a pack) so that a 12 MB database spans as many packs as a 1 GB one does
    in production (~30); every one is damaged in the primary and intact in the copy. The review found
    one plan per damaged pack (26 for 25: quadratic reads, and past MAX_ROUTES a 40 GB database would
    not restore through --fallback at all; finding 12); since 13cb18c a primary found damaged twice
    is distrusted and the restore takes a few plans."""
    from dbre.repository import pack as pack_module
    from dbre.repository.copy import copy_snapshots
    from dbre.repository.fallback import open_with_fallbacks
    from dbre.restore import full

    monkeypatch.setattr(pack_module.PackWriter.__init__, "__defaults__", (64 * 1024, None))
    primary, offsite = str(tmp_path / "primary"), str(tmp_path / "offsite")
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as c:  # 12 MB that does not compress
        c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, v BLOB)")
        c.executemany("INSERT INTO items(v) VALUES (randomblob(1000))", [() for _ in range(12000)])
    m = backup(Repository.open_or_init(primary), LocalFileSource(db), "app").manifest
    copy_snapshots(Repository.open(primary), Repository.init_copy_of(Repository.open(primary), offsite, None))
    assert len(m.packs) >= 20, len(m.packs)
    for p in m.packs:  # the attacker: every pack rewritten (its last byte flipped)
        path = tmp_path / "primary" / pack_key(p)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    plans = [0]
    real = full._plan

    def counting(*args: Any, **kwargs: Any) -> Any:
        plans[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(full, "_plan", counting)
    fb = open_with_fallbacks(primary, None, [offsite])
    full.apply_restore(fb, full.plan_restore(fb, "app", tmp_path / "out.db"))
    assert query_count(tmp_path / "out.db") == query_count(db)
    assert plans[0] <= 3, f"{plans[0]} plans for {len(m.packs)} damaged packs"


def query_count(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM items").fetchone()[0])


# -- finding 13 (fixed in 145db62): a replayed stronger setting is followed too ---------------------------------------


def test_a_replayed_stronger_setting_does_not_escalate_the_writers(lock_bucket: str, tmp_path: Path,
                                                                    s3_client: Any) -> None:
    """The operator chose governance (deletable with s3:BypassGovernanceRetention: an erasure request,
    a mistaken backup of secrets); the offsite copy is compliance, sealed with the same master key, and
    the attacker puts it over the primary's. Finding 13, fixed: writers follow the first version of
    `object-lock` (the oldest that opens: dbre writes it once, nobody can insert an older one) and write
    it back over the replayed one, so later objects stay governance-locked for the chosen period."""
    key = Secret("correct horse battery staple")
    url, off = f"s3://{lock_bucket}/repo", f"s3://{lock_bucket}/off"
    assert enable(Repository.open_or_init(url, key), ObjectLock.parse("governance:1d"))
    db = make_db(tmp_path / "app.db", mb=0.2)
    backup(Repository.open(url, key), LocalFileSource(db), "app")
    offsite = Repository.init_copy_of(Repository.open(url, key), off, key)
    assert enable(offsite, ObjectLock.parse("compliance:2d"))
    body = s3_client.get_object(Bucket=lock_bucket, Key="off/object-lock")["Body"].read()
    s3_client.put_object(Bucket=lock_bucket, Key="repo/object-lock", Body=body)  # the attacker
    change_rows(db, 20)
    m = backup(Repository.open(url, key), LocalFileSource(db), "app").manifest
    mode, until = _head(s3_client, lock_bucket, f"repo/{Repository.open(url, key).manifest_key(m)}")
    assert mode == "GOVERNANCE" and until < m.time.timestamp() + 1.5 * 86400, (mode, until - time.time())
