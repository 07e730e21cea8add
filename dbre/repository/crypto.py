"""Sealing of stored bytes (zstd, then a name-bound checksum or AES-256-GCM) and the repository's keys.

Every object and every pack blob dbre writes is sealed under the name it is stored as, so every
byte read back is checked, and an object moved to another name does not open:
- plain v2:     0x03 ‖ zstd(data) ‖ xxh3_128(0x03 ‖ name ‖ 0x00 ‖ zstd(data))
- encrypted v2: 0x04 ‖ salt(16) ‖ nonce(12) ‖ AES-256-GCM(subkey, nonce, zstd(data), aad=0x04 ‖ name),
                subkey = HKDF-SHA256(master, salt, info=b"dbre v2 seal"): a fresh key per object.
Format 1 (read only, repositories of config version 1):
- plain:     0x01 ‖ zstd(data) ‖ xxh3_128(0x01 ‖ zstd(data))
- encrypted: 0x02 ‖ nonce(12) ‖ AES-256-GCM(master, nonce, zstd(data), aad=0x02)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from typing import Any

import xxhash
import zstandard

from dbre.errors import IntegrityError, RepositoryError, UsageError
from dbre.secrets import Secret

PLAIN_V1 = 1
ENCRYPTED_V1 = 2
PLAIN = 3
ENCRYPTED = 4
_NONCE = 12
_SALT = 16
_TAG = 16
_SUM = 16
ZSTD_LEVEL = 1
_PLAIN_BYTE = bytes([PLAIN])
_ENCRYPTED_BYTE = bytes([ENCRYPTED])
_SEAL_INFO = b"dbre v2 seal"
CONFIG_MAC_INFO = b"dbre v2 config"
PAGE_HASH_INFO = b"dbre v2 page hash"
_DAMAGE_HINT = "run `dbre verify --read-data` to find damage"

MAX_UNSEALED = 256 * 1024 * 1024  # no sealed object dbre writes opens up larger (a manifest, a 2 MiB batch)

_local = threading.local()


def _cctx() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


# The 16-byte content address of a page in format 1 (xxh3-128; only ever stored inside sealed
# objects). The C function itself, not a wrapper: backup and restore call it once per page.
page_hash = xxhash.xxh3_128_digest


def hkdf(master: bytes, info: bytes, salt: bytes = b"") -> bytes:
    """HKDF-SHA256 (RFC 5869) with a 32-byte output: extract, then one expand block.

    Written on ``hmac.digest`` (two C calls, ~1 µs) because encrypted v2 derives a key per object;
    an empty salt is the RFC's default (32 zero bytes)."""
    prk = hmac.digest(salt or bytes(32), master, "sha256")
    return hmac.digest(prk, info + b"\x01", "sha256")


