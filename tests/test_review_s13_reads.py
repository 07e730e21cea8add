"""Cold review (session 13) of the reads that go on without a lock (``Repository.read_lock``,
``WriteRefused``): real parts only (a moto server checking IAM, CLI subprocesses).

Finding 1 (strict xfail until fixed the same day in Lock.acquire): credentials that may put but not
delete (an "append-only" backup key, a
common anti-ransomware policy: s3:GetObject, s3:ListBucket, s3:PutObject, no s3:DeleteObject). A run
taking a shared lock while a prune holds its exclusive one writes its lock object, sees the prune's,
and in ``Lock.acquire``'s clean-up deletes its own: that delete is AccessDenied -> ``WriteRefused``,
which replaces the ``LockedError``. ``read_lock`` then takes it for a read-only repository and the
restore reads WITHOUT a lock beside the running prune (and leaves its lock object behind); a backup
says "access denied (these credentials may not write)" instead of "locked by prune", and
``--retry-lock`` does not wait (it retries only ``LockedError``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_bucket_name
from tests.dbfactory import make_db, run_dbre
from tests.test_readonly_repository import as_user, iam_user


def _append_only_bucket(spawn_moto: Any) -> tuple[Any, str, dict[str, str], dict[str, str]]:
    """A moto server checking IAM, a bucket, and two users' environments: a writer (s3:*) and an
    appender that may get, list and put but not delete."""
    import boto3

    server = spawn_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "8"})
    bucket = unique_bucket_name("dbre-ao")
    boto3.session.Session().client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    iam = boto3.session.Session().client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    writer = {**iam_user(iam, "writer", ["s3:*"], bucket), "AWS_ENDPOINT_URL": server.endpoint}
    appender = {**iam_user(iam, "appender", ["s3:GetObject", "s3:ListBucket", "s3:PutObject"], bucket),
                "AWS_ENDPOINT_URL": server.endpoint}
    return server, bucket, writer, appender


def test_append_only_credentials_do_not_turn_a_held_prune_lock_into_an_unlocked_read(
        spawn_moto: Any, tmp_path: Path) -> None:
    """A live exclusive lock (a prune, held in this process with full credentials) must stop a restore
    run with append-only credentials ("locked by"), as it stops one with full credentials; it must not
    be read as "the repository refuses writes" and run unlocked."""

    from dbre.repository.lock import Lock
    from dbre.storage.s3 import S3Store

    server, bucket, writer, appender = _append_only_bucket(spawn_moto)
    url = f"s3://{bucket}/repo"
    src = make_db(tmp_path / "app.db", mb=0.3)
    r = run_dbre("backup", src, "--repo", url, "--db", "app", env=writer)
    assert r.returncode == 0, r

    with as_user(writer):
        store = S3Store(bucket, "repo", endpoint_url=server.endpoint)
        prune = Lock(store, "prune", exclusive=True)
        prune.acquire()
    try:
        # the control: full credentials are refused by the prune's lock
        r = run_dbre("restore", "--repo", url, "--db", "app", "--to", tmp_path / "a.db", env=writer)
        assert r.returncode != 0 and "locked by prune" in r.stderr, r
        # the same restore with append-only credentials
        out = tmp_path / "b.db"
        r = run_dbre("restore", "--repo", url, "--db", "app", "--to", out, env=appender)
        with as_user(writer):
            left = [k for k in store.list("locks/") if k != prune.key]
        assert not out.exists(), f"the restore ran beside a live prune lock, without its own: {r}"
        assert r.returncode != 0 and "locked by prune" in r.stderr, r
        # credentials that may not delete cannot remove the run's own lock object: it stays, said so, and goes
        # stale like any other (nothing else can be done with them)
        assert len(left) <= 1 and (not left or "could not remove it" in r.stderr), (left, r)
    finally:
        with as_user(writer):
            prune.release()


def test_append_only_backup_beside_a_prune_says_locked_and_waits(spawn_moto: Any, tmp_path: Path) -> None:
    """The backup is refused either way (nothing is written without a lock); what is wrong is the cause
    it names, which sends the operator to the bucket policy instead of to the running prune."""

    from dbre.repository.lock import Lock
    from dbre.storage.s3 import S3Store

    server, bucket, writer, appender = _append_only_bucket(spawn_moto)
    url = f"s3://{bucket}/repo"
    src = make_db(tmp_path / "app.db", mb=0.3)
    r = run_dbre("backup", src, "--repo", url, "--db", "app", env=appender)
    assert r.returncode == 0, r  # (append-only credentials back up: nothing in a backup deletes)

    with as_user(writer):
        store = S3Store(bucket, "repo", endpoint_url=server.endpoint)
        prune = Lock(store, "prune", exclusive=True)
        prune.acquire()
    try:
        r = run_dbre("backup", src, "--repo", url, "--db", "app", env=appender)
        assert r.returncode != 0, r
        assert "locked by prune" in r.stderr, r
    finally:
        with as_user(writer):
            prune.release()


# -- finding 2: restore --fallback from a read-only primary drops the copy's lock too ----------------


def test_fallback_from_a_read_only_primary_still_locks_the_writable_copy(tmp_path: Path) -> None:
    """A primary that refuses writes (read-only bind mount, or chmod + setpriv) and an offsite copy that
    takes writes, held by a live exclusive lock (a prune) there. With a writable primary the restore is
    refused by the copy's prune lock (the control); with the read-only primary it must be refused too,
    not read the copy unlocked while its prune deletes."""
    from dbre.repository.lock import Lock
    from dbre.storage.local import LocalStore
    from tests.test_readonly_repository import ReadOnly

    src, repo, offsite = make_db(tmp_path / "app.db", mb=0.5), tmp_path / "repo", tmp_path / "offsite"
    assert run_dbre("backup", src, "--repo", repo, "--db", "app").returncode == 0
    r = run_dbre("copy", "--repo", repo, "--to", offsite)
    assert r.returncode == 0, r
    prune = Lock(LocalStore(offsite), "prune", exclusive=True)
    prune.acquire()
    try:
        r = run_dbre("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "a.db", "--fallback", offsite)
        assert r.returncode != 0 and "locked by prune" in r.stderr, f"control: {r}"
        ro = ReadOnly(repo, tmp_path / "ro")
        try:
            out = tmp_path / "b.db"
            r = ro.run("restore", "--repo", ro.path, "--db", "app", "--to", out, "--fallback", offsite)
            assert "reads it without a lock" in r.stderr, f"{ro.mode}: {r}"  # (the primary's: as designed)
            assert r.returncode != 0 and "locked by prune" in r.stderr and not out.exists(), f"{ro.mode}: {r}"
        finally:
            ro.close()
    finally:
        prune.release()


# -- checked sound: verify --read-data beside a store-wide failure concludes nothing -------------------


def test_credentials_revoked_mid_verify_conclude_nothing(spawn_moto: Any, tmp_path: Path) -> None:
    """verify --read-data of two snapshots with no pack in common; after the first pack is read, the access
    key in use is deleted (a rotation, a revoked key: every later request is InvalidAccessKeyId). Nothing
    in the repository changed: verify raises naming the credentials (c808e34's 'cannot be read' must not
    report intact snapshots as damaged). (The structure check's pack-index and run reads turn any
    PermanentError into 'cannot be read' damage: not reachable here without a hook; see the review.)"""
    import boto3

    from dbre.errors import RepositoryError
    from dbre.repository.repo import Repository
    from dbre.repository.verify import verify

    server = spawn_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "8"})
    bucket = unique_bucket_name("dbre-rv")
    boto3.session.Session().client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    iam = boto3.session.Session().client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    iam.create_user(UserName="admin")
    iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="admin")["AccessKey"]
    iam_admin = boto3.session.Session(aws_access_key_id=key["AccessKeyId"],
                                      aws_secret_access_key=key["SecretAccessKey"]).client(
        "iam", endpoint_url=server.endpoint, region_name="us-east-1")
    user = iam_user(iam, "verifier", ["s3:*"], bucket)
    env = {**user, "AWS_ENDPOINT_URL": server.endpoint}
    url = f"s3://{bucket}/repo"
    src = tmp_path / "app.db"
    for seed in (1, 2):  # new rows throughout: the snapshots share no pack
        src.unlink(missing_ok=True)
        make_db(src, mb=0.5, seed=seed)
        r = run_dbre("backup", src, "--repo", url, "--db", "app", env=env)
        assert r.returncode == 0, r

    revoked: list[int] = []

    def revoke(done: int, total: int) -> None:
        if not revoked:
            assert total >= 2, total
            iam_admin.delete_access_key(UserName="verifier", AccessKeyId=user["AWS_ACCESS_KEY_ID"])
            revoked.append(done)

    saved_url = os.environ.get("AWS_ENDPOINT_URL")
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        with as_user(user):
            repo = Repository.open(url)
            with pytest.raises(RepositoryError, match="credentials rejected"):
                verify(repo, read_data=True, progress=revoke)
    finally:
        if saved_url is None:
            os.environ.pop("AWS_ENDPOINT_URL", None)
        else:
            os.environ["AWS_ENDPOINT_URL"] = saved_url
    assert revoked
