"""`dbre restore --provider sqld`: a real sqld with bottomless replication to a real S3-compatible
server (moto), writes over time, forks at several times, each restored state checked against what
had been committed by then. Nothing here is mocked."""

from __future__ import annotations

import json
import re
import time
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import apsw
import pytest

from dbre.repository.manifest import iso
from tests.dbfactory import assert_one_line_error, cli
from tests.sqld import SqldServer, sqld_namespaces, start_sqld  # noqa: F401 - the session fixture

ADMIN_KEY = "admin-key-s3cr3t-0f-this-test"
_BATCH = re.compile(r"/(\d+)-(\d+)-(\d+)\.[a-z]+$")  # <first frame>-<last frame>-<upload unix seconds>.<compression>


@dataclass
class History:
    server: SqldServer
    times: list[float]  # times[k]: a time when state k (rows 1..k, state.n = k) is restorable, before commit k+1

    def env(self, **extra: str) -> dict[str, str | None]:
        return {"LIBSQL_ADMIN_AUTH_KEY": ADMIN_KEY, **extra}

    def args(self, *more: str) -> list[str]:
        assert self.server.admin_url
        return ["restore", "--provider", "sqld", "--admin-url", self.server.admin_url, "--namespace", "app", *more]


def _batches(s3: Any, bucket: str) -> dict[str, int]:
    """The WAL batches bottomless has uploaded: key -> upload second."""
    out: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            m = _BATCH.search(obj["Key"])
            if m:
                out[obj["Key"]] = int(m.group(3))
    return out


