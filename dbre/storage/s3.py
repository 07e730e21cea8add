"""A store under a prefix of an S3 bucket (AWS or any S3-compatible service), through botocore.

botocore is boto3's own client layer (same credential chain, config files and AWS_ENDPOINT_URL).
This is the only module that imports boto3/botocore: every SDK exception is turned here into
``NotFound``, ``AlreadyExists``, ``TransientError`` or ``PermanentError`` (``WriteRefused`` for a
put or delete denied) with a message "op key: cause" and a hint. Credentials come from the usual
AWS chain (env, config files, instance roles) and never appear in messages or reprs; the endpoint
comes from ``AWS_ENDPOINT_URL`` unless one is given.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import botocore.config
import botocore.exceptions
import botocore.loaders
import botocore.session

from dbre.errors import UsageError
from dbre.storage.base import (
    AlreadyExists,
    Conflict,
    NotFound,
    ObjectVersion,
    PermanentError,
    ReadRefused,
    Retention,
    StorageError,
    TransientError,
    WriteRefused,
)

_HINT_BUCKET = "create the bucket or fix the repository URL"
_HINT_CREDENTIALS = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile in use"
_HINT_DENIED = ("grant the credentials s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket (under Object "
                "Lock also s3:GetBucketObjectLockConfiguration, s3:GetObjectRetention, s3:PutObjectRetention, "
                "s3:ListBucketVersions, s3:GetObjectVersion and s3:DeleteObjectVersion)")
_HINT_ENDPOINT = "check AWS_ENDPOINT_URL and that the server is up"
_WRITTEN_MAX = 100_000  # retain-untils remembered by one store object (a long replicate run forgets the oldest)

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}
_DENIED = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"}
# ops whose AccessDenied is WriteRefused (a version's deletion or retention: Object Lock denies those too)
_WRITES = {"put", "replace", "delete"}
# Retryable codes a server may send with a 4xx status; any 5xx is retryable too. A 409
# ConditionalRequestConflict means a concurrent operation kept S3 from evaluating If-None-Match:
# nothing was written and AWS documents that the write should be retried.
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
    "OperationAborted",
    "ConditionalRequestConflict",
}
# Parsed service models, shared by every client in the process (read-only once loaded).
_LOADER = botocore.loaders.create_loader()

# Anything shaped like an AWS access key id is cut from server messages, should one echo it.
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AIDA|AROA)[A-Z0-9]{12,}\b")


class S3Store:
    """Objects under ``s3://bucket/prefix``: key ``k`` is the S3 object ``prefix/k``.

    S3 puts are atomic, so there are no temp objects; ``put(if_absent=True)`` uses
    ``If-None-Match: *``, which AWS and moto enforce (some other S3-compatible servers ignore it).
    It is also a ``LockingStore`` (base.py): Object Lock retention on puts, extension, versions.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        max_attempts: int = 3,
        connect_timeout: float = 5,
        read_timeout: float = 60,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._base = f"{self.prefix}/" if self.prefix else ""
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._retain: tuple[str, float, tuple[str, ...]] | None = None  # mode, seconds, exempt prefixes
        self._written: dict[str, float] = {}
        self._ahead = 0.0  # seconds the store's clock is ahead of this host's (its Date headers), when it is
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=16,
        )
        try:
            # A session of its own per store (sessions are not thread-safe, and each one reads the
            # credentials afresh); the parsed service models are shared, which makes it ~5x faster.
            session = botocore.session.Session()
            session.register_component("data_loader", _LOADER)
            self._client: Any = session.create_client("s3", endpoint_url=endpoint_url, config=config)
            self.endpoint = str(self._client.meta.endpoint_url)  # the store's name with the URL (two S3s)
        except (botocore.exceptions.BotoCoreError, ValueError) as err:
            raise PermanentError(
                f"open {self.url}: cannot set up the S3 client ({type(err).__name__})",
                "check AWS_ENDPOINT_URL, AWS_PROFILE and the AWS config files",
            ) from err

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None, **options: Any) -> S3Store:
        """Open ``s3://bucket`` or ``s3://bucket/prefix``; ``endpoint_url`` overrides AWS_ENDPOINT_URL."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
            raise UsageError(f"repository {url!r}: not an S3 URL", "use s3://bucket/prefix")
        return cls(parts.netloc, parts.path, endpoint_url=endpoint_url, **options)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise PermanentError(f"invalid key {key!r}")
        return self._base + key

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self._put(key, data, {"IfNoneMatch": "*"} if if_absent else {})

    def replace(self, key: str, data: bytes, *, expected: bytes) -> None:
        """Write ``data`` under ``key`` only if it holds exactly ``expected`` (``ReplacingStore``): a
        GET with the object's ETag, a byte comparison, then one PutObject with ``If-Match`` (a 412:
        ``Conflict``). A single PUT: the object is the old one or the new one, whole, at every instant."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            current = bytes(response["Body"].read(len(expected) + 1))
            etag = str(response["ETag"])
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise self._error("replace", key, err) from err
        if current != expected:
            raise Conflict(f"replace {key}: it changed since it was read (another run wrote it); nothing was written",
                           "read it again and retry")
        self._put(key, data, {"IfMatch": etag})

    def _put(self, key: str, data: bytes, condition: dict[str, str]) -> None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data, **condition}
        if_absent = "IfNoneMatch" in condition
        until = None
        if self._retain is not None and not key.startswith(self._retain[2]):
            # by the store's clock when it is ahead: a snapshot then takes the store's time (backup.snapshot_time)
            until = float(math.ceil(time.time() + self._ahead + self._retain[1]))  # whole seconds: S3 keeps no more
            args["ObjectLockMode"] = self._retain[0]
            args["ObjectLockRetainUntilDate"] = datetime.fromtimestamp(until, UTC)
        try:
            response = self._client.put_object(**args)
            if until is not None:
                self._learn_clock(response)
                if len(self._written) >= _WRITTEN_MAX:
                    self._written.pop(next(iter(self._written)))
                self._written[key] = until
        except botocore.exceptions.ClientError as err:
            if if_absent and (_code(err) == "PreconditionFailed" or _status(err) == 412):
                raise AlreadyExists(f"put {key}: already exists") from None
            if "IfMatch" in condition and (_code(err) == "PreconditionFailed" or _status(err) == 412):
                raise Conflict(f"replace {key}: it changed since it was read (another run wrote it); "
                               "nothing was written", "read it again and retry") from None
            raise self._error("put", key, err) from err
        except botocore.exceptions.BotoCoreError as err:
            raise self._error("put", key, err) from err

    def get(self, key: str) -> bytes:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(response["Body"].read())
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise self._error("get", key, err) from err

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise PermanentError(f"get {key}: invalid range (offset {offset}, length {length})")
        if length == 0:
            if not self.exists(key):
                raise NotFound(f"get {key}: not found")
            return b""
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={offset}-{offset + length - 1}"
            )
            return bytes(response["Body"].read())
        except botocore.exceptions.ClientError as err:
            if _code(err) == "InvalidRange" or _status(err) == 416:
                return b""  # the object exists (else NoSuchKey) and ends before offset
            raise self._error("get", key, err) from err
        except botocore.exceptions.BotoCoreError as err:
            raise self._error("get", key, err) from err

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        skip = len(self._base)
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._base + prefix}
        if start_after is not None:
            args["StartAfter"] = self._base + start_after
        if limit is not None:
            if limit <= 0:
                return
            args["PaginationConfig"] = {"MaxItems": limit, "PageSize": min(limit, 1000)}
        count = 0
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(**args):
                for obj in page.get("Contents", ()):
                    name = obj["Key"][skip:]
                    if name and not name.endswith("/"):  # "folder" markers made by consoles are not ours
                        yield name
                        count += 1
                        if limit is not None and count >= limit:
                            return
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise self._error("list", prefix, err) from err

    def usage(self) -> int:
        """Bytes of the current objects under the prefix (one LIST per 1,000 objects). A versioned bucket
        also keeps (and bills) noncurrent versions until its lifecycle or Object Lock lets them go."""
        total = 0
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                                Prefix=self._base):
                total += sum(int(obj.get("Size", 0)) for obj in page.get("Contents", ()))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise self._error("list", "", err) from err
        return total

    def modified(self, key: str) -> float:
        try:
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            return float(head["LastModified"].timestamp())
        except botocore.exceptions.ClientError as err:
            if _status(err) == 404:
                raise NotFound(f"stat {key}: not found") from None
            raise self._error("stat", key, err) from err
        except botocore.exceptions.BotoCoreError as err:
            raise self._error("stat", key, err) from err

    def delete(self, key: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            error = self._error("delete", key, err)
            if not isinstance(error, NotFound):
                raise error from err

    def exists(self, key: str) -> bool:
        # A one-byte GET rather than HEAD: a HEAD's 404 has no body, so a missing bucket would
        # look like a missing key; GET says NoSuchBucket.
        try:
            self._client.get_object(Bucket=self.bucket, Key=self._key(key), Range="bytes=0-0")["Body"].read()
            return True
        except botocore.exceptions.ClientError as err:
            if _code(err) == "InvalidRange" or _status(err) == 416:
                return True  # an empty object
            error = self._error("exists", key, err)
            if isinstance(error, NotFound):
                return False
            raise error from err
        except botocore.exceptions.BotoCoreError as err:
            raise self._error("exists", key, err) from err

    # -- Object Lock (LockingStore) ----------------------------------------------------------------

    def lock_enabled(self) -> bool:
        # retried here (4 tries): the calls of Object Lock do not go through RetryingStore, and a 404 whose
        # answer was cut short comes back as the bare code "404", which must not pass for "no Object Lock"
        for attempt in range(4):
            try:
                conf = self._client.get_object_lock_configuration(Bucket=self.bucket)
                break
            except botocore.exceptions.ClientError as err:
                code = _code(err)
                if code in ("ObjectLockConfigurationNotFoundError", "NotImplemented"):
                    return False  # (a provider without the Object Lock API has no Object Lock)
                if code not in ("404", "NotFound") and self._error("", "", err).__class__ is not TransientError \
                        or attempt == 3:
                    raise self._error("object lock configuration", "", err) from err
            except botocore.exceptions.BotoCoreError as err:
                if attempt == 3:
                    raise self._error("object lock configuration", "", err) from err
            time.sleep(0.25 * 2**attempt)
        self._learn_clock(conf)
        return bool(conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled")

    def _learn_clock(self, response: dict[str, Any]) -> None:
        """How far the store's clock is ahead of this host's, from a response's Date (whole seconds:
        the store's time is below Date + 1); under 2 s it is taken as none (clocks agree, or latency)."""
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        try:
            ahead = email.utils.parsedate_to_datetime(str(date)).timestamp() + 1.0 - time.time()
        except (TypeError, ValueError, IndexError):
            return
        self._ahead = ahead if ahead > 2.0 else 0.0

    def set_default_retention(self, mode: str, seconds: float, exempt: tuple[str, ...]) -> None:
        if mode not in ("GOVERNANCE", "COMPLIANCE") or seconds <= 0:
            raise PermanentError(f"object lock on {self.url}: bad retention ({mode}, {seconds} s)")
        self._retain = (mode, seconds, exempt)

    def written_until(self, key: str) -> float | None:
        return self._written.get(key)

    def retention(self, key: str, version_id: str | None = None) -> Retention | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if version_id is not None:
            args["VersionId"] = version_id
        try:
            head = self._client.head_object(**args)
        except botocore.exceptions.ClientError as err:
            if _status(err) in (404, 405):  # 405: the version named is a delete marker
                raise NotFound(f"retention {key}: not found") from None
            raise self._error("retention", key, err) from err
        except botocore.exceptions.BotoCoreError as err:
            raise self._error("retention", key, err) from err
        mode, until = head.get("ObjectLockMode"), head.get("ObjectLockRetainUntilDate")
        if not mode or until is None:
            return None
        return Retention(str(mode), float(until.timestamp()))

    def extend_retention(self, key: str, mode: str, until: float, version_id: str | None = None) -> None:
        args: dict[str, Any] = {"VersionId": version_id} if version_id is not None else {}
        try:
            self._client.put_object_retention(
                Bucket=self.bucket, Key=self._key(key),
                Retention={"Mode": mode, "RetainUntilDate": datetime.fromtimestamp(math.ceil(until), UTC)}, **args)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise self._error("extend retention", key, err) from err

    def delete_version(self, key: str, version_id: str) -> None:
        """Delete one version for good (a delete marker too); S3 refuses a version still locked
        (AccessDenied: no bypass is ever sent), and so it does without s3:DeleteObjectVersion."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key), VersionId=version_id)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            error = self._error("delete version", key, err)
            if not isinstance(error, NotFound):
                raise error from err

    def versions(self, prefix: str = "") -> Iterator[ObjectVersion]:
        skip = len(self._base)
        try:
            pages = self._client.get_paginator("list_object_versions").paginate(
                Bucket=self.bucket, Prefix=self._base + prefix)
            for page in pages:
                found = [(v, False) for v in page.get("Versions", ())]
                found += [(v, True) for v in page.get("DeleteMarkers", ())]
                # S3 lists each key's versions newest first, but gives versions and markers apart: merged
                # by time (whole seconds: ties keep the listing's order), the latest of a key first
                found.sort(key=lambda vm: (vm[0]["Key"], not vm[0].get("IsLatest"),
                                           -vm[0]["LastModified"].timestamp()))
                for v, marker in found:
                    name = v["Key"][skip:]
                    if name and not name.endswith("/"):
                        yield ObjectVersion(name, str(v["VersionId"]), marker, float(v["LastModified"].timestamp()))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
            raise self._error("list versions", prefix, err) from err

    def get_version(self, key: str, version_id: str, offset: int = 0, length: int | None = None) -> bytes:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "VersionId": version_id}
        if length is not None:
            if length <= 0:
                return b""
            args["Range"] = f"bytes={offset}-{offset + length - 1}"
        elif offset:
            args["Range"] = f"bytes={offset}-"
        try:
            return bytes(self._client.get_object(**args)["Body"].read())
        except botocore.exceptions.ClientError as err:
            if _code(err) == "InvalidRange" or _status(err) == 416:
                return b""
            if _code(err) in ("NoSuchVersion", "InvalidArgument") or _status(err) == 405:
                raise NotFound(f"get {key} version {version_id}: not found") from None
            raise self._error("get", key, err) from err
        except botocore.exceptions.BotoCoreError as err:
            raise self._error("get", key, err) from err

    def _error(self, op: str, key: str, err: Exception) -> StorageError:
        """Map a botocore exception to a store error; the message never carries SDK text verbatim."""
        where = f"{op} {key}" if key else op
        if isinstance(err, botocore.exceptions.ClientError):
            code, status = _code(err), _status(err)
            detail = _server_message(err)
            if code in _NOT_FOUND:
                return NotFound(f"{where}: not found")
            if code == "NoSuchBucket":
                return PermanentError(f"{where}: bucket {self.bucket!r} does not exist", _HINT_BUCKET)
            if code in _BAD_CREDENTIALS:
                return PermanentError(f"{where}: credentials rejected ({code})", _HINT_CREDENTIALS)
            if code in _DENIED and op in _WRITES:  # (credentials that may read: read-only operations go on)
                return WriteRefused(f"{where}: access denied to {self.url} (these credentials may not write)",
                                    _HINT_DENIED, cause="access denied")
            if code in _DENIED and op in ("get", "get_range"):  # (this object: the store itself answers)
                return ReadRefused(f"{where}: access denied to {self.url}", _HINT_DENIED)
            if code in _DENIED:
                return PermanentError(f"{where}: access denied to {self.url}", _HINT_DENIED)
            if code in _TRANSIENT or status >= 500 or status == 429:
                return TransientError(f"{where}: server busy or failing ({code or status}{detail})")
            return PermanentError(f"{where}: refused by the server ({code or status}{detail})")
        if isinstance(err, botocore.exceptions.SSLError):
            return PermanentError(
                f"{where}: TLS error talking to the S3 endpoint",
                "check AWS_ENDPOINT_URL's certificate (AWS_CA_BUNDLE)",
            )
        if isinstance(err, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError):
            return TransientError(f"{where}: S3 endpoint timed out", _HINT_ENDPOINT)
        if isinstance(
            err,
            botocore.exceptions.ConnectionError
            | botocore.exceptions.HTTPClientError
            | botocore.exceptions.IncompleteReadError,
        ):
            return TransientError(f"{where}: cannot reach the S3 endpoint ({type(err).__name__})", _HINT_ENDPOINT)
        if isinstance(err, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return PermanentError(f"{where}: no usable AWS credentials", _HINT_CREDENTIALS)
        if isinstance(err, botocore.exceptions.CredentialRetrievalError):
            return PermanentError(f"{where}: cannot load AWS credentials", _HINT_CREDENTIALS)
        if isinstance(err, botocore.exceptions.ParamValidationError):
            return PermanentError(f"{where}: invalid request (bad bucket name or key?)", _HINT_BUCKET)
        return PermanentError(f"{where}: S3 client error ({type(err).__name__})")


def _code(err: botocore.exceptions.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: botocore.exceptions.ClientError) -> int:
    try:
        return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        return 0


def _server_message(err: botocore.exceptions.ClientError) -> str:
    """The server's own short message, if any, with anything like an access key id cut out."""
    message = str(err.response.get("Error", {}).get("Message", "")).strip()
    if not message:
        return ""
    message = _ACCESS_KEY_ID.sub("<key id>", message)
    return f": {message[:200]}"
