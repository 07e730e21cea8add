"""Source identity: whether a backup's source is the one a database's earlier snapshots came from.

A database name (``app``) is a chain of snapshots of one source. The manifest records that source
(``source``: kind, and the file's absolute path or the URL without secrets, plus the database's
``application_id``); the next backup under the same name compares its source with the newest
regular snapshot's and refuses a different one, so a file that merely has the same default name
never becomes the newest ``app`` (see docs/FORMAT.md, *Source identity*).

Two sources are the same when their locations are: a file's normalised absolute path, or the file
the recorded path names now (a symlink, a bind mount, a hard link); a libSQL server's host, port,
path and namespace, whatever the scheme (libsql://, https://, wss://) and whatever the token (never
recorded). The database's content is not part of the identity (it changes with every backup, and a
restore over the source is the same source); it only words the refusal: a moved file holds the
same tables, a different database other ones.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from dbre.errors import UsageError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SECRET_QUERY_KEYS = {"authtoken", "auth_token", "token", "jwt"}


def location(identity: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The normalised location a source identity names; None when it names none (old manifests)."""
    if not isinstance(identity, dict):
        return None
    kind = identity.get("kind")
    if kind == "file" and isinstance(identity.get("path"), str) and identity["path"]:
        return ("file", os.path.normpath(identity["path"]))
    if kind == "libsql" and isinstance(identity.get("url"), str) and identity["url"]:
        return _url_location(identity["url"], identity.get("namespace"))
    return None


def _url_location(url: str, namespace: object) -> tuple[str, ...] | None:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host:
        return None
    query = {k.lower(): v for k, v in parse_qsl(parts.query, keep_blank_values=True)
             if k.lower() not in _SECRET_QUERY_KEYS}
    if scheme == "libsql":
        http = "http" if query.get("tls") == "0" else "https"
    elif scheme in ("http", "ws"):
        http = "http"
    else:
        http = "https"
    return ("libsql", host.lower(), str(port or _DEFAULT_PORTS[http]), parts.path.rstrip("/"),
            str(namespace or ""))


def describe(identity: dict[str, Any] | None) -> str:
    """A source as a person reads it: the path, or the URL (with its namespace)."""
    if not isinstance(identity, dict):
        return "unknown source"
    if identity.get("kind") == "file" and identity.get("path"):
        return str(identity["path"])
    if identity.get("url"):
        ns = identity.get("namespace")
        return str(identity["url"]) + (f" (namespace {ns})" if ns else "")
    return "unknown source"


def same_source(recorded: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether ``current`` is the source ``recorded`` names. A recorded identity without a location
    (a manifest written before sources were compared, or by another tool) matches anything."""
    old, new = location(recorded), location(current)
    if old is None:
        return True
    if new is None or old[0] != new[0]:
        return False
    if old == new:
        return True
    if old[0] == "file":
        try:  # the recorded path may now name the same file under another name (symlink, hard link)
            return os.path.samefile(old[1], new[1])
        except OSError:
            return False  # the recorded file is gone (moved) or unreadable: not provably the same
    return False


def table_names(schema: list[dict[str, Any]]) -> list[str]:
    """The user tables of a schema listing (``sqlite_schema`` rows)."""
    return sorted(r["name"] for r in schema
                  if r.get("type") == "table" and not str(r.get("name", "")).startswith("sqlite_"))


def same_lineage(recorded_app_id: object, recorded_tables: list[str], app_id: int | None,
                 tables: list[str]) -> bool:
    """Whether the database now at the new location looks like the one recorded: the same
    ``application_id`` (when both are known) and at least half of the smaller set of table names
    in common. Only words the refusal: both cases are refused without the option."""
    if isinstance(recorded_app_id, int) and app_id is not None and recorded_app_id != app_id:
        return False
    a, b = set(recorded_tables), set(tables)
    if not a or not b:
        return a == b
    return len(a & b) * 2 >= min(len(a), len(b))


def refuse_new_source(db: str, recorded: dict[str, Any], current: dict[str, Any], recorded_tables: list[str],
                      app_id: int | None, tables: list[str] | None) -> UsageError:
    """The one-line refusal of a backup whose source is not the one ``db``'s snapshots came from."""
    head = f"backup of {db}: {describe(current)} is not the source of {db}'s snapshots ({describe(recorded)})"
    if tables is None:
        why = ""
    elif same_lineage(recorded.get("application_id"), recorded_tables, app_id, tables):
        why = "; it holds the same tables, as if moved"
    else:
        why = (f"; it holds another database (tables {_few(tables)}; {db} has {_few(recorded_tables)})")
    return UsageError(head + why + "; nothing was written",
                      f"give it its own name with --db NAME, or pass --accept-new-source (the backup flow's "
                      f"accept_new_source) if {db} moved there")


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