def _restorable_after(s3: Any, bucket: str, seen: dict[str, int]) -> float:
    """Wait for the batch of the commit just made; returns a time at which a fork includes it: the fork
    keeps batches uploaded before the time's second (see dbre/provider/sqld.py), so upload second + 1.5 s."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = {k: v for k, v in _batches(s3, bucket).items() if k not in seen}
        if new:
            time.sleep(1.2)  # (a commit's frames could go in more than one batch: take the last)
            new = {k: v for k, v in _batches(s3, bucket).items() if k not in seen}
            seen.update(new)
            return max(new.values()) + 1.5
        time.sleep(0.1)
    raise AssertionError("bottomless uploaded no batch in 20 s")


@pytest.fixture(scope="module")
def history(moto_server: str, s3_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    """sqld (namespaces, admin API with a key, bottomless every second into a fresh bucket) and the
    namespace ``app``: state 0, then four commits (row i inserted and ``state.n`` set to i in one
    transaction). After each, the test waits for its batch in S3 and for the time it is restorable
    to pass, so each state has a time of its own, whatever the upload lag."""
    bucket = f"bottomless-{int(time.time() * 1000) % 10**9}"
    s3_client.create_bucket(Bucket=bucket)
    env = {
        "LIBSQL_BOTTOMLESS_BUCKET": bucket, "LIBSQL_BOTTOMLESS_ENDPOINT": moto_server,
        "LIBSQL_BOTTOMLESS_DATABASE_ID": "dbre-test", "LIBSQL_BOTTOMLESS_AWS_ACCESS_KEY_ID": "testing",
        "LIBSQL_BOTTOMLESS_AWS_SECRET_ACCESS_KEY": "testing", "LIBSQL_BOTTOMLESS_AWS_DEFAULT_REGION": "us-east-1",
        "LIBSQL_BOTTOMLESS_BATCH_INTERVAL_SECS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:  # (start_sqld passes this process's environment on)
        for k, v in env.items():
            mp.setenv(k, v)
        server = start_sqld(tmp_path_factory.mktemp("sqld-bottomless"), namespaces=True, admin=True,
                            extra_args=["--enable-bottomless-replication", "--admin-auth-key", ADMIN_KEY])
    try:
        _admin(server, "POST", "/v1/namespaces/app/create")
        seen: dict[str, int] = {}
        server.pipeline(["CREATE TABLE t(i INTEGER PRIMARY KEY, v TEXT)", "CREATE TABLE state(n INTEGER)",
                         "INSERT INTO state VALUES (0)"], namespace="app")
        times = [_restorable_after(s3_client, bucket, seen)]
        for i in range(1, 5):
            time.sleep(max(0.0, times[-1] + 0.3 - time.time()))  # (commit i after state i-1's time)
            server.pipeline(["BEGIN", ("INSERT INTO t VALUES (?, ?)", (i, f"row {i}")),
                             ("UPDATE state SET n = ?", (i,)), "COMMIT"], namespace="app")
            times.append(_restorable_after(s3_client, bucket, seen))
        time.sleep(max(0.0, times[-1] - time.time()))
        yield History(server, times)
    finally:
        server.stop()


def _admin(server: SqldServer, method: str, path: str) -> None:
    import urllib.request

    assert server.admin_url
    req = urllib.request.Request(server.admin_url + path, data=b"{}", method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"basic {ADMIN_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()


def _rows(path: Path) -> tuple[list[tuple[int, str]], int]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = [(int(r[0]), str(r[1])) for r in conn.execute("SELECT i, v FROM t ORDER BY i")]
        n = conn.execute("SELECT n FROM state").fetchone()
        assert n is not None
        return rows, int(n[0])
    finally:
        conn.close()


def _at(t: float) -> str:
    return iso(datetime.fromtimestamp(t, UTC))


def test_forks_at_several_times_hold_what_was_committed_by_then(history: History, tmp_path: Path) -> None:
    """A fork at state k's time (after commit k's batch was uploaded, before commit k+1) restores rows
    1..k and state k exactly: commit k, and nothing committed after the time."""
    for k in (0, 1, 2, 4):
        t = history.times[k]
        out = tmp_path / f"at-{k}.db"
        started = time.monotonic()
        r = cli(*history.args("--at", _at(t), "--to", str(out), "--url", history.server.url, "--json"),
                env=history.env())
        elapsed = time.monotonic() - started
        assert r.returncode == 0, r
        s = json.loads(r.stdout)
        rows, n = _rows(out)
        assert (rows, n) == ([(i, f"row {i}") for i in range(1, k + 1)], k), (k, s)
        assert s["to"] == str(out) and s["tables"] == 2 and s["size"] == out.stat().st_size
        assert s["cleanup_error"] is None and s["create_seconds"] < elapsed
        print(f"fork at commit {k}: fork {s['create_seconds']:.2f} s, read {s['read_seconds']:.2f} s, "
              f"cli {elapsed:.2f} s")
    # the scratch namespaces are gone: asking for the newest state works and lists no leftovers to clean
    out = tmp_path / "now.db"
    r = cli(*history.args("--at", _at(time.time()), "--to", str(out), "--url", history.server.url),
            env=history.env())
    assert r.returncode == 0, r
    assert _rows(out) == ([(i, f"row {i}") for i in range(1, 5)], 4)
    assert "restored namespace app as it was at" in r.stdout and "fork " in r.stdout


def test_into_namespace_leaves_the_fork_in_place(history: History) -> None:
    t = history.times[2]
    r = cli(*history.args("--at", _at(t), "--into-namespace", "app-before", "--url", history.server.url),
            env=history.env())
    assert r.returncode == 0, r
    assert "into the new namespace app-before" in r.stdout
    assert history.server.execute("SELECT i FROM t ORDER BY i", namespace="app-before") == [[1], [2]]
    # a fork never replaces a namespace: the same name again is refused, the fork untouched
    again = cli(*history.args("--at", _at(history.times[3]), "--into-namespace", "app-before"), env=history.env())
    assert_one_line_error(again, 2, "app-before", "already exists", "choose a new name")
    assert history.server.execute("SELECT count(*) FROM t", namespace="app-before") == [[2]]


def test_a_time_before_the_history_is_refused_and_nothing_is_left(history: History, tmp_path: Path) -> None:
    """sqld forks an empty database for a time before the namespace's first backup; dbre refuses it."""
    out = tmp_path / "before.db"
    t = history.times[0] - 3600
    r = cli(*history.args("--at", _at(t), "--to", str(out), "--url", history.server.url), env=history.env())
    assert_one_line_error(r, 1, "holds no table", "before its first bottomless backup", "later --at")
    assert not out.exists() and not list(tmp_path.iterdir())
    r = cli(*history.args("--at", _at(t), "--into-namespace", "too-early", "--url", history.server.url),
            env=history.env())
    assert_one_line_error(r, 1, "holds no table")
    with pytest.raises(urllib.error.HTTPError):  # deleted again: the name is not a namespace
        history.server.execute("SELECT 1", namespace="too-early")


