"""Format-2 snapshots: time-ordered names, O(1) lookups, manifest and run checks, the keyed page hash.

Every storage case runs on a local repository and on a real S3 server (moto_server); the tamper
cases run on plain and encrypted repositories. In a plain repository an attacker can recompute the
(unkeyed) seal checksum, so those cases re-seal under the new name with ``reseal_plain``: what
refuses them is then the manifest or run check itself, not the seal.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import blake3
import pytest
import xxhash
import zstandard

from dbre.errors import UsageError
from dbre.repository import backup as backup_mod
from dbre.repository.backup import backup, load_records, read_run
from dbre.repository.manifest import Manifest, parse_key_id
from dbre.repository.repo import Repository, pack_key
from dbre.restore.full import apply_restore, plan_restore
from dbre.secrets import Secret
from dbre.sources.local import LocalFileSource
from dbre.storage import open_store
from dbre.storage.base import MANIFEST_CAP, Store
from tests.dbfactory import assert_one_line_error, assert_same_db, change_rows, cli, make_db
from tests.stores import PassThroughStore

PASSPHRASE = "snapshots-v2-test-passphrase"
V1_DATA = Path(__file__).parent / "data" / "v1"
V1_PASSPHRASE = "v1-golden-passphrase"
KEY_NAME = re.compile(r"^snapshots/x/[0-9a-f]{16}-[0-9a-f]{16}$")


# --------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty repository location on each backend."""
    if request.param == "local":
        return str(tmp_path / "repo")
    return str(request.getfixturevalue("s3_repo_url"))


@pytest.fixture(params=["plain", "encrypted"])
def passphrase(request: pytest.FixtureRequest) -> str | None:
    return PASSPHRASE if request.param == "encrypted" else None


def _key(passphrase: str | None) -> Secret | None:
    return Secret(passphrase) if passphrase else None


def _env(passphrase: str | None) -> dict[str, str | None]:
    return {"DBRE_ENCRYPTION_KEY": passphrase}


def _backup(url: str | Store, passphrase: str | None, db: Path, name: str = "x") -> Manifest:
    repo = Repository.open_or_init(url, _key(passphrase))
    return backup(repo, LocalFileSource(str(db)), name).manifest


def reseal_plain(data: bytes, name: str, *, level: int = 1, length: int | None = None) -> bytes:
    """Seal ``data`` as the object ``name`` in the plain v2 format, written here independently of
    dbre (anyone with write access to a plain bucket can do this). ``length``: pad the zstd body
    with a skippable frame to make the sealed object exactly that long."""
    body = zstandard.ZstdCompressor(level=level).compress(data)
    if length is not None:
        pad = length - (1 + len(body) + 16) - 8
        assert pad >= 0, f"replacement is {-pad} bytes too long"
        body += struct.pack("<II", 0x184D2A50, pad) + bytes(pad)
    digest = xxhash.xxh3_128(b"\x03" + name.encode() + b"\x00" + body).digest()
    return b"\x03" + body + digest


def open_plain(blob: bytes) -> bytes:
    assert blob[0] == 3
    return zstandard.ZstdDecompressor().decompress(blob[1:-16])


class CountingStore(PassThroughStore):
    """A store that counts manifest GETs and unbounded snapshot listings, and can slow ranged GETs."""

    def __init__(self, inner: Store, range_delay: float = 0.0) -> None:
        super().__init__(inner)
        self.manifest_gets: list[str] = []
        self.full_listings = 0
        self.range_delay = range_delay
        self.ranges_now = 0
        self.ranges_max = 0
        self._mu = threading.Lock()

    def get(self, key: str) -> bytes:
        if key.startswith("snapshots/"):
            self.manifest_gets.append(key)
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if key.startswith("snapshots/") and length == MANIFEST_CAP + 1:  # a manifest read (get_capped)
            self.manifest_gets.append(key)
        with self._mu:
            self.ranges_now += 1
            self.ranges_max = max(self.ranges_max, self.ranges_now)
        try:
            time.sleep(self.range_delay)
            return self.inner.get_range(key, offset, length)
        finally:
            with self._mu:
                self.ranges_now -= 1

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        if prefix.startswith("snapshots/") and limit is None:
            self.full_listings += 1
        return self.inner.list(prefix, start_after=start_after, limit=limit)


