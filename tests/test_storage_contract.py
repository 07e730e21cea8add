"""The Store contract, checked against every backend; then S3-specific failures and RetryingStore.

The S3 cases run against a real moto_server (see tests/conftest.py), never behind a flag.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dbre.errors import UsageError
from dbre.storage import open_store
from dbre.storage.base import (
    AlreadyExists,
    NotFound,
    PermanentError,
    StorageError,
    Store,
    TransientError,
    WriteRefused,
    open_upload,
)
from dbre.storage.local import LocalStore, LocalUpload
from dbre.storage.retry import RetryingStore
from dbre.storage.s3 import S3Store
from tests.conftest import MotoServer, free_port, unique_bucket_name

# --------------------------------------------------------------------------- the contract


def test_store_satisfies_protocol(store: Store) -> None:
    assert isinstance(store, Store)
    assert store.url


def test_put_get_roundtrip(store: Store) -> None:
    store.put("packs/ab/ab12", b"pack bytes")
    store.put("config", b"{}")
    assert store.get("packs/ab/ab12") == b"pack bytes"
    assert store.get("config") == b"{}"


def test_get_missing_raises_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("snapshots/missing")
    with pytest.raises(NotFound):
        store.get_range("snapshots/missing", 0, 10)


def test_get_range(store: Store) -> None:
    data = bytes(range(100))
    store.put("blob", data)
    assert store.get_range("blob", 10, 20) == data[10:30]
    assert store.get_range("blob", 0, 1) == data[:1]
    assert store.get_range("blob", 90, 10) == data[90:]
    assert store.get_range("blob", 95, 50) == data[95:]  # fewer bytes only at the end
    assert store.get_range("blob", 100, 10) == b""
    assert store.get_range("blob", 500, 10) == b""
    assert store.get_range("blob", 10, 0) == b""


def test_list_by_prefix(store: Store) -> None:
    keys = ["packs/ab/1", "packs/ab/2", "packs/ac/3", "packs/b/4", "snapshots/s1", "config"]
    for key in keys:
        store.put(key, b"x")
    assert sorted(store.list()) == sorted(keys)
    assert sorted(store.list("packs/")) == ["packs/ab/1", "packs/ab/2", "packs/ac/3", "packs/b/4"]
    assert sorted(store.list("packs/a")) == ["packs/ab/1", "packs/ab/2", "packs/ac/3"]  # not a folder
    assert sorted(store.list("packs/ab/")) == ["packs/ab/1", "packs/ab/2"]
    assert sorted(store.list("sn")) == ["snapshots/s1"]
    assert list(store.list("locks/")) == []
    assert list(store.list("nothing")) == []


def test_list_ordered_from_a_start_with_a_limit(store: Store) -> None:
    """start_after/limit: ascending byte order, strictly after the start, at most limit keys."""
    keys = [f"snapshots/db/{n:04x}-{n}" for n in (3, 17, 250, 4095, 9)] + ["snapshots/other/0001-x", "config"]
    for key in keys:
        store.put(key, b"x")
    mine = sorted(k for k in keys if k.startswith("snapshots/db/"))
    assert list(store.list("snapshots/db/", limit=1)) == mine[:1]
    assert list(store.list("snapshots/db/", limit=3)) == mine[:3]
    assert list(store.list("snapshots/db/", start_after=mine[1])) == mine[2:]
    assert list(store.list("snapshots/db/", start_after="snapshots/db/00fa", limit=1)) == ["snapshots/db/00fa-250"]
    assert list(store.list("snapshots/db/", start_after="snapshots/db/zzzz")) == []
    assert list(store.list("snapshots/db/", limit=0)) == []
    assert list(store.list("snapshots/db/", start_after="snapshots/")) == mine


def test_modified_is_the_stores_clock(store: Store) -> None:
    before = time.time()
    store.put("locks/a", b"1")
    stamp = store.modified("locks/a")
    # S3's LastModified has one-second resolution; the test server shares this machine's clock
    assert before - 2 <= stamp <= time.time() + 2
    with pytest.raises(NotFound):
        store.modified("locks/missing")


def test_local_list_of_an_unreadable_folder_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder that cannot be read must not list as empty (prune would conclude from it).

    Tests run as root here, which reads any folder whatever its mode, so the refusal is injected
    at os.scandir, the call LocalStore's walk makes; a non-root run also checks it with chmod 000."""
    store = LocalStore(tmp_path / "repo")
    store.put("snapshots/app/1", b"x")
    store.put("snapshots/other/1", b"x")
    blocked = str(tmp_path / "repo" / "snapshots" / "app")
    real = os.scandir

    def scandir(path: object = ".") -> object:
        # LocalStore walks folders by descriptor (no link followed): name the folder behind it
        named = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else str(path)
        if named == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermanentError, match="list"):
        list(store.list("snapshots/"))
    with pytest.raises(PermanentError):
        list(store.list("snapshots/", limit=1))
    monkeypatch.setattr(os, "scandir", real)
    if os.geteuid() != 0:
        os.chmod(blocked, 0)
        try:
            with pytest.raises(PermanentError):
                list(store.list("snapshots/"))
        finally:
            os.chmod(blocked, 0o755)


