"""Security: what an encrypted repository shows to someone who can read the bucket, what dbre prints and
logs about its secrets, and where names read from a repository can make dbre write.

- Every object of an encrypted repository (local, and S3 on the moto server) holding backups of a
  database with distinctive table, column, index, view and trigger names and row values, replicated
  segments under a writer, the records of backups, verify and row repairs: no marker appears in any
  object's bytes or key, in UTF-8, UTF-16le or UTF-16be, nor the SQLite header.
- Distinctive secrets (the passphrase, a wrong passphrase, the libSQL/Turso auth token, the AWS secret key,
  TURSO_API_TOKEN, LIBSQL_ADMIN_AUTH_KEY) never appear in stdout, stderr, DEBUG logs, tracebacks of
  --debug runs (in process and in a real process), files written, or the reprs of the objects that hold them.
- A manifest forged in a plain repository (re-sealed with the repository's own checksum key, as anyone with
  bucket write access can) naming packs `../x`, `/abs` or with a NUL, or tables named like paths, never makes
  restore, restore-table or export read or write outside the repository and the target directory.
"""

# test-group: heavy

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dbre.repository.repo import Repository
from dbre.secrets import Secret
from tests.dbfactory import CliResult, assert_one_line_error, run_dbre, tree_hashes
from tests.replication import start_replicator, stop_replicator

PASSPHRASE = "pass-Kq7WzX3vT9mLr2Yb-phrase"
MARKER = "M4rk3r-9f8e7d6c5b4a-UNIQUE-ROW-VALUE-40b"  # 40 bytes
assert len(MARKER) == 40
NAMES = ("zebra_ledger_tbl", "ocelot_col", "narwhal_idx", "quokka_view", "pangolin_trg", "axolotl_in_trigger_sql",
         "wombat_blob_col")
MARKERS = (*NAMES, MARKER, "SQLite format 3")


def forms(text: str) -> list[bytes]:
    return [text.encode(), text.encode("utf-16-le"), text.encode("utf-16-be")]


SCHEMA = """
CREATE TABLE zebra_ledger_tbl(id INTEGER PRIMARY KEY, ocelot_col TEXT, wombat_blob_col BLOB);
CREATE INDEX narwhal_idx ON zebra_ledger_tbl(ocelot_col);
CREATE VIEW quokka_view AS SELECT ocelot_col FROM zebra_ledger_tbl;
CREATE TABLE tally(n INTEGER);
INSERT INTO tally VALUES (0);
CREATE TRIGGER pangolin_trg AFTER INSERT ON zebra_ledger_tbl BEGIN
  UPDATE tally SET n = n + 1 /* axolotl_in_trigger_sql */;
END;
"""


def make_marked_db(path: Path, rows: int = 300) -> Path:
    """A WAL database whose every name and many row values are markers (text and UTF-8 in blobs)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO zebra_ledger_tbl(ocelot_col, wombat_blob_col) VALUES (?, ?)",
                         ((f"{MARKER}-{i}", (MARKER * 3).encode()) for i in range(rows)))
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path


def write_rows(path: Path, seconds: float) -> int:
    """Commit marked rows for ``seconds`` (the replicator ships them as segments)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    n = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            conn.execute("INSERT INTO zebra_ledger_tbl(ocelot_col, wombat_blob_col) VALUES (?, ?)",
                         (f"{MARKER}-w{n}", MARKER.encode()))
            n += 1
            time.sleep(0.01)
    finally:
        conn.close()
    return n


# --------------------------------------------------------------------------- running the CLI in process


@dataclass
class Outcome:
    result: CliResult
    trace: str  # the traceback a --debug run raised ("" when none)
    logs: str


