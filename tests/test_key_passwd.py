"""`dbre key passwd` (issue 15): the same master key re-wrapped under a new passphrase, `config` replaced only if
unchanged, on a local directory and on S3 (moto_server): the new passphrase opens, the old one fails, every
snapshot restores, bad input changes nothing, racing runs leave exactly one new passphrase, and a kill -9 at
each step leaves the old config or the new one, both valid. Under Object Lock the old version stays locked
and `verify --immutable` still passes with the new passphrase."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dbre.repository.crypto import CONFIG_MAC_INFO, PAGE_HASH_INFO, WrongKeyError
from dbre.repository.repo import Repository
from dbre.secrets import Secret
from dbre.storage.base import Conflict, NotFound, ReplacingStore, Store
from dbre.storage.local import LocalStore
from dbre.storage.retry import RetryingStore
from dbre.storage.s3 import S3Store
from tests.conftest import unique_bucket_name
from tests.dbfactory import assert_one_line_error, assert_same_db, change_rows, cli, dbre_env, make_db

OLD, NEW, OTHER = "old passphrase 1", "new passphrase 2", "other passphrase 3"
SECRETS = (OLD, NEW, OTHER)


FAST_N = 2**12  # scrypt's cost in the repositories made here (stored in each config, honoured when opening)


@pytest.fixture(autouse=True)
def _own_cache_and_fast_scrypt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own cache; configs written here (in this process and the spawned ones) use scrypt
    n=2^12 instead of 2^17: the tests are of the passphrase's handling, not of scrypt's cost."""
    monkeypatch.setenv("DBRE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("dbre.repository.crypto.SCRYPT_N", FAST_N)


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "repo")
    return str(request.getfixturevalue("s3_repo_url"))


def _store(url: str) -> Store:
    return LocalStore(url) if not url.startswith("s3://") else S3Store.from_url(url)


def _config(url: str) -> bytes:
    return _store(url).get("config")


def _no_secret(*outputs: str) -> None:
    for out in outputs:
        for s in SECRETS:
            assert s not in out, "a passphrase was printed"


def _passwd(url: str, old: str | None, new: str | None, *extra: str) -> Any:
    env = {"DBRE_ENCRYPTION_KEY": old, "DBRE_NEW_ENCRYPTION_KEY": new}
    r = cli("key", "passwd", "--repo", url, *extra, env=env)
    _no_secret(r.stdout, r.stderr)
    return r