def test_list_never_shows_keys_being_written(store: Store) -> None:
    """While a writer keeps putting objects, every listed key is complete and readable."""
    payload = os.urandom(256 * 1024)
    wanted = {f"packs/p{i}" for i in range(12)}
    done = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for key in sorted(wanted):
                store.put(key, payload)
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        for key in store.list():
            assert key in wanted, f"unexpected key {key!r} listed"
            assert store.get(key) == payload
    thread.join()
    assert not errors
    assert set(store.list()) == wanted


def test_delete_is_idempotent(store: Store) -> None:
    store.put("locks/l1", b"lock")
    store.delete("locks/l1")
    assert not store.exists("locks/l1")
    with pytest.raises(NotFound):
        store.get("locks/l1")
    assert list(store.list("locks/")) == []
    store.delete("locks/l1")
    store.delete("never/written")


def test_exists(store: Store) -> None:
    assert not store.exists("packs/ab/1")
    store.put("packs/ab/1", b"x")
    assert store.exists("packs/ab/1")
    assert not store.exists("packs/ab")  # a prefix of keys is not a key
    assert not store.exists("packs/ab/12")


def test_conditional_put_keeps_first_content(store: Store) -> None:
    store.put("snapshots/s1", b"first", if_absent=True)
    with pytest.raises(AlreadyExists):
        store.put("snapshots/s1", b"second", if_absent=True)
    assert store.get("snapshots/s1") == b"first"


def _race_conditional_puts(store: Store, key: str, payloads: list[bytes]) -> tuple[list[bytes], int]:
    """Start one thread per payload, all putting ``key`` if absent at once; (winners, losers)."""
    barrier = threading.Barrier(len(payloads))
    winners: list[bytes] = []
    losers: list[bytes] = []
    errors: list[BaseException] = []

    def racer(data: bytes) -> None:
        barrier.wait()
        try:
            store.put(key, data, if_absent=True)
            winners.append(data)
        except AlreadyExists:
            losers.append(data)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=racer, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    return winners, len(losers)


def test_racing_conditional_puts_exactly_one_wins(store: Store) -> None:
    for round_ in range(5):
        key = f"snapshots/race-{round_}"
        winners, losers = _race_conditional_puts(store, key, [bytes([n]) * 64 * 1024 for n in (1, 2)])
        assert len(winners) == 1 and losers == 1, f"round {round_}: {len(winners)} winners"
        assert store.get(key) == winners[0]


def test_plain_put_overwrites(store: Store) -> None:
    store.put("index/i1", b"old", if_absent=True)
    store.put("index/i1", b"new")
    assert store.get("index/i1") == b"new"
    store.put("index/i1", b"newer")
    assert store.get("index/i1") == b"newer"
    assert list(store.list("index/")) == ["index/i1"]


def test_empty_object(store: Store) -> None:
    store.put("empty", b"")
    assert store.get("empty") == b""
    assert store.get_range("empty", 0, 10) == b""
    assert store.exists("empty")
    assert list(store.list("emp")) == ["empty"]


def test_five_megabyte_object(store: Store) -> None:
    data = os.urandom(5 * 1024 * 1024)
    store.put("packs/big", data)
    assert store.get("packs/big") == data
    assert store.get_range("packs/big", len(data) - 100, 1000) == data[-100:]
    assert store.get_range("packs/big", 1_000_000, 4096) == data[1_000_000:1_004_096]


