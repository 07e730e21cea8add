"""Restore with an offsite copy as fallback (`restore --fallback REPO`, `--policy`): each object a
restore needs that is missing, truncated, flipped or forged in the primary (pack, pack index, page-map
run, manifest, generation base, segment, config) is taken from the copy made by `dbre copy`, checked as
strictly, and named on its own line; the restored file is byte for byte the one the intact repository
gives. Without a fallback the restore refuses as before; damaged in both, it fails with one line naming
the object and both repositories, the target untouched. Real local directories and a real S3 server
(moto_server); nothing is mocked."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dbre.replicate.segment import list_generations
from dbre.repository.repo import Repository
from tests.dbfactory import assert_one_line_error, assert_same_db, cli, make_db
from tests.replication import make_source, replicating


@dataclass
class Setup:
    primary: Path  # the intact primary repository (tests damage copies of it)
    offsite: Path  # its copy by `dbre copy` (tests only read it)
    src: Path
    snapshot: str  # the newest snapshot's id
    txid: int  # the last replicated transaction
    ref_snapshot: Path  # restore --snapshot <snapshot> of the intact primary
    ref_newest: Path  # restore (the newest replicated state) of the intact primary


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _replicate(repo: Repository, src: Path, commits: int) -> None:
    """A Replicator thread ships ``commits`` transactions of ``src`` as a few segments, then stops."""
    conn = sqlite3.connect(src, isolation_level=None)
    with replicating(repo, src):
        for k in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(3000))", (10_000 + k,))
            conn.execute("UPDATE counter SET n = ?", (10_000 + k,))
            conn.execute("COMMIT")
            time.sleep(0.12)
    conn.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("fallback")
    src, primary, offsite = root / "src.db", root / "primary", root / "offsite"
    make_source(src, 3000)
    assert cli("backup", src, "--repo", primary, "--db", "app").returncode == 0
    conn = sqlite3.connect(src, isolation_level=None)
    conn.execute("UPDATE t SET pad = randomblob(300) WHERE seq % 7 = 0")
    conn.close()
    assert cli("backup", src, "--repo", primary, "--db", "app").returncode == 0
    _replicate(Repository.open(str(primary)), src, 12)
    r = cli("copy", "--repo", primary, "--to", offsite)
    assert r.returncode == 0, r
    repo = Repository.open(str(primary))
    (names,) = list_generations(repo, "app").values()
    assert len(names) >= 3, names
    newest = repo.snapshots("app")[-1]
    ref_snapshot, ref_newest = root / "ref_snapshot.db", root / "ref_newest.db"
    r = cli("restore", "--repo", primary, "--db", "app", "--snapshot", newest.id, "--to", ref_snapshot)
    assert r.returncode == 0, r
    assert cli("restore", "--repo", primary, "--db", "app", "--to", ref_newest).returncode == 0
    assert_same_db(src, ref_newest)  # every commit was shipped: the newest replicated state is the source
    return Setup(primary, offsite, src, newest.id, names[-1].last, ref_snapshot, ref_newest)


# -- damage --------------------------------------------------------------------------------------


def _index_start(pack: bytes) -> int:
    """Where a pack's sealed index begins (``blob* ‖ index ‖ u32 len ‖ "DBREPK01"``)."""
    assert pack[-8:] == b"DBREPK01"
    (length,) = struct.unpack("<I", pack[-12:-8])
    return len(pack) - 12 - length


@dataclass
class Target:
    key: str  # the object damaged
    restore: list[str]  # restore options of a state that needs it
    ref: str  # "snapshot" or "newest": which reference the restore must equal
    lo: int = 0  # where a flipped bit lands: [lo, hi)
    hi: int = 0


