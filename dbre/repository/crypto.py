"""Sealing of stored bytes: zstd compression, then a checksum or AES-256-GCM authenticated encryption.

Every object and every pack blob dbre writes is sealed, so every byte read back is checked:
- plain:     b"\\x01" + zstd(data) + xxh3_128(b"\\x01" + zstd(data))
- encrypted: b"\\x02" + nonce(12) + AESGCM(key).encrypt(nonce, zstd(data), aad=b"\\x02")
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading

import xxhash
import zstandard

from dbre.errors import IntegrityError, RepositoryError
from dbre.secrets import Secret

PLAIN = 1
ENCRYPTED = 2
_NONCE = 12
_TAG = 16
_SUM = 16
ZSTD_LEVEL = 1
_PLAIN_BYTE = bytes([PLAIN])
_ENCRYPTED_BYTE = bytes([ENCRYPTED])

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


# The 16-byte content address of a page (xxh3-128; only ever stored inside sealed objects). The
# C function itself, not a wrapper: backup and restore call it once per page.
page_hash = xxhash.xxh3_128_digest


class Sealer:
    """Seals and unseals bytes with the repository's key (None for a plain repository)."""

    def __init__(self, key: Secret | None = None) -> None:
        self._aead = None
        if key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            raw = key.reveal()
            assert isinstance(raw, bytes) and len(raw) == 32
            self._aead = AESGCM(raw)

    @property
    def encrypted(self) -> bool:
        return self._aead is not None

    def __repr__(self) -> str:
        return f"Sealer(encrypted={self.encrypted})"

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._wrap(_cctx().compress(data))

    def seal_parts(self, parts: list[bytes | memoryview]) -> bytes:
        """``seal(b"".join(parts))``: one compression call (a call per part would release and
        retake the GIL each time, and the threads then queue behind each other)."""
        return self._wrap(_cctx().compress(parts[0] if len(parts) == 1 else b"".join(parts)))

    def _wrap(self, body: bytes) -> bytes:
        if self._aead is None:
            digest = xxhash.xxh3_128(_PLAIN_BYTE)
            digest.update(body)
            return b"".join((_PLAIN_BYTE, body, digest.digest()))
        nonce = os.urandom(_NONCE)
        return b"".join((_ENCRYPTED_BYTE, nonce, self._aead.encrypt(nonce, body, _ENCRYPTED_BYTE)))

    def unseal(self, blob: bytes, what: str) -> bytes:
        """Check and open a sealed blob; ``what`` names it in errors."""
        if not blob:
            raise IntegrityError(f"{what}: empty object", "run `dbre verify --read-data` to find damage")
        kind = blob[0]
        if kind == PLAIN:
            if self._aead is not None:
                raise IntegrityError(f"{what}: unencrypted data in an encrypted repository")
            if len(blob) < 1 + _SUM or xxhash.xxh3_128_digest(blob[:-_SUM]) != blob[-_SUM:]:
                raise IntegrityError(f"{what}: checksum mismatch (damaged or truncated)")
            body = blob[1:-_SUM]
        elif kind == ENCRYPTED:
            if self._aead is None:
                raise RepositoryError(
                    f"{what}: data is encrypted", "set DBRE_ENCRYPTION_KEY or pass --key-file"
                )
            from cryptography.exceptions import InvalidTag

            if len(blob) < 1 + _NONCE + _TAG:
                raise IntegrityError(f"{what}: truncated")
            try:
                body = self._aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], bytes([ENCRYPTED]))
            except InvalidTag:
                raise IntegrityError(f"{what}: authentication failed (damaged or tampered)") from None
        else:
            raise IntegrityError(f"{what}: unknown format byte {kind}")
        try:
            return _dctx().decompress(body)
        except zstandard.ZstdError as err:
            raise IntegrityError(f"{what}: cannot decompress ({err})") from None


# -- keys ------------------------------------------------------------------------------------------

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1


def new_key_params(passphrase: Secret) -> tuple[dict[str, object], Secret]:
    """Make a random master key wrapped by a key derived from ``passphrase``.

    Returns the config entry to store and the master key. A new passphrase can wrap the same
    master key later without re-encrypting data.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt = os.urandom(16)
    master = os.urandom(32)
    kek = _derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    nonce = os.urandom(_NONCE)
    wrapped = nonce + AESGCM(kek).encrypt(nonce, master, b"dbre-master-key")
    params: dict[str, object] = {
        "cipher": "aes-256-gcm",
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": base64.b64encode(salt).decode(),
        "wrapped_key": base64.b64encode(wrapped).decode(),
    }
    return params, Secret(master)


def open_key(params: dict[str, object], passphrase: Secret) -> Secret:
    """Unwrap the master key; a wrong passphrase raises RepositoryError."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        salt = base64.b64decode(str(params["salt"]))
        wrapped = base64.b64decode(str(params["wrapped_key"]))
        kek = _derive(passphrase, salt, int(str(params["n"])), int(str(params["r"])), int(str(params["p"])))
        return Secret(AESGCM(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], b"dbre-master-key"))
    except InvalidTag:
        raise RepositoryError(
            "wrong encryption key for this repository",
            "check DBRE_ENCRYPTION_KEY or the --key-file used when the repository was created",
        ) from None
    except (KeyError, ValueError) as err:
        raise RepositoryError(f"repository config: bad encryption entry ({err})") from None


def _derive(passphrase: Secret, salt: bytes, n: int, r: int, p: int) -> bytes:
    raw = passphrase.reveal()
    pw = raw.encode() if isinstance(raw, str) else raw
    return hashlib.scrypt(pw, salt=salt, n=n, r=r, p=p, maxmem=128 * 1024 * 1024, dklen=32)
