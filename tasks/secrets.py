"""Secrets at the edge: resolve ``env:NAME`` / ``prefect-secret:BLOCK`` references to ``dbre.secrets.Secret``."""

from __future__ import annotations

import os

from dbre.errors import UsageError
from dbre.policy import BLOCK_REF, ENV_REF, check_secret_ref
from dbre.secrets import Secret
from dbre.sources.remote import token_from_env


def resolve_secret(ref: str) -> Secret:
    """The secret a reference names; UsageError (never the value) when it is missing or malformed."""
    try:
        ref = check_secret_ref(ref)
    except ValueError as err:
        raise UsageError(f"secret reference: {err}") from None
    if m := ENV_REF.match(ref):
        value = os.environ.get(m.group(1), "")
        if not value:
            raise UsageError(f"secret {ref}: environment variable {m.group(1)} is not set",
                             "set it in the environment of the worker or serve process")
        return Secret(value)
    m = BLOCK_REF.match(ref)
    assert m is not None
    from prefect.blocks.system import Secret as SecretBlock

    try:
        value = SecretBlock.load(m.group(1)).get()
    except ValueError:
        raise UsageError(f"secret {ref}: no Prefect Secret block named {m.group(1)!r}",
                         "create it in the UI (Blocks > Secret) or with `prefect block create secret`") from None
    if not isinstance(value, str) or not value:
        raise UsageError(f"secret {ref}: the block holds no text value", "store the key or token as a string")
    return Secret(value)


def resolve_key(ref: str | None) -> Secret | None:
    """The repository key: the reference, else DBRE_ENCRYPTION_KEY if set (as the CLI does), else none."""
    if ref:
        return resolve_secret(ref)
    env = os.environ.get("DBRE_ENCRYPTION_KEY")
    if env is not None and not env.strip():
        # (a secret that failed to load on the worker: an empty key must not create or open a plain repository)
        raise UsageError("DBRE_ENCRYPTION_KEY is set but empty",
                         "set it to the passphrase, or unset it for a repository without encryption")
    return Secret(env) if env else None


def resolve_token(ref: str | None) -> Secret | None:
    """A remote source's token: the reference, else LIBSQL_AUTH_TOKEN / TURSO_AUTH_TOKEN, else none."""
    return resolve_secret(ref) if ref else token_from_env()