def invoke(*args: str | Path, env: Mapping[str, str | None]) -> Outcome:
    """The CLI in this process with ``env``, DEBUG logs captured, and the traceback of an exception it raised."""
    from typer.testing import CliRunner

    from dbre.cli import app

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        r = CliRunner().invoke(app, [str(a) for a in args], env=dict(env), catch_exceptions=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    trace = ""
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        trace = "".join(traceback.format_exception(r.exception))
    return Outcome(CliResult(r.exit_code, r.stdout, r.stderr), trace, stream.getvalue())


# --------------------------------------------------------------------------- stored objects


def stored_objects(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, bytes) of every object of a repository (local files, or every S3 object under the prefix)."""
    if url.startswith("s3://"):
        import boto3

        bucket, _, prefix = url[5:].partition("/")
        s3 = boto3.session.Session().client("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(prefix) + 1:], s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        return
    for p in sorted(Path(url).rglob("*")):
        if p.is_file():
            yield str(p.relative_to(url)), p.read_bytes()


def marker_hits(url: str) -> tuple[int, list[str]]:
    """How many objects were scanned, and every (object, marker) found in a key or in the bytes."""
    hits, count = [], 0
    for key, data in stored_objects(url):
        count += 1
        for marker in MARKERS:
            for form in forms(marker):
                width = len(form) // len(marker)
                if form in data:
                    hits.append(f"bytes of {key}: {marker!r} ({width} byte/char)")
                if form in key.encode():
                    hits.append(f"key {key}: {marker!r} ({width} byte/char)")
    return count, hits


@pytest.mark.parametrize("where", ["local", "s3"])
def test_encrypted_repository_shows_no_names_values_or_pages(where: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """Backups, replicated segments, records of backups, verify, restore-table and repair-rows audits: nothing."""
    url = str(tmp_path / "repo") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/repo"
    env = {"DBRE_ENCRYPTION_KEY": PASSPHRASE}
    src = make_marked_db(tmp_path / "live.db")
    rep = start_replicator(src, url, "app", interval="300ms", env=env)
    try:
        _wait_for_base(url, rep)
        assert write_rows(src, 1.5) > 20
        time.sleep(1.0)
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    for args in (["backup", src, "--repo", url, "--db", "app"],
                 ["backup", src, "--repo", url, "--db", "zebra_ledger_tbl"],  # a db name is a key: shown on purpose
                 ["verify", "--repo", url],
                 ["drill", "--repo", url, "--db", "app"],
                 ["restore-table", "--repo", url, "--db", "app", "--live", src, "--table", "zebra_ledger_tbl",
                  "--apply"],
                 ["repair-rows", "--repo", url, "--db", "app", "--live", src, "--table", "zebra_ledger_tbl",
                  "--where", "id < 5", "--apply"]):
        out = invoke(*args, env=env)
        assert out.result.returncode == 0, out.result
    repo = Repository.open(url, Secret(PASSPHRASE))
    assert any(k.startswith("segments/app/") and not k.endswith("/base") for k in repo.store.list("segments/"))
    assert repo.records("audits", "app"), "repair-rows and restore-table leave audit records"
    count, hits = marker_hits(url)
    # the one name the user chose as a key (--db zebra_ledger_tbl) is in keys by design: only those keys
    chosen = ("key snapshots/zebra_ledger_tbl/", "key records/backups/zebra_ledger_tbl/")
    hits = [h for h in hits if not h.startswith(chosen) or "'zebra_ledger_tbl'" not in h]
    assert count > 10
    print(f"{where}: {count} objects scanned for {len(MARKERS)} markers in 3 encodings")
    assert hits == [], f"{len(hits)} markers in plain text among {count} objects: {hits[:20]}"
    # the scan itself finds every marker in the database file (and its header)
    assert {h.split(": ", 1)[1].split(" (")[0] for h in marker_hits(str(src.parent))[1]} >= {repr(m) for m in MARKERS}


def _wait_for_base(url: str, proc: Any, timeout: float = 60) -> None:
    """Until the replicator has written its first generation's base (read from the store: no key needed)."""
    from dbre.storage import open_store

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if any(k.endswith("/base") for k in open_store(url).list("segments/app/")):
                return
        except Exception:  # noqa: BLE001 - the bucket prefix may not exist yet
            pass
        time.sleep(0.1)
    raise AssertionError("no generation within the timeout")


# --------------------------------------------------------------------------- secrets


SECRETS = {
    "DBRE_ENCRYPTION_KEY": PASSPHRASE,
    "LIBSQL_AUTH_TOKEN": "tok-libsql-Hh4Jk8Pq2Rs6Vw0Y",
    "TURSO_AUTH_TOKEN": "tok-turso-Bb3Nn7Mm1Zz5Xx9C",
    "TURSO_API_TOKEN": "tok-api-Gg2Ff6Dd0Ss4Aa8Q",
    "LIBSQL_ADMIN_AUTH_KEY": "adm-key-Ee1Rr5Tt9Yy3Uu7I",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-Oo4Pp8Ll2Kk6Jj0H",
}
WRONG = "wrong-pass-Cc9Vv3Bb7Nn1Mm5"
URL_TOKEN = "url-token-Ww6Qq0Ee4Rr8Tt2"


def closed_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


@contextlib.contextmanager
def refusing_server() -> Iterator[int]:
    """An HTTP server on localhost answering every request 401 with a JSON error (what a wrong token meets)."""
    import http.server
    import threading

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            body = b'{"error": "unauthorized: bad token"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def leaks(text: str) -> list[str]:
    return [name for name, value in {**SECRETS, "wrong": WRONG, "url token": URL_TOKEN}.items() if value in text]


def test_secrets_never_printed_logged_or_raised(tmp_path: Path, s3_bucket: str) -> None:
    """Every command that takes a secret, on success and failure paths (a closed port, a server refusing the token),
    plain and --debug: no secret anywhere."""
    with refusing_server() as refusing:
        _secrets_never_printed(tmp_path, s3_bucket, refusing)


def _secrets_never_printed(tmp_path: Path, s3_bucket: str, refusing: int) -> None:
    env: dict[str, str | None] = {**SECRETS, "DBRE_KEY_FILE": None, "DBRE_POLICY": None}
    port = closed_port()
    src = make_marked_db(tmp_path / "live.db", rows=50)
    repo, s3 = tmp_path / "repo", f"s3://{s3_bucket}/repo"
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(WRONG)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    remote = f"libsql://127.0.0.1:{port}/?authToken={URL_TOKEN}"
    runs: list[tuple[list[str | Path], dict[str, str | None], bool]] = [
        (["backup", src, "--repo", repo, "--db", "app", "--json"], env, True),
        (["backup", src, "--repo", s3, "--db", "app"], env, True),
        (["snapshots", "--repo", repo, "--json"], env, True),
        (["snapshots", "--repo", s3], env, True),
        (["verify", "--repo", repo, "--json"], env, True),
        (["restore", "--repo", repo, "--db", "app", "--to", out_dir / "r.db", "--json", "--force",
          "--no-safety-snapshot"], env, True),
        (["restore", "--repo", s3, "--db", "app", "--to", out_dir / "s.db", "--force", "--no-safety-snapshot"],
         env, True),
        (["export", "--repo", repo, "--db", "app", "--table", "zebra_ledger_tbl", "--format", "csv",
          "--out", out_dir / "e.csv", "--force"], env, True),
        (["repair-rows", "--repo", repo, "--db", "app", "--live", src, "--table", "zebra_ledger_tbl", "--where",
          "id < 3", "--apply", "--json"], env, True),
        (["audit", "--repo", repo, "--json"], env, True),
        (["status", "--repo", repo, "--json"], env, True),
        (["copy", "--repo", repo, "--to", tmp_path / "offsite"], env, True),
        # failing paths
        (["snapshots", "--repo", repo, "--key-file", wrong_key], env, False),
        (["restore", "--repo", repo, "--db", "app", "--to", out_dir / "w.db", "--key-file", wrong_key], env, False),
        (["backup", remote, "--repo", repo, "--db", "remote"], env, False),
        (["backup", f"https://127.0.0.1:{port}/?token={URL_TOKEN}", "--repo", repo, "--db", "remote2"], env, False),
        (["replicate", remote, "--repo", repo, "--db", "remote3", "--state-dir", tmp_path / "state"], env, False),
        (["snapshots", "--repo", f"s3://no-such-bucket-{port}/repo"], env, False),
        (["backup", src, "--repo", f"s3://no-such-bucket-{port}/repo", "--db", "app"], env, False),
        (["restore", "--provider", "sqld", "--admin-url", f"http://127.0.0.1:{port}", "--namespace", "ns",
          "--at", "2026-11-30T00:00:00Z", "--to", out_dir / "p.db", "--url", f"http://127.0.0.1:{port}"], env, False),
        (["restore", "--provider", "turso", "--org", "o", "--database", "d", "--at", "2026-11-30T00:00:00Z",
          "--into", "d2"], {**env, "TURSO_API_BASE_URL": f"http://127.0.0.1:{port}"}, False),
        # a server that answers: 401 to every request
        (["backup", f"http://127.0.0.1:{refusing}/?authToken={URL_TOKEN}", "--repo", repo, "--db", "r401"], env,
         False),
        (["restore", "--provider", "sqld", "--admin-url", f"http://127.0.0.1:{refusing}", "--namespace", "ns",
          "--at", "2026-11-30T00:00:00Z", "--to", out_dir / "p.db", "--url", f"http://127.0.0.1:{refusing}"], env,
         False),
        (["restore", "--provider", "turso", "--org", "o", "--database", "d", "--at", "2026-11-30T00:00:00Z",
          "--into", "d2"], {**env, "TURSO_API_BASE_URL": f"http://127.0.0.1:{refusing}"}, False),
    ]
    seen = 0
    for args, run_env, ok in runs:
        for debug in ([], ["--debug"]):
            out = invoke(*debug, *args, env=run_env)
            where = f"dbre {' '.join(map(str, [*debug, *args]))}"
            assert (out.result.returncode == 0) == ok, (where, out.result, out.trace[-3000:])
            if not ok and not debug:
                assert_one_line_error(out.result, out.result.returncode)
            for what, text in (("stdout", out.result.stdout), ("stderr", out.result.stderr),
                               ("traceback", out.trace), ("logs", out.logs)):
                assert leaks(text) == [], f"{where}: {leaks(text)} in its {what}: {text[-3000:]}"
            seen += 1
    # real processes with --debug print the traceback on stderr
    for args in (["snapshots", "--repo", repo, "--key-file", wrong_key], ["backup", remote, "--repo", repo,
                                                                          "--db", "remote"]):
        r = run_dbre("--debug", *args, env=env)
        assert r.returncode == 1 and "Traceback" in r.stderr, r
        assert leaks(r.stdout + r.stderr) == [], r
    # every file written: the repository, the offsite copy, restores, exports, state
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            found = [n for n, v in {**SECRETS, "wrong": WRONG, "url token": URL_TOKEN}.items()
                     if v.encode() in data and path != wrong_key]
            assert found == [], f"{path}: {found}"
    assert seen == 2 * len(runs)


def test_reprs_redact_secrets(tmp_path: Path) -> None:
    """The objects that hold secrets print none: Secret, Sealer, Repository, stores, sources, provider clients."""
    from dbre.provider.sqld import SqldAdmin
    from dbre.provider.turso import TursoPlatform
    from dbre.sources import open_source
    from dbre.storage.s3 import S3Store

    key = Secret(PASSPHRASE)
    repo = Repository.open_or_init(str(tmp_path / "repo"), key)
    objects: list[Any] = [
        key, repo, repo.sealer, repo.store,
        open_source(f"libsql://db.example:8080/?authToken={URL_TOKEN}", token=Secret(SECRETS["LIBSQL_AUTH_TOKEN"])),
        open_source(f"https://db.example/?jwt={URL_TOKEN}"),
        SqldAdmin("http://127.0.0.1:1", Secret(SECRETS["LIBSQL_ADMIN_AUTH_KEY"])),
        TursoPlatform("org", Secret(SECRETS["TURSO_API_TOKEN"])),
        S3Store.from_url("s3://bucket/prefix"),
    ]
    for obj in objects:
        for text in (repr(obj), str(obj), repr(vars(obj)) if hasattr(obj, "__dict__") else ""):
            assert leaks(text) == [], f"{type(obj).__name__}: {text}"
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(key)


def test_prefect_parameters_carry_no_secret() -> None:
    """A run of the backup or restore flow started with a literal key or token stores no secret in its parameters
    (what Prefect keeps with the run and shows), and the flow's refusal names the parameter, not the value."""
    from flows.backup import backup_flow
    from flows.restore import restore_flow

    stored = backup_flow.serialize_parameters({"db": "app", "key": PASSPHRASE, "token": SECRETS["LIBSQL_AUTH_TOKEN"]})
    stored_r = restore_flow.serialize_parameters({"request": {"database": "app", "target": "/tmp/x"},
                                                  "key": PASSPHRASE})
    for params in (stored, stored_r):
        assert leaks(json.dumps(params, default=str)) == [], params
        assert params["key"] == "refused:a-literal-secret"
    assert backup_flow.serialize_parameters({"db": "app", "key": "env:DBRE_ENCRYPTION_KEY"})["key"] == \
        "env:DBRE_ENCRYPTION_KEY"


# --------------------------------------------------------------------------- names that could be paths


def _forge(repo: Repository, key: str, edit: Any) -> None:
    """Rewrite the manifest at ``key`` through ``edit(dict)`` and re-seal it as the repository would."""
    d = json.loads(repo.sealer.unseal(repo.store.get(key), key))
    edit(d)  # names only: the root binds the runs' hashes, which stay as they were
    repo.store.put(key, repo.sealer.seal(json.dumps(d).encode(), key))


@pytest.mark.parametrize("pack", ["../../outside", "/etc/passwd", "ab\x00cd"])
def test_forged_pack_name_never_leaves_the_repository(tmp_path: Path, pack: str) -> None:
    """A plain repository's manifest re-sealed with a pack id that is a path: one line, nothing written outside."""
    src = make_marked_db(tmp_path / "live.db", rows=50)
    repo_dir = tmp_path / "repo"
    assert invoke("backup", src, "--repo", repo_dir, "--db", "app", env={}).result.returncode == 0
    repo = Repository.open(str(repo_dir))
    (key,) = list(repo.store.list("snapshots/app/"))

    def edit(d: dict[str, Any]) -> None:
        for run in d["runs"]:
            run["pack"] = pack
        d["packs"] = [pack]

    _forge(repo, key, edit)
    target = tmp_path / "target"
    target.mkdir()
    before = tree_hashes(tmp_path)
    for args in (["restore", "--repo", repo_dir, "--db", "app", "--to", target / "r.db"],
                 ["export", "--repo", repo_dir, "--db", "app", "--table", "zebra_ledger_tbl", "--format", "csv",
                  "--out", target / "e.csv"],
                 ["verify", "--repo", repo_dir, "--read-data"]):
        out = invoke(*args, env={})
        assert out.trace == "", out.trace
        if args[0] == "verify":  # a line per damaged object, each naming a key under the repository
            assert out.result.returncode == 1 and "Traceback" not in out.result.stderr, out.result
            assert "manifest is damaged" in out.result.stderr
        else:
            assert_one_line_error(out.result, 1)
    assert tree_hashes(tmp_path) == before
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("table", ["../escape", "/abs/olute", "nul\x00byte"])
def test_forged_table_name_is_not_a_path(tmp_path: Path, table: str) -> None:
    """A snapshot's table named like a path (in the forged schema, and truly in the database): restore-table and
    export treat it as an SQL name, and write only the live database / --out."""
    src = tmp_path / "live.db"
    conn = sqlite3.connect(src, isolation_level=None)
    safe = table.replace("\x00", "")  # SQLite cannot hold a NUL in a name: forge it into the manifest instead
    conn.execute(f'CREATE TABLE "{safe}"(id INTEGER PRIMARY KEY, v TEXT)')
    conn.execute(f'INSERT INTO "{safe}"(v) VALUES (?)', (MARKER,))
    conn.close()
    repo_dir = tmp_path / "repo"
    assert invoke("backup", src, "--repo", repo_dir, "--db", "app", env={}).result.returncode == 0
    if "\x00" in table:
        repo = Repository.open(str(repo_dir))
        (key,) = list(repo.store.list("snapshots/app/"))

        def edit(d: dict[str, Any]) -> None:
            d["tables"] = {table: next(iter(d["tables"].values()))}
            for row in d["schema"]:
                row["name"] = row["tbl_name"] = table

        _forge(repo, key, edit)
    target = tmp_path / "target"
    target.mkdir()
    outside = sorted(p.name for p in tmp_path.parent.iterdir())
    r1 = invoke("restore-table", "--repo", repo_dir, "--db", "app", "--live", src, "--table", table, "--apply", env={})
    r2 = invoke("export", "--repo", repo_dir, "--db", "app", "--table", table, "--format", "csv",
                "--out", target / "e.csv", env={})
    for out in (r1, r2):
        assert out.trace == "", out.trace
        if out.result.returncode != 0:
            assert_one_line_error(out.result, out.result.returncode)
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == outside
    assert {p.name for p in target.iterdir()} <= {"e.csv"}
    assert not (tmp_path / "escape").exists() and not Path("/abs/olute").exists()