def test_upload_appears_only_at_commit(store: Store) -> None:
    """An upload written in pieces (packs): invisible until commit, whole after it."""
    pieces = [os.urandom(n) for n in (1000, 5 * 1024 * 1024, 0, 77)]
    upload = open_upload(store, "packs/up/streamed")
    for piece in pieces:
        upload.write(piece)
        assert not store.exists("packs/up/streamed")
        assert list(store.list("packs/up/")) == []
    upload.commit()
    assert store.get("packs/up/streamed") == b"".join(pieces)
    assert list(store.list("packs/up/")) == ["packs/up/streamed"]


def test_aborted_upload_leaves_nothing(store: Store) -> None:
    upload = open_upload(store, "packs/up/aborted")
    upload.write(os.urandom(6 * 1024 * 1024))
    upload.abort()
    assert not store.exists("packs/up/aborted")
    assert list(store.list("")) == []
    if isinstance(store, LocalStore):
        assert store.clean_temp() == 0  # the temp file went with the abort


def test_local_upload_streams_to_disk() -> None:
    """A local upload writes as it goes (memory stays flat); other stores buffer and put once."""
    assert isinstance(open_upload(LocalStore("/nonexistent-root"), "k"), LocalUpload)


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../b", "a/.."])
def test_invalid_keys_rejected(store: Store, key: str) -> None:
    with pytest.raises(PermanentError):
        store.put(key, b"x")
    with pytest.raises(PermanentError):
        store.get(key)


# --------------------------------------------------------------------------- S3 specifics


def _assert_clean(err: BaseException) -> None:
    """A store error from our own hierarchy, with no SDK text and no secret in it."""
    assert type(err).__module__.startswith("dbre.")
    for text in (str(err), repr(err)):
        assert "testing" not in text  # the session's fake access key and secret
        assert "botocore" not in text and "ClientError" not in text


def test_s3_url_parsing(moto_server: str) -> None:
    assert S3Store.from_url("s3://bucket").url == "s3://bucket"
    store = S3Store.from_url("s3://bucket/a/b/")
    assert (store.bucket, store.prefix, store.url) == ("bucket", "a/b", "s3://bucket/a/b")
    opened = open_store("s3://bucket/p")  # S3 repositories retry transient errors
    assert isinstance(opened, RetryingStore) and isinstance(opened.store, S3Store)
    for bad in ("s3://", "s3:///p", "s3://b/p?x=1"):
        with pytest.raises(UsageError):
            S3Store.from_url(bad)


def test_s3_prefixes_are_isolated(s3_bucket: str) -> None:
    """Keys are relative to the URL's prefix; a sibling prefix that extends it stays apart."""
    one = S3Store.from_url(f"s3://{s3_bucket}/repo")
    other = S3Store.from_url(f"s3://{s3_bucket}/repo2")
    whole = S3Store.from_url(f"s3://{s3_bucket}")
    one.put("config", b"1")
    other.put("config", b"2")
    assert list(one.list()) == ["config"]
    assert one.get("config") == b"1"
    assert sorted(whole.list()) == ["repo/config", "repo2/config"]


def test_s3_missing_bucket_is_permanent_with_hint(moto_server: str) -> None:
    store = S3Store.from_url(f"s3://{unique_bucket_name('dbre-missing')}/repo")
    operations: dict[str, Callable[[], object]] = {
        "put": lambda: store.put("config", b"x"),
        "get": lambda: store.get("config"),
        "list": lambda: list(store.list()),
        "exists": lambda: store.exists("config"),
        "delete": lambda: store.delete("config"),
    }
    for op, call in operations.items():
        with pytest.raises(PermanentError) as info:
            call()
        assert info.value.message.startswith(op)
        assert "create the bucket" in info.value.hint
        _assert_clean(info.value)


