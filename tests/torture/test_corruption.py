"""Corruption: one bit flipped, or the object cut to half its length, in each kind of object of a
copy of a repository (a data pack, a manifest, a page-map run inside its pack, a replicated
segment, the config). `dbre verify --read-data` exits 1 naming the damaged object's key, and
`dbre restore` of a state that needs it refuses with exit 1 and one line, leaving the target as it
was (an old database byte for byte; an absent path absent, with no temp file beside it). With the
offsite copy `dbre copy` made as `--fallback`, the same restore takes the damaged object from it, names
it on its own line, and gives the file the intact repository gives, byte for byte."""

from __future__ import annotations

import hashlib
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dbre.replicate.segment import list_generations
from dbre.repository.repo import Repository
from tests.dbfactory import assert_one_line_error, make_db
from tests.replication import make_source, start_writer, wait_for_generation
from tests.torture.harness import cli
from tests.torture.launcher import Launcher

KINDS = ("pack", "manifest", "run", "segment", "config")


@dataclass
class Base:
    """The repository every case copies: db ``app`` replicated (a base snapshot and segments), then
    two backups of it."""

    repo: Path
    src: Path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, launcher: Launcher) -> Base:
    root = tmp_path_factory.mktemp("corruption")
    src, repo = root / "src.db", root / "repo"
    make_source(src, 2000)
    run = launcher.start(["replicate", src, "--repo", repo, "--db", "app", "--interval", "200ms"])
    try:
        wait_for_generation(str(repo))
        writer = start_writer(src, root / "writer.log", 1.5, start_seq=2000, pause=0.01, ckpt_every=0)
        assert writer.wait(timeout=60) == 0
        time.sleep(0.8)
    finally:
        if run.running():
            run.terminate()
    assert run.returncode == 0, run
    for _ in range(2):
        writer = start_writer(src, root / "writer.log", 0.3, start_seq=10**6 + _ * 1000, pause=0.005)
        assert writer.wait(timeout=60) == 0
        r = cli("backup", src, "--repo", repo, "--db", "app")
        assert r.returncode == 0, r
    assert cli("verify", "--repo", repo, "--read-data").returncode == 0
    return Base(repo, src)


@dataclass
class Damage:
    key: str  # the object damaged, as verify must name it
    restore: list[str]  # the restore options of a state that needs it


def _index_start(pack: bytes) -> int:
    """Where a pack's sealed index begins (``blob* ‖ index ‖ u32 len ‖ "DBREPK01"``)."""
    assert pack[-8:] == b"DBREPK01"
    (length,) = struct.unpack("<I", pack[-12:-8])
    return len(pack) - 12 - length


