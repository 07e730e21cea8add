"""Cold review of `dbre key passwd` (issue 15): each test demonstrates one finding against the real local store
or a real S3 server (moto_server), as an attacker with write access but no passphrase, or as an operator on a
bad day. The findings and their fixes are listed in the session's report."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import RepositoryError
from dbre.repository.repo import Repository
from dbre.secrets import Secret
from dbre.storage.base import TransientError
from dbre.storage.local import LocalStore
from tests.conftest import unique_bucket_name
from tests.dbfactory import assert_one_line_error, cli, dbre_env, make_db
from tests.stores import PassThroughStore

OLD, NEW = "old passphrase 1", "new passphrase 2"
FAST_N = 2**12


@pytest.fixture(autouse=True)
def _own_cache_and_fast_scrypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBRE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("dbre.repository.crypto.SCRYPT_N", FAST_N)


def _passwd(url: str, old: str | None, new: str | None, *extra: str) -> Any:
    r = cli("key", "passwd", "--repo", url, *extra, env={"DBRE_ENCRYPTION_KEY": old, "DBRE_NEW_ENCRYPTION_KEY": new})
    for s in (OLD, NEW):
        assert s not in r.stdout and s not in r.stderr, "a passphrase was printed"
    return r


def _encrypted_repo(tmp_path: Path, url: str | None = None) -> str:
    url = url or str(tmp_path / "repo")
    assert cli("backup", make_db(tmp_path / "app.db", mb=0.1), "--repo", url,
               env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    return url


# -- attacker: a malformed locked version of `config` ------------------------------------------------


def test_a_malformed_locked_config_version_does_not_crash_verify_immutable(s3_client: Any, tmp_path: Path) -> None:
    """Finding (medium): an attacker who can write the bucket adds a locked version of `config` with the
    repository's id and ``"encryption": 1`` (then puts the real bytes back on top, so nothing else notices).
    After a `dbre key passwd`, `verify --immutable` with the new passphrase tries that version first in
    `_newer_locked_config`, and `open_key` raised a TypeError, which escaped (only NotFound and RepositoryError
    were skipped): the proof that the backups survive an attacker failed with "unexpected error". Fixed: a
    malformed encryption entry is a RepositoryError ("bad encryption entry"), skipped like any version that does
    not open."""
    bucket = unique_bucket_name("dbre-review-key")
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    url = f"s3://{bucket}/repo"
    r = cli("init", "--repo", url, "--object-lock", "governance:1d", env={"DBRE_ENCRYPTION_KEY": OLD})
    assert r.returncode == 0, r
    _encrypted_repo(tmp_path, url)
    real = s3_client.get_object(Bucket=bucket, Key="repo/config")["Body"].read()
    until = datetime.now(UTC) + timedelta(days=2)
    for body in (json.dumps({**json.loads(real), "encryption": 1}).encode(), real):  # the attacker's, then real
        s3_client.put_object(Bucket=bucket, Key="repo/config", Body=body, ObjectLockMode="GOVERNANCE",
                             ObjectLockRetainUntilDate=until)
    assert _passwd(url, OLD, NEW).returncode == 0
    r = cli("verify", "--repo", url, "--immutable", env={"DBRE_ENCRYPTION_KEY": NEW})
    assert r.returncode == 0, r
    assert "unexpected error" not in r.stderr


# -- operator: a failure after the swap ---------------------------------------------------------------


class _ReadBackFails(PassThroughStore):
    """A real local store whose reads of `config` fail (a TransientError past the retries) once it was replaced."""

    replaced = False

    def replace(self, key: str, data: bytes, *, expected: bytes) -> None:
        self.inner.replace(key, data, expected=expected)  # type: ignore[attr-defined]
        self.replaced = True

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if self.replaced and key == "config":
            raise TransientError("get config: connection reset (gave up after 5 attempts in 30 s)")
        return self.inner.get_range(key, offset, length)

    def get(self, key: str) -> bytes:
        return self.get_range(key, 0, 1 << 20)


def test_an_error_after_the_swap_says_the_new_passphrase_is_in_force(tmp_path: Path) -> None:
    """Finding (medium): when reading `config` back failed after the replace had succeeded, passwd ended with
    the storage error alone ("get config: connection reset"), exit 1, as if nothing had changed: an operator who
    typed the new passphrase and did not keep it, or who reverts the hosts to the old one, is locked out. Fixed:
    the error says the passphrase WAS changed and the new one is in force."""
    url = _encrypted_repo(tmp_path)
    repo = Repository.open(_ReadBackFails(LocalStore(url)), Secret(OLD))  # type: ignore[arg-type]
    with pytest.raises(RepositoryError) as err:
        repo.change_passphrase(Secret(OLD), Secret(NEW))
    text = f"{err.value.message} {err.value.hint}"
    assert "was changed" in text and "new passphrase" in text.lower(), text
    assert OLD not in text and NEW not in text
    Repository.open(LocalStore(url), Secret(NEW))  # and it was: the new one opens

    # the same when the replace's own answer was lost on its last attempt: it may have been written
    class _AnswerLost(PassThroughStore):
        def replace(self, key: str, data: bytes, *, expected: bytes) -> None:
            self.inner.replace(key, data, expected=expected)  # type: ignore[attr-defined]
            raise TransientError(f"replace {key}: connection reset (gave up after 5 attempts in 120 s)")

    repo = Repository.open(_AnswerLost(LocalStore(url)), Secret(NEW))  # type: ignore[arg-type]
    with pytest.raises(RepositoryError) as err:
        repo.change_passphrase(Secret(NEW), Secret(OLD))
    text = f"{err.value.message} {err.value.hint}"
    assert "may have been replaced" in text and "NEW passphrase" in text, text
    Repository.open(LocalStore(url), Secret(OLD))  # (it was)


# -- operator: who may read `config` after the swap ---------------------------------------------------


def test_the_new_config_keeps_the_old_files_mode_and_owner(tmp_path: Path) -> None:
    """Finding (medium): on a local directory the new `config` was a fresh file, 0644 under the usual umask and
    owned by whoever ran passwd. A repository kept 0600 by its service user and a `sudo dbre key passwd` left a
    root-owned `config` the service user cannot read: every later backup failed ("Permission denied"); a
    `config` made read-only (0444) against accidents became writable again. Fixed: the new file takes the old
    one's mode, and its owner and group when the run may give them (root)."""
    url = _encrypted_repo(tmp_path)
    config = Path(url) / "config"
    for mode in (0o600, 0o444):
        os.chmod(config, mode)
        owner = (65534, 65534) if os.geteuid() == 0 else (os.geteuid(), os.getegid())  # (nobody: root gives it)
        os.chown(config, *owner)
        old, new = (OLD, NEW) if mode == 0o600 else (NEW, OLD)
        before = config.read_bytes()
        assert _passwd(url, old, new).returncode == 0
        assert config.read_bytes() != before
        st = config.stat()
        assert stat.S_IMODE(st.st_mode) == mode, oct(st.st_mode)
        assert (st.st_uid, st.st_gid) == owner


