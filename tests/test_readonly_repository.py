"""A repository that refuses writes can still be restored from (cold tester, finding A), and verify
holds a shared lock so a concurrent prune cannot make it report a false "not found" (finding B).

A real read-only repository, not a mock: as root (whom permission bits do not stop) the repository
folder is bind-mounted read-only (`mount --bind` + `mount -o remount,bind,ro`: EROFS, as a read-only
medium or mount gives); where mounting is not permitted, the tree is made unwritable (chmod a-w) and
each CLI run goes through `setpriv` without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (EACCES, as a
repository owned by another user gives); a non-root user needs only the chmod. Every test says which
it used in its failure messages (DBRE_TEST_READONLY=chmod takes the fallback on purpose). The full
disk is a small tmpfs filled up (ENOSPC), or where mounting is not permitted a file-size limit of 0 on
the run (EFBIG; DBRE_TEST_DISK=rlimit on purpose). S3: a moto server that checks IAM, with
credentials allowed only s3:GetObject and s3:ListBucket (AccessDenied on every PUT and DELETE).
Mounts are undone and permissions given back in finalizers, on every path.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unique_bucket_name
from tests.dbfactory import (
    CliResult,
    assert_same_db,
    change_rows,
    dbre_env,
    make_db,
    query,
    run_dbre,
    tree_hashes,
)

WARNING = "reads it without a lock"
NO_CAPS = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
           "--inh-caps=-dac_override,-dac_read_search"]


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


class ReadOnly:
    """``folder`` made read-only: ``path`` is what to pass as --repo, ``run(args)`` runs the CLI on it."""

    def __init__(self, folder: Path, mountpoint: Path) -> None:
        self.folder = folder
        self.prefix: list[str] = []
        self.mounted = False
        mountpoint.mkdir()
        wanted = os.environ.get("DBRE_TEST_READONLY") != "chmod"  # =chmod: the fallback, on purpose
        if wanted and os.geteuid() == 0 and _mount("--bind", str(folder), str(mountpoint)):
            self.mounted = True
            if not _mount("-o", "remount,bind,ro", str(mountpoint)):
                self.close()
                raise RuntimeError(f"cannot remount {mountpoint} read-only")
            self.mode, self.path, self.cause = "read-only bind mount", mountpoint, "read-only file system"
            return
        subprocess.run(["chmod", "-R", "a-w", str(folder)], check=True)
        self.path, self.cause = folder, "permission denied"
        if os.geteuid() == 0:
            self.mode, self.prefix = "chmod a-w + setpriv without CAP_DAC_OVERRIDE", NO_CAPS
        else:
            self.mode = "chmod a-w"

    def run(self, *args: str | os.PathLike[str], env: dict[str, str | None] | None = None) -> CliResult:
        proc = subprocess.run([*self.prefix, sys.executable, "-m", "dbre.cli", *map(str, args)],
                              capture_output=True, text=True, timeout=120, env=dbre_env(env))
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)
            self.mounted = False
        else:
            subprocess.run(["chmod", "-R", "u+w", str(self.folder)], capture_output=True)


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path]:
    """A repository holding two snapshots of ``app`` (the source as of the second)."""
    src, repo = make_db(tmp_path / "app.db", mb=1.0), tmp_path / "repo"
    for i in range(2):
        if i:
            change_rows(src, 50, seed=i)
        r = run_dbre("backup", src, "--repo", repo, "--db", "app")
        assert r.returncode == 0, r
    return repo, src


@pytest.fixture
def read_only(tmp_path: Path, backed_up: tuple[Path, Path]) -> Iterator[ReadOnly]:
    ro = ReadOnly(backed_up[0], tmp_path / "ro")
    try:
        yield ro
    finally:
        ro.close()


def warnings(r: CliResult) -> list[str]:
    return [line for line in r.stderr.splitlines() if "warning: cannot lock" in line]


def assert_one_warning(r: CliResult, cause: str, where: str) -> None:
    assert r.returncode == 0, f"{where}: {r}"
    lines = warnings(r)
    assert len(lines) == 1, f"{where}: want one warning line: {r}"
    assert WARNING in lines[0] and cause in lines[0] and lines[0].startswith("dbre: warning:"), f"{where}: {lines}"
    assert "Traceback" not in r.stderr, f"{where}: {r}"


def one_line_error(r: CliResult, where: str, *needles: str) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("dbre: "), f"{where}: {r}"
    for needle in needles:
        assert needle.lower() in lines[0].lower(), f"{where}: {needle!r} not in {lines[0]!r}"
    return lines[0]


def csv_rows(path: Path) -> list[tuple[str, ...]]:
    with open(path, newline="") as f:
        return [tuple(row) for row in csv.reader(f)][1:]


def test_read_only_operations_work_on_a_read_only_repository(read_only: ReadOnly, backed_up: tuple[Path, Path],
                                                              tmp_path: Path) -> None:
    """restore, sql, export, copy (from it) and verify --read-data each succeed with one warning line
    naming the cause; what they give is the source's content exactly; the repository is unchanged."""
    repo, src = backed_up
    ro, where = read_only, read_only.mode
    before = tree_hashes(repo)

    out = tmp_path / "restored.db"
    r = ro.run("restore", "--repo", ro.path, "--db", "app", "--to", out)
    assert_one_warning(r, ro.cause, f"{where}: restore")
    assert_same_db(src, out)

    sql = "SELECT count(*), sum(n), max(name) FROM items"
    r = ro.run("sql", "--repo", ro.path, "--db", "app", sql, "--format", "csv")
    assert_one_warning(r, ro.cause, f"{where}: sql")
    assert r.stdout.splitlines()[1:] == [",".join(map(str, query(src, sql)[0]))], r

    exported = tmp_path / "items.csv"
    r = ro.run("export", "--repo", ro.path, "--db", "app", "--table", "items", "--format", "csv", "--out", exported)
    assert_one_warning(r, ro.cause, f"{where}: export")
    want = [tuple("" if v is None else v.hex() if isinstance(v, bytes) else str(v) for v in row)
            for row in query(src, "SELECT * FROM items ORDER BY id")]
    assert sorted(csv_rows(exported), key=lambda row: int(row[0])) == want

    offsite = tmp_path / "offsite"
    r = ro.run("copy", "--repo", ro.path, "--to", offsite)
    assert_one_warning(r, ro.cause, f"{where}: copy")
    again = tmp_path / "from-offsite.db"
    assert run_dbre("restore", "--repo", offsite, "--db", "app", "--to", again).returncode == 0
    assert_same_db(src, again)

    r = ro.run("verify", "--repo", ro.path, "--read-data")
    assert_one_warning(r, ro.cause, f"{where}: verify")
    assert r.stdout.startswith("ok: 2 snapshots"), r

    assert tree_hashes(repo) == before, f"{where}: the repository changed"
    assert not list(Path(repo, "locks").glob("*")), f"{where}: a lock was left"


