"""Sealing v2, keys and the authenticated config: what someone who can write the bucket (but has no
key) can no longer do, on a local directory and on S3; and format-1 repositories read as before."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import pytest
import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from dbre.errors import IntegrityError, RepositoryError
from dbre.repository import crypto
from dbre.repository.backup import backup
from dbre.repository.crypto import Sealer, config_mac, hkdf
from dbre.repository.pack import read_pack_index
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.secrets import Secret
from dbre.sources.local import LocalFileSource
from dbre.storage import Store
from dbre.storage.local import LocalStore
from tests.dbfactory import make_db

PASSPHRASE = Secret("correct horse battery staple")
V1 = Path(__file__).parent / "data" / "v1"
V1_PASSPHRASE = Secret("v1-golden-passphrase")  # tests/data/v1/make_v1.py


def master() -> Secret:
    return Secret(os.urandom(32))


# -- the seal itself ------------------------------------------------------------------------------


def test_seal_formats_and_fresh_key_per_object() -> None:
    key = master()
    plain, enc = Sealer(None), Sealer(key)
    p = plain.seal(b"hello" * 100, "records/drills/app/1")
    e1, e2 = enc.seal(b"hello" * 100, "records/drills/app/1"), enc.seal(b"hello" * 100, "records/drills/app/1")
    assert p[0] == 3 and e1[0] == 4
    assert e1[1:17] != e2[1:17] and e1[17:29] != e2[17:29]  # a fresh salt (so subkey) and nonce each time
    body = zstandard.ZstdCompressor(level=crypto.ZSTD_LEVEL).compress(b"hello" * 100)
    import xxhash

    assert p == b"\x03" + body + xxhash.xxh3_128_digest(b"\x03records/drills/app/1\x00" + body)
    # the spec's construction, computed independently with the cryptography package's HKDF
    subkey = HKDF(hashes.SHA256(), 32, e1[1:17], b"dbre v2 seal").derive(key.reveal())  # type: ignore[arg-type]
    assert AESGCM(subkey).decrypt(e1[17:29], e1[29:], b"\x04records/drills/app/1") == body
    for s, blob in ((plain, p), (enc, e1), (enc, e2)):
        assert s.unseal(blob, "records/drills/app/1") == b"hello" * 100
    assert plain.seal_parts([b"ab", b"cd"], "page-batch") == plain.seal(b"abcd", "page-batch")


def test_derive_key_is_hkdf_and_none_when_plain() -> None:
    key = master()
    s = Sealer(key)
    want = HKDF(hashes.SHA256(), 32, None, b"dbre v2 page hash").derive(key.reveal())  # type: ignore[arg-type]
    assert s.derive_key(b"dbre v2 page hash") == want == hkdf(key.reveal(), b"dbre v2 page hash")  # type: ignore[arg-type]
    assert s.derive_key(b"dbre v2 config") != want
    assert Sealer(None).derive_key(b"dbre v2 page hash") is None
    assert "Secret" not in repr(s) and key.reveal().hex() not in repr(s)  # type: ignore[union-attr]


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_name_binding(encrypted: bool) -> None:
    s = Sealer(master() if encrypted else None)
    blob = s.seal(b'{"db": "a"}', "snapshots/a/0001")
    for other in ("snapshots/b/0001", "snapshots/a/0002", "snapshots/a/0001 ", "page-batch", ""):
        with pytest.raises(IntegrityError, match="another name"):
            s.unseal(blob, other)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_flipped_bit_anywhere_fails(encrypted: bool) -> None:
    s = Sealer(master() if encrypted else None)
    blob = s.seal(b"some record body " * 4, "run 00ff")
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            with pytest.raises(RepositoryError):
                s.unseal(bytes(bad), "run 00ff")
    for cut in (0, 1, len(blob) // 2, len(blob) - 1):
        with pytest.raises(IntegrityError):
            s.unseal(blob[:cut], "run 00ff")


def test_format_1_bytes_only_in_a_format_1_repository() -> None:
    key = master()
    body = zstandard.ZstdCompressor().compress(b"old data")
    nonce = os.urandom(12)
    v1_enc = b"\x02" + nonce + AESGCM(key.reveal()).encrypt(nonce, body, b"\x02")  # type: ignore[arg-type]
    import xxhash

    v1_plain = b"\x01" + body + xxhash.xxh3_128_digest(b"\x01" + body)
    assert Sealer(key, version=1).unseal(v1_enc, "x") == b"old data"
    assert Sealer(None, version=1).unseal(v1_plain, "x") == b"old data"
    with pytest.raises(IntegrityError, match="written in format 1 or tampered"):
        Sealer(key).unseal(v1_enc, "x")
    with pytest.raises(IntegrityError, match="written in format 1 or tampered"):
        Sealer(None).unseal(v1_plain, "x")
    with pytest.raises(IntegrityError, match="config says format 1"):
        Sealer(key, version=1).unseal(Sealer(key).seal(b"new", "x"), "x")
    with pytest.raises(RepositoryError, match="read only"):
        Sealer(key, version=1).seal(b"new", "x")


# -- an attacker with write access to the bucket ---------------------------------------------------


def _db(tmp_path: Path, name: str = "a", seed: int = 0) -> LocalFileSource:
    path = tmp_path / f"{name}.db"
    return LocalFileSource(path if path.exists() else make_db(path, mb=0.2, seed=seed))


def _manifest_keys(store: Store, db: str) -> list[str]:
    return sorted(store.list(f"snapshots/{db}/"))


@pytest.fixture(params=[True, False], ids=["encrypted", "plain"])
def filled(request: pytest.FixtureRequest, store: Store, tmp_path: Path) -> tuple[Repository, Secret | None]:
    """A repository (encrypted, or plain) on each backend with backups of databases a and b."""
    key = PASSPHRASE if request.param else None
    repo = Repository.open_or_init(store, key)
    backup(repo, _db(tmp_path, "a"), "a")
    backup(repo, _db(tmp_path, "b", seed=1), "b")
    repo.put_record("drills", "a", {"passed": True})
    repo.put_record("drills", "b", {"passed": False})
    return repo, key


def test_manifest_copied_under_another_database_does_not_open(filled: tuple[Repository, Secret | None]) -> None:
    repo, key = filled
    store = repo.store
    a_key, b_key = _manifest_keys(store, "a")[0], _manifest_keys(store, "b")[0]
    forged = "snapshots/b/" + a_key.rsplit("/", 1)[1]
    store.put(forged, store.get(a_key))
    fresh = Repository.open(store, key)
    with pytest.raises(IntegrityError, match="another name"):
        fresh.sealer.unseal(store.get(forged), forged)  # the seal alone refuses it
    store.put(b_key, store.get(a_key))  # a's bytes over b's own manifest
    with pytest.raises(IntegrityError):
        Repository.open(store, key).snapshots("b")


def test_record_copied_under_another_name_does_not_open(filled: tuple[Repository, Secret | None],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Never read as b's: skipped with a warning naming it (one damaged record hides no other)."""
    import logging

    repo, key = filled
    store = repo.store
    (a_rec,) = store.list("records/drills/a/")
    (b_rec,) = store.list("records/drills/b/")
    store.put(b_rec, store.get(a_rec))
    with caplog.at_level(logging.WARNING):
        assert Repository.open(store, key).records("drills", "b") == []
    assert any(b_rec in m and "another name" in m for m in caplog.messages), caplog.messages
    assert Repository.open(store, key).records("drills", "a")[0]["passed"] is True