class Sealer:
    """Seals and unseals bytes with the repository's master key (None for a plain repository).

    ``version`` is the repository's format: a version-2 Sealer writes and reads only v2 bytes
    (0x03/0x04); a version-1 Sealer reads only v1 bytes (0x01/0x02) and writes nothing.
    """

    def __init__(self, key: Secret | None = None, version: int = 2) -> None:
        if version not in (1, 2):
            raise ValueError(f"no sealing for format {version}")
        self.version = version
        self._master: bytes | None = None
        self._aead_v1 = None
        if key is not None:
            raw = key.reveal()
            assert isinstance(raw, bytes) and len(raw) == 32
            self._master = raw
            if version == 1:
                from cryptography.hazmat.primitives.ciphers.aead import AESGCM

                self._aead_v1 = AESGCM(raw)

    @property
    def encrypted(self) -> bool:
        return self._master is not None

    def __repr__(self) -> str:
        return f"Sealer(encrypted={self.encrypted}, version={self.version})"

    def derive_key(self, info: bytes) -> bytes | None:
        """A 32-byte key for one purpose: HKDF-SHA256(master, info); None for a plain repository."""
        return None if self._master is None else hkdf(self._master, info)

    # -- sealing ---------------------------------------------------------------------------------

    def seal(self, data: bytes | bytearray | memoryview, name: str) -> bytes:
        """Compress and seal ``data`` as the object called ``name`` (bound: it opens only as ``name``)."""
        return self._wrap(_cctx().compress(data), name)

    def seal_parts(self, parts: list[bytes | memoryview], name: str) -> bytes:
        """``seal(b"".join(parts), name)``: one compression call (a call per part would release and
        retake the GIL each time, and the threads then queue behind each other)."""
        return self._wrap(_cctx().compress(parts[0] if len(parts) == 1 else b"".join(parts)), name)

    def _wrap(self, body: bytes, name: str) -> bytes:
        if self.version != 2:
            raise RepositoryError("format 1 is read only: nothing is sealed in it",
                                  "convert the repository with `dbre migrate`")
        bound = name.encode()
        if self._master is None:
            digest = xxhash.xxh3_128(_PLAIN_BYTE)
            digest.update(bound + b"\x00")
            digest.update(body)
            return b"".join((_PLAIN_BYTE, body, digest.digest()))
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        salt = os.urandom(_SALT)
        nonce = os.urandom(_NONCE)
        aead = AESGCM(hkdf(self._master, _SEAL_INFO, salt))
        return b"".join((_ENCRYPTED_BYTE, salt, nonce, aead.encrypt(nonce, body, _ENCRYPTED_BYTE + bound)))

    # -- opening ---------------------------------------------------------------------------------

    def unseal(self, blob: bytes | memoryview, name: str, *, where: str | None = None) -> bytes:
        """Check and open the sealed object ``name``; ``where`` (default ``name``) says in errors
        where it was read from. Damage, tampering and an object stored under another name all
        raise IntegrityError."""
        what = where or name
        if not blob:
            raise IntegrityError(f"{what}: empty object", _DAMAGE_HINT)
        kind = blob[0]
        if kind in (PLAIN_V1, ENCRYPTED_V1) and self.version != 1:
            raise IntegrityError(f"{what}: written in format 1 or tampered (format byte {kind} in a format 2 "
                                 "repository)", _DAMAGE_HINT)
        if kind in (PLAIN, ENCRYPTED) and self.version != 2:
            raise IntegrityError(f"{what}: format 2 data in a repository whose config says format 1 "
                                 "(config changed or damaged)", "restore `config` from the offsite copy")
        if kind in (PLAIN, PLAIN_V1):
            if self._master is not None:
                raise IntegrityError(f"{what}: unencrypted data in an encrypted repository", _DAMAGE_HINT)
            body = self._open_plain(blob, name, what)
        elif kind in (ENCRYPTED, ENCRYPTED_V1):
            if self._master is None:
                raise RepositoryError(
                    f"{what}: data is encrypted, but the repository's config says it is not "
                    "(config changed, or encrypted objects planted)",
                    "restore `config` from the offsite copy; a plain repository takes no key",
                )
            body = self._open_encrypted(blob, name, what)
        else:
            raise IntegrityError(f"{what}: unknown format byte {kind}", _DAMAGE_HINT)
        try:
            # a frame says how large it opens up: refuse a bomb before allocating (in a plain
            # repository anyone who can write the bucket can recompute the checksum)
            size = zstandard.frame_content_size(body)
            if size < 0 or size > MAX_UNSEALED:
                raise IntegrityError(f"{what}: would open up to {'an unknown size' if size < 0 else size} bytes "
                                     f"(dbre seals at most {MAX_UNSEALED})", _DAMAGE_HINT)
            return _dctx().decompress(body)
        except zstandard.ZstdError as err:
            raise IntegrityError(f"{what}: cannot decompress ({err})", _DAMAGE_HINT) from None

    @staticmethod
    def _open_plain(blob: bytes | memoryview, name: str, what: str) -> bytes | memoryview:
        if len(blob) < 1 + _SUM:
            raise IntegrityError(f"{what}: truncated", _DAMAGE_HINT)
        body = blob[1:-_SUM]
        if blob[0] == PLAIN_V1:
            digest = xxhash.xxh3_128_digest(blob[:-_SUM])
        else:
            h = xxhash.xxh3_128(_PLAIN_BYTE)
            h.update(name.encode() + b"\x00")
            h.update(body)
            digest = h.digest()
        if digest != blob[-_SUM:]:
            raise IntegrityError(f"{what}: checksum mismatch (damaged, truncated or stored under another name)",
                                 _DAMAGE_HINT)
        return body

    def _open_encrypted(self, blob: bytes | memoryview, name: str, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        try:
            if blob[0] == ENCRYPTED_V1:
                if len(blob) < 1 + _NONCE + _TAG:
                    raise IntegrityError(f"{what}: truncated", _DAMAGE_HINT)
                assert self._aead_v1 is not None
                return self._aead_v1.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], bytes([ENCRYPTED_V1]))
            head = 1 + _SALT + _NONCE
            if len(blob) < head + _TAG:
                raise IntegrityError(f"{what}: truncated", _DAMAGE_HINT)
            assert self._master is not None
            aead = AESGCM(hkdf(self._master, _SEAL_INFO, bytes(blob[1 : 1 + _SALT])))
            return aead.decrypt(blob[1 + _SALT : head], blob[head:], _ENCRYPTED_BYTE + name.encode())
        except InvalidTag:
            raise IntegrityError(f"{what}: authentication failed (damaged, tampered or stored under another name)",
                                 _DAMAGE_HINT) from None


# -- config authentication -------------------------------------------------------------------------


def canonical(fields: dict[str, Any]) -> bytes:
    """The bytes a config MAC covers: canonical JSON of every field but "mac"."""
    return json.dumps({k: v for k, v in fields.items() if k != "mac"}, sort_keys=True,
                      separators=(",", ":")).encode()


def config_mac(fields: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, canonical(fields), "sha256").hexdigest()


def config_mac_ok(fields: dict[str, Any], key: bytes) -> bool:
    mac = fields.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(mac, config_mac(fields, key))