def test_writes_into_a_read_only_repository_are_refused_cleanly(read_only: ReadOnly, backed_up: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """backup and forget --prune refuse in one line (forget: it writes a lock first, and never deletes
    without it); restore --force over a database takes a safety snapshot into the repository, which
    refuses: one line naming --no-safety-snapshot, target and repository unchanged; with
    --no-safety-snapshot the restore goes on (one warning) and is exact; restore-table --apply (which
    writes an audit record into the repository) refuses with nothing changed."""
    repo, src = backed_up
    ro, where = read_only, read_only.mode
    before = tree_hashes(repo)

    one_line_error(ro.run("backup", src, "--repo", ro.path, "--db", "app"), f"{where}: backup", "put locks/")
    line = one_line_error(ro.run("forget", "--repo", ro.path, "--keep-last", "1", "--prune", "--grace", "0"),
                          f"{where}: forget", "forget: cannot write its exclusive lock", "a few hundred bytes",
                          "never changes anything without it")
    assert ro.cause.split()[0] in line.lower(), line

    live = tmp_path / "live.db"
    make_db(live, mb=0.2, seed=9)
    live_bytes = live.read_bytes()
    r = ro.run("restore", "--repo", ro.path, "--db", "app", "--to", live, "--force")
    one_line_error(r, f"{where}: restore --force", "safety snapshot", "refuses writes", "--no-safety-snapshot",
                   "nothing was changed")
    assert live.read_bytes() == live_bytes and not Path(f"{live}-wal").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".live")) == []  # no temp file

    r = ro.run("restore-table", "--repo", ro.path, "--db", "app", "--live", live, "--table", "items", "--apply")
    assert warnings(r), r
    lines = [x for x in r.stderr.splitlines() if x.strip() and "warning: cannot lock" not in x]
    assert r.returncode == 1 and len(lines) == 1 and "refuses writes" in lines[0] \
        and "nothing was changed" in lines[0], f"{where}: restore-table --apply: {r}"
    assert live.read_bytes() == live_bytes

    r = ro.run("restore", "--repo", ro.path, "--db", "app", "--to", live, "--force", "--no-safety-snapshot")
    assert_one_warning(r, ro.cause, f"{where}: restore --force --no-safety-snapshot")
    assert_same_db(src, live)
    assert tree_hashes(repo) == before, f"{where}: the repository changed"


