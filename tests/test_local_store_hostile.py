"""A local repository in the hands of someone who can write its files but has no key (or of an
operator on a bad day): links, FIFOs and files planted where folders or objects belong.

LocalStore never follows a link below its root (the root itself may be one), never blocks on a
FIFO, and answers each case with one line naming the path and the fix; nothing outside the
repository is read, written or deleted. Real LocalStore, real `dbre` runs on a real repository.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from dbre.errors import IntegrityError
from dbre.storage.base import NotFound, PermanentError
from dbre.storage.local import LocalStore
from tests.dbfactory import assert_one_line_error, cli, make_db, run_dbre, snapshot_files, tree_hashes

OLD = time.time() - 3 * 3600  # older than prune's 2 h grace


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small database and a repository holding one snapshot of it (copied for each test)."""
    base = tmp_path_factory.mktemp("seed")
    src = make_db(base / "app.db", mb=0.3)
    repo = base / "repo"
    assert cli("init", "--repo", repo).returncode == 0
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    return src, repo


@pytest.fixture
def world(seed: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path, Path]:
    """(source db, repository, a victim folder outside it holding two old files)."""
    src, repo = seed
    shutil.copytree(repo, tmp_path / "repo")
    victim = tmp_path / "victim"
    victim.mkdir()
    for name in ("precious.txt", "other.bin"):
        (victim / name).write_bytes(b"not dbre's " + name.encode())
        os.utime(victim / name, (OLD, OLD))
    return src, tmp_path / "repo", victim


def _link_folder(repo: Path, name: str, victim: Path) -> None:
    folder = repo / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.symlink_to(victim)


# -- 1. links inside the repository are never followed --------------------------------------------


def test_prune_with_tmp_linked_elsewhere_deletes_nothing_there(world: tuple[Path, Path, Path]) -> None:
    _, repo, victim = world
    before = tree_hashes(victim)
    _link_folder(repo, ".tmp", victim)
    r = run_dbre("forget", "--repo", repo, "--keep-last", "1", "--prune")
    assert_one_line_error(r, 1, "folder .tmp is a symbolic link", str(victim), "replace the link")
    with pytest.raises(PermanentError, match="folder .tmp is a symbolic link"):  # prune's last step
        LocalStore(repo).clean_temp(older_than=7200)
    assert tree_hashes(victim) == before


def test_backup_with_tmp_linked_elsewhere_writes_nothing_there(world: tuple[Path, Path, Path]) -> None:
    src, repo, victim = world
    _link_folder(repo, ".tmp", victim)
    r = run_dbre("backup", src, "--repo", repo, "--db", "app", "--full")
    assert_one_line_error(r, 1, ".tmp is a symbolic link")
    assert sorted(p.name for p in victim.iterdir()) == ["other.bin", "precious.txt"]


@pytest.mark.parametrize("args", [["unlock"], ["unlock", "--remove-all"]], ids=["stale", "remove-all"])
def test_unlock_with_locks_linked_elsewhere_deletes_nothing_there(world: tuple[Path, Path, Path],
                                                                  args: list[str]) -> None:
    _, repo, victim = world
    before = tree_hashes(victim)
    _link_folder(repo, "locks", victim)
    r = run_dbre(*args, "--repo", repo)
    assert_one_line_error(r, 1, "folder locks is a symbolic link", "dbre does not follow links")
    assert tree_hashes(victim) == before


def test_no_operation_goes_through_a_linked_key_folder(world: tuple[Path, Path, Path]) -> None:
    """put, delete, list, get, exists and modified all refuse a linked folder on the key's path,
    and leave the place it points at as it was (reads too: see LocalStore's docstring)."""
    _, repo, victim = world
    store = LocalStore(repo)
    (repo / "packs" / "zz").symlink_to(victim)
    before = tree_hashes(victim)
    fds = len(os.listdir("/proc/self/fd"))
    for call in (lambda: store.put("packs/zz/new", b"x"), lambda: store.delete("packs/zz/precious.txt"),
                 lambda: list(store.list("packs/")), lambda: list(store.list("packs/zz/")),
                 lambda: store.get("packs/zz/precious.txt"), lambda: store.get_range("packs/zz/precious.txt", 0, 4),
                 lambda: store.exists("packs/zz/precious.txt"), lambda: store.modified("packs/zz/precious.txt"),
                 lambda: store.open_upload("packs/zz/up").commit()):
        with pytest.raises(PermanentError, match="packs/zz") as info:
            call()
        assert "symbolic link" in str(info.value) and "\n" not in str(info.value)
    assert tree_hashes(victim) == before
    assert len(os.listdir("/proc/self/fd")) == fds, "every folder descriptor is closed on refusal"
    assert not [p for p in (repo / ".tmp").iterdir()], "the refused upload left no temp file"
    assert list(store.list("snapshots/")), "a link elsewhere does not stop other listings"


def test_a_linked_object_is_refused_as_damage_and_delete_removes_only_the_link(
        world: tuple[Path, Path, Path]) -> None:
    _, repo, victim = world
    store = LocalStore(repo)
    (repo / "locks" / "planted").symlink_to(victim / "precious.txt")
    with pytest.raises(IntegrityError, match="locks/planted: a symbolic link"):
        store.get("locks/planted")
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.get_range("locks/planted", 0, 10)
    with pytest.raises(PermanentError, match="locks/planted in the repository is a symbolic link"):
        list(store.list("locks/"))
    store.delete("locks/planted")
    assert not (repo / "locks" / "planted").is_symlink()
    assert (victim / "precious.txt").read_bytes() == b"not dbre's precious.txt"