def test_s3_unreachable_endpoint_is_transient(moto_server: str) -> None:
    store = S3Store.from_url("s3://bucket/repo", endpoint_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    for call in (lambda: store.put("config", b"x"), lambda: store.get("config"), lambda: list(store.list())):
        with pytest.raises(TransientError) as info:
            call()
        assert "AWS_ENDPOINT_URL" in info.value.hint
        _assert_clean(info.value)
    assert time.monotonic() - started < 10


def test_s3_rejected_credentials_are_permanent(
    spawn_moto: Callable[..., MotoServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    # moto accepts any credentials unless INITIAL_NO_AUTH_ACTION_COUNT says otherwise
    server = spawn_moto(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    key_id, secret = "AKIAZZZZZZZZZZZZZZZZ", "not-the-secret-0123456789"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = S3Store.from_url("s3://bucket/repo", endpoint_url=server.endpoint)
    with pytest.raises(PermanentError) as info:
        store.put("config", b"x")
    assert "AWS_ACCESS_KEY_ID" in info.value.hint
    for text in (str(info.value), repr(info.value), repr(store)):
        assert key_id not in text and secret not in text


@pytest.mark.parametrize(
    ("code", "status", "expected", "hint"),
    [
        ("SlowDown", 503, TransientError, ""),
        ("InternalError", 500, TransientError, ""),
        ("ConditionalRequestConflict", 409, TransientError, ""),
        ("AccessDenied", 403, WriteRefused, "s3:PutObject"),  # (a read-only key: readers go on without a lock)
        ("SignatureDoesNotMatch", 403, PermanentError, "AWS_SECRET_ACCESS_KEY"),
        ("NoSuchBucket", 404, PermanentError, "create the bucket"),
        ("InvalidArgument", 400, PermanentError, ""),
    ],
)
def test_s3_error_codes_map_to_store_errors(
    moto_server: str, code: str, status: int, expected: type[StorageError], hint: str
) -> None:
    """Server answers moto does not produce on demand, injected with botocore's own Stubber."""
    from botocore.stub import Stubber

    store = S3Store.from_url("s3://bucket/repo")
    with Stubber(store._client) as stubber:
        stubber.add_client_error("put_object", service_error_code=code, http_status_code=status)
        with pytest.raises(expected) as info:
            store.put("config", b"x", if_absent=True)
    assert info.type is expected
    assert info.value.message.startswith("put config: ")
    assert hint in info.value.hint


# --------------------------------------------------------------------------- RetryingStore


def test_retrying_store_rides_out_a_server_restart(
    spawn_moto: Callable[..., MotoServer], caplog: pytest.LogCaptureFixture
) -> None:
    bucket = unique_bucket_name()
    server = spawn_moto(buckets=[bucket])  # a restarted moto has lost its state: recreate the bucket
    s3 = S3Store.from_url(f"s3://{bucket}/repo", endpoint_url=server.endpoint)
    store = RetryingStore(s3, attempts=30, base_delay=0.1, max_delay=0.4)
    store.put("before", b"1")
    server.stop()
    restarted = threading.Event()

    def restart() -> None:
        time.sleep(1.0)
        server.start()
        restarted.set()

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        with caplog.at_level(logging.INFO, logger="dbre.storage.retry"):
            store.put("snapshots/s1", b"manifest")
    finally:
        thread.join()
    assert restarted.is_set()
    assert any("retrying" in record.getMessage() for record in caplog.records)
    assert store.get("snapshots/s1") == b"manifest"


class _FlakyStore:
    """A Store whose operations fail with the given errors, in order, before they succeed."""

    url = "flaky://"

    def __init__(self, *failures: Exception) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.data: dict[str, bytes] = {}

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        self._maybe_fail()
        if if_absent and key in self.data:
            raise AlreadyExists(f"put {key}: already exists")
        self.data[key] = data

    def get(self, key: str) -> bytes:
        self._maybe_fail()
        return self.data[key]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._maybe_fail()
        return self.data[key][offset : offset + length]

    def list(self, prefix: str = "", *, start_after: str | None = None, limit: int | None = None) -> Iterator[str]:
        for n, key in enumerate(sorted(self.data)):
            if n == 1:
                self._maybe_fail()  # fail mid-listing, after one key went out
            yield key

    def delete(self, key: str) -> None:
        self._maybe_fail()
        self.data.pop(key, None)

    def exists(self, key: str) -> bool:
        self._maybe_fail()
        return key in self.data

    def modified(self, key: str) -> float:
        self._maybe_fail()
        return 0.0


def test_retry_transient_until_success() -> None:
    sleeps: list[float] = []
    inner = _FlakyStore(*(TransientError(f"put k: busy {n}") for n in range(3)))
    store = RetryingStore(inner, attempts=4, base_delay=0.1, sleep=sleeps.append)
    assert isinstance(store, Store)
    store.put("k", b"v")
    assert inner.calls == 4
    assert inner.data == {"k": b"v"}
    assert len(sleeps) == 3
    for n, delay in enumerate(sleeps):
        assert 0.1 * 2**n / 2 <= delay <= 0.1 * 2**n


def test_retry_gives_up_after_attempts() -> None:
    sleeps: list[float] = []
    inner = _FlakyStore(*(TransientError("get k: busy") for _ in range(10)))
    store = RetryingStore(inner, attempts=5, sleep=sleeps.append)
    with pytest.raises(TransientError, match="gave up after 5 attempts"):
        store.get("k")
    assert inner.calls == 5
    assert len(sleeps) == 4


@pytest.mark.parametrize(
    "error", [PermanentError("get k: denied"), NotFound("get k: not found"), AlreadyExists("put k: exists")]
)
def test_retry_never_repeats_other_errors(error: Exception) -> None:
    sleeps: list[float] = []
    inner = _FlakyStore(error)
    store = RetryingStore(inner, attempts=5, sleep=sleeps.append)
    with pytest.raises(type(error)):
        store.get("k")
    assert inner.calls == 1
    assert sleeps == []


def test_retry_conditional_put_finds_its_own_write() -> None:
    """A conditional put that meets the key holding exactly its data succeeded (an earlier attempt's
    answer was lost); other content is a conflict (tests/torture/test_s3_faults.py: end to end)."""
    inner = _FlakyStore(TransientError("put k: connection reset"))
    inner.data["k"] = b"v"  # as if the failed attempt had reached the store
    store = RetryingStore(inner, sleep=lambda _: None)
    store.put("k", b"v", if_absent=True)
    assert inner.data["k"] == b"v"
    with pytest.raises(AlreadyExists):
        store.put("k", b"other", if_absent=True)


def test_retry_list_resumes_without_duplicates() -> None:
    inner = _FlakyStore(TransientError("list: busy"))
    inner.data = {"a": b"", "b": b"", "c": b""}
    store = RetryingStore(inner, sleep=lambda _: None)
    assert list(store.list()) == ["a", "b", "c"]


def test_local_clean_temp_spares_a_pack_still_being_written(tmp_path: Path) -> None:
    """Prune cleans .tmp with its grace period: a live backup's growing pack is not pulled away."""
    store = LocalStore(tmp_path / "repo")
    live = store.open_upload("packs/aa/live")
    live.write(b"first blob")
    dead = store.open_upload("packs/bb/dead")
    dead.write(b"left by a kill -9")
    dead_file = next(p for p in (tmp_path / "repo" / ".tmp").iterdir() if p.read_bytes() == b"left by a kill -9")
    old = time.time() - 3 * 3600
    os.utime(dead_file, (old, old))
    assert store.clean_temp(older_than=2 * 3600) == 1
    live.write(b" second blob")
    live.commit()
    assert store.get("packs/aa/live") == b"first blob second blob"
    assert not dead_file.exists()


def test_local_put_whose_temp_file_a_prune_removed_says_so_and_stores_nothing(tmp_path: Path) -> None:
    """A writer paused mid-put while a prune with --grace 0 empties .tmp (CI saw a replicator's lock
    put fail with a bare "No such file or directory"): the put fails with one line naming the
    cause and the fix, and the key stays absent (no empty or partial object)."""
    store = LocalStore(tmp_path / "repo")
    for if_absent in (False, True):
        upload = store.open_upload("locks/paused")
        upload.write(b"a lock")
        assert store.clean_temp(older_than=0) == 1  # what forget --prune --grace 0 does
        with pytest.raises(PermanentError, match=r"temp file in \.tmp was removed .*--grace") as err:
            upload.commit(if_absent=if_absent)
        assert "--grace" in (err.value.hint or "")
        assert not store.exists("locks/paused")
        assert list(store.list("locks/")) == []
