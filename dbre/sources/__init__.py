"""Backup sources: a local file, or a remote libSQL database (sqld or Turso)."""

from __future__ import annotations

from dbre.secrets import Secret
from dbre.sources.base import Source

__all__ = ["Source", "open_source"]

_REMOTE = ("libsql://", "http://", "https://", "ws://", "wss://")


def open_source(spec: str, token: Secret | None = None) -> Source:
    """The source a command-line argument names: a URL for a remote libSQL database, else a path."""
    if spec.startswith(_REMOTE):
        from dbre.sources.remote import RemoteLibsqlSource

        return RemoteLibsqlSource(spec, token=token)
    from dbre.sources.local import LocalFileSource

    return LocalFileSource(spec)