def _history(url: str, passphrase: str | None, tmp_path: Path, n: int, *, page_size: int = 4096,
             mb: float = 0.3) -> tuple[Path, list[Manifest]]:
    db = make_db(tmp_path / "src.db", mb=mb, page_size=page_size)
    snaps = []
    for i in range(n):
        if i:
            change_rows(db, 3, seed=i)
        snaps.append(_backup(url, passphrase, db))
    return db, snaps


# --------------------------------------------------------------------------- names and lookups


def test_snapshot_keys_sort_newest_first(repo_url: str, tmp_path: Path) -> None:
    """snapshots/<db>/<inv>-<id>: the first key in ascending order is the newest snapshot, and the
    key holds the manifest's id and its time to the microsecond."""
    _, snaps = _history(repo_url, None, tmp_path, 3)
    store = open_store(repo_url)
    keys = sorted(store.list("snapshots/x/"))
    assert len(keys) == 3 and all(KEY_NAME.match(k) for k in keys), keys
    newest_first = sorted(snaps, key=lambda m: m.time, reverse=True)
    for k, m in zip(keys, newest_first, strict=True):
        parsed = parse_key_id(k.rsplit("/", 1)[1])
        assert parsed == (m.id, m.time)
        assert m.format == 2 and m.root
    assert list(store.list("snapshots/x/", limit=1)) == [keys[0]]
    result = cli("snapshots", "--repo", repo_url, "--db", "x", "--json")
    assert result.returncode == 0, result
    assert {m.id for m in snaps} <= set(re.findall(r'"id": "([0-9a-f]{16})"', result.stdout))


def test_lookups_read_one_manifest(repo_url: str, tmp_path: Path) -> None:
    """Newest, newest at or before T, id prefix, and the backup's parent: one manifest GET each,
    and no listing of the whole history for the first, second and last."""
    db, snaps = _history(repo_url, None, tmp_path, 4)
    store = CountingStore(open_store(repo_url))
    repo = Repository.open(store)
    cases = [
        ({}, snaps[3]),
        ({"at": snaps[1].time}, snaps[1]),
        ({"at": snaps[2].time - timedelta(microseconds=1)}, snaps[1]),
        ({"at": snaps[3].time + timedelta(days=1)}, snaps[3]),
    ]
    for kwargs, want in cases:
        store.manifest_gets.clear()
        repo._manifests.clear()
        assert repo.find_snapshot("x", **kwargs).id == want.id, kwargs
        assert len(store.manifest_gets) == 1, (kwargs, store.manifest_gets)
    assert store.full_listings == 0
    store.manifest_gets.clear()
    assert repo.find_snapshot("x", snaps[2].id[:6]).id == snaps[2].id
    assert len(store.manifest_gets) == 1
    with pytest.raises(UsageError, match="before the first snapshot"):
        repo.find_snapshot("x", at=snaps[0].time - timedelta(microseconds=1))

    change_rows(db, 3, seed=99)
    store.manifest_gets.clear()
    store.full_listings = 0
    made = backup(Repository.open(store), LocalFileSource(str(db)), "x").manifest
    assert made.parent == snaps[3].id
    assert store.manifest_gets == [Repository.open(repo_url).manifest_key(snaps[3])]
    assert store.full_listings == 0


def test_snapshots_last_reads_only_the_newest_manifests(repo_url: str, tmp_path: Path) -> None:
    """`dbre snapshots --last N` on a long history: the names carry the time, so only N manifests
    are read."""
    _, snaps = _history(repo_url, None, tmp_path, 5)
    store = CountingStore(open_store(repo_url))
    repo = Repository.open(store)
    got = repo.snapshots("x", last=2)
    assert [m.id for m in got] == [m.id for m in snaps[-2:]]
    assert len(store.manifest_gets) == 2
    result = cli("snapshots", "--repo", repo_url, "--db", "x", "--last", "2", "--json")
    assert result.returncode == 0, result
    assert re.findall(r'"id": "([0-9a-f]{16})"', result.stdout) == [m.id for m in snaps[-2:]]


