"""Blob stores: where a repository's objects live (a local directory or an S3 bucket prefix)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from dbre.storage.base import AlreadyExists, NotFound, PermanentError, StorageError, Store, TransientError

__all__ = ["AlreadyExists", "NotFound", "PermanentError", "StorageError", "Store", "TransientError", "open_store",
           "overlap"]


def open_store(url: str) -> Store:
    """Open the store a repository URL names: ``s3://bucket/prefix`` or a local directory path.

    The S3 backend (and botocore) is imported only when an ``s3://`` URL is used; it is wrapped
    in ``RetryingStore`` so that transient failures (throttling, 5xx, a dropped connection) are
    retried with backoff.
    """
    if url.startswith("s3://"):
        from dbre.storage.retry import RetryingStore
        from dbre.storage.s3 import S3Store

        return RetryingStore(S3Store.from_url(url))
    if "://" in url:
        from dbre.errors import UsageError

        raise UsageError(f"repository {url!r}: unsupported scheme", "use a local path or s3://bucket/prefix")
    if re.match(r"(?i)[a-z][a-z0-9+.-]+:", url) and not url.lower().startswith("file:"):
        # `s3:/bucket/x`, `s3:bucket/x`, `S3://...` typed by hand would otherwise make a local folder `s3:`
        from dbre.errors import UsageError

        scheme = url.split(":", 1)[0]
        raise UsageError(f"repository {url!r} looks like a mistyped URL ({scheme}: without //)",
                         "use s3://bucket/prefix, or ./" + url + " for a local folder of that name")
    from dbre.storage.local import LocalStore

    store = LocalStore(url)
    file = next((p for p in (store.root, *store.root.parents) if p.is_file()), None)
    if file is not None:
        from dbre.errors import RepositoryError

        what = "a file" if file == store.root else f"{file} is a file"
        raise RepositoryError(f"repository {store.url}: not a repository: {what}",
                              "a repository is a folder or s3://bucket/prefix")
    return store


def overlap(a: Store, b: Store) -> str | None:
    """Whether two stores are one place however spelled (a trailing slash, a relative path, a symbolic
    link: "same"), one lies inside the other ("inside": a copy nested in the repository it copies,
    counted in its size, or a repository planted in another's prefix), or neither (None). S3
    stores are compared by bucket and prefix (the endpoint is not known here)."""
    ra, rb = getattr(a, "root", None), getattr(b, "root", None)
    if ra is None and rb is None:
        ua, ub = a.url.rstrip("/"), b.url.rstrip("/")
        if ua == ub:
            return "same"
        return "inside" if ua.startswith(ub + "/") or ub.startswith(ua + "/") else None
    if ra is None or rb is None:
        return None
    pa, pb = Path(os.path.realpath(ra)), Path(os.path.realpath(rb))
    if pa == pb or (pa.exists() and pb.exists() and os.path.samefile(pa, pb)):
        return "same"
    if pa in pb.parents or pb in pa.parents:
        return "inside"
    # (the same folder reached another way, a bind mount: compared by device and inode, folder by folder)
    for inner, outer in ((pa, pb), (pb, pa)):
        if outer.exists() and any(p.exists() and os.path.samefile(p, outer) for p in inner.parents):
            return "inside"
    return None