# -- operator: a non-UTF-8 new key file -------------------------------------------------------------


def test_a_new_key_file_that_is_not_text_is_one_line_without_its_bytes(tmp_path: Path) -> None:
    """Finding (low): a --new-key-file that is not text in the locale's encoding (a Latin-1 "é") ended in
    "unexpected error: UnicodeDecodeError: ... can't decode byte 0xe9 in position 5", exit 1: not the one line
    with a fix, and it names a byte of the secret and where it is. Fixed: exit 2, one line, no byte shown."""
    url = _encrypted_repo(tmp_path)
    before = (Path(url) / "config").read_bytes()
    bad = tmp_path / "new-key"
    bad.write_bytes(b"passw\xe9rd-new\n")
    r = _passwd(url, OLD, None, "--new-key-file", str(bad))
    line = assert_one_line_error(r, 2, "new key file", "UTF-8")
    assert "0xe9" not in line and "position" not in line, line
    assert (Path(url) / "config").read_bytes() == before


# -- operator: a versioned bucket without Object Lock ------------------------------------------------


def test_a_versioned_bucket_is_told_the_old_config_stays(s3_client: Any, tmp_path: Path) -> None:
    """Finding (low): in a bucket with versioning on but no Object Lock (a common DR setting), the old `config`
    stays as a noncurrent version and opens with the OLD passphrase for whoever reads versions, until a lifecycle
    rule or someone deletes it; passwd said so only under Object Lock. Fixed: when `config` has more than one
    version after the change, the output says so (one ListObjectVersions; not said if that is denied)."""
    bucket = unique_bucket_name("dbre-review-ver")
    s3_client.create_bucket(Bucket=bucket)
    s3_client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    url = _encrypted_repo(tmp_path, f"s3://{bucket}/repo")
    r = _passwd(url, OLD, NEW)
    assert r.returncode == 0, r
    assert "version" in r.stdout and "OLD passphrase" in r.stdout, r.stdout
    r = _passwd(url, NEW, OLD, "--json")
    assert r.returncode == 0, r
    assert any("version" in n for n in json.loads(r.stdout)["notes"]), r.stdout
    # an unversioned bucket: no such note
    other = unique_bucket_name("dbre-review-nov")
    s3_client.create_bucket(Bucket=other)
    (tmp_path / "other").mkdir()
    r = _passwd(_encrypted_repo(tmp_path / "other", f"s3://{other}/repo"), OLD, NEW)
    assert r.returncode == 0 and "noncurrent" not in r.stdout, r.stdout


