"""Blob stores: where a repository's objects live (a local directory or an S3 bucket prefix)."""

from __future__ import annotations

import re

from dbre.storage.base import AlreadyExists, NotFound, PermanentError, StorageError, Store, TransientError

__all__ = ["AlreadyExists", "NotFound", "PermanentError", "StorageError", "Store", "TransientError", "open_store"]


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