# -- passphrase and master key ---------------------------------------------------------------------

SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_MAXMEM = 256 * 1024 * 1024  # 128·r·n = 128 MiB at the defaults; caps what a config can ask for
_WRAP_AAD = b"dbre-master-key"


class WrongKeyError(RepositoryError):
    """The passphrase does not unwrap the repository's master key."""


def new_key_params(passphrase: Secret) -> tuple[dict[str, object], Secret]:
    """Make a random master key wrapped by a key derived from ``passphrase``.

    Returns the config entry to store and the master key. A new passphrase can wrap the same
    master key later without re-encrypting data (``wrap_key``: `dbre key passwd`).
    """
    master = Secret(os.urandom(32))
    return wrap_key(master, passphrase), master


def scrypt_params(params: object) -> tuple[int, int, int] | None:
    """The scrypt ``(n, r, p)`` of a config's ``encryption`` entry, or None if it has none readable."""
    try:
        return int(str(params["n"])), int(str(params["r"])), int(str(params["p"]))  # type: ignore[index]
    except (KeyError, ValueError, TypeError):
        return None


def scrypt_work(n: int, r: int, p: int) -> tuple[int, int]:
    """What one derivation at ``(n, r, p)`` costs, in scrypt's units: (memory ~ r·n, time ~ r·n·p)."""
    return r * n, r * n * p


def wrap_key(master: Secret, passphrase: Secret, keep: tuple[int, int, int] | None = None) -> dict[str, object]:
    """The config entry wrapping ``master`` under ``passphrase``: a fresh salt and nonce, scrypt at
    today's parameters (``SCRYPT_N``, ``SCRYPT_R``, ``SCRYPT_P``), or at ``keep`` (the parameters the
    entry it replaces had) when those cost more: a new passphrase never weakens the derivation."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    raw = master.reveal()
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ValueError("a master key is 32 bytes")
    n, r, p = SCRYPT_N, SCRYPT_R, SCRYPT_P
    if keep is not None and scrypt_work(*keep)[1] > scrypt_work(n, r, p)[1]:
        n, r, p = keep  # (it opened, so it is within SCRYPT_MAXMEM)
    salt = os.urandom(16)
    kek = _derive(passphrase, salt, n, r, p)
    nonce = os.urandom(_NONCE)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, raw, _WRAP_AAD)
    return {
        "cipher": "aes-256-gcm",
        "kdf": "scrypt",
        "n": n,
        "r": r,
        "p": p,
        "salt": base64.b64encode(salt).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }


def open_key(params: dict[str, object], passphrase: Secret) -> Secret:
    """Unwrap the master key with the scrypt parameters stored in ``params``; a wrong
    passphrase raises RepositoryError."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        salt = base64.b64decode(str(params["salt"]))
        wrapped = base64.b64decode(str(params["wrapped_key"]))
        kek = _derive(passphrase, salt, int(str(params["n"])), int(str(params["r"])), int(str(params["p"])))
        return Secret(AESGCM(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _WRAP_AAD))
    except InvalidTag:
        raise WrongKeyError(
            "wrong encryption key for this repository",
            "check DBRE_ENCRYPTION_KEY or the --key-file used when the repository was created "
            "(if the key is right, `config` was changed: restore it from the offsite copy)",
        ) from None
    except (KeyError, ValueError, TypeError) as err:  # (TypeError: an entry that is not an object, e.g. `1`)
        raise RepositoryError(f"repository config: bad encryption entry ({err})",
                              "restore `config` from the offsite copy") from None


# scrypt at n=2^17 costs 0.3-2 s and 128 MiB: a process that opens the same repository again (a
# flow's tasks, the copy's second repository) reuses the key it derived. Entries are named by an
# HMAC under a per-process random key, so the table holds no passphrase or fast hash of one.
_KEK_CACHE: dict[bytes, bytes] = {}
_KEK_CACHE_KEY = os.urandom(32)
_KEK_LOCK = threading.Lock()


def _derive(passphrase: Secret, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not (1 <= p <= 16 and 1 <= r <= 64):
        raise ValueError("scrypt parameters out of range")
    raw = passphrase.reveal()
    try:
        pw = raw.encode() if isinstance(raw, str) else raw
    except UnicodeEncodeError:  # bytes that are not UTF-8 from the env; the codec's message would show one
        raise UsageError("the passphrase is not UTF-8 text", "give DBRE_ENCRYPTION_KEY or the key file as UTF-8 "
                         "text") from None
    tag = hmac.digest(_KEK_CACHE_KEY, b"%d,%d,%d,%d," % (n, r, p, len(salt)) + salt + pw, "sha256")
    with _KEK_LOCK:
        kek = _KEK_CACHE.get(tag)
    if kek is None:
        kek = hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM, dklen=32)
        with _KEK_LOCK:
            if len(_KEK_CACHE) >= 16:
                _KEK_CACHE.clear()
            _KEK_CACHE[tag] = kek
    return kek