def test_backup_parent_skips_a_damaged_newest_manifest(repo_url: str, tmp_path: Path) -> None:
    """The newest manifest is damaged: the backup reads the next one (one more GET) as parent."""
    db, snaps = _history(repo_url, None, tmp_path, 3)
    raw = open_store(repo_url)
    newest_key = Repository.open(repo_url).manifest_key(snaps[2])
    raw.put(newest_key, b"\x03garbage" + bytes(16))
    store = CountingStore(raw)
    change_rows(db, 3, seed=50)
    result = backup(Repository.open(store), LocalFileSource(str(db)), "x")
    made = result.manifest
    assert made.parent == snaps[1].id
    assert len(store.manifest_gets) == 2 and store.manifest_gets[0] == newest_key
    # said, not swallowed (review finding 9): the result and the manifest name the skipped one
    assert made.stats["skipped_manifests"] == [newest_key]
    assert result.chain_note is not None and newest_key in result.chain_note and "dbre verify" in result.chain_note


# --------------------------------------------------------------------------- tampering


def test_manifest_of_another_database_is_refused(repo_url: str, passphrase: str | None, tmp_path: Path) -> None:
    """a's manifest copied under snapshots/b/: restore of b refuses it (one line naming the key)
    and forget on b fails instead of deleting a's snapshot."""
    db = make_db(tmp_path / "src.db", mb=0.3)
    b_snap = _backup(repo_url, passphrase, db, "b")
    change_rows(db, 3)
    a_snap = _backup(repo_url, passphrase, db, "a")
    store = open_store(repo_url)
    a_key = Repository.open(repo_url, _key(passphrase)).manifest_key(a_snap)
    planted = a_key.replace("snapshots/a/", "snapshots/b/")
    data = store.get(a_key)
    if passphrase is None:
        data = reseal_plain(open_plain(data), planted)  # a plain seal can be recomputed
    store.put(planted, data)

    result = cli("restore", "--repo", repo_url, "--db", "b", "--to", tmp_path / "out.db", env=_env(passphrase))
    why = "belongs to a" if passphrase is None else "authentication failed"
    assert_one_line_error(result, 1, planted, why)
    assert not (tmp_path / "out.db").exists()

    result = cli("forget", "--repo", repo_url, "--db", "b", "--keep-last", "1", env=_env(passphrase))
    assert_one_line_error(result, 1, planted)
    assert store.exists(a_key), "forget on b deleted a's snapshot"
    b_key = Repository.open(repo_url, _key(passphrase)).manifest_key(b_snap)
    assert store.exists(b_key)
    assert Repository.open(repo_url, _key(passphrase)).find_snapshot("a").id == a_snap.id
    # the one snapshot of b asked for by id still restores
    result = cli("restore", "--repo", repo_url, "--db", "b", "--snapshot", b_snap.id[:8],
                 "--to", tmp_path / "b.db", env=_env(passphrase))
    assert result.returncode == 0, result


def test_older_manifest_over_a_newer_one_is_refused(repo_url: str, passphrase: str | None, tmp_path: Path) -> None:
    """The older manifest's bytes under the newer one's key are refused by restore; the next
    backup takes the older snapshot as its parent."""
    _older_over_newer(repo_url, passphrase, tmp_path, same_id=False)


def test_manifest_time_must_match_its_name(repo_url: str, tmp_path: Path) -> None:
    """Plain repository: the older manifest, its id rewritten to the newer one's, re-sealed under
    the newer key: only the time in the key catches it."""
    _older_over_newer(repo_url, None, tmp_path, same_id=True)


def _older_over_newer(repo_url: str, passphrase: str | None, tmp_path: Path, *, same_id: bool) -> None:
    db, snaps = _history(repo_url, passphrase, tmp_path, 2)
    store = open_store(repo_url)
    repo = Repository.open(repo_url, _key(passphrase))
    old_key, new_key = repo.manifest_key(snaps[0]), repo.manifest_key(snaps[1])
    data = store.get(old_key)
    if passphrase is None:
        body = Manifest.from_json(open_plain(data))
        if same_id:
            body = dataclasses.replace(body, id=snaps[1].id)
        data = reseal_plain(body.to_json(), new_key)
    store.put(new_key, data)

    result = cli("restore", "--repo", repo_url, "--db", "x", "--to", tmp_path / "out.db", env=_env(passphrase))
    why = "authentication failed" if passphrase else ("its name says" if same_id else f"holds snapshot {snaps[0].id}")
    assert_one_line_error(result, 1, new_key, why)
    result = cli("restore", "--repo", repo_url, "--db", "x", "--at", snaps[0].taken_at,
                 "--to", tmp_path / "old.db", env=_env(passphrase))
    assert result.returncode == 0, result
    change_rows(db, 3, seed=7)
    assert _backup(repo_url, passphrase, db).parent == snaps[0].id