def test_pack_index_moved_into_another_pack_fails(filled: tuple[Repository, Secret | None]) -> None:
    repo, key = filled
    store = repo.store
    packs = sorted(store.list("packs/"))
    assert len(packs) >= 2
    a, b = store.get(packs[0]), store.get(packs[1])
    n_a = int.from_bytes(a[-12:-8], "little")
    n_b = int.from_bytes(b[-12:-8], "little")
    grafted = b[: len(b) - 12 - n_b] + a[len(a) - 12 - n_a :]  # b's blobs, a's index and trailer
    assert read_pack_index(a, repo.sealer, packs[0])  # in place it opens
    with pytest.raises(IntegrityError, match="another name"):
        read_pack_index(grafted, repo.sealer, packs[1])
    with pytest.raises(IntegrityError, match="another name"):
        read_pack_index(a, repo.sealer, packs[1])  # a whole pack copied under another pack's name


def test_format_1_blob_planted_in_a_format_2_repository(filled: tuple[Repository, Secret | None]) -> None:
    repo, key = filled
    store = repo.store
    target = _manifest_keys(store, "a")[0]
    body = zstandard.ZstdCompressor().compress(Repository.open(store, key).sealer.unseal(store.get(target), target))
    import xxhash

    # the attacker has no key: the best they can plant is a plain v1 object (or an old v1 one)
    store.put(target, b"\x01" + body + xxhash.xxh3_128_digest(b"\x01" + body))
    with pytest.raises(IntegrityError, match="written in format 1 or tampered"):
        Repository.open(store, key).sealer.unseal(store.get(target), target)
    with pytest.raises(IntegrityError):
        Repository.open(store, key).snapshots("a")


