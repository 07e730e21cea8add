"""`dbre --retry-lock D`: a run that meets a conflicting live lock (prune, forget) tries again for D instead
of failing at once; without it, it fails at once with one line that names the option. Local and S3."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dbre.errors import LockedError
from dbre.repository import lock as lock_mod
from dbre.repository.lock import hold, list_locks
from dbre.repository.repo import Repository
from tests.dbfactory import CliResult, assert_one_line_error, cli, make_db, run_dbre


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "repo")
    return f"s3://{request.getfixturevalue('s3_bucket')}/repo"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_db(tmp_path / "src.db", mb=0.5)


def _hold_exclusive_for(repo: Repository, seconds: float) -> threading.Thread:
    taken = threading.Event()

    def run() -> None:
        with hold(repo.store, "prune", exclusive=True):
            taken.set()
            time.sleep(seconds)

    t = threading.Thread(target=run)
    t.start()
    assert taken.wait(30)
    return t


def test_hold_waits_for_a_conflicting_lock_then_takes_it(repo_url: str, src: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With 20 s of retry, a shared lock asked while prune holds the repository for 2 s is taken after
    prune releases (not before: while waiting it leaves no lock object of its own); with 0 it is refused
    at once, and nothing of it stays."""
    assert cli("backup", src, "--repo", repo_url, "--db", "app").returncode == 0
    repo = Repository.open(repo_url)
    prune = _hold_exclusive_for(repo, 2.0)
    try:
        monkeypatch.setattr(lock_mod, "RETRY_SECONDS", 0.0)
        began = time.monotonic()
        with pytest.raises(LockedError, match="locked by prune"), hold(repo.store, "backup app"):
            pass
        assert time.monotonic() - began < 2.0
        assert [i.record.get("op") for i in list_locks(repo.store)] == ["prune"]
        monkeypatch.setattr(lock_mod, "RETRY_SECONDS", 20.0)
        began = time.monotonic()
        with hold(repo.store, "backup app"):
            waited = time.monotonic() - began
            assert sorted(i.record.get("op") for i in list_locks(repo.store)) == ["backup app"], "prune released first"
    finally:
        prune.join()
    assert 1.0 < waited < 15.0, waited
    assert list_locks(repo.store) == []


def test_cli_backup_with_retry_lock_waits_for_prune(repo_url: str, src: Path) -> None:
    """`dbre backup` beside a prune holding the repository: refused at once with one line naming
    --retry-lock (exit 1, no snapshot); with `--retry-lock 30s` (or DBRE_RETRY_LOCK) it waits and
    succeeds; a retry too short fails with the same line, saying how long it waited; a bad duration
    is a usage error (exit 2)."""
    assert cli("backup", src, "--repo", repo_url, "--db", "app").returncode == 0
    repo = Repository.open(repo_url)
    # the two refused runs take ~2 s each on S3, and much longer on a loaded machine: the third must
    # still find the lock held (9 s was not enough once in CI)
    prune = _hold_exclusive_for(repo, 25.0)
    try:
        r = run_dbre("backup", src, "--repo", repo_url, "--db", "app")
        assert_one_line_error(r, 1, "locked by prune", "--retry-lock")
        r = run_dbre("--retry-lock", "1s", "backup", src, "--repo", repo_url, "--db", "app")
        waiting, last = r.stderr.splitlines()  # a line when it starts waiting, the error when it gives up
        assert waiting.startswith("dbre: backup app: repository is locked by prune") and "waiting up to 1 s" in waiting
        assert_one_line_error(CliResult(r.returncode, r.stdout, last), 1, "locked by prune", "still after waiting 1 s",
                              "longer --retry-lock")
        assert len(repo.snapshots("app")) == 1
        r = run_dbre("--retry-lock", "30s", "backup", src, "--repo", repo_url, "--db", "app")
    finally:
        prune.join()
    assert r.returncode == 0, r
    assert "waiting up to" in r.stderr and "locked by prune" in r.stderr
    assert len(repo.snapshots("app")) == 2
    r = run_dbre("backup", src, "--repo", repo_url, "--db", "app", env={"DBRE_RETRY_LOCK": "30s"})
    assert r.returncode == 0 and "waiting" not in r.stderr, r  # nothing held: no wait, no message
    r = run_dbre("--retry-lock", "soon", "backup", src, "--repo", repo_url, "--db", "app")
    assert_one_line_error(r, 2, "--retry-lock", "cannot parse duration")