# -- a full repository disk ------------------------------------------------------------------------


class FullDisk:
    """A tmpfs of ``size`` bytes at ``root`` (ENOSPC when full), or where mounting is not permitted, a
    file-size limit of 0 on each run (EFBIG: every write fails, as on a full disk)."""

    def __init__(self, root: Path, size: int) -> None:
        root.mkdir()
        self.root = root
        mounted = os.environ.get("DBRE_TEST_DISK") != "rlimit" and _mount("-t", "tmpfs", "-o", f"size={size}",
                                                                          "tmpfs", str(root))
        self.mode = "tmpfs" if mounted else "rlimit"  # DBRE_TEST_DISK=rlimit: the fallback, on purpose
        self.full = False

    def fill(self) -> None:
        self.full = True
        if self.mode == "tmpfs":
            with open(self.root / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (64 << 10))
                        f.flush()
                except OSError:
                    pass

    def _preexec(self) -> None:
        if self.full and self.mode == "rlimit":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    def run(self, *args: str | os.PathLike[str]) -> CliResult:
        proc = subprocess.run([sys.executable, "-m", "dbre.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=120, env=dbre_env(), preexec_fn=self._preexec)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def close(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[FullDisk]:
    disk = FullDisk(tmp_path / "disk", 8 << 20)
    try:
        yield disk
    finally:
        disk.close()


def test_prune_on_a_full_repository_disk_is_refused_and_restore_still_works(full_disk: FullDisk,
                                                                            tmp_path: Path) -> None:
    """The repository's disk is full: forget --prune refuses (its exclusive lock cannot be written, and
    it never deletes without it) in one line saying the lock is a few hundred bytes and to free space;
    nothing is deleted. A restore from it works, with one warning naming the full disk, and is exact
    (tmpfs only: under the file-size limit of the fallback the target could not be written either)."""
    src, repo = make_db(tmp_path / "app.db", mb=1.0), full_disk.root / "repo"
    for i in range(2):
        if i:
            change_rows(src, 50, seed=i)
        assert full_disk.run("backup", src, "--repo", repo, "--db", "app").returncode == 0
    before = tree_hashes(repo)
    full_disk.fill()
    where = full_disk.mode
    one_line_error(full_disk.run("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0"),
                   f"{where}: forget --prune", "disk full", "a few hundred bytes", "free space")
    assert tree_hashes(repo) == before, f"{where}: the repository changed"
    if full_disk.mode == "rlimit":
        return  # (a file-size limit stops the restore's target too: only a full repository disk lets it be)
    out = tmp_path / "restored.db"
    r = full_disk.run("restore", "--repo", repo, "--db", "app", "--to", out)
    assert_one_warning(r, "disk full", f"{where}: restore")
    assert_same_db(src, out)


# -- S3 credentials that may only read -------------------------------------------------------------


def iam_user(iam: Any, name: str, actions: Sequence[str], bucket: str) -> dict[str, str]:
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="dbre", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": list(actions),
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


@contextmanager
def as_user(creds: dict[str, str]) -> Iterator[None]:
    """This process's AWS credentials are ``creds``'s while the block runs (for an S3Store made in it)."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({k: creds[k] for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_s3_credentials_that_may_only_read(spawn_moto: Any, tmp_path: Path) -> None:
    """moto checking IAM: a writer (s3:*) backs up; a reader allowed only s3:GetObject and s3:ListBucket
    gets AccessDenied on every PUT. The store says WriteRefused ("access denied") for the put and the
    delete, reads work; restore and verify --read-data succeed with one warning and the restore is
    exact; forget --prune refuses in one line."""
    import boto3

    from dbre.storage.base import WriteRefused
    from dbre.storage.s3 import S3Store

    # the set-up requests below go unchecked, then IAM applies (a count too high would let the reader write
    # once: the asserts below would fail, not pass)
    server = spawn_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "8"})
    bucket = unique_bucket_name("dbre-ro")
    boto3.session.Session().client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
    iam = boto3.session.Session().client("iam", endpoint_url=server.endpoint, region_name="us-east-1")
    writer = {**iam_user(iam, "writer", ["s3:*"], bucket), "AWS_ENDPOINT_URL": server.endpoint}
    reader = {**iam_user(iam, "reader", ["s3:GetObject", "s3:ListBucket"], bucket),
              "AWS_ENDPOINT_URL": server.endpoint}
    url = f"s3://{bucket}/repo"
    src = make_db(tmp_path / "app.db", mb=0.5)
    r = run_dbre("backup", src, "--repo", url, "--db", "app", env=writer)
    assert r.returncode == 0, r

    with as_user(reader):
        store = S3Store(bucket, "repo", endpoint_url=server.endpoint)
        with pytest.raises(WriteRefused, match="put locks/x: access denied") as put:
            store.put("locks/x", b"{}")
        assert put.value.cause == "access denied"
        with pytest.raises(WriteRefused, match="delete config: access denied"):
            store.delete("config")
        assert store.get("config") and list(store.list("snapshots/app/"))

    out = tmp_path / "restored.db"
    r = run_dbre("restore", "--repo", url, "--db", "app", "--to", out, env=reader)
    assert_one_warning(r, "access denied", "s3 restore")
    assert_same_db(src, out)
    r = run_dbre("verify", "--repo", url, "--read-data", env=reader)
    assert_one_warning(r, "access denied", "s3 verify")
    assert r.stdout.startswith("ok: 1 snapshots"), r
    one_line_error(run_dbre("forget", "--repo", url, "--keep-last", "1", "--prune", env=reader), "s3 forget",
                   "cannot write its exclusive lock", "access denied", "a few hundred bytes")


# -- verify beside prune ---------------------------------------------------------------------------


def test_verify_holds_a_shared_lock_so_prune_cannot_pull_packs_from_under_it(tmp_path: Path) -> None:
    """The tester's race, made certain: verify --read-data of two snapshots with no pack in common; after
    it has read the first pack, `forget --keep-last 1 --prune --grace 0` runs (which, with no lock held
    by verify, deleted the older snapshot's packs and verify then said "get packs/...: not found"). Now
    the prune is refused ("locked by verify") and verify reports both snapshots clean. The other way
    round: while a prune holds its exclusive lock, verify is refused in one line naming it (never a
    false "not found"), and with --retry-lock it waits for the prune to end, then verifies clean."""
    from dbre.repository.lock import Lock
    from dbre.repository.repo import Repository
    from dbre.repository.verify import verify

    src, repo = tmp_path / "app.db", tmp_path / "repo"
    for seed in (1, 2):  # new rows throughout: the snapshots share no pack
        src.unlink(missing_ok=True)
        make_db(src, mb=1.0, seed=seed)
        assert run_dbre("backup", src, "--repo", repo, "--db", "app").returncode == 0
    before = tree_hashes(repo)
    prunes: list[CliResult] = []

    def prune_meanwhile(done: int, total: int) -> None:
        if not prunes:
            assert total >= 2, total
            prunes.append(run_dbre("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0"))

    report = verify(Repository.open(str(repo)), read_data=True, progress=prune_meanwhile)
    assert report.ok and report.snapshots == 2 and report.packs_read >= 2, report.problems
    one_line_error(prunes[0], "prune during verify", "locked by verify")
    assert tree_hashes(repo) == before

    held = Lock(Repository.open(str(repo)).store, "prune", exclusive=True)
    held.acquire()
    try:
        r = run_dbre("verify", "--repo", repo, "--read-data")
        one_line_error(r, "verify during prune", "locked by prune")
        assert "not found" not in r.stderr + r.stdout
        timer = threading.Timer(2.0, held.release)
        timer.start()
        r = run_dbre("--retry-lock", "30s", "verify", "--repo", repo, "--read-data")
        timer.join()
    finally:
        held.release()
    assert r.returncode == 0 and r.stdout.startswith("ok: 2 snapshots") and "waiting up to" in r.stderr, r
    assert run_dbre("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0").returncode == 0
    assert run_dbre("verify", "--repo", repo, "--read-data").stdout.startswith("ok: 1 snapshots")


def test_a_readable_repository_takes_the_lock_and_warns_nothing(backed_up: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    """On a writable repository read_lock is the shared lock: no warning, and the restore's lock is
    seen by a concurrent exclusive lock (here: held while the restore runs, found by list_locks)."""
    from dbre.repository.lock import list_locks
    from dbre.repository.repo import Repository

    repo, src = backed_up
    repository = Repository.open(str(repo))
    with repository.read_lock("restore app") as held:
        locks = list_locks(repository.store)
        assert [info.record["op"] for info in locks] == ["restore app"] and held.key == locks[0].key
    assert list_locks(repository.store) == []
    r = run_dbre("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "out.db")
    assert r.returncode == 0 and not warnings(r), r
    assert_same_db(src, tmp_path / "out.db")
    with sqlite3.connect(tmp_path / "out.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_a_restore_into_a_folder_it_cannot_write_adds_no_safety_snapshot(tmp_path: Path,
                                                                          backed_up: tuple[Path, Path]) -> None:
    """restore --force over a live database in a folder that takes no new file (a read-only mount; else
    no write permission): refused in one line naming the folder's problem, and the repository gains no
    safety snapshot (a cold tester saw one written before the refusal)."""
    repo, src = backed_up
    place = tmp_path / "live"
    place.mkdir()
    shutil.copy(src, place / "app.db")
    before = tree_hashes(repo)
    ro = ReadOnly(place, tmp_path / "live-ro")
    try:
        r = ro.run("restore", "--repo", repo, "--db", "app", "--to", ro.path / "app.db", "--force")
        assert r.returncode == 1 and "cannot create a file there" in r.stderr, r
        assert r.stderr.strip().count("\n") == 0 and "safety snapshot" not in r.stderr, r
    finally:
        ro.close()
    assert tree_hashes(repo) == before, "the refused restore changed the repository"


def test_verify_names_every_pack_it_cannot_read_and_goes_on(tmp_path: Path) -> None:
    """One pack the store refuses to give (mode 000, read without CAP_DAC_OVERRIDE as an unprivileged
    reader would), another deleted: verify reports both, each in its own line, and exits 1; it used to
    stop at the first with `get packs/..: Permission denied` and never name the missing one."""
    repo = tmp_path / "repo"
    for i in range(3):  # three backups of three databases: three packs at least
        src = make_db(tmp_path / f"db{i}.db", mb=0.3, seed=i)
        assert run_dbre("backup", src, "--repo", repo, "--db", f"db{i}").returncode == 0
    packs = sorted((repo / "packs").glob("*/*"))
    assert len(packs) >= 3
    denied, gone = packs[0], packs[1]
    gone.unlink()
    denied.chmod(0)
    prefix = NO_CAPS if os.geteuid() == 0 else []
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "dbre.cli", "verify", "--repo", str(repo)],
                              capture_output=True, text=True, timeout=120, env=dbre_env())
    finally:
        denied.chmod(0o644)
    assert proc.returncode == 1, proc
    damaged = [line for line in proc.stderr.splitlines() if line.startswith("DAMAGED")]
    assert any(denied.name in line and "cannot be read" in line for line in damaged), proc.stderr
    assert any(gone.name in line and "missing" in line for line in damaged), proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_dry_run_of_forget_plans_on_a_read_only_repository(read_only: ReadOnly,
                                                              backed_up: tuple[Path, Path]) -> None:
    """`forget --dry-run` (and with --prune) writes nothing, so a repository it may only read is no
    reason to refuse: the plan, one warning line, the repository unchanged."""
    repo, _ = backed_up
    ro, where = read_only, read_only.mode
    before = tree_hashes(repo)
    for extra in ([], ["--prune"]):
        r = ro.run("forget", "--repo", ro.path, "--keep-last", "1", "--dry-run", *extra)
        assert_one_warning(r, ro.cause, f"{where}: forget --dry-run {extra}")
        assert r.stdout.count("would forget") == 1 and r.stdout.count(" keep ") == 1, r
        assert ("prune: would delete 0 unused packs" in r.stdout) == bool(extra), r
    assert tree_hashes(repo) == before, f"{where}: the repository changed"