# -- config ----------------------------------------------------------------------------------------


def _config(store: Store) -> dict[str, object]:
    return json.loads(store.get("config"))


def test_new_repositories_are_format_2_with_a_mac(store: Store) -> None:
    repo = Repository.open_or_init(store, PASSPHRASE)
    cfg = _config(store)
    assert repo.version == cfg["version"] == 2
    enc = cfg["encryption"]
    assert isinstance(enc, dict) and (enc["n"], enc["r"], enc["p"]) == (2**17, 8, 1)
    assert "hash_key" not in cfg  # encrypted: the page-hash key is derived from the master key
    assert repo.hash_key == repo.sealer.derive_key(b"dbre v2 page hash") and repo.hash_key is not None
    mac_key = repo.sealer.derive_key(b"dbre v2 config")
    assert mac_key is not None and cfg["mac"] == config_mac(cfg, mac_key)
    assert Repository.open(store, PASSPHRASE).hash_key == repo.hash_key


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_a_config_edited_in_any_field_is_refused(store: Store, encrypted: bool) -> None:
    key = PASSPHRASE if encrypted else None
    Repository.open_or_init(store, key)
    original = store.get("config")
    edits: dict[str, object] = {"id": "0" * 32, "created": "2020-01-01T00:00:00Z", "page_hash": "xxh3-128",
                                "compression": "none", "format": "other", "extra": 1}
    if not encrypted:
        edits["hash_key"] = "11" * 32
    for field, value in edits.items():
        cfg = json.loads(original)
        cfg[field] = value
        store.put("config", json.dumps(cfg).encode())
        with pytest.raises(RepositoryError, match="config was changed or damaged") as err:
            Repository.open(store, key)
        assert "offsite copy" in err.value.hint
    cfg = json.loads(original)
    del cfg["mac"]
    store.put("config", json.dumps(cfg).encode())
    with pytest.raises(RepositoryError, match="config was changed or damaged"):
        Repository.open_or_init(store, key)
    store.put("config", original)
    assert Repository.open(store, key).version == 2


def test_encrypted_config_downgraded_to_plain_is_refused(store: Store, tmp_path: Path) -> None:
    repo = Repository.open_or_init(store, PASSPHRASE)
    backup(repo, _db(tmp_path), "a")
    # the attacker: encryption gone, a hash key of their own, the MAC recomputed for it
    cfg = _config(store)
    cfg["encryption"] = None
    cfg["hash_key"] = "ab" * 32
    cfg["mac"] = config_mac(cfg, bytes.fromhex("ab" * 32))
    store.put("config", json.dumps(cfg).encode())
    with pytest.raises(RepositoryError, match="is not encrypted, but a key was given") as err:
        Repository.open_or_init(store, PASSPHRASE)  # the backup path, given the key
    assert "offsite copy" in err.value.hint
    plain = Repository.open(store)  # without a key: the config looks fine, every object refuses
    with pytest.raises(RepositoryError, match="data is encrypted"):
        plain.snapshots("a")
    with pytest.raises(RepositoryError, match="holds encrypted objects"):
        backup(Repository.open_or_init(store), _db(tmp_path), "a")
    with pytest.raises(RepositoryError, match="holds encrypted objects"):
        Repository.open(store).put_record("drills", "a", {})
    assert not list(store.list("records/"))
    assert len(_manifest_keys(store, "a")) == 1  # nothing plain was written


def test_plain_over_encrypted_packs_only(store: Store, tmp_path: Path) -> None:
    """No manifest yet (a first backup that died): the pack alone shows the data is encrypted."""
    repo = Repository.open_or_init(store, PASSPHRASE)
    backup(repo, _db(tmp_path), "a")
    for k in list(store.list("snapshots/")):
        store.delete(k)
    cfg = _config(store)
    cfg["encryption"], cfg["hash_key"] = None, "cd" * 32
    cfg["mac"] = config_mac(cfg, bytes.fromhex("cd" * 32))
    store.put("config", json.dumps(cfg).encode())
    with pytest.raises(RepositoryError, match="holds encrypted objects"):
        backup(Repository.open_or_init(store), _db(tmp_path), "a")