def test_run_swapped_for_another_of_the_same_length_is_refused(repo_url: str, tmp_path: Path) -> None:
    """Plain repository: the newer snapshot's run blob is replaced inside its pack by the older
    snapshot's run, re-sealed under the newer run's name and padded to the same length. The seal
    and the length pass; the run's hash does not."""
    db = make_db(tmp_path / "src.db", mb=1, page_size=512)
    old = _backup(repo_url, None, db)
    change_rows(db, 20)
    new = _backup(repo_url, None, db)
    assert len(old.runs) == len(new.runs) == 1 and old.runs[0].hash != new.runs[0].hash
    repo = Repository.open(repo_url)
    old_raw = read_run(repo, old, old.runs[0])
    run = new.runs[0]
    assert len(old_raw) == len(read_run(repo, new, run))
    swapped = reseal_plain(old_raw, f"run {run.hash}", level=19, length=run.length)
    store = open_store(repo_url)
    pack = bytearray(store.get(pack_key(run.pack)))
    pack[run.offset : run.offset + run.length] = swapped
    store.put(pack_key(run.pack), bytes(pack))

    result = cli("restore", "--repo", repo_url, "--db", "x", "--to", tmp_path / "out.db")
    assert_one_line_error(result, 1, f"packs/{run.pack}@{run.offset}", "does not match its hash")
    assert not (tmp_path / "out.db").exists()


def test_reordered_runs_fail_the_root_check(repo_url: str, tmp_path: Path) -> None:
    """Plain repository: the manifest's run list reversed (every run still matches its own hash)."""
    db = make_db(tmp_path / "src.db", mb=3, page_size=512)
    m = _backup(repo_url, None, db)
    assert len(m.runs) >= 2
    store = open_store(repo_url)
    key = Repository.open(repo_url).manifest_key(m)
    body = dataclasses.replace(m, runs=m.runs[::-1])
    store.put(key, reseal_plain(body.to_json(), key))

    result = cli("restore", "--repo", repo_url, "--db", "x", "--to", tmp_path / "out.db")
    assert_one_line_error(result, 1, key, "root does not match")


def test_restore_checks_every_page_with_the_keyed_hash(repo_url: str, tmp_path: Path) -> None:
    """Plain repository: one page inside a page batch changed, the batch re-sealed and padded to
    its length: restore names the blob and the page; an untouched repository restores equal."""
    db = make_db(tmp_path / "src.db", mb=0.5)
    m = _backup(repo_url, None, db)
    repo = Repository.open(repo_url)
    apply_restore(repo, plan_restore(repo, "x", tmp_path / "good.db"))
    assert_same_db(db, tmp_path / "good.db")
    _, pack, off, length, slot = next(r for r in backup_mod.iter_records(repo, m) if r[3])
    store = open_store(repo_url)
    data = bytearray(store.get(pack_key(pack.hex())))
    pages = bytearray(open_plain(bytes(data[off : off + length])))
    pages[slot * m.page_size + 100] ^= 0xFF
    data[off : off + length] = reseal_plain(bytes(pages), "page-batch", level=19, length=length)
    store.put(pack_key(pack.hex()), bytes(data))
    result = cli("restore", "--repo", repo_url, "--db", "x", "--to", tmp_path / "bad.db")
    assert_one_line_error(result, 1, f"packs/{pack.hex()}@{off}", "does not match its hash")


# --------------------------------------------------------------------------- page hash, runs, v1, copy