# -- the store's replace-if-unchanged ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["local", "s3", "s3-retrying"])
def test_replace_only_if_unchanged(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "local":
        store: Any = LocalStore(tmp_path / "r")
    else:
        s3 = S3Store.from_url(request.getfixturevalue("s3_repo_url"))
        store = RetryingStore(s3) if backend == "s3-retrying" else s3
    assert isinstance(store, ReplacingStore)
    with pytest.raises(NotFound):
        store.replace("k", b"new", expected=b"old")
    store.put("k", b"old")
    with pytest.raises(Conflict):
        store.replace("k", b"new", expected=b"other")
    assert store.get("k") == b"old"
    store.replace("k", b"new", expected=b"old")
    assert store.get("k") == b"new"
    with pytest.raises(Conflict):  # a second replace from the same old bytes
        store.replace("k", b"newer", expected=b"old")
    assert store.get("k") == b"new"
    # racing replaces from the same bytes: exactly one wins, its bytes are there
    for round_ in range(3):
        base = store.get("k")
        wins: list[bytes] = []
        losses: list[str] = []
        start = threading.Barrier(4)

        def one(data: bytes, base: bytes = base, start: threading.Barrier = start, wins: list[bytes] = wins,
                losses: list[str] = losses) -> None:
            start.wait()
            try:
                store.replace("k", data, expected=base)
                wins.append(data)
            except Conflict:
                losses.append("conflict")

        threads = [threading.Thread(target=one, args=(f"r{round_}-{i}".encode(),)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if backend == "local":  # the flock: exactly one
            assert len(wins) == 1 and len(losses) == 3, (wins, losses)
        else:
            # moto checks If-Match and then writes, with no lock between (s3/responses.py put_object): two
            # threads can both pass (seen once in ~10 rounds). AWS evaluates it atomically; whole passwd runs
            # are serialised by the exclusive repository lock and read `config` back anyway.
            assert 1 <= len(wins) and len(wins) + len(losses) == 4, (wins, losses)
        assert store.get("k") in wins
    if backend == "local":
        assert not list((tmp_path / "r" / ".tmp").iterdir())  # no temp file left by a refused replace


# -- the command ----------------------------------------------------------------------------------


def test_passwd_keeps_every_snapshot_and_only_the_new_passphrase_opens(repo_url: str, tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", mb=0.5)
    assert cli("backup", db, "--repo", repo_url, "--db", "app", env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    first = tmp_path / "first.db"
    shutil.copy(db, first)
    before = _config(repo_url)
    packs_before = sorted(_store(repo_url).list("packs/"))

    r = _passwd(repo_url, OLD, NEW)
    assert r.returncode == 0, r
    assert "passphrase changed" in r.stdout and "offsite copies" in r.stdout and "keep working" in r.stdout, r
    after = _config(repo_url)
    assert after != before
    assert sorted(_store(repo_url).list("packs/")) == packs_before  # no data touched
    old_cfg, new_cfg = json.loads(before), json.loads(after)
    assert {k: v for k, v in old_cfg.items() if k not in ("encryption", "mac")} == \
        {k: v for k, v in new_cfg.items() if k not in ("encryption", "mac")}
    assert new_cfg["encryption"]["salt"] != old_cfg["encryption"]["salt"]
    assert new_cfg["encryption"]["n"] == FAST_N  # wrapped at the current scrypt parameters
    assert new_cfg["encryption"]["wrapped_key"] != old_cfg["encryption"]["wrapped_key"]
    # the same master key: the derived keys of the new config (new passphrase) are those of the old (old one)
    opened = Repository.open(_store(repo_url), Secret(NEW))
    assert opened.raw_config == after
    old_sealer = Repository._sealer(old_cfg, Secret(OLD), repo_url)
    for info in (CONFIG_MAC_INFO, PAGE_HASH_INFO):
        assert opened.sealer.derive_key(info) == old_sealer.derive_key(info)
    with pytest.raises(WrongKeyError):
        Repository._sealer(new_cfg, Secret(OLD), repo_url)

    # the old passphrase: the existing one line, exit 1; the new one opens
    assert_one_line_error(cli("snapshots", "--repo", repo_url, env={"DBRE_ENCRYPTION_KEY": OLD}), 1,
                          "wrong encryption key")
    # a snapshot taken before restores with the new passphrase; a backup after it chains onto it
    change_rows(db, 20)
    assert cli("backup", db, "--repo", repo_url, "--db", "app", env={"DBRE_ENCRYPTION_KEY": NEW}).returncode == 0
    snaps = json.loads(cli("snapshots", "--repo", repo_url, "--json", env={"DBRE_ENCRYPTION_KEY": NEW}).stdout)
    items = snaps if isinstance(snaps, list) else snaps.get("snapshots", snaps)
    ids = [s.get("id") for s in items]
    assert len(ids) == 2, snaps
    for snap, source in ((ids[0], first), (ids[1], db)):
        out = tmp_path / f"restored-{snap}.db"
        r = cli("restore", "--repo", repo_url, "--db", "app", "--snapshot", snap, "--to", out,
                env={"DBRE_ENCRYPTION_KEY": NEW})
        assert r.returncode == 0, r
        assert_same_db(source, out)
    assert cli("verify", "--repo", repo_url, "--read-data", env={"DBRE_ENCRYPTION_KEY": NEW}).returncode == 0

    # and back again: the passphrase can change any number of times
    assert _passwd(repo_url, NEW, OTHER).returncode == 0
    assert cli("snapshots", "--repo", repo_url, env={"DBRE_ENCRYPTION_KEY": OTHER}).returncode == 0
    assert not _store(repo_url).exists("locks/") and not list(_store(repo_url).list("locks/"))  # lock released


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.slow)])
def test_bad_input_changes_nothing(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    repo_url = str(tmp_path / "repo") if backend == "local" else str(request.getfixturevalue("s3_repo_url"))
    db = make_db(tmp_path / "app.db", mb=0.1)
    assert cli("backup", db, "--repo", repo_url, env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    before = _config(repo_url)
    # a wrong old passphrase: the existing line, exit 1, config byte for byte
    assert_one_line_error(_passwd(repo_url, OTHER, NEW), 1, "wrong encryption key")
    assert _config(repo_url) == before
    assert_one_line_error(_passwd(repo_url, None, NEW), 1, "is encrypted", "DBRE_ENCRYPTION_KEY")
    # the new passphrase: empty, equal to the old, surrounded by spaces, missing (no terminal), an empty file
    assert_one_line_error(_passwd(repo_url, OLD, ""), 2, "empty")
    assert_one_line_error(_passwd(repo_url, OLD, OLD), 2, "the new passphrase is the old one")
    assert_one_line_error(_passwd(repo_url, OLD, f" {NEW}"), 2, "white space")
    assert_one_line_error(_passwd(repo_url, OLD, None), 2, "no new passphrase", "--new-key-file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert_one_line_error(_passwd(repo_url, OLD, None, "--new-key-file", empty), 2, "empty")
    assert_one_line_error(_passwd(repo_url, OLD, None, "--new-key-file", tmp_path / "none"), 2, "new key file")
    same = tmp_path / "same"
    same.write_text(OLD + "\n")  # read stripped, as --key-file is: the old passphrase again
    assert_one_line_error(_passwd(repo_url, OLD, None, "--new-key-file", same), 2, "is the old one")
    assert _config(repo_url) == before
    assert not list(_store(repo_url).list("locks/"))
    # a key file works for both
    old_file, new_file = tmp_path / "old", tmp_path / "new"
    old_file.write_text(OLD + "\n")
    new_file.write_text(NEW + "\n")
    r = _passwd(repo_url, None, None, "--key-file", old_file, "--new-key-file", new_file, "--json")
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["changed"] is True
    assert cli("snapshots", "--repo", repo_url, "--key-file", new_file).returncode == 0


def test_plain_missing_and_format_1_repositories_are_refused(tmp_path: Path, s3_repo_url: str) -> None:
    db = make_db(tmp_path / "app.db", mb=0.1)
    for url in (str(tmp_path / "plain"), s3_repo_url):
        assert cli("backup", db, "--repo", url).returncode == 0
        before = _config(url)
        for old in (None, OLD):
            assert_one_line_error(_passwd(url, old, NEW), 2, "is not encrypted", "no passphrase to change")
        assert _config(url) == before
    assert_one_line_error(_passwd(str(tmp_path / "nothing"), OLD, NEW), 1, "no repository")
    assert not (tmp_path / "nothing").exists()
    v1 = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "data" / "v1" / "encrypted", v1)
    before = (v1 / "config").read_bytes()
    assert_one_line_error(_passwd(str(v1), "v1-golden-passphrase", NEW), 2, "format 1", "dbre migrate")
    assert (v1 / "config").read_bytes() == before


# -- concurrency and kill -9 ------------------------------------------------------------------------


_RUN = f"""
import sys
import dbre.repository.crypto
dbre.repository.crypto.SCRYPT_N = {FAST_N}
sys.argv = ["dbre", *sys.argv[1:]]
from dbre.cli import main
main()
"""


def _spawn_passwd(url: str, old: str, new: str, *extra: str) -> subprocess.Popen[str]:
    env = dbre_env({"DBRE_ENCRYPTION_KEY": old, "DBRE_NEW_ENCRYPTION_KEY": new})
    return subprocess.Popen([sys.executable, "-c", _RUN, *extra, "key", "passwd", "--repo", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _opens_with(url: str) -> list[str]:
    """Which of the test's passphrases open the repository now."""
    out = []
    for p in SECRETS:
        try:
            Repository.open(_store(url), Secret(p))
            out.append(p)
        except WrongKeyError:
            pass
    return out


@pytest.mark.parametrize("backend,retry", [
    ("local", False), ("s3", True),
    pytest.param("local", True, marks=pytest.mark.slow), pytest.param("s3", False, marks=pytest.mark.slow),
])
def test_racing_passwd_runs_leave_exactly_one_new_passphrase(backend: str, retry: bool, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """Two runs at once from the same old passphrase: one wins; the other is refused by the exclusive lock, or
    (waiting for it with --retry-lock) finds `config` changed under the lock. Never a mixture, never lost."""
    repo_url = str(tmp_path / "repo") if backend == "local" else str(request.getfixturevalue("s3_repo_url"))
    db = make_db(tmp_path / "app.db", mb=0.1)
    assert cli("backup", db, "--repo", repo_url, env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    extra = ("--retry-lock", "30s") if retry else ()
    procs = [_spawn_passwd(repo_url, OLD, NEW, *extra), _spawn_passwd(repo_url, OLD, OTHER, *extra)]
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    for out, err in results:
        _no_secret(out, err)
    assert sorted(codes) == [0, 1], (codes, results)
    loser = results[codes.index(1)][1]
    assert ("locked by" in loser or "changed since it was read" in loser
            or "wrong encryption key" in loser), loser
    winner = (NEW, OTHER)[codes.index(0)]
    assert _opens_with(repo_url) == [winner]
    assert not list(_store(repo_url).list("locks/"))


_KILL_AT = r'''
import os, sys, time
point, url = sys.argv[1], sys.argv[2]
import dbre.repository.crypto
dbre.repository.crypto.SCRYPT_N = 2**12
from dbre.storage import local, s3

def pause():
    print("PAUSED", flush=True)
    time.sleep(120)

if point == "before-replace":  # the lock is held, the new config checked: nothing written yet
    for cls in (local.LocalStore, s3.S3Store):
        def wrap(orig):
            def replace(self, *a, **k):
                pause()
                return orig(self, *a, **k)
            return replace
        cls.replace = wrap(cls.replace)
elif point == "before-rename":  # local: the new config written and fsynced in .tmp, not yet renamed
    real = os.replace
    def replace(src, dst, **k):  # (LocalStore renames by name within folder descriptors)
        if str(dst) == "config" or str(dst).endswith("/config"):
            pause()
        return real(src, dst, **k)
    os.replace = replace
elif point == "after-rename":  # local: renamed into place (and the folder fsynced), the lock still held
    orig = local.LocalUpload.commit
    def commit(self, **k):
        orig(self, **k)
        if self.key == "config":
            pause()
    local.LocalUpload.commit = commit
elif point == "before-put":  # S3: the ETag read, the conditional PUT not sent
    orig = s3.S3Store._put
    def put(self, key, data, condition):
        if key == "config":
            pause()
        return orig(self, key, data, condition)
    s3.S3Store._put = put
elif point == "after-put":  # S3: the PUT answered, the lock still held
    orig = s3.S3Store._put
    def put(self, key, data, condition):
        orig(self, key, data, condition)
        if key == "config":
            pause()
    s3.S3Store._put = put
sys.argv = ["dbre", "key", "passwd", "--repo", url]
from dbre.cli import main
main()
'''


def _kill_at(point: str, url: str) -> None:
    env = dbre_env({"DBRE_ENCRYPTION_KEY": OLD, "DBRE_NEW_ENCRYPTION_KEY": NEW})
    proc = subprocess.Popen([sys.executable, "-c", _KILL_AT, point, url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the pause (or the end of a run that never paused)
        assert line.strip() == "PAUSED", (point, line, proc.stderr.read() if proc.stderr else "")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


@pytest.mark.parametrize("backend,points", [
    ("local", [("before-replace", OLD), ("before-rename", OLD), ("after-rename", NEW)]),
    ("s3", [("before-replace", OLD), ("before-put", OLD), ("after-put", NEW)]),
])
def test_kill_9_leaves_the_old_or_the_new_config_both_valid(backend: str, points: list[tuple[str, str]],
                                                            tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A real SIGKILL of a `dbre key passwd` process paused at each step (by a test-only patch in that process):
    before the swap the old config opens with the old passphrase, after it the new one with the new; the data
    restores with whichever opens, and the next passwd is not blocked by the dead run's lock (same host: its
    pid is gone)."""
    db = make_db(tmp_path / "app.db", mb=0.1)
    for point, expect in points:
        url = str(tmp_path / f"repo-{point}") if backend == "local" else str(request.getfixturevalue("s3_repo_url"))
        assert cli("backup", db, "--repo", url, env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
        before = _config(url)
        _kill_at(point, url)
        assert _opens_with(url) == [expect], point
        if expect == OLD:
            assert _config(url) == before, point
        if point == points[-1][0]:
            out = tmp_path / f"out-{point}.db"
            r = cli("restore", "--repo", url, "--db", "app", "--to", out, env={"DBRE_ENCRYPTION_KEY": expect})
            assert r.returncode == 0, r
            assert_same_db(db, out)
            # the dead run's exclusive lock does not block the next passwd (same host, its pid is gone)
            r = _passwd(url, expect, OTHER)
            assert r.returncode == 0, (point, r)
            assert _opens_with(url) == [OTHER]


# -- Object Lock --------------------------------------------------------------------------------------


def test_object_lock_keeps_the_old_version_and_verify_immutable_opens_the_new(s3_client: Any, tmp_path: Path) -> None:
    from dbre.repository.immutable import open_locked, verify_immutable

    bucket = unique_bucket_name("dbre-lock")
    s3_client.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    url = f"s3://{bucket}/repo"
    env_old = {"DBRE_ENCRYPTION_KEY": OLD}
    assert cli("init", "--repo", url, "--object-lock", "governance:1d", env=env_old).returncode == 0
    db = make_db(tmp_path / "app.db", mb=0.1)
    assert cli("backup", db, "--repo", url, env=env_old).returncode == 0

    r = _passwd(url, OLD, NEW)
    assert r.returncode == 0, r
    assert "Object Lock" in r.stdout and "OLD passphrase" in r.stdout and "retention" in r.stdout, r
    versions = [v for v in s3_client.list_object_versions(Bucket=bucket, Prefix="repo/config")["Versions"]
                if v["Key"] == "repo/config"]
    assert len(versions) == 2
    for v in versions:  # both versions locked: the new one like every object the repository writes
        head = s3_client.head_object(Bucket=bucket, Key="repo/config", VersionId=v["VersionId"])
        assert head.get("ObjectLockMode") == "GOVERNANCE"
        assert head["ObjectLockRetainUntilDate"].timestamp() > time.time()
    assert _opens_with(url) == [NEW]
    # a writer after passwd (it follows the first version of `object-lock`, sealed under the same master key)
    change_rows(db, 10)
    assert cli("backup", db, "--repo", url, env={"DBRE_ENCRYPTION_KEY": NEW}).returncode == 0
    # the locked versions: with the new passphrase the newer locked config opens, and every snapshot is protected
    report = verify_immutable(url, Secret(NEW))
    assert report.ok, report.summary()
    assert len(report.protected) == 2
    r = cli("verify", "--repo", url, "--immutable", env={"DBRE_ENCRYPTION_KEY": NEW})
    assert r.returncode == 0, r
    # the old version still opens with the old passphrase for whoever reads versions (said in the output)
    old_view = open_locked(url, Secret(OLD))
    assert json.loads(old_view.raw_config or b"{}")["encryption"]["salt"] != \
        json.loads(_config(url))["encryption"]["salt"]
    with pytest.raises(WrongKeyError):
        open_locked(url, Secret(OTHER))


def test_an_offsite_copy_keeps_its_own_passphrase_until_changed_there(tmp_path: Path) -> None:
    primary, copy = str(tmp_path / "primary"), str(tmp_path / "copy")
    db = make_db(tmp_path / "app.db", mb=0.1)
    assert cli("backup", db, "--repo", primary, env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    assert cli("copy", "--repo", primary, "--to", copy, env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    r = _passwd(primary, OLD, NEW)
    assert r.returncode == 0 and "dbre key passwd --repo COPY" in r.stdout, r
    # copying on with the new passphrase works (the copy's config authenticates under the same master key)
    change_rows(db, 5)
    assert cli("backup", db, "--repo", primary, env={"DBRE_ENCRYPTION_KEY": NEW}).returncode == 0
    r = cli("copy", "--repo", primary, "--to", copy, env={"DBRE_ENCRYPTION_KEY": NEW})
    assert r.returncode == 0, r
    assert _opens_with(copy) == [OLD]  # the copy's own config: the old passphrase, as the output said
    assert _passwd(copy, OLD, NEW).returncode == 0
    assert _opens_with(copy) == [NEW]
    out = tmp_path / "from-copy.db"
    assert cli("restore", "--repo", copy, "--db", "app", "--to", out, env={"DBRE_ENCRYPTION_KEY": NEW}).returncode == 0
    assert_same_db(db, out)


def _on_a_terminal(url: str, answers: list[str], env: dict[str, str | None]) -> tuple[int, str]:
    """Run `dbre key passwd` on a pseudo-terminal (its controlling terminal), answering each prompt in turn;
    returns the exit code and everything the terminal showed."""
    import pty
    import select

    argv = [sys.executable, "-c", _RUN, "key", "passwd", "--repo", url]
    status = -1
    full_env = dbre_env(env)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.execve(sys.executable, argv, full_env)
    shown, pending, deadline = b"", list(answers), time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            # getpass writes its " " once echo is off and typed-ahead input flushed: answer only then
            if pending and shown.endswith(b": "):
                os.write(fd, pending.pop(0).encode() + b"\n")
        else:
            os.kill(pid, signal.SIGKILL)  # stuck at a prompt: the assertions below then fail
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        os.close(fd)
        if pid:  # (an exception above: the child is ours and not reaped yet)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), shown.decode(errors="replace")


def test_on_a_terminal_both_passphrases_are_typed_hidden(tmp_path: Path) -> None:
    url = str(tmp_path / "repo")
    db = make_db(tmp_path / "app.db", mb=0.1)
    assert cli("backup", db, "--repo", url, env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    before = _config(url)
    no_keys: dict[str, str | None] = {"DBRE_ENCRYPTION_KEY": None, "DBRE_NEW_ENCRYPTION_KEY": None}
    code, shown = _on_a_terminal(url, [OLD, NEW, OTHER], no_keys)  # typed twice, differently
    assert code == 2 and "differ" in shown, shown
    assert _config(url) == before
    code, shown = _on_a_terminal(url, [OTHER], no_keys)  # a wrong current passphrase: stops before the new
    assert code == 1 and "wrong encryption key" in shown and "New passphrase" not in shown, shown
    code, shown = _on_a_terminal(url, [OLD, NEW, NEW], no_keys)
    assert code == 0 and "Current passphrase" in shown and "New passphrase again" in shown, shown
    assert "passphrase changed" in shown, shown
    _no_secret(shown)  # nothing typed is echoed
    assert _opens_with(url) == [NEW]


# -- failure paths in the core ------------------------------------------------------------------------


def _encrypted_repo(tmp_path: Path) -> str:
    url = str(tmp_path / "repo")
    assert cli("backup", make_db(tmp_path / "app.db", mb=0.1), "--repo", url,
               env={"DBRE_ENCRYPTION_KEY": OLD}).returncode == 0
    return url


def test_config_changed_after_open_is_refused_and_kept(tmp_path: Path) -> None:
    """A run that opened the repository before another one changed the passphrase finds `config` changed
    under its lock: refused, the other run's config stays (no lost update)."""
    url = _encrypted_repo(tmp_path)
    slow = Repository.open(LocalStore(url), Secret(OLD))
    assert _passwd(url, OLD, NEW).returncode == 0
    winner = _config(url)
    with pytest.raises(Exception, match="changed since it was read") as err:
        slow.change_passphrase(Secret(OLD), Secret(OTHER))
    assert OLD not in str(err.value) and OTHER not in str(err.value)
    assert _config(url) == winner and _opens_with(url) == [NEW]
    assert not list(LocalStore(url).list("locks/"))


def test_a_lost_lock_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dbre.repository.lock import Lock, LockLostError

    url = _encrypted_repo(tmp_path)
    before = _config(url)

    def lost(self: Lock, what: str, **kwargs: Any) -> None:
        raise LockLostError(f"{what}: the repository lock was removed by another run", "run it again")

    monkeypatch.setattr(Lock, "check_alive", lost)
    repo = Repository.open(LocalStore(url), Secret(OLD))
    with pytest.raises(LockLostError):
        repo.change_passphrase(Secret(OLD), Secret(NEW))
    assert _config(url) == before and not list(LocalStore(url).list("locks/"))
    assert not list((Path(url) / ".tmp").glob("*"))  # nothing half-written either


def test_a_replace_whose_answer_was_lost_is_recognised_as_its_own(tmp_path: Path) -> None:
    """The first attempt wrote, then its answer was lost (a TransientError): the retry meets a Conflict, reads
    the key back, finds exactly its bytes, and succeeds; different bytes there stay a Conflict."""
    from dbre.storage.base import TransientError
    from tests.stores import PassThroughStore

    class LosesFirstAnswer(PassThroughStore):
        calls = 0

        def replace(self, key: str, data: bytes, *, expected: bytes) -> None:
            self.calls += 1
            self.inner.replace(key, data, expected=expected)  # type: ignore[attr-defined]
            if self.calls == 1:
                raise TransientError(f"replace {key}: connection reset")

    inner = LocalStore(tmp_path / "r")
    inner.put("config", b"old")
    flaky = LosesFirstAnswer(inner)
    RetryingStore(flaky, base_delay=0.01).replace("config", b"new", expected=b"old")  # type: ignore[arg-type]
    assert flaky.calls == 2 and inner.get("config") == b"new"
    with pytest.raises(Conflict):
        RetryingStore(inner).replace("config", b"newer", expected=b"old")
    assert inner.get("config") == b"new"


def test_a_lock_held_past_the_wait_is_named_not_waited_on_forever(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A local replace waits for another's flock on the same file at most REPLACE_LOCK_WAIT seconds:
    a holder stopped mid-replace (here: a child process holding it, then stopped with SIGSTOP) is
    named in one line, and the file is unchanged; once the holder is gone the replace goes through."""
    import dbre.storage.local as local_mod
    from dbre.storage.base import TransientError

    monkeypatch.setattr(local_mod, "REPLACE_LOCK_WAIT", 0.5)
    store = LocalStore(str(tmp_path / "r"))
    store.put("config", b"old")
    path = tmp_path / "r" / "config"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        holder.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TransientError) as caught:
            store.replace("config", b"new", expected=b"old")
        assert 0.4 < time.monotonic() - started < 5
        assert "held its lock" in caught.value.message and str(path) in caught.value.hint
        assert "\n" not in str(caught.value)
        assert path.read_bytes() == b"old"
    finally:
        holder.kill()
        holder.wait()
    store.replace("config", b"new", expected=b"old")
    assert path.read_bytes() == b"new"