# -- operator: disk full while the new config is written ---------------------------------------------


_RUN = f"""
import resource, signal, sys
import dbre.repository.crypto
dbre.repository.crypto.SCRYPT_N = {FAST_N}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["dbre", "key", "passwd", "--repo", sys.argv[2]]
from dbre.cli import main
main()
"""


def test_disk_full_while_the_new_config_is_written_changes_nothing(tmp_path: Path) -> None:
    """Holds (no finding): a write of the new `config` that fails for space (EFBIG under RLIMIT_FSIZE, the path
    ENOSPC takes too) ends in one line naming the disk, exit 1; `config` is byte for byte the old one, no temp
    file is left in .tmp and the lock is gone."""
    url = _encrypted_repo(tmp_path)
    before = (Path(url) / "config").read_bytes()
    env = dbre_env({"DBRE_ENCRYPTION_KEY": OLD, "DBRE_NEW_ENCRYPTION_KEY": NEW})
    r = subprocess.run([sys.executable, "-c", _RUN, str(len(before) // 2), url], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1, r
    assert "config: disk full" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (Path(url) / "config").read_bytes() == before
    assert not list((Path(url) / ".tmp").iterdir())
    assert not list(LocalStore(url).list("locks/"))


# -- attacker: a locked version of `config` that asks for a dear scrypt ------------------------------


def test_a_dear_scrypt_in_an_attackers_locked_config_version_is_not_derived(
        s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (low): `_newer_locked_config` ran one scrypt per locked version of `config` at the version's own
    parameters. An attacker who can write the bucket adds locked versions with the repository's id asking for
    p=16 at the memory cap (16 derivations of 256 MiB each, ~20-30 s a version here): after a passwd, every
    `verify --immutable` pays that for each such version. Fixed: a version asking for more than today's
    parameters or the oldest config's (the most a passwd writes) is skipped without deriving. Shown with p=16
    at a small n (the test counts derivations rather than paying for them)."""
    import hashlib

    from dbre.repository.immutable import verify_immutable

    bucket = unique_bucket_name("dbre-review-dear")
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    url = f"s3://{bucket}/repo"
    assert cli("init", "--repo", url, "--object-lock", "governance:1d",
               env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    _encrypted_repo(tmp_path, url)
    real = s3_client.get_object(Bucket=bucket, Key="repo/config")["Body"].read()
    dear = json.loads(real)
    dear["encryption"] = {**dear["encryption"], "n": 2**13, "r": 8, "p": 16}
    until = datetime.now(UTC) + timedelta(days=2)
    for body in (json.dumps(dear).encode(), real):
        s3_client.put_object(Bucket=bucket, Key="repo/config", Body=body, ObjectLockMode="GOVERNANCE",
                             ObjectLockRetainUntilDate=until)
    assert _passwd(url, OLD, NEW).returncode == 0
    calls: list[tuple[int, int, int]] = []
    real_scrypt = hashlib.scrypt

    def counted(password: bytes, *, salt: bytes, n: int, r: int, p: int, **kw: Any) -> bytes:
        calls.append((n, r, p))
        return real_scrypt(password, salt=salt, n=n, r=r, p=p, **kw)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    report = verify_immutable(url, Secret(NEW))
    assert report.ok, report.summary()
    assert (2**13, 8, 16) not in calls, calls


# -- operator: a stronger scrypt is kept ----------------------------------------------------------------


def test_passwd_never_weakens_the_stored_scrypt_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (low): the new config was always wrapped at this dbre's parameters, so a repository made with
    stronger ones (a newer dbre, or one tuned up) was silently weakened by a passwd run with this one. Fixed:
    the dearer of the two is kept."""
    monkeypatch.setattr("dbre.repository.crypto.SCRYPT_N", FAST_N * 2)
    url = _encrypted_repo(tmp_path)
    monkeypatch.setattr("dbre.repository.crypto.SCRYPT_N", FAST_N)
    assert _passwd(url, OLD, NEW).returncode == 0
    assert json.loads((Path(url) / "config").read_bytes())["encryption"]["n"] == FAST_N * 2
    monkeypatch.setattr("dbre.repository.crypto.SCRYPT_N", FAST_N * 4)  # and today's when they are dearer
    assert _passwd(url, NEW, OLD).returncode == 0
    assert json.loads((Path(url) / "config").read_bytes())["encryption"]["n"] == FAST_N * 4


# -- operator: a flow run already going ---------------------------------------------------------------


def test_a_flows_later_task_needs_the_new_passphrase_and_the_output_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding (low, the output): passwd said "runs already going keep working (they hold the master key)".
    True of a command, not of a Prefect flow run: each task opens the repository again with the key its block
    or env gives, so a flow run going during the change fails at its next task. Fixed (the notes): they say so
    and give the order (pause the deployments, change, update their key, resume)."""
    from tasks.verify import verify_repository

    url = _encrypted_repo(tmp_path)
    monkeypatch.setenv("DBRE_ENCRYPTION_KEY", OLD)
    assert verify_repository.fn(url)["ok"] is True  # the flow's first task, before the change
    r = _passwd(url, OLD, NEW)
    assert r.returncode == 0
    with pytest.raises(RepositoryError, match="wrong encryption key"):
        verify_repository.fn(url)  # its next task, after it
    assert "Prefect flow" in r.stdout and "pause the deployments" in r.stdout, r.stdout


# -- operator: a passphrase in the env that is not UTF-8 ------------------------------------------


def test_a_passphrase_in_the_env_that_is_not_utf8_is_one_line_without_its_bytes(tmp_path: Path) -> None:
    """Finding (low): a DBRE_NEW_ENCRYPTION_KEY (or DBRE_ENCRYPTION_KEY) holding bytes that are not UTF-8 (a
    Latin-1 "é", which Python keeps as a surrogate) ended in "unexpected error: UnicodeEncodeError: 'utf-8'
    codec can't encode character '\\udce9' in position 5", exit 1: a byte of the secret and where it is.
    Fixed: one line, exit 2, no byte shown (the old passphrase's case in every command, through `_derive`)."""
    url = _encrypted_repo(tmp_path)
    before = (Path(url) / "config").read_bytes()
    for old, new in ((OLD, "passw\udce9rd-new"), ("passw\udce9rd-old", NEW)):
        line = assert_one_line_error(_passwd(url, old, new), 2, "not UTF-8")
        assert "udce9" not in line and "position" not in line, line
    assert (Path(url) / "config").read_bytes() == before


def test_a_key_file_that_is_not_text_is_one_line_without_its_bytes(tmp_path: Path) -> None:
    """--key-file for any command: a file that is not UTF-8 is one line, exit 2, no byte of it shown."""
    from typer.testing import CliRunner

    from dbre.cli import app

    bad = tmp_path / "key"
    bad.write_bytes(b"pass\xe9word\n")
    result = CliRunner().invoke(app, ["snapshots", "--repo", str(tmp_path / "repo"), "--key-file", str(bad)])
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "not UTF-8" in lines[0], result.output
    assert "xe9" not in result.output and "position" not in result.output, result.output
