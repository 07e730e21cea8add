"""A disk that fills (issue 11): during a backup into a local repository, during a restore, during
replicate. Each run either succeeds (and what it wrote restores exactly) or fails with one line naming
"disk full" and the fix; the repository still verifies with --read-data, every earlier snapshot and
every shipped commit still restores, no temp file is left, the target is untouched, and once space
is freed the next run succeeds.

The disk is a real one that fills: a tmpfs of a few MiB mounted under the test's folder (ENOSPC, as a
full volume gives). Where mounting is not permitted (no CAP_SYS_ADMIN), the same runs go under a
file-size limit instead (RLIMIT_FSIZE: write(2) fails with EFBIG at the limit, as at the end of a
disk); the test says which it used in every failure message.
"""

# test-group: heavy

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbre.repository.repo import Repository
from tests.dbfactory import CliResult, assert_one_line_error, assert_same_db, make_db, tree_hashes
from tests.replication import (
    dbre_cmd,
    make_source,
    read_log,
    restore_at,
    restored_seq,
    start_writer,
    utc,
)
from tests.torture.harness import content_digest, list_snapshots, remove_db, verify_clean


class Disk:
    """A small volume at ``root``: ``fill(free)`` leaves about ``free`` bytes writable, ``free_all()``
    gives the space back, ``run(args)`` runs dbre as a subprocess on it."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        root.mkdir(parents=True)
        mounted = os.environ.get("DBRE_TEST_DISK") != "rlimit" and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], capture_output=True).returncode == 0
        self.mode = "tmpfs" if mounted else "rlimit"  # DBRE_TEST_DISK=rlimit: the fallback, on purpose
        self.limit: int | None = None  # rlimit mode: the per-file limit in force
        self.filler = root / "filler.bin"

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, free: int) -> None:
        """Leave about ``free`` bytes (tmpfs: a filler file takes the rest; rlimit: no file may grow past it)."""
        if self.mode == "rlimit":
            self.limit = free
            return
        self.filler.unlink(missing_ok=True)
        take = max(0, self.free() - free)
        with open(self.filler, "wb") as f:
            while take > 0:
                n = min(take, 1 << 20)
                try:
                    f.write(b"\0" * n)
                    f.flush()
                except OSError:
                    break
                take -= n

    def free_all(self) -> None:
        self.limit = None
        self.filler.unlink(missing_ok=True)

    def _preexec(self) -> None:
        if self.limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, self.limit))

    def popen(self, args: list[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, preexec_fn=self._preexec, **kw)  # type: ignore[call-overload,no-any-return]

    def run(self, *args: str | os.PathLike[str], timeout: float = 120) -> CliResult:
        env = {k: v for k, v in os.environ.items() if k not in ("DBRE_ENCRYPTION_KEY", "DBRE_KEY_FILE")}
        proc = subprocess.run([sys.executable, "-m", "dbre.cli", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, preexec_fn=self._preexec)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    def close(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], capture_output=True)

    def __str__(self) -> str:
        return f"[{self.mode} disk of {self.size >> 20} MiB]"


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    d = Disk(tmp_path / "disk", 12 << 20)
    try:
        yield d
    finally:
        d.close()


def _no_temp_files(root: Path) -> bool:
    tmp = root / ".tmp"
    return not tmp.is_dir() or not any(tmp.iterdir())


def test_backup_into_a_repository_whose_disk_fills_at_every_point(disk: Disk, tmp_path: Path) -> None:
    """A first snapshot on a roomy disk; then, at 7 amounts of free space from 0 to more than a backup
    needs, a backup of a changed database (2.5 MiB of new, incompressible pages: packs, then indexes
    and the manifest). Each either succeeds and restores exactly, or fails with one line (exit 1,
    "disk full", "free space"), leaving no temp file, no new snapshot, and a repository that verifies;
    every snapshot taken so far restores to its content. With the space back, the next backup succeeds."""
    repo, src = disk.root / "repo", tmp_path / "src.db"
    make_db(src, mb=1.0, seed=1)
    first = disk.run("backup", src, "--repo", repo, "--db", "app")
    assert first.returncode == 0, f"{disk} {first}"
    expected = {list_snapshots(str(repo))[-1]["id"]: content_digest(src)}
    failed = succeeded = 0
    for i, free in enumerate([0, 64 << 10, 512 << 10, 1 << 20, 2 << 20, 3 << 20, 6 << 20]):
        remove_db(src)
        make_db(src, mb=2.5, seed=10 + i)  # new rows throughout: every page changes
        disk.fill(free)
        before = len(list_snapshots(str(repo)))
        r = disk.run("backup", src, "--repo", repo, "--db", "app")
        disk.free_all()
        where = f"{disk} free {free} bytes"
        if r.returncode == 0:
            succeeded += 1
            snaps = list_snapshots(str(repo))
            assert len(snaps) == before + 1, where
            expected[snaps[-1]["id"]] = content_digest(src)
        else:
            failed += 1
            assert_one_line_error(r, 1, "disk full", "free space")
            assert len(list_snapshots(str(repo))) == before, f"{where}: a failed backup left a snapshot"
        assert _no_temp_files(repo), f"{where}: temp files left in .tmp"
        verify_clean(str(repo))
    assert failed >= 2 and succeeded >= 1, f"{disk}: {failed} failed, {succeeded} succeeded: the sweep missed"
    print(f"{disk}: {failed} backups failed on the full disk, {succeeded} fitted")
    r = disk.run("backup", src, "--repo", repo, "--db", "app")
    assert r.returncode == 0, f"{disk} with the space back: {r}"
    expected[list_snapshots(str(repo))[-1]["id"]] = content_digest(src)
    for snap_id, digest in expected.items():
        out = tmp_path / f"r-{snap_id}.db"
        assert disk.run("restore", "--repo", repo, "--db", "app", "--snapshot", snap_id, "--to", out).returncode == 0
        assert content_digest(out) == digest, f"{disk}: snapshot {snap_id} does not restore to its content"


def test_restore_onto_a_disk_that_fills_leaves_the_target_untouched(disk: Disk, tmp_path: Path) -> None:
    """A 4 MiB database restored onto a disk with 1 MiB free: exit 1, one line ("disk full"); a new
    target does not appear (nor any temp file beside it); an existing target given with --force keeps
    its bytes; the repository is unchanged. With the space back, the same restore is exact."""
    src, repo = make_db(tmp_path / "src.db", mb=4.0, seed=2), tmp_path / "repo"
    assert disk.run("backup", src, "--repo", repo, "--db", "app").returncode == 0
    target, existing = disk.root / "out.db", disk.root / "existing.db"
    existing.write_bytes(b"the old database, still needed" * 1000)
    before = tree_hashes(repo, existing)
    disk.fill(1 << 20)
    r = disk.run("restore", "--repo", repo, "--db", "app", "--to", target)
    assert_one_line_error(r, 1, "disk full")
    assert not target.exists(), f"{disk}: a partial target was left"
    r = disk.run("restore", "--repo", repo, "--db", "app", "--to", existing, "--force", "--no-safety-snapshot")
    assert_one_line_error(r, 1, "disk full", "not touched")
    assert tree_hashes(repo, existing) == before, f"{disk}: the repository or the existing target changed"
    assert sorted(p.name for p in disk.root.iterdir()) == sorted(["existing.db", disk.filler.name] if
                                                                 disk.mode == "tmpfs" else ["existing.db"]), \
        f"{disk}: leftovers {sorted(p.name for p in disk.root.iterdir())}"
    disk.free_all()
    assert disk.run("restore", "--repo", repo, "--db", "app", "--to", target).returncode == 0
    assert_same_db(src, target)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_export_onto_a_disk_that_fills(disk: Disk, tmp_path: Path, fmt: str) -> None:
    """A table exported onto a disk with 64 KiB free: exit 1, one line ("disk full", naming the
    file and that it was not written), no partial or temp file; an existing file given with --force
    keeps its bytes. A cold tester saw `unexpected error: OSError` here."""
    src, repo = make_db(tmp_path / "src.db", mb=3.0, seed=3), tmp_path / "repo"
    assert disk.run("backup", src, "--repo", repo, "--db", "app").returncode == 0
    out, existing = disk.root / f"t.{fmt}", disk.root / f"old.{fmt}"
    existing.write_bytes(b"yesterday's export" * 100)
    before = tree_hashes(repo, existing)
    disk.fill(64 << 10)
    table = "items"
    r = disk.run("export", "--repo", repo, "--db", "app", "--table", table, "--format", fmt, "--out", out)
    assert_one_line_error(r, 1, "disk full", str(out), "was not written")
    r = disk.run("export", "--repo", repo, "--db", "app", "--table", table, "--format", fmt, "--out", existing,
                 "--force")
    assert_one_line_error(r, 1, "disk full")
    assert tree_hashes(repo, existing) == before, f"{disk}: the repository or the existing file changed"
    assert sorted(p.name for p in disk.root.iterdir()) == sorted([existing.name, disk.filler.name] if
                                                                 disk.mode == "tmpfs" else [existing.name]), \
        f"{disk}: leftovers {sorted(p.name for p in disk.root.iterdir())}"


def test_replicate_into_a_repository_whose_disk_fills(disk: Disk, tmp_path: Path) -> None:
    """A replicator ships into a repository on a small disk while a writer commits; the disk is then
    filled. The replicator stops within seconds, exit 1, one line ("disk full", "free space"), and
    the application goes on committing (it never depended on the replicator). The repository verifies,
    no temp file is left, every commit shipped before the stop restores at its time. With the space
    back, a replicator started again resumes, and the newest restore holds every commit the writer made."""
    repo, src, log = disk.root / "repo", tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, 200)
    rep = disk.popen(dbre_cmd("replicate", str(src), "--repo", str(repo), "--db", "app", "--interval", "200ms",
                              "-q"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer = None
    try:
        deadline = time.time() + 60
        while not (repo / "segments" / "app").is_dir() and time.time() < deadline and rep.poll() is None:
            time.sleep(0.1)
        writer = start_writer(src, log, 4.0, start_seq=200, pause=0.01)
        time.sleep(1.5)
        disk.fill(16 << 10)  # rlimit mode: takes effect for the next replicator only, see below
        if disk.mode == "rlimit":
            rep.send_signal(signal.SIGTERM)
            assert rep.wait(timeout=30) == 0
            rep = disk.popen(dbre_cmd("replicate", str(src), "--repo", str(repo), "--db", "app", "--interval",
                                      "200ms", "-q"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, err = rep.communicate(timeout=60)
        assert writer.wait(timeout=60) == 0, "the application's writer failed while the repository disk was full"
    finally:
        for p in (rep, writer):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert rep.returncode == 1 and len(lines) == 1 and "disk full" in lines[0] and "free space" in lines[0], \
        f"{disk}: exit {rep.returncode}: {lines}"
    disk.free_all()
    assert _no_temp_files(repo), f"{disk}: temp files left"
    verify_clean(str(repo))
    commits, _ = read_log(log)
    shipped_until = max(os.stat(p).st_mtime for p in (repo / "segments" / "app").rglob("*") if p.is_file())
    shipped = [c for c in commits if c.after < shipped_until - 1.0]
    assert shipped, f"{disk}: nothing shipped before the disk filled"
    r = Repository.open(str(repo))
    probe = shipped[len(shipped) // 2]
    out = tmp_path / "mid.db"
    restore_at(r, "app", utc(probe.after + 0.3), out)
    assert restored_seq(out)[1] >= probe.seq, f"{disk}: commit {probe.seq} shipped before the stop is lost"
    # space back: a new replicator resumes, and the newest state is every commit the writer made
    again = disk.popen(dbre_cmd("replicate", str(src), "--repo", str(repo), "--db", "app", "--interval", "200ms",
                                "-q"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    out = tmp_path / "newest.db"
    try:  # until it has shipped the writer's last commit (a loaded machine starts it slowly)
        deadline, top, last_err = time.monotonic() + 90, -1, ""
        while time.monotonic() < deadline and again.poll() is None:
            time.sleep(1.0)
            out.unlink(missing_ok=True)  # each look restores afresh (a restore never replaces a file)
            try:
                restore_at(Repository.open(str(repo)), "app", utc(time.time() + 1), out)
                top = restored_seq(out)[1]
            except Exception as err:  # noqa: BLE001 - a new generation being written: look again
                last_err = repr(err)
                continue
            if top == commits[-1].seq:
                break
    finally:
        again.send_signal(signal.SIGTERM)
        _, err2 = again.communicate(timeout=30)
    assert again.returncode == 0, err2.decode()
    assert top == commits[-1].seq, \
        f"{disk}: the resumed replicator shipped up to {top} of {commits[-1].seq} in 90 s ({last_err})"