def choose(repo: Path, kind: str) -> tuple[Damage, int, int]:
    """The object of ``kind`` to damage, and the byte range [lo, hi) where a flipped bit lands."""
    r = Repository.open(str(repo))
    snaps = sorted(r.snapshots(), key=lambda m: m.taken_at)
    newest = snaps[-1]
    if kind == "config":
        size = (repo / "config").stat().st_size
        return Damage("config", ["--snapshot", newest.id]), size // 3, size // 3 + 1
    if kind == "manifest":
        (key,) = [k for k in r.store.list(f"snapshots/{newest.db}/") if k.endswith(newest.id)]
        size = (repo / key).stat().st_size
        return Damage(key, ["--snapshot", newest.id]), 1, size
    if kind == "segment":
        (names,) = list_generations(r, "app").values()
        name = names[len(names) // 2]
        size = (repo / name.key).stat().st_size
        return Damage(name.key, ["--txid", str(name.last)]), size // 2, size // 2 + 1
    run_ranges: dict[str, list[tuple[int, int]]] = {}
    for m in snaps:
        for ref in [*m.runs, *m.fast_runs]:
            run_ranges.setdefault(ref.pack, []).append((ref.offset, ref.length))
    if kind == "run":
        ref = newest.runs[0]
        middle = ref.offset + ref.length // 2
        return Damage(f"packs/{ref.pack[:2]}/{ref.pack}", ["--snapshot", newest.id]), middle, middle + 1
    # a data pack of the newest snapshot: a byte of a page batch (neither a run nor the index)
    for pack in newest.packs:
        raw = (repo / "packs" / pack[:2] / pack).read_bytes()
        taken = sorted(run_ranges.get(pack, []))
        for pos in range(len(raw) // 3, _index_start(raw)):
            if not any(o <= pos < o + n for o, n in taken):
                return Damage(f"packs/{pack[:2]}/{pack}", ["--snapshot", newest.id]), pos, pos + 1
    raise AssertionError("no data pack in the newest snapshot")


def damaged_copy(base: Base, tmp_path: Path, kind: str, how: str) -> tuple[Path, Damage]:
    """A copy of the base repository with one object of ``kind`` damaged (a bit flipped, or cut in half)."""
    repo = tmp_path / "repo"
    shutil.copytree(base.repo, repo)
    damage, lo, hi = choose(repo, kind)
    path = repo / damage.key
    raw = bytearray(path.read_bytes())
    if how == "flip":
        pos = (lo + hi) // 2
        raw[pos] ^= 0x10
        path.write_bytes(bytes(raw))
    else:
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    return repo, damage


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("kind", KINDS)
def test_damage_is_named_and_refused(base: Base, tmp_path: Path, kind: str, how: str) -> None:
    repo, damage = damaged_copy(base, tmp_path, kind, how)

    verified = cli("verify", "--repo", repo, "--read-data")
    assert verified.returncode == 1, verified
    assert damage.key in verified.stdout + verified.stderr, f"verify does not name {damage.key}: {verified}"
    assert "Traceback" not in verified.stdout + verified.stderr

    # restore over an old database: refused, the old file byte for byte as it was
    (tmp_path / "place").mkdir()
    old = make_db(tmp_path / "place" / "old.db", mb=0.2, journal="delete", seed=5)
    before = hashlib.sha256(old.read_bytes()).hexdigest()
    r = cli("restore", "--repo", repo, "--db", "app", *damage.restore, "--to", old, "--force",
            "--no-safety-snapshot")
    assert_one_line_error(r, 1)
    assert hashlib.sha256(old.read_bytes()).hexdigest() == before, "a refused restore changed the target"
    # to a new path: nothing is left there
    fresh = tmp_path / "place" / "new.db"
    r = cli("restore", "--repo", repo, "--db", "app", *damage.restore, "--to", fresh)
    assert_one_line_error(r, 1)
    assert sorted(p.name for p in fresh.parent.iterdir()) == ["old.db"], "a refused restore left files"



@pytest.fixture(scope="module")
def offsite(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base repository's offsite copy (`dbre copy`), and each state's restore from the intact base."""
    root = tmp_path_factory.mktemp("corruption_offsite")
    r = cli("copy", "--repo", base.repo, "--to", root / "offsite")
    assert r.returncode == 0, r
    return root / "offsite"


_INTACT: dict[tuple[str, ...], str] = {}


def intact(base: Base, options: list[str], folder: Path) -> str:
    """sha256 of the file the intact base repository restores with ``options`` (restored once per options)."""
    if tuple(options) not in _INTACT:
        out = folder / f"intact-{len(_INTACT)}.db"
        r = cli("restore", "--repo", base.repo, "--db", "app", *options, "--to", out)
        assert r.returncode == 0, r
        _INTACT[tuple(options)] = hashlib.sha256(out.read_bytes()).hexdigest()
    return _INTACT[tuple(options)]


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("kind", KINDS)
def test_damage_is_taken_from_the_offsite_copy(base: Base, offsite: Path, tmp_path: Path, kind: str,
                                               how: str) -> None:
    repo, damage = damaged_copy(base, tmp_path, kind, how)
    out = tmp_path / "restored.db"
    r = cli("restore", "--repo", repo, "--db", "app", *damage.restore, "--to", out, "--fallback", offsite)
    assert r.returncode == 0, r
    taken = [line for line in r.stdout.splitlines() if "taken from" in line]
    assert taken and all(str(offsite) in line for line in taken), r.stdout
    assert any(line.startswith(f"{damage.key}:") for line in taken), f"the restore does not name {damage.key}: {r}"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == intact(base, damage.restore, tmp_path)