def target(repo_dir: Path, snapshot: str, kind: str) -> Target:
    r = Repository.open(str(repo_dir))
    m = r.load_manifest("app", snapshot)
    snap = ["--snapshot", snapshot]
    if kind == "manifest":
        (key,) = [k for k in r.store.list("snapshots/app/") if k.endswith(snapshot)]
        return Target(key, snap, "snapshot", 1, (repo_dir / key).stat().st_size)
    if kind in ("segment", "base"):
        (gen,) = list_generations(r, "app")
        names = list_generations(r, "app")[gen]
        key = f"segments/app/{gen}/base" if kind == "base" else names[len(names) // 2].key
        size = (repo_dir / key).stat().st_size
        return Target(key, [], "newest", size // 2, size // 2 + 1)
    if kind == "config":
        size = (repo_dir / "config").stat().st_size
        return Target("config", snap, "snapshot", size // 3, size // 3 + 1)
    if kind == "run":
        run = m.runs[0]
        return Target(f"packs/{run.pack[:2]}/{run.pack}", snap, "snapshot", run.offset + run.length // 2,
                      run.offset + run.length // 2 + 1)
    # the largest pack of the snapshot: a page batch's byte, or its index's
    pack = max(m.packs, key=lambda p: (repo_dir / "packs" / p[:2] / p).stat().st_size)
    key = f"packs/{pack[:2]}/{pack}"
    raw = (repo_dir / key).read_bytes()
    start = _index_start(raw)
    if kind == "index":
        return Target(key, snap, "snapshot", start + 1, len(raw) - 12)
    assert kind == "pack"
    runs = [(x.offset, x.offset + x.length) for x in [*m.runs, *m.fast_runs] if x.pack == pack]
    pos = next(p for p in range(start // 3, start) if not any(a <= p < b for a, b in runs))
    return Target(key, snap, "snapshot", pos, pos + 1)


def damage(path: Path, how: str, t: Target) -> None:
    raw = bytearray(path.read_bytes())
    if how == "flip":
        raw[(t.lo + t.hi) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
    elif how == "truncate":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        assert how == "delete"
        path.unlink()


CASES = [("pack", "flip"), ("pack", "truncate"), ("pack", "delete"), ("index", "flip"), ("run", "flip"),
         ("manifest", "flip"), ("manifest", "delete"), ("segment", "flip"), ("segment", "truncate"),
         ("segment", "delete"), ("base", "flip"), ("config", "flip")]


@pytest.mark.parametrize(("kind", "how"), CASES)
def test_fallback_takes_the_damaged_object(setup: Setup, tmp_path: Path, kind: str, how: str) -> None:
    repo = tmp_path / "primary"
    shutil.copytree(setup.primary, repo)
    t = target(repo, setup.snapshot, kind)
    damage(repo / t.key, how, t)
    ref = setup.ref_snapshot if t.ref == "snapshot" else setup.ref_newest

    # without a fallback: refused as before, nothing written
    out = tmp_path / "out" / "restored.db"
    out.parent.mkdir()
    r = cli("restore", "--repo", repo, "--db", "app", *t.restore, "--to", out)
    assert r.returncode != 0, r
    assert_one_line_error(r, r.returncode)
    assert not list(out.parent.iterdir()), "a refused restore left files"

    # with the offsite copy: the exact file, the object named on its line
    r = cli("restore", "--repo", repo, "--db", "app", *t.restore, "--to", out, "--fallback", setup.offsite)
    assert r.returncode == 0, r
    lines = [line for line in r.stdout.splitlines() if "taken from" in line]
    assert any(line.startswith(f"{t.key}:") and str(setup.offsite) in line for line in lines), r.stdout
    assert ("missing" if how == "delete" else "in the primary") in "\n".join(lines)
    assert sorted(p.name for p in out.parent.iterdir()) == ["restored.db"]
    assert _sha(out) == _sha(ref), "the restore with a fallback is not the intact repository's"
    assert_same_db(ref, out)

    # --json counts them
    out2 = tmp_path / "out" / "again.db"
    r = cli("restore", "--repo", repo, "--db", "app", *t.restore, "--to", out2, "--fallback", setup.offsite,
            "--json")
    assert r.returncode == 0, r
    fb = json.loads(r.stdout)["fallback"]
    assert fb["objects"] + (1 if fb["config_from"] else 0) == len(lines) >= 1
    assert _sha(out2) == _sha(ref)


def test_damaged_in_both_fails_naming_both(setup: Setup, tmp_path: Path) -> None:
    repo, offsite = tmp_path / "primary", tmp_path / "offsite"
    shutil.copytree(setup.primary, repo)
    shutil.copytree(setup.offsite, offsite)
    t = target(repo, setup.snapshot, "pack")
    damage(repo / t.key, "flip", t)
    damage(offsite / t.key, "truncate", t)
    place = tmp_path / "place"
    place.mkdir()
    old = make_db(place / "old.db", mb=0.2, journal="delete", seed=5)
    before = _sha(old)
    r = cli("restore", "--repo", repo, "--db", "app", "--snapshot", setup.snapshot, "--to", old, "--force",
            "--no-safety-snapshot", "--fallback", offsite)
    line = assert_one_line_error(r, 1, t.key, str(repo), str(offsite))
    assert "truncated" in line and "checksum" in line, line
    assert _sha(old) == before, "a refused restore changed the target"
    assert sorted(p.name for p in place.iterdir()) == ["old.db"]
    # missing in the copy too: the same
    (offsite / t.key).unlink()
    r = cli("restore", "--repo", repo, "--db", "app", "--snapshot", setup.snapshot, "--to", place / "new.db",
            "--fallback", offsite)
    assert_one_line_error(r, 1, t.key, "missing in " + str(offsite))
    assert sorted(p.name for p in place.iterdir()) == ["old.db"]


def test_forged_objects_are_not_accepted(setup: Setup, tmp_path: Path) -> None:
    """Objects of valid format but wrong content in the primary: another pack's bytes under a pack's key,
    an older snapshot's manifest re-sealed (valid checksum: a plain repository's key is in its config) under
    the newest one's key, another segment's bytes under a segment's key. Each is refused and taken from the
    copy; a forged object in the copy as well is refused there too."""
    repo = tmp_path / "primary"
    shutil.copytree(setup.primary, repo)
    r = Repository.open(str(repo))
    m = r.load_manifest("app", setup.snapshot)
    other = next(p for p in r.pack_ids() if p not in m.packs)
    pack = target(repo, setup.snapshot, "pack").key
    (repo / pack).write_bytes((repo / "packs" / other[:2] / other).read_bytes())
    older = r.snapshots("app")[0]
    key = target(repo, setup.snapshot, "manifest").key
    (repo / key).write_bytes(r.sealer.seal(older.to_json(), key))
    (gen,) = list_generations(r, "app")
    names = list_generations(r, "app")[gen]
    (repo / names[1].key).write_bytes((repo / names[0].key).read_bytes())

    out = tmp_path / "snap.db"
    res = cli("restore", "--repo", repo, "--db", "app", "--snapshot", setup.snapshot, "--to", out,
              "--fallback", setup.offsite)
    assert res.returncode == 0, res
    assert f"{key}: holds snapshot {older.id}" in res.stdout and f"{pack}:" in res.stdout, res.stdout
    assert _sha(out) == _sha(setup.ref_snapshot)
    out = tmp_path / "newest.db"
    res = cli("restore", "--repo", repo, "--db", "app", "--to", out, "--fallback", setup.offsite)
    assert res.returncode == 0, res
    assert f"{names[1].key}:" in res.stdout, res.stdout
    assert _sha(out) == _sha(setup.ref_newest)

    # the copy's object forged as well (the copy is no more trusted than the primary's references)
    offsite = tmp_path / "offsite"
    shutil.copytree(setup.offsite, offsite)
    (offsite / pack).write_bytes((offsite / "packs" / other[:2] / other).read_bytes())
    res = cli("restore", "--repo", repo, "--db", "app", "--snapshot", setup.snapshot, "--to", tmp_path / "x.db",
              "--fallback", offsite)
    assert_one_line_error(res, 1, pack, str(offsite))
    assert not (tmp_path / "x.db").exists()


def test_policy_offsite_is_the_fallback_and_bad_fallbacks(setup: Setup, tmp_path: Path) -> None:
    repo = tmp_path / "primary"
    shutil.copytree(setup.primary, repo)
    t = target(repo, setup.snapshot, "manifest")
    damage(repo / t.key, "flip", t)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"databases:\n  - name: app\n    source: {setup.src}\n    rpo: 1h\n    rto: 15m\n"
        f"repositories:\n  primary: {repo}\n  offsite: {setup.offsite}\nretention:\n  keep_last: 3\n")
    out = tmp_path / "out.db"
    r = cli("restore", "--repo", repo, "--db", "app", "--snapshot", setup.snapshot, "--to", out, "--policy", policy)
    assert r.returncode == 0, r
    assert f"{t.key}:" in r.stdout and _sha(out) == _sha(setup.ref_snapshot)
    # a fallback that is no copy of the primary (another repository), or no repository: bad input, nothing read
    stranger = tmp_path / "stranger"
    assert cli("backup", setup.src, "--repo", stranger, "--db", "app").returncode == 0
    for bad, needle in ((stranger, "not an offsite copy"), (tmp_path / "empty", "no repository")):
        r = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "no.db", "--fallback", bad)
        assert_one_line_error(r, 2, needle)
    assert not (tmp_path / "no.db").exists()
    r = cli("restore", "--repo", repo, "--db", "app", "--to", tmp_path / "no.db", "--fallback", repo)
    assert_one_line_error(r, 2, "is the primary")


def test_restore_table_reads_through_the_fallback(setup: Setup, tmp_path: Path) -> None:
    repo = tmp_path / "primary"
    shutil.copytree(setup.primary, repo)
    t = target(repo, setup.snapshot, "pack")
    damage(repo / t.key, "delete", t)
    live = tmp_path / "live.db"
    shutil.copy(setup.ref_snapshot, live)
    r = cli("restore-table", "--repo", repo, "--db", "app", "--live", live, "--table", "t",
            "--snapshot", setup.snapshot, "--apply", "--fallback", setup.offsite)
    assert r.returncode == 0, r
    assert f"{t.key}: missing in the primary; taken from {setup.offsite}" in r.stdout, r.stdout
    conn = sqlite3.connect(live)
    try:
        assert conn.execute("SELECT count(*) FROM t_restored").fetchone() == conn.execute(
            "SELECT count(*) FROM t").fetchone()
    finally:
        conn.close()


def test_s3_primary_with_s3_fallback(setup: Setup, tmp_path: Path, s3_client: Any, s3_bucket: str) -> None:
    """The primary and its copy on a real S3 server: a deleted pack and a flipped manifest are taken
    from the copy, and the restored file is exact."""
    primary, offsite = f"s3://{s3_bucket}/primary", f"s3://{s3_bucket}/offsite"
    assert cli("copy", "--repo", setup.primary, "--to", primary).returncode == 0
    assert cli("copy", "--repo", primary, "--to", offsite).returncode == 0
    local = target(setup.primary, setup.snapshot, "pack")
    manifest = target(setup.primary, setup.snapshot, "manifest")
    s3_client.delete_object(Bucket=s3_bucket, Key=f"primary/{local.key}")
    body = bytearray(s3_client.get_object(Bucket=s3_bucket, Key=f"primary/{manifest.key}")["Body"].read())
    body[len(body) // 2] ^= 0x01
    s3_client.put_object(Bucket=s3_bucket, Key=f"primary/{manifest.key}", Body=bytes(body))
    out = tmp_path / "out.db"
    r = cli("restore", "--repo", primary, "--db", "app", "--snapshot", setup.snapshot, "--to", out)
    assert_one_line_error(r, 1, manifest.key)
    r = cli("restore", "--repo", primary, "--db", "app", "--snapshot", setup.snapshot, "--to", out,
            "--fallback", offsite, "--json")
    assert r.returncode == 0, r
    fb = json.loads(r.stdout)["fallback"]
    assert {x["key"] for x in fb["taken"]} == {local.key, manifest.key}, fb
    assert _sha(out) == _sha(setup.ref_snapshot)



def test_encrypted_config_and_forged_manifest(tmp_path: Path) -> None:
    """An encrypted repository: its config's wrapped key damaged (the primary no longer opens with the
    passphrase) and its newest manifest replaced by one sealed under another repository's key (an attacker
    without the key). The copy's config opens with the same passphrase and the copy's manifest
    authenticates; both lines say so, and the file is exact. The copy shares the primary's key: `dbre copy`
    gives it the primary's config bytes, so a restore needs no other key."""
    from dbre.secrets import Secret

    env = {"DBRE_ENCRYPTION_KEY": "correct horse"}
    src, primary, offsite = make_db(tmp_path / "src.db", mb=0.5), tmp_path / "primary", tmp_path / "offsite"
    assert cli("backup", src, "--repo", primary, "--db", "app", env=env).returncode == 0
    assert cli("copy", "--repo", primary, "--to", offsite, env=env).returncode == 0
    assert (offsite / "config").read_bytes() == (primary / "config").read_bytes()
    repo = Repository.open(str(primary), Secret("correct horse"))
    (m,) = repo.snapshots("app")
    (key,) = list(repo.store.list("snapshots/app/"))
    evil = Repository.open_or_init(str(tmp_path / "evil"), Secret("attacker"))
    (primary / key).write_bytes(evil.sealer.seal(m.to_json(), key))
    config = json.loads((primary / "config").read_text())
    wrapped = bytearray(base64.b64decode(config["encryption"]["wrapped_key"]))
    wrapped[20] ^= 0x01  # the master key no longer unwraps: "wrong encryption key"
    config["encryption"]["wrapped_key"] = base64.b64encode(bytes(wrapped)).decode()
    (primary / "config").write_text(json.dumps(config, indent=1))

    out = tmp_path / "out.db"
    r = cli("restore", "--repo", primary, "--db", "app", "--to", out, env=env)
    assert_one_line_error(r, 1)
    r = cli("restore", "--repo", primary, "--db", "app", "--to", out, "--fallback", offsite, env=env)
    assert r.returncode == 0, r
    assert f"config: unusable in the primary; taken from {offsite}" in r.stdout, r.stdout
    assert f"{key}: authentication failed" in r.stdout, r.stdout
    assert_same_db(src, out)
    # a wrong passphrase stays wrong: the copy does not open with it either
    r = cli("restore", "--repo", primary, "--db", "app", "--to", tmp_path / "no.db", "--fallback", offsite,
            env={"DBRE_ENCRYPTION_KEY": "wrong"})
    assert_one_line_error(r, 1)
    assert not (tmp_path / "no.db").exists()


def test_unreadable_object_is_read_from_the_copy(setup: Setup, tmp_path: Path) -> None:
    """A pack the primary's store cannot read (a permanent store error, e.g. EIO or access denied on
    one object) is read from the copy, said as "unreadable"; the library API, as Prefect and drills use it."""
    from dbre.repository.fallback import FallbackRepository, FallbackStore
    from dbre.restore.full import apply_restore, plan_restore
    from dbre.storage import open_store
    from dbre.storage.base import PermanentError
    from tests.stores import PassThroughStore

    bad = target(setup.primary, setup.snapshot, "pack").key

    class Failing(PassThroughStore):
        def get_range(self, key: str, offset: int, length: int) -> bytes:
            if key == bad:
                raise PermanentError(f"get {key}: Input/output error")
            return self.inner.get_range(key, offset, length)

    primary = Repository.open(str(setup.primary))
    repo = FallbackRepository(primary, FallbackStore(Failing(primary.store), [open_store(str(setup.offsite))]))
    out = tmp_path / "out.db"
    apply_restore(repo, plan_restore(repo, "app", out, snapshot=setup.snapshot))
    assert [t.line for t in repo.taken] == [f"{bad}: unreadable (get {bad}: Input/output error) in the primary; "
                                            f"taken from {setup.offsite}"]
    assert _sha(out) == _sha(setup.ref_snapshot)
    assert not any(k.startswith("locks/") for k in open_store(str(setup.offsite)).list("locks/")), \
        "the restore wrote into the copy"


def test_fallback_with_follow_or_provider_is_refused(setup: Setup, tmp_path: Path) -> None:
    """--follow and --provider read no repository objects through copies: --fallback with them is bad input."""
    r = cli("restore", "--repo", setup.primary, "--db", "app", "--to", tmp_path / "s.db", "--follow",
            "--fallback", setup.offsite)
    assert_one_line_error(r, 2, "--fallback")
    r = cli("restore", "--provider", "sqld", "--to", tmp_path / "s.db", "--fallback", setup.offsite)
    assert_one_line_error(r, 2, "--fallback")
    assert not (tmp_path / "s.db").exists()


def test_a_distrusted_primary_is_still_read_last_for_what_every_copy_lost(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two packs damaged in the primary make it distrusted (review s8, finding 12: then every object comes from
    the copy first); a third pack, intact in the primary but damaged in the copy, is still read from the primary,
    last: the restore is exact, and names what it took from where."""
    from dbre.repository import pack as pack_module
    from dbre.repository.copy import copy_snapshots
    from dbre.repository.fallback import DISTRUST_AFTER, open_with_fallbacks
    from dbre.repository.repo import pack_key
    from dbre.restore import full

    monkeypatch.setattr(pack_module.PackWriter.__init__, "__defaults__", (64 * 1024, None))
    primary, offsite = tmp_path / "primary", tmp_path / "offsite"
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, v BLOB)")
        c.executemany("INSERT INTO items(v) VALUES (randomblob(1000))", [() for _ in range(3000)])
    assert cli("backup", db, "--repo", primary, "--db", "app").returncode == 0
    m = Repository.open(str(primary)).snapshots("app")[-1]
    copy_snapshots(Repository.open(str(primary)), Repository.init_copy_of(Repository.open(str(primary)), str(offsite),
                                                                          None))
    # the packs a restore reads: pages, page map and fast runs (a pack holding only the table checksums'
    # page sums is a hint for the next backup, never read by a restore)
    from dbre.repository.backup import load_records

    recs = load_records(Repository.open(str(primary)), m)
    needed = {bytes(recs.buf[i * recs.size + 16 : i * recs.size + 32]).hex() for i in range(len(recs))}
    needed |= {r.pack for r in (*m.runs, *m.fast_runs)}
    packs = sorted(p for p in m.packs if p in needed)
    assert len(packs) >= DISTRUST_AFTER + 2, len(packs)

    def flip(root: Path, pack: str) -> None:
        path = root / pack_key(pack)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    for p in packs[:-1]:
        flip(primary, p)
    # lost in the copy only, every byte of it: the primary's is the one intact. (One flipped byte in
    # the middle was not enough: once the primary is distrusted, a blob of that pack away from the
    # byte reads fine from the copy, and when the pack order put one there it was "taken" from it.)
    lost = offsite / pack_key(packs[-1])
    lost.write_bytes(bytes(b ^ 0xFF for b in lost.read_bytes()))
    fb = open_with_fallbacks(str(primary), None, [str(offsite)])
    full.apply_restore(fb, full.plan_restore(fb, "app", tmp_path / "out.db"))
    assert_same_db(db, tmp_path / "out.db")
    taken = {t.key for t in fb.taken}  # type: ignore[attr-defined]
    assert {pack_key(p) for p in packs[:-1]} <= taken and pack_key(packs[-1]) not in taken
