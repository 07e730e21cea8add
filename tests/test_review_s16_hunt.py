"""Findings of session 16's bug hunt on the repository side (an operator's bad day), each a test that
failed before its fix: a forget that failed after forgetting, overflowing keep-within durations, exit
codes of a missing repository, a --prom path that cannot be one, an offsite copy that is the primary
itself or lies inside it, a passphrase no --key-file can give, a --repo whose folder cannot be made."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dbre.errors import DbreError
from dbre.repository.repo import Repository
from dbre.repository.retention import KeepPolicy, forget
from dbre.storage import PermanentError
from dbre.storage.local import LocalStore
from tests.dbfactory import assert_one_line_error, cli, make_db, snapshot_files, tree_hashes, two_databases_repo


@pytest.fixture
def two_dbs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A repository with database ``app`` (two snapshots) and ``b`` (one)."""
    return two_databases_repo(tmp_path)


def test_forget_with_prune_reads_every_manifest_before_it_forgets(two_dbs: tuple[Path, Path, Path]) -> None:
    """Before: `forget --db app --prune` forgot app's older snapshot, then failed on b's damaged manifest
    with "no pack was deleted", reading as if nothing had happened."""
    repo, _, _ = two_dbs
    (damaged,) = [p for p in snapshot_files(repo) if p.parent.name == "b"]
    data = bytearray(damaged.read_bytes())
    data[20] ^= 0xFF
    damaged.write_bytes(bytes(data))
    before = tree_hashes(repo)
    result = cli("forget", "--repo", repo, "--db", "app", "--keep-last", "1", "--prune", "--grace", "0")
    assert_one_line_error(result, 1, "no snapshot was forgotten", damaged.name)
    assert tree_hashes(repo) == before  # app's two snapshots and every pack are still there


class _PacksUnlistable(LocalStore):
    """A local store whose listing of packs fails once something was deleted (the prune's step after the
    forget's deletions)."""

    deleted = False

    def delete(self, key: str) -> None:
        self.deleted = True
        super().delete(key)

    def list(self, prefix: str = "", **kwargs: Any) -> Iterator[str]:
        if prefix.startswith("packs") and self.deleted:
            raise PermanentError("list packs/: the listing failed")
        return super().list(prefix, **kwargs)


def test_a_prune_failing_after_the_forget_says_what_was_forgotten(two_dbs: tuple[Path, Path, Path]) -> None:
    """A unit test of the logic above the store: when the prune fails once snapshots are gone, its error
    names them (they are forgotten: the failure must not read as "nothing happened")."""
    repo_path, _, _ = two_dbs
    older = sorted(p for p in snapshot_files(repo_path) if p.parent.name == "app")[-1]  # (names sort newest first)
    repo = Repository.open(_PacksUnlistable(str(repo_path)))
    with pytest.raises(DbreError) as caught:
        forget(repo, KeepPolicy(last=1), "app", prune=True, grace=0)
    assert "forget had already forgotten 1 snapshots: app/" in caught.value.message
    assert "the listing failed" in caught.value.message
    assert not older.exists()  # it really was forgotten, as the message says


@pytest.mark.parametrize("within", ["740000d", "17800000h", "99999999999h", "99999999999999999999d"])
def test_an_enormous_keep_within_keeps_everything(two_dbs: tuple[Path, Path, Path], within: str) -> None:
    """Before: OverflowError ("date value out of range"), as an unexpected error."""
    repo, _, _ = two_dbs
    result = cli("forget", "--repo", repo, "--keep-within", within, "--dry-run", "--json")
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert len(out["keep"]) == 3 and out["remove"] == []


@pytest.mark.parametrize("command", [["unlock"], ["key", "passwd"]])
def test_a_missing_repository_exits_1_as_for_every_command(tmp_path: Path, command: list[str]) -> None:
    env = {"DBRE_ENCRYPTION_KEY": "old-pass", "DBRE_NEW_ENCRYPTION_KEY": "new-pass"}
    result = cli(*command, "--repo", tmp_path / "none", env=env)
    assert_one_line_error(result, 1, "no repository at", "check --repo")
    assert not (tmp_path / "none").exists()


def test_a_prom_path_that_cannot_be_one_is_refused_first(two_dbs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Before: "unexpected error: FileNotFoundError" / "IsADirectoryError", and a temp file left."""
    repo, _, _ = two_dbs
    result = cli("status", "--repo", repo, "--prom", tmp_path / "missing" / "m.prom")
    assert_one_line_error(result, 2, "does not exist", "create it")
    folder = tmp_path / "m.prom"
    folder.mkdir()
    result = cli("status", "--repo", repo, "--prom", folder)
    assert_one_line_error(result, 2, "is a folder")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    ok = cli("status", "--repo", repo, "--prom", tmp_path / "dbre.prom")
    assert "dbre_" in (tmp_path / "dbre.prom").read_text(), ok


def test_an_offsite_copy_that_is_the_primary_is_an_alert(two_dbs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Before: `status --offsite` with the primary itself printed "current" and exited 0."""
    repo, _, _ = two_dbs
    for spelled in (str(repo), str(repo) + "/", "./" + str(repo.relative_to(Path.cwd()))
                    if repo.is_relative_to(Path.cwd()) else str(repo) + "/."):
        result = cli("status", "--repo", repo, "--offsite", spelled, "--json")
        assert result.returncode == 1, result
        alerts = [a for a in json.loads(result.stdout)["alerts"] if a["event"] == "offsite_unreadable"]
        assert alerts and all("primary repository itself" in a["message"] for a in alerts), alerts


def test_a_copy_inside_the_primary_is_refused_and_reported(two_dbs: tuple[Path, Path, Path]) -> None:
    repo, _, _ = two_dbs
    before = tree_hashes(repo)
    result = cli("copy", "--repo", repo, "--to", repo / "offsite")
    assert_one_line_error(result, 2, "one inside the other")
    assert tree_hashes(repo) == before and not (repo / "offsite").exists()
    # the other way round: the primary inside the folder named as the copy
    result = cli("copy", "--repo", repo, "--to", repo.parent)
    assert_one_line_error(result, 2, "one inside the other")
    # a copy already made there by an older dbre: status says it is no copy
    assert cli("copy", "--repo", repo, "--to", repo.parent / "offsite").returncode == 0
    (repo.parent / "offsite").rename(repo / "offsite")
    result = cli("status", "--repo", repo, "--offsite", repo / "offsite", "--json")
    messages = [a["message"] for a in json.loads(result.stdout)["alerts"]]
    assert any("lie one inside the other" in m for m in messages), messages


@pytest.mark.parametrize("passphrase", ["spacey-pass ", " spacey-pass", "pass\n"])
def test_a_passphrase_no_key_file_can_give_creates_nothing(tmp_path: Path, passphrase: str) -> None:
    """Before: the repository was created, and the same passphrase in a --key-file then failed as a
    wrong key (pointing at a changed config)."""
    src = make_db(tmp_path / "app.db", mb=0.1)
    result = cli("backup", src, "--repo", tmp_path / "repo", env={"DBRE_ENCRYPTION_KEY": passphrase})
    line = assert_one_line_error(result, 2, "white space", "nothing was created")
    assert "spacey" not in line and not (tmp_path / "repo" / "config").exists()


def test_a_repository_folder_that_cannot_be_made_names_the_fix(tmp_path: Path) -> None:
    src = make_db(tmp_path / "app.db", mb=0.1)
    result = cli("backup", src, "--repo", "/proc/dbre-no-such-folder")
    assert_one_line_error(result, 1, "config", "check the repository path")