def test_existing_file_needs_force(history: History, tmp_path: Path) -> None:
    out = tmp_path / "live.db"
    out.write_bytes(b"do not touch")
    args = history.args("--at", _at(history.times[1]), "--to", str(out), "--url", history.server.url)
    r = cli(*args, env=history.env())
    assert_one_line_error(r, 2, "already exists", "--force")
    assert out.read_bytes() == b"do not touch"
    r = cli(*args, "--force", env=history.env())
    assert r.returncode == 0, r
    assert _rows(out) == ([(1, "row 1")], 1)
    assert "no safety snapshot" in r.stdout


def test_dry_run_asks_nothing_and_shows_the_plan(history: History, tmp_path: Path) -> None:
    out = tmp_path / "plan.db"
    r = cli(*history.args("--at", _at(history.times[2]), "--to", str(out), "--url", history.server.url,
                          "--dry-run"), env=history.env(LIBSQL_ADMIN_AUTH_KEY="wrong"))  # (a wrong key: never used)
    assert r.returncode == 0, r
    assert "would restore namespace app as it was at" in r.stdout and "temporary namespace dbre-restore-" in r.stdout
    assert "nothing committed after the time" in r.stdout
    assert not out.exists()


def test_wrong_admin_key_is_refused_without_printing_it(history: History, tmp_path: Path) -> None:
    secret = "wrong-key-that-must-not-show"
    r = cli(*history.args("--at", _at(history.times[1]), "--to", str(tmp_path / "x.db"), "--url",
                          history.server.url), env=history.env(LIBSQL_ADMIN_AUTH_KEY=secret))
    assert_one_line_error(r, 1, "refused (HTTP 401)", "LIBSQL_ADMIN_AUTH_KEY")
    assert secret not in r.stdout + r.stderr and ADMIN_KEY not in r.stdout + r.stderr
    from dbre.provider.sqld import SqldAdmin
    from dbre.secrets import Secret

    assert secret not in repr(SqldAdmin("http://127.0.0.1:1", Secret(secret)))


def test_future_time_and_mixed_options_are_one_line_each(history: History, tmp_path: Path) -> None:
    out = str(tmp_path / "x.db")
    future = _at(time.time() + 3600)
    cases: list[tuple[list[str], list[str]]] = [
        (history.args("--at", future, "--to", out, "--url", "http://x"), ["in the future", "past time"]),
        (history.args("--at", future), ["either to a file (--to) or into a new namespace"]),
        (history.args("--at", future, "--to", out), ["needs --url"]),
        (history.args("--at", future, "--to", out, "--url", "http://x", "--repo", "r", "--db", "d"),
         ["--repo, --db cannot be used with --provider"]),
        (history.args("--at", future, "--to", out, "--url", "http://x", "--fallback", "r2"),
         ["--fallback cannot be used with --provider"]),
        (history.args("--at", future, "--into", "x"), ["--into cannot be used with --provider sqld"]),
        (["restore", "--namespace", "app", "--repo", "r", "--db", "d", "--to", out], ["--namespace needs --provider"]),
        (history.args("--at", "yesterday", "--to", out, "--url", "http://x"), ["cannot parse time"]),
        (["restore", "--provider", "nosuch", "--at", future], ["unknown --provider", "sqld or turso"]),
    ]
    for args, needles in cases:
        assert_one_line_error(cli(*args, env=history.env()), 2, *needles)
    assert not list(tmp_path.iterdir())


def test_a_sqld_without_bottomless_says_it_keeps_no_history(sqld_namespaces: SqldServer) -> None:  # noqa: F811
    sqld_namespaces.create_namespace("nohistory")
    try:
        assert sqld_namespaces.admin_url
        r = cli("restore", "--provider", "sqld", "--admin-url", sqld_namespaces.admin_url, "--namespace",
                "nohistory", "--at", _at(time.time() - 5), "--into-namespace", "nohistory-copy")
        assert_one_line_error(r, 1, "backup service not configured", "--enable-bottomless-replication")
    finally:
        sqld_namespaces.delete_namespace("nohistory")


def test_fork_timestamp_is_naive_and_a_second_early() -> None:
    """sqld drops a timestamp with a zone (and forks the current state): dbre sends a naive one."""
    from dbre.provider.sqld import fork_timestamp

    at = datetime(2026, 12, 1, 12, 0, 7, 600_000, tzinfo=UTC) + timedelta(0)
    assert fork_timestamp(at) == "2026-12-01T12:00:06"