def test_replace_and_key_passwd_refuse_a_linked_config(world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, repo, _ = world
    outside = tmp_path / "config-elsewhere"
    shutil.move(repo / "config", outside)
    (repo / "config").symlink_to(outside)
    data = outside.read_bytes()
    with pytest.raises(IntegrityError, match="config: a symbolic link"):
        LocalStore(repo).replace("config", b"new", expected=data)
    r = run_dbre("key", "passwd", "--repo", repo, env={"DBRE_NEW_ENCRYPTION_KEY": "x" * 20})
    assert r.returncode != 0 and "Traceback" not in r.stderr, r
    assert "symbolic link" in r.stderr, r
    assert outside.read_bytes() == data and (repo / "config").is_symlink()


def test_the_root_itself_may_be_a_link(world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, repo, _ = world
    link = tmp_path / "repo-link"
    link.symlink_to(repo)
    assert cli("backup", src, "--repo", link, "--db", "app").returncode == 0
    assert cli("verify", "--repo", link).returncode == 0


# -- 2. a stray folder (or link, FIFO) in .tmp ------------------------------------------------------


def test_prune_skips_what_is_not_a_regular_file_in_tmp(world: tuple[Path, Path, Path]) -> None:
    _, repo, victim = world
    tmp = repo / ".tmp"
    tmp.mkdir(exist_ok=True)
    (tmp / "stray").mkdir()
    (tmp / "stray" / "inside").write_bytes(b"x")
    (tmp / "link").symlink_to(victim / "precious.txt")
    os.mkfifo(tmp / "fifo")
    (tmp / "dead-put").write_bytes(b"half a pack")
    for p in (tmp / "stray", tmp / "stray" / "inside", tmp / "fifo", tmp / "dead-put"):
        os.utime(p, (OLD, OLD))
    os.utime(tmp / "link", (OLD, OLD), follow_symlinks=False)
    r = run_dbre("forget", "--repo", repo, "--keep-last", "1", "--prune", timeout=60)
    assert r.returncode == 0, r
    assert sorted(p.name for p in tmp.iterdir()) == ["fifo", "link", "stray"]
    assert (tmp / "stray" / "inside").exists() and (victim / "precious.txt").exists()


# -- 3. a FIFO planted as an object fails at once ----------------------------------------------------


def test_a_fifo_config_fails_at_once(world: tuple[Path, Path, Path]) -> None:
    _, repo, _ = world
    (repo / "config").unlink()
    os.mkfifo(repo / "config")
    r = run_dbre("snapshots", "--repo", repo, timeout=30)
    assert_one_line_error(r, 1, "config", "FIFO", "not a regular file")


def test_a_fifo_manifest_is_damage_for_verify_and_fails_restore_and_backup_at_once(
        world: tuple[Path, Path, Path], tmp_path: Path) -> None:
    src, repo, _ = world
    (manifest,) = snapshot_files(repo)
    manifest.unlink()
    os.mkfifo(manifest)
    key = manifest.relative_to(repo).as_posix()
    store = LocalStore(repo)
    for read in (lambda: store.get(key), lambda: store.get_range(key, 0, 100)):
        started = time.monotonic()
        with pytest.raises(IntegrityError, match=f"{key}: a FIFO"):
            read()
        assert time.monotonic() - started < 5
    r = run_dbre("verify", "--repo", repo, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r
    assert key in r.stdout + r.stderr and "FIFO" in r.stdout + r.stderr, r
    r = run_dbre("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "out.db", timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "FIFO" in r.stderr, r
    assert not (tmp_path / "out.db").exists()
    r = run_dbre("backup", src, "--repo", repo, "--db", "app", timeout=60)
    assert "Traceback" not in r.stderr, r
    if r.returncode != 0:
        assert_one_line_error(r, r.returncode, "FIFO")


# -- 4. a file where a folder belongs ---------------------------------------------------------------


@pytest.mark.parametrize("folder", [".tmp", "locks"])
def test_a_file_where_a_folder_belongs_is_named(world: tuple[Path, Path, Path], folder: str) -> None:
    src, repo, _ = world
    if (repo / folder).exists():
        shutil.rmtree(repo / folder)
    (repo / folder).write_bytes(b"someone's file")
    before = tree_hashes(repo)
    r = run_dbre("backup", src, "--repo", repo, "--db", "app")
    assert_one_line_error(r, 1, f"{folder} in the repository is a file where a folder belongs",
                          f"move {folder} out of the way; dbre makes the folder again")
    assert tree_hashes(repo) == before


def test_reads_of_a_missing_folder_are_not_found(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "repo")
    with pytest.raises(NotFound):
        store.get("packs/ab/nothing")
    assert not store.exists("packs/ab/nothing")
    assert list(store.list("packs/")) == []
    store.delete("packs/ab/nothing")
    assert store.clean_temp() == 0
    store.put("packs/ab/x", b"x")
    assert store.get("packs/ab/x") == b"x" and list(store.list("packs/")) == ["packs/ab/x"]