def test_a_key_for_a_plain_repository_is_refused(store: Store, tmp_path: Path) -> None:
    backup(Repository.open_or_init(store), _db(tmp_path), "a")
    for opener in (Repository.open, Repository.open_or_init):
        with pytest.raises(RepositoryError, match="is not encrypted, but a key was given") as err:
            opener(store, PASSPHRASE)
        assert "omit the key" in err.value.hint
    assert Repository.open(store).snapshots("a")


@pytest.mark.parametrize("left", ["packs/", "snapshots/", "records/"])
def test_data_without_config_is_never_initialised_again(store: Store, tmp_path: Path, left: str) -> None:
    repo = Repository.open_or_init(store, PASSPHRASE)
    backup(repo, _db(tmp_path), "a")
    repo.put_record("drills", "a", {})
    for prefix in {"packs/", "snapshots/", "records/"} - {left}:
        for k in list(store.list(prefix)):
            store.delete(k)
    store.delete("config")
    for key in (PASSPHRASE, None):
        with pytest.raises(RepositoryError, match="holds data but no config") as err:
            Repository.open_or_init(store, key)
        assert "restore `config`" in err.value.hint
    assert not store.exists("config")


def test_wrong_passphrase(store: Store) -> None:
    Repository.open_or_init(store, PASSPHRASE)
    with pytest.raises(RepositoryError, match="wrong encryption key"):
        Repository.open(store, Secret("not the passphrase"))
    with pytest.raises(RepositoryError, match="is encrypted"):
        Repository.open(store)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_offsite_copy_shares_the_config(store: Store, tmp_path: Path, encrypted: bool) -> None:
    key = PASSPHRASE if encrypted else None
    src = Repository.open_or_init(LocalStore(tmp_path / "src"), key)
    backup(src, _db(tmp_path), "a")
    dst = Repository.init_copy_of(src, store, key)
    assert store.get("config") == src.store.get("config")  # byte-identical
    from dbre.repository.copy import copy_snapshots

    copy_snapshots(src, dst)
    again = Repository.open(store, key)
    assert again.hash_key == src.hash_key
    out = tmp_path / "out.db"
    apply_restore(again, plan_restore(again, "a", out))
    assert out.stat().st_size > 0
    # a copy whose config was edited no longer passes as a copy of the source
    cfg = _config(store)
    cfg["created"] = "2020-01-01T00:00:00Z"
    store.put("config", json.dumps(cfg).encode())
    with pytest.raises(RepositoryError, match="config was changed or damaged"):
        Repository.init_copy_of(src, store, key)


# -- format 1: read as before, never written ------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_format_1_repository_restores_byte_identically(tmp_path: Path, kind: str) -> None:
    shutil.copytree(V1 / kind, tmp_path / kind)
    key = V1_PASSPHRASE if kind == "encrypted" else None
    repo = Repository.open(str(tmp_path / kind), key)
    assert repo.version == 1 and repo.hash_key is None
    snaps = repo.snapshots("app")
    assert len(snaps) == 2
    out = tmp_path / "restored.db"
    apply_restore(repo, plan_restore(repo, "app", out))
    assert filecmp.cmp(out, V1 / "app-final.db", shallow=False)
    from dbre.repository.verify import verify

    assert verify(repo, read_data=True).ok


@pytest.mark.parametrize("kind", ["plain", "encrypted"])
def test_format_1_repository_is_never_written(tmp_path: Path, kind: str) -> None:
    from dbre.repository.copy import copy_snapshots
    from dbre.repository.retention import KeepPolicy, forget, prune

    shutil.copytree(V1 / kind, tmp_path / kind)
    url = str(tmp_path / kind)
    key = V1_PASSPHRASE if kind == "encrypted" else None
    before = {p: p.read_bytes() for p in (tmp_path / kind).rglob("*") if p.is_file()}
    repo = Repository.open_or_init(url, key)
    src = _db(tmp_path)
    attempts = [
        lambda: backup(repo, src, "app"),
        lambda: forget(repo, KeepPolicy(last=1)),
        lambda: prune(repo),
        lambda: repo.put_record("drills", "app", {}),
        lambda: copy_snapshots(Repository.open_or_init(str(tmp_path / "new"), key), repo),
    ]
    for attempt in attempts:
        with pytest.raises(RepositoryError, match="uses format 1") as err:
            attempt()
        assert f"dbre migrate --repo {url} --to" in err.value.hint
    after = {p: p.read_bytes() for p in (tmp_path / kind).rglob("*") if p.is_file()}
    assert after == before
