"""A cold review of a3d82e6 and f09d43a (session 16's bug hunt): an attacker who can write the restore target's
folder, and an operator on a bad day. Tests that document a bug fail until it is fixed; the others show that
a case the brief asked about is handled."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from dbre.storage import open_store, overlap
from tests.dbfactory import (
    assert_one_line_error,
    backed_up_db,
    change_rows,
    cli,
    make_db,
    run_dbre,
    snapshot_files,
    tree_hashes,
    two_databases_repo,
)

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[Path, Path]:
    return backed_up_db(tmp_path)


# ------------------------------------------------------------------ restore targets behind a symbolic link


def test_a_symlink_to_a_fifo_is_refused_at_once(backed_up: tuple[Path, Path], tmp_path: Path) -> None:
    """check_target lets any symlink through (lstat), whatever it points at: `restore --force` onto a link
    to a named pipe hangs in `_sqlite_header`'s open, the very hang f09d43a fixed for a FIFO named directly."""
    _, repo = backed_up
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "target.db").symlink_to(tmp_path / "pipe")
    try:
        result = run_dbre("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "target.db", "--force",
                          timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("restore --force onto a symlink to a FIFO hung (killed after 30 s)")
    assert_one_line_error(result, 2, "not a regular file")
    assert (tmp_path / "pipe").is_fifo()


@pytest.fixture
def loop_device(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A loop block device over a 1 MiB image of random bytes (a partition's content), detached after."""
    if not ROOT or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    made = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_symlink_to_a_block_device_is_never_written(backed_up: tuple[Path, Path], tmp_path: Path,
                                                       loop_device: Path) -> None:
    """An attacker who can write the target's folder swaps app.db for a symlink to a disk. `restore --force`
    refuses ("not an SQLite database") and its hint says to pass --no-safety-snapshot; done so, `_hold_still`
    opens the device through the link (SQLite sees size 0) and writes an empty database's first page over
    the disk's first 4 KiB (a partition table, a superblock) before the link is renamed over."""
    _, repo = backed_up
    target = tmp_path / "live.db"
    target.symlink_to(loop_device)
    before = loop_device.read_bytes()
    first = cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force")
    assert loop_device.read_bytes() == before  # (refused: "not an SQLite database ... pass --no-safety-snapshot")
    second = cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force", "--no-safety-snapshot")
    assert loop_device.read_bytes() == before, "the block device behind the symlink was written"
    assert_one_line_error(first, 2, "not a regular file")
    assert_one_line_error(second, 2, "not a regular file")


def test_a_target_swapped_for_a_device_link_mid_restore_is_not_written(
        backed_up: tuple[Path, Path], tmp_path: Path, loop_device: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same write with plain `restore --force` over a real database: the folder's writer swaps it for a
    symlink to a disk after the plan and the safety snapshot, before `_replace` (which re-checks use, not
    kind): its `_hold_still` opens the device and SQLite's COMMIT writes page 1 over the disk."""
    import dbre.restore.full as full

    src, repo = backed_up
    target = tmp_path / "live.db"
    shutil.copy(src, target)
    before = loop_device.read_bytes()
    real = full._replace

    def swapped(tmp: Path, tgt: Path, *args, **kwargs):  # type: ignore[no-untyped-def]
        tgt.unlink()
        tgt.symlink_to(loop_device)
        return real(tmp, tgt, *args, **kwargs)

    monkeypatch.setattr(full, "_replace", swapped)
    cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force")
    assert loop_device.read_bytes() == before, "the block device swapped in behind the target was written"


# ------------------------------------------------------------------ --to spellings


def test_to_a_missing_folder_spelt_with_a_dot_makes_no_file(backed_up: tuple[Path, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--to restored/` is refused since f09d43a, but `--to restored/.` (Path drops the "/.") still writes a
    file named `restored`, exit 0: the case the commit meant to close, spelt another way."""
    _, repo = backed_up
    monkeypatch.chdir(tmp_path)
    result = cli("restore", "--repo", repo, "--db", "app", "--to", "restored/.")
    assert not (tmp_path / "restored").exists(), "a file named after the folder was written"
    assert_one_line_error(result, 2, "folder")


def test_to_a_file_with_a_slash_is_not_called_a_missing_folder(backed_up: tuple[Path, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--to app.db/` where app.db is a file: refused (good), but the line says it "names a folder, which does
    not exist" and suggests creating the folder, where a file of that name is."""
    _, repo = backed_up
    monkeypatch.chdir(tmp_path)
    before = tree_hashes(tmp_path / "app.db")
    line = assert_one_line_error(cli("restore", "--repo", repo, "--db", "app", "--to", "app.db/", "--force"), 2)
    assert tree_hashes(tmp_path / "app.db") == before
    assert "does not exist" not in line and "file" in line.split("(")[0], line


def test_symlinked_folder_relative_path_and_empty_file_restore(backed_up: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Fine: a folder that is a symlink, a relative `..` path from another cwd, and --force over a 0-byte
    file (no safety snapshot needed) all restore."""
    src, repo = backed_up
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    shutil.copy(src, tmp_path / "real" / "x.db")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert cli("restore", "--repo", repo, "--db", "app", "--to", "../link/x.db", "--force").returncode == 0
    assert cli("restore", "--repo", repo, "--db", "app", "--to", "../link/y.db").returncode == 0
    (tmp_path / "real" / "zero.db").write_bytes(b"")
    assert cli("restore", "--repo", repo, "--db", "app", "--to", "../link/zero.db", "--force").returncode == 0
    assert not (tmp_path / "link").is_symlink() or (tmp_path / "link").resolve() == tmp_path / "real"
    for name in ("x.db", "y.db", "zero.db"):
        assert sqlite3.connect(tmp_path / "real" / name).execute("SELECT count(*) FROM items").fetchone()[0] > 0


# ------------------------------------------------------------------ free space


def test_a_file_system_that_reports_no_size_does_not_block_restore(backed_up: tuple[Path, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Some FUSE and network file systems answer statvfs with zeros (f_blocks 0: no figures). The new check
    reads that as "disk full (N bytes needed, 0 free)" and refuses `restore --force` over the live database;
    its hint ("free space or restore to another disk") does not name --no-safety-snapshot, the only way
    past it in place."""
    src, repo = backed_up
    target = tmp_path / "live.db"
    shutil.copy(src, target)
    change_rows(target)
    monkeypatch.setattr(os, "statvfs", lambda _p: os.statvfs_result((4096, 0, 0, 0, 0, 0, 0, 0, 0, 255)))
    result = cli("restore", "--repo", repo, "--db", "app", "--to", target, "--force")
    assert result.returncode == 0, result


# ------------------------------------------------------------------ TEXT that is not UTF-8


def test_repair_rows_puts_back_a_row_whose_live_text_is_not_utf8(tmp_path: Path) -> None:
    """The live row's TEXT was damaged into bytes that are not UTF-8 (the row one wants repaired); the
    snapshot's is fine. `repair-rows` now stops in one line ("the live database: a TEXT value is not valid
    UTF-8"), so it can never repair the very row that is bad; only restore-table (a whole table) is left."""
    live, repo = tmp_path / "live.db", tmp_path / "repo"
    with sqlite3.connect(live) as conn:
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, s TEXT)")
        conn.execute("INSERT INTO t VALUES (1, 'fine'), (2, 'ok')")
    conn.close()
    assert cli("backup", live, "--repo", repo, "--db", "g").returncode == 0
    with sqlite3.connect(live) as conn:
        conn.execute("UPDATE t SET s = CAST(x'61ff62' AS TEXT) WHERE id = 1")
    conn.close()
    result = cli("repair-rows", "--repo", repo, "--db", "g", "--table", "t", "--where", "id = 1", "--live", live,
                 "--apply")
    assert result.returncode == 0, result
    conn = sqlite3.connect(live)
    assert conn.execute("SELECT hex(s) FROM t WHERE id = 1").fetchone()[0] == b"fine".hex().upper()
    conn.close()


# ------------------------------------------------------------------ overlap


def test_overlap_judges_s3_spellings_right() -> None:
    """Fine: prefixes p and p2 are apart; s3://b and s3://b/, p/ and p, //p and p are one; a prefix inside."""
    o = lambda a, b: overlap(open_store(a), open_store(b))  # noqa: E731
    assert o("s3://b/p", "s3://b/p2") is None and o("s3://b/p2", "s3://b/p") is None
    assert o("s3://b", "s3://b/") == "same" and o("s3://b/p/", "s3://b/p") == "same"
    assert o("s3://b/p", "s3://b//p") == "same"
    assert o("s3://b", "s3://b/p") == "inside" and o("s3://b/p/q", "s3://b/p") == "inside"
    assert o("s3://b/p", "s3://c/p") is None


def test_copy_into_the_primary_through_a_bind_mount_is_refused(tmp_path: Path) -> None:
    """`overlap` compares real paths for "inside": a folder bind-mounted elsewhere (a container volume) hides
    that the copy lands inside the primary. "same" is caught by samefile; nested is not: the offsite copy is
    written into the primary repository's own folder, and `status --offsite` would call it current."""
    if not ROOT or shutil.which("mount") is None:
        pytest.skip("needs root and mount")
    (tmp_path / "disk").mkdir()
    (tmp_path / "alias").mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "disk"), str(tmp_path / "alias")],
                      capture_output=True).returncode != 0:
        pytest.skip("bind mounts are not allowed here")
    try:
        src = make_db(tmp_path / "app.db", mb=0.1)
        repo = tmp_path / "disk" / "repo"
        assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
        assert overlap(open_store(str(repo)), open_store(str(tmp_path / "alias" / "repo"))) == "same"
        result = cli("copy", "--repo", repo, "--to", tmp_path / "alias" / "repo" / "offsite")
        assert not (repo / "offsite").exists(), "the offsite copy was written inside the primary repository"
        assert_one_line_error(result, 2, "inside")
    finally:
        subprocess.run(["umount", str(tmp_path / "alias")], check=False)


# ------------------------------------------------------------------ forget


def test_forget_fails_whole_on_another_databases_manifest_every_way(tmp_path: Path) -> None:
    """Fine: with b's manifest damaged, `forget --prune` without --db, and `--db app --prune --dry-run`, exit
    1 in one line naming the manifest, and nothing in the repository changes."""
    repo, app, _ = two_databases_repo(tmp_path)
    (damaged,) = [p for p in snapshot_files(repo) if p.parent.name == "b"]
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0xFF
    damaged.write_bytes(bytes(data))
    before = tree_hashes(repo)
    for extra in ([], ["--db", "app", "--dry-run"], ["--dry-run"]):
        result = cli("forget", "--repo", repo, "--keep-last", "1", "--prune", "--grace", "0", *extra)
        assert_one_line_error(result, 1, damaged.name)
        assert tree_hashes(repo) == before, extra


# ------------------------------------------------------------------ passphrase


def test_edge_space_passphrase_refused_without_echo_or_folder(tmp_path: Path) -> None:
    """Fine: init and a first backup refuse " secret" / "secret  " with exit 2, one line, the passphrase
    not in it, and no repository folder left behind."""
    src = make_db(tmp_path / "app.db", mb=0.1)
    for i, (key, args) in enumerate([(" hunter2-pass", ["init"]), ("hunter2-pass  ", ["backup", str(src)])]):
        repo = tmp_path / f"r{i}"
        result = run_dbre(*args, "--repo", repo, env={"DBRE_ENCRYPTION_KEY": key})
        line = assert_one_line_error(result, 2, "white space", "nothing was created")
        assert "hunter2" not in line and "hunter2" not in result.stdout
        assert not repo.exists()
