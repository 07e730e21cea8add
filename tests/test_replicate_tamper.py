"""Segments are checked on restore: a damaged, swapped, re-sealed or missing segment is refused
(one line, exit 1) whenever the restore needs it, and restores before it still work; `--txid N`
restores exactly N transactions."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from dbre.errors import IntegrityError
from dbre.replicate.check import verify_segments
from dbre.replicate.segment import Segment, list_generations
from dbre.repository.repo import Repository
from dbre.secrets import Secret
from tests.replication import (
    check_chains,
    dbre_cmd,
    make_source,
    read_log,
    restore_at,
    restored_seq,
    start_replicator,
    start_writer,
    stop_replicator,
    utc,
    wait_for_generation,
)

BASE_ROWS = 200


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A local repository with one generation of at least 4 segments; the writer's log. (Shared:
    the tamper test puts every segment back as it was.)"""
    tmp_path = tmp_path_factory.mktemp("replicated")
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="300ms")
    try:
        wait_for_generation(repo_url, proc=rep)
        assert start_writer(src, log, 2.0, start_seq=BASE_ROWS, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    return repo_url, log


def _names(repo: Repository) -> list:  # type: ignore[type-arg]
    (names,) = list_generations(repo, "app").values()
    assert len(names) >= 4
    return names


def _path(repo_url: str, key: str) -> Path:
    return Path(repo_url) / key


def _restore_cli(repo_url: str, at: str, to: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--at", at, "--to", str(to)),
                          capture_output=True, text=True, timeout=120)


def test_damaged_swapped_resealed_or_missing_segment_is_refused(replicated: tuple[str, Path],
                                                                 tmp_path: Path) -> None:
    repo_url, log = replicated
    commits, _ = read_log(log)
    repo = Repository.open(repo_url)
    names = _names(repo)
    victim, other = names[2], names[1]
    end = utc(commits[-1].after + 1).isoformat()
    before_victim = utc((names[0].last_us + 1) / 1e6)
    original = _path(repo_url, victim.key).read_bytes()

    def refused(what: str) -> None:
        out = tmp_path / f"{what}.db"
        res = _restore_cli(repo_url, end, out)
        assert res.returncode == 1, (what, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and victim.key.split("/")[-1][:16] in lines[0], (what, res.stderr)
        assert not out.exists()
        # and verify names the generation, exit 1
        ver = subprocess.run(dbre_cmd("verify", "--repo", repo_url), capture_output=True, text=True, timeout=120)
        assert ver.returncode == 1 and f"DAMAGED segments/app/{victim.generation}" in ver.stderr, (what, ver)
        # a time before the victim needs only earlier segments: still restored, exactly
        early = tmp_path / f"{what}-early.db"
        restore_at(Repository.open(repo_url), "app", before_victim, early)
        assert restored_seq(early)[1] == BASE_ROWS + names[0].last
        early.unlink()

    # a flipped byte
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01
    _path(repo_url, victim.key).write_bytes(bytes(damaged))
    refused("flipped")
    # another authentic segment stored under the victim's name (sealing binds the name)
    _path(repo_url, victim.key).write_bytes(_path(repo_url, other.key).read_bytes())
    refused("swapped")
    # re-sealed under its own name with one page changed (a plain repository's checksum can be
    # recomputed by anyone): the hash chain, over every page, does not match
    seg = Segment.decode(repo.sealer.unseal(original, victim.key), victim.key)
    tx = seg.transactions[0]
    pgno = next(iter(tx.pages))
    tx.pages[pgno] = bytes([tx.pages[pgno][0] ^ 1]) + tx.pages[pgno][1:]
    _path(repo_url, victim.key).write_bytes(repo.sealer.seal(seg.encode(), victim.key))
    refused("resealed")
    # missing: a gap in the txids
    _path(repo_url, victim.key).unlink()
    with pytest.raises(IntegrityError, match="gap"):
        check_chains(Repository.open(repo_url))
    refused("missing")
    # put back, everything restores again
    _path(repo_url, victim.key).write_bytes(original)
    out = tmp_path / "healed.db"
    assert _restore_cli(repo_url, end, out).returncode == 0
    assert restored_seq(out)[1] == commits[-1].seq
    ver = subprocess.run(dbre_cmd("verify", "--repo", repo_url), capture_output=True, text=True, timeout=120)
    assert ver.returncode == 0 and f"{len(names)} segments" in ver.stdout, ver


def test_restore_txid(replicated: tuple[str, Path], tmp_path: Path) -> None:
    repo_url, log = replicated
    commits, _ = read_log(log)
    for txid in (0, 1, 17, len(commits)):
        out = tmp_path / f"tx{txid}.db"
        res = subprocess.run(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--txid", str(txid),
                                      "--to", str(out)), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert restored_seq(out) == (BASE_ROWS + txid,) * 3
    res = subprocess.run(dbre_cmd("restore", "--repo", repo_url, "--db", "app", "--txid", str(len(commits) + 5),
                                  "--to", str(tmp_path / "none.db")), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no replicated transaction" in res.stderr


def test_encrypted_repository(tmp_path: Path) -> None:
    """Replicate into an encrypted repository (segments sealed with AES-256-GCM under their keys);
    restore at the end and by txid; a segment's bytes are not plain text of the database."""
    env = {"DBRE_ENCRYPTION_KEY": "correct horse battery staple"}
    repo_url, src, log = str(tmp_path / "repo"), tmp_path / "src.db", tmp_path / "writer.log"
    make_source(src, BASE_ROWS)
    rep = start_replicator(src, repo_url, interval="300ms", env=env)
    try:
        deadline = time.time() + 60
        while not list((tmp_path / "repo").glob("segments/app/*/base")) and time.time() < deadline:
            assert rep.poll() is None, rep.stderr.read() if rep.stderr else ""
            time.sleep(0.1)
        assert start_writer(src, log, 1.5, start_seq=BASE_ROWS, ckpt_every=0).wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    commits, _ = read_log(log)
    segs = [p for p in (tmp_path / "repo").glob("segments/app/*/*") if p.name != "base"]
    assert segs and all(p.read_bytes()[0] == 4 for p in segs)  # the encrypted seal's format byte
    repo = Repository.open(repo_url, Secret(env["DBRE_ENCRYPTION_KEY"]))  # one scrypt, in this process
    out = tmp_path / "end.db"
    restore_at(repo, "app", utc(commits[-1].after + 1), out)
    assert restored_seq(out)[1] == commits[-1].seq
    assert verify_segments(repo) == (len(segs), [])
