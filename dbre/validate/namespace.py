"""A drill's last mile for remote databases: load the restored file into a new sqld namespace.

sqld's admin API creates a namespace from an SQL dump (``POST /v1/namespaces/:ns/create`` with
``{"dump_url": ...}``; a ``file://`` URL is read by the server, so this needs the server on the
machine that holds the scratch folder, or a dump URL the server can fetch). The new namespace is
then checked over Hrana (HTTP): every table's row count equals the manifest's. Turso has no such
endpoint: there a drill restores to a local file only.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dbre.errors import RestoreError, UsageError
from dbre.repository.manifest import Manifest
from dbre.repository.tables import qident
from dbre.secrets import Secret
from dbre.validate.checks import CheckResult


@dataclass
class NamespaceTarget:
    """Where a drill loads its restore: sqld's admin API and its Hrana (HTTP) URL, a namespace name."""

    admin_url: str
    url: str
    namespace: str
    token: Secret | None = None
    keep: bool = False

    def __post_init__(self) -> None:
        for name, value in (("admin URL", self.admin_url), ("URL", self.url)):
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise UsageError(f"sqld {name} {value!r} is not an http(s) URL", "e.g. http://127.0.0.1:9090")
        if not self.namespace.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"namespace {self.namespace!r} is not allowed", "use letters, digits, '-' and '_'")


@dataclass
class NamespaceResult:
    namespace: str
    seconds: float
    dump_bytes: int
    checks: list[CheckResult] = field(default_factory=list)
    deleted: bool = False

    def summary(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "seconds": round(self.seconds, 3), "dump_bytes": self.dump_bytes,
                "deleted": self.deleted}


def _request(method: str, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None,
             timeout: float = 600) -> bytes:
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - the operator's own server
        return bytes(resp.read())


def write_dump(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> int:
    """An SQL dump of the restored file (schema and rows, one transaction); returns its size."""
    conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        with open(out, "w", encoding="utf-8") as f:
            for line in conn.iterdump():
                f.write(line)
                f.write("\n")
    finally:
        conn.close()
    return Path(out).stat().st_size


def load_into_namespace(restored: str | os.PathLike[str], manifest: Manifest, target: NamespaceTarget,
                        scratch: str | os.PathLike[str]) -> NamespaceResult:
    """Create ``target.namespace`` from the restored file and check its row counts against the manifest."""
    t0 = time.perf_counter()
    dump = Path(scratch) / f"{target.namespace}.sql"
    size = write_dump(restored, dump)
    try:
        _request("POST", f"{target.admin_url.rstrip('/')}/v1/namespaces/{target.namespace}/create",
                 {"dump_url": dump.absolute().as_uri()})
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:200]
        raise RestoreError(f"load into namespace {target.namespace}: sqld answered HTTP {err.code} ({detail})",
                           "the namespace may exist already, or the server cannot read the dump file") from None
    except (urllib.error.URLError, OSError) as err:
        raise RestoreError(f"load into namespace {target.namespace}: cannot reach sqld's admin API ({err})",
                           "check --namespace-admin") from None
    finally:
        dump.unlink(missing_ok=True)
    checks = namespace_row_counts(target, manifest)
    return NamespaceResult(target.namespace, time.perf_counter() - t0, size, checks)


def namespace_row_counts(target: NamespaceTarget, manifest: Manifest) -> list[CheckResult]:
    """Check "namespace_row_count" per table: the server's count(*) equals the manifest's."""
    tables = sorted(manifest.tables)
    stmts = [{"type": "execute", "stmt": {"sql": f"SELECT count(*) FROM {qident(t)}"}} for t in tables]
    headers = {"Host": f"{target.namespace}.{urlsplit(target.url).hostname}"}
    if target.token:
        headers["Authorization"] = f"Bearer {target.token.reveal()!s}"
    try:
        raw = _request("POST", f"{target.url.rstrip('/')}/v2/pipeline",
                       {"baton": None, "requests": [*stmts, {"type": "close"}]}, headers)
    except (urllib.error.URLError, OSError) as err:
        return [CheckResult("namespace_row_count", False, detail=f"cannot query namespace {target.namespace}: {err}")]
    out = []
    for table, res in zip(tables, json.loads(raw)["results"], strict=False):
        want = manifest.tables[table].rows
        if res.get("type") != "ok":
            out.append(CheckResult("namespace_row_count", False, table, None,
                                   f"query failed: {(res.get('error') or {}).get('message', res)}"))
            continue
        got = int(res["response"]["result"]["rows"][0][0]["value"])
        out.append(CheckResult("namespace_row_count", got == want, table, None,
                               f"{got} rows in namespace {target.namespace}" + ("" if got == want else
                                                                                 f", expected {want}")))
    return out


def delete_namespace(target: NamespaceTarget) -> bool:
    """Remove the drill's namespace; False (not an error) when it cannot be removed."""
    try:
        _request("DELETE", f"{target.admin_url.rstrip('/')}/v1/namespaces/{target.namespace}", timeout=60)
        return True
    except (urllib.error.URLError, OSError):
        return False