def test_page_hash_is_keyed_per_repository(tmp_path: Path) -> None:
    """The same page hashes differently in two repositories; an encrypted repository's page hash
    needs its master key (HKDF "dbre v2 page hash"): the config holds no hash key, and it is stable
    across opens. Stored run hashes are the repository's hash, not xxh3 or unkeyed BLAKE3."""
    page = bytes(range(256)) * 16
    db = make_db(tmp_path / "src.db", mb=0.2)
    plain1, plain2 = str(tmp_path / "p1"), str(tmp_path / "p2")
    enc1, enc2 = str(tmp_path / "e1"), str(tmp_path / "e2")
    made = {url: _backup(url, pw, db) for url, pw in
            [(plain1, None), (plain2, None), (enc1, PASSPHRASE), (enc2, PASSPHRASE)]}
    hashes = {url: Repository.open(url, _key(pw)).page_hash(page)
              for url, pw in [(plain1, None), (plain2, None), (enc1, PASSPHRASE), (enc2, PASSPHRASE)]}
    assert len(set(hashes.values())) == 4
    assert len({m.runs[0].hash for m in made.values()}) == 4  # same pages, four different page maps
    for h in hashes.values():
        assert h not in (xxhash.xxh3_128_digest(page), blake3.blake3(page).digest(16)) and len(h) == 16

    enc = Repository.open(enc1, Secret(PASSPHRASE))
    assert "hash_key" not in enc.config
    derived = enc.sealer.derive_key(b"dbre v2 page hash")
    assert derived is not None
    assert enc.page_hash(page) == blake3.blake3(page, key=derived).digest(16)
    assert Repository.open(enc1, Secret(PASSPHRASE)).page_hash(page) == hashes[enc1]  # stable
    with pytest.raises(Exception, match="encrypted"):
        Repository.open(enc1)
    plain = Repository.open(plain1)
    assert plain.page_hash(page) == blake3.blake3(page, key=bytes.fromhex(plain.config["hash_key"])).digest(16)
    raw = read_run(plain, made[plain1], made[plain1].runs[0])
    assert plain.page_hash(raw).hex() == made[plain1].runs[0].hash


def test_runs_are_fetched_concurrently_in_order(tmp_path: Path) -> None:
    """Many runs, each ranged GET slowed down: several are in flight at once, at most RUN_READERS,
    and the records come back in page order (restore checks every page)."""
    db = make_db(tmp_path / "src.db", mb=12, page_size=512)
    url = str(tmp_path / "repo")
    m = _backup(url, None, db)
    assert len(m.runs) >= 5
    store = CountingStore(open_store(url), range_delay=0.05)
    repo = Repository.open(store)
    started = time.perf_counter()
    records = load_records(repo, m)
    seconds = time.perf_counter() - started
    assert 2 <= store.ranges_max <= backup_mod.RUN_READERS
    assert seconds < len(m.runs) * 0.05  # one at a time would take at least this long
    assert list(records) == [r for run in m.runs for r in _split(read_run(Repository.open(url), m, run))]
    apply_restore(repo, plan_restore(repo, "x", tmp_path / "out.db"))
    assert_same_db(db, tmp_path / "out.db")


def _split(raw: bytes) -> list[bytes]:
    size = backup_mod.RECORD.size
    return [raw[i : i + size] for i in range(0, len(raw), size)]


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_v1_repository_still_reads(kind: str, tmp_path: Path) -> None:
    """The golden format-1 repositories: names without '-', xxh3 page hash, lookups and restore."""
    url = str(tmp_path / kind)
    shutil.copytree(V1_DATA / kind, url)
    key = Secret(V1_PASSPHRASE) if kind == "encrypted" else None
    repo = Repository.open(url, key)
    assert repo.version == 1 and repo.page_hash is xxhash.xxh3_128_digest
    snaps = repo.snapshots("app")
    assert len(snaps) == 2 and all(r.time is None for r in repo.list_snapshot_refs("app"))
    assert repo.find_snapshot("app").id == snaps[1].id
    assert repo.find_snapshot("app", at=snaps[0].time).id == snaps[0].id
    assert repo.find_snapshot("app", snaps[0].id[:6]).id == snaps[0].id
    apply_restore(repo, plan_restore(repo, "app", tmp_path / "out.db"))
    # compared on a copy: opening the golden file would leave -wal/-shm beside it
    assert_same_db(shutil.copy(V1_DATA / "app-final.db", tmp_path / "final.db"), tmp_path / "out.db")


def test_copy_keeps_snapshot_names(tmp_path: Path, s3_repo_url: str) -> None:
    """A copy (local to S3) stores each manifest under the same name, so its name-bound seal opens."""
    src_url = str(tmp_path / "repo")
    _, snaps = _history(src_url, PASSPHRASE, tmp_path, 2)
    result = cli("copy", "--repo", src_url, "--to", s3_repo_url, env=_env(PASSPHRASE))
    assert result.returncode == 0, result
    assert sorted(open_store(s3_repo_url).list("snapshots/")) == sorted(open_store(src_url).list("snapshots/"))
    dst = Repository.open(s3_repo_url, Secret(PASSPHRASE))
    assert dst.find_snapshot("x").id == snaps[1].id
    assert dst.find_snapshot("x", at=snaps[0].time).id == snaps[0].id
