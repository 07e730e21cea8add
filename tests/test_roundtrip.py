"""Any legal SQLite file round-trips through `dbre backup` + `dbre restore`, checked by sqldiff.

Also: incremental cost, restore by time and by id, forget + prune, copy, encryption, and the
same round trip against a real S3-compatible server.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from dbre.repository.repo import Repository
from dbre.secrets import Secret
from tests.dbfactory import (
    assert_one_line_error,
    assert_same_db,
    change_rows,
    cli,
    copy_db,
    execute_script,
    integrity,
    make_db,
    pack_files,
    query,
    run_dbre,
    snapshot_files,
)

# --------------------------------------------------------------------------- helpers


def backup(src: Path, repo: Path | str, *args: str, env: dict[str, str | None] | None = None) -> dict[str, Any]:
    result = cli("backup", src, "--repo", repo, "--json", *args, env=env)
    assert result.returncode == 0, result
    out = json.loads(result.stdout)
    assert isinstance(out, dict)
    return out


def restore(repo: Path | str, db: str, to: Path, *args: str, env: dict[str, str | None] | None = None) -> Path:
    result = cli("restore", "--repo", repo, "--db", db, "--to", to, *args, env=env)
    assert result.returncode == 0, result
    return to


def roundtrip(src: Path, tmp_path: Path, name: str = "restored.db") -> Path:
    repo = tmp_path / "repo"
    snap = backup(src, repo)
    assert snap["db"] == src.stem
    out = restore(repo, src.stem, tmp_path / name)
    assert_same_db(src, out)
    return out


# --------------------------------------------------------------------------- every kind of file


@pytest.mark.parametrize("page_size", [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])
def test_every_page_size(tmp_path: Path, page_size: int) -> None:
    journal = "wal" if page_size in (512, 4096, 65536) else "delete"
    src = make_db(tmp_path / "src.db", mb=0.4, page_size=page_size, journal=journal)
    out = roundtrip(src, tmp_path)
    assert query(out, "PRAGMA page_size") == [(page_size,)]


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_auto_vacuum(tmp_path: Path, mode: str) -> None:
    src = make_db(tmp_path / "src.db", mb=1, auto_vacuum=mode, journal="delete")
    # free pages: full vacuums them away, incremental keeps them on the freelist until asked
    execute_script(src, "DELETE FROM items WHERE id BETWEEN 100 AND 1500;" + ("PRAGMA incremental_vacuum(10);"
                                                                  if mode == "incremental" else ""))
    if mode == "incremental":
        assert query(src, "PRAGMA freelist_count")[0][0] > 0
    out = roundtrip(src, tmp_path)
    assert query(out, "PRAGMA auto_vacuum") == [({"full": 1, "incremental": 2}[mode],)]
    assert query(out, "PRAGMA freelist_count") == query(src, "PRAGMA freelist_count")


@pytest.mark.parametrize("encoding", ["UTF-16le", "UTF-16be"])
def test_utf16(tmp_path: Path, encoding: str) -> None:
    src = make_db(tmp_path / "src.db", mb=0.2, encoding=encoding)
    execute_script(src, "CREATE TABLE words(w TEXT); INSERT INTO words VALUES ('Grüße'), ('日本語'), ('🙂 emoji');")
    out = roundtrip(src, tmp_path)
    assert query(out, "PRAGMA encoding") == [(encoding,)]
    assert query(out, "SELECT w FROM words ORDER BY rowid") == [("Grüße",), ("日本語",), ("🙂 emoji",)]


def series(n: int) -> str:
    """A table expression of the integers 1..n (this sqlite3 build has no generate_series)."""
    return f"(WITH RECURSIVE s(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM s WHERE value < {n}) " \
        "SELECT value FROM s)"


FEATURES = {
    "fts5": f"""
        CREATE VIRTUAL TABLE docs USING fts5(title, body);
        INSERT INTO docs SELECT 'title ' || value, 'body text number ' || value || ' lorem ipsum dolor'
          FROM {series(3000)};
    """,
    "without_rowid": f"""
        CREATE TABLE kv(k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID;
        INSERT INTO kv SELECT printf('key-%06d', value), randomblob(200) FROM {series(3000)};
    """,
    "strict": f"""
        CREATE TABLE s(id INTEGER PRIMARY KEY, a INT NOT NULL, b TEXT, c REAL, d BLOB, e ANY) STRICT;
        INSERT INTO s(a, b, c, d, e) SELECT value, 'v' || value, value / 7.0, randomblob(20), value
          FROM {series(2000)};
    """,
    "generated_columns": f"""
        CREATE TABLE g(a INTEGER, b INTEGER, s INTEGER GENERATED ALWAYS AS (a + b) STORED,
                       v TEXT GENERATED ALWAYS AS ('v' || (a * b)) VIRTUAL);
        CREATE INDEX g_v ON g(v);
        INSERT INTO g(a, b) SELECT value, value * 2 FROM {series(2000)};
    """,
    "large_blobs": f"""
        CREATE TABLE blobs(id INTEGER PRIMARY KEY, data BLOB);
        INSERT INTO blobs(data) SELECT randomblob(1048576) FROM {series(3)};
        INSERT INTO blobs(data) VALUES (zeroblob(2000000));
    """,
    "views_and_triggers": f"""
        CREATE TABLE orders(id INTEGER PRIMARY KEY, qty INT, price REAL);
        CREATE TABLE audit(id INTEGER PRIMARY KEY, order_id INT, at TEXT);
        CREATE TRIGGER orders_ai AFTER INSERT ON orders BEGIN
          INSERT INTO audit(order_id, at) VALUES (new.id, 'now');
        END;
        CREATE VIEW totals AS SELECT count(*) AS n, sum(qty * price) AS total FROM orders;
        INSERT INTO orders(qty, price) SELECT value % 10, value * 1.5 FROM {series(500)};
    """,
    "user_version_and_application_id": """
        PRAGMA user_version = 42;
        PRAGMA application_id = 1684172133;
        CREATE TABLE t(x);
        INSERT INTO t VALUES (1);
    """,
    "schema_only": """
        CREATE TABLE a(id INTEGER PRIMARY KEY, name TEXT UNIQUE);
        CREATE TABLE b(id INTEGER PRIMARY KEY, a_id INT REFERENCES a(id));
        CREATE INDEX b_a ON b(a_id);
    """,
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_features(tmp_path: Path, feature: str, journal: str) -> None:
    src = execute_script(tmp_path / "src.db", FEATURES[feature], setup=[f"PRAGMA journal_mode={journal}"])
    out = roundtrip(src, tmp_path)
    if feature == "fts5":
        match = "SELECT rowid FROM docs WHERE docs MATCH 'number AND 2999'"
        assert query(out, match) == query(src, match) == [(2999,)]
        execute_script(out, "INSERT INTO docs(docs) VALUES ('integrity-check')")  # raises if the index is corrupt
    elif feature == "generated_columns":
        assert query(out, "SELECT s, v FROM g WHERE a = 10") == [(30, "v200")]
    elif feature == "views_and_triggers":
        assert query(out, "SELECT n FROM totals") == [(500,)]
        assert query(out, "SELECT count(*) FROM audit") == [(500,)]
    elif feature == "user_version_and_application_id":
        assert query(out, "PRAGMA user_version") == [(42,)]
        assert query(out, "PRAGMA application_id") == [(1684172133,)]
    elif feature == "large_blobs":
        assert query(out, "SELECT sum(length(data)) FROM blobs") == [(3 * 1048576 + 2000000,)]


def test_empty_file(tmp_path: Path) -> None:
    src = tmp_path / "src.db"
    src.write_bytes(b"")
    snap = backup(src, tmp_path / "repo")
    assert snap["pages"] == 0
    out = restore(tmp_path / "repo", "src", tmp_path / "restored.db")
    assert out.stat().st_size == 0
    assert integrity(out) == "ok"
    assert_same_db(src, out)


def test_wal_content_not_yet_checkpointed(tmp_path: Path) -> None:
    """Transactions that live only in the -wal file (a writer still has the db open) are in the backup."""
    src = make_db(tmp_path / "src.db", mb=0.5)
    writer = sqlite3.connect(src, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("CREATE TABLE late(x)")
        writer.execute(f"INSERT INTO late SELECT value FROM {series(1000)}")
        assert Path(str(src) + "-wal").stat().st_size > 0
        snap = backup(src, tmp_path / "repo")
        out = restore(tmp_path / "repo", "src", tmp_path / "restored.db")
        assert query(out, "SELECT count(*) FROM late") == [(1000,)]
        assert snap["pages"] == query(src, "PRAGMA page_count")[0][0]
        assert_same_db(src, out)
    finally:
        writer.close()


# --------------------------------------------------------------------------- incremental backups


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_incremental_cost_follows_the_change(tmp_path: Path, journal: str) -> None:
    src = make_db(tmp_path / "src.db", mb=8, journal=journal)
    repo = tmp_path / "repo"
    full = backup(src, repo)
    size = src.stat().st_size
    assert full["pages_added"] == full["pages"] > 2000
    assert full["added_bytes"] > size * 0.8  # random payloads do not compress

    change_rows(src, 5)
    inc = backup(src, repo)
    assert inc["pages"] == full["pages"]
    # 5 rows: their leaf pages, index leaves, interior pages on the way, page 1
    assert 1 <= inc["pages_added"] <= 40, inc
    assert inc["pages_added"] < inc["pages"] * 0.02
    assert inc["added_bytes"] < size * 0.03, inc

    same = backup(src, repo)
    assert same["pages_added"] == 0, same
    assert same["added_bytes"] < 64 * 1024, same  # the manifest only
    out = restore(repo, "src", tmp_path / "restored.db")
    assert_same_db(src, out)


def test_restore_at_and_older_snapshots(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=1, journal="delete")
    repo = tmp_path / "repo"
    snaps, copies = [], []
    for i in range(3):
        execute_script(src, f"CREATE TABLE IF NOT EXISTS marker(v); DELETE FROM marker; "
                            f"INSERT INTO marker VALUES ({i});")
        change_rows(src, 20, seed=i)
        copies.append(copy_db(src, tmp_path / f"copy-{i}.db"))
        snaps.append(backup(src, repo))
        time.sleep(0.02)
    listed = cli("snapshots", "--repo", repo, "--json")
    assert [s["id"] for s in json.loads(listed.stdout)["snapshots"]] == [s["id"] for s in snaps]

    def at(ts: str, delta_ms: int = 0) -> str:
        t = datetime.fromisoformat(ts.replace("Z", "+00:00")) + timedelta(milliseconds=delta_ms)
        return t.isoformat()

    cases = [
        (at(snaps[0]["taken_at"]), 0),          # exactly the first
        (at(snaps[1]["taken_at"], -1), 0),      # just before the second
        (at(snaps[1]["taken_at"]), 1),          # exactly the second
        (at(snaps[1]["taken_at"], 1), 1),       # just after it
        (at(snaps[2]["taken_at"], 10_000), 2),  # long after the last
    ]
    for k, (when, expect) in enumerate(cases):
        out = restore(repo, "src", tmp_path / f"at-{k}.db", "--at", when)
        assert query(out, "SELECT v FROM marker") == [(expect,)], when
        assert_same_db(copies[expect], out)
    # a naive time is UTC; a zone offset is honoured
    t1 = datetime.fromisoformat(snaps[1]["taken_at"].replace("Z", "+00:00"))
    naive = t1.astimezone(UTC).replace(tzinfo=None).isoformat()
    shifted = t1.astimezone(timezone(timedelta(hours=-7))).isoformat()
    for k, when in enumerate([naive, shifted]):
        out = restore(repo, "src", tmp_path / f"tz-{k}.db", "--at", when)
        assert query(out, "SELECT v FROM marker") == [(1,)], when

    for i, snap in enumerate(snaps):
        out = restore(repo, "src", tmp_path / f"id-{i}.db", "--snapshot", snap["id"][:8])
        assert_same_db(copies[i], out)
    # the default is the newest, and --force replaces an existing target
    out = restore(repo, "src", tmp_path / "id-0.db", "--force")
    assert_same_db(copies[2], out)


# --------------------------------------------------------------------------- retention, copy


def test_forget_prune_keeps_what_it_keeps(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=2, journal="delete")
    repo = tmp_path / "repo"
    snaps, copies = [], []
    for i in range(5):
        # the same rows each time: a later snapshot supersedes the pages an earlier one added
        execute_script(src, f"UPDATE items SET payload = randomblob(400) WHERE id % 50 = 0; PRAGMA user_version={i};")
        copies.append(copy_db(src, tmp_path / f"copy-{i}.db"))
        snaps.append(backup(src, repo))
    packs_before = {p.name for p in pack_files(repo)}
    assert len(snapshot_files(repo)) == 5

    # --grace 0: the packs were written moments ago, and only age keeps an unused pack (see test_locks_gc)
    dry = cli("forget", "--repo", repo, "--keep-last", "2", "--prune", "--grace", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry
    plan = json.loads(dry.stdout)
    assert {r["id"] for r in plan["remove"]} == {s["id"] for s in snaps[:3]}
    assert {p.name for p in pack_files(repo)} == packs_before and len(snapshot_files(repo)) == 5

    done = cli("forget", "--repo", repo, "--keep-last", "2", "--prune", "--grace", "0", "--json")
    assert done.returncode == 0, done
    out = json.loads(done.stdout)
    freed = {k: out["prune"].pop(k) for k in ("freed_bytes", "storage_bytes_before", "storage_bytes_after")}
    assert out["prune"] == plan["prune"]  # (and what it freed, which a dry run does not claim)
    assert freed["freed_bytes"] == freed["storage_bytes_before"] - freed["storage_bytes_after"] > 0, freed
    assert len(snapshot_files(repo)) == 2
    packs_after = {p.name for p in pack_files(repo)}
    kept = Repository.open(str(repo)).snapshots()
    used = set().union(*(m.packs for m in kept))
    assert packs_after == used  # nothing a kept snapshot needs is gone, nothing unused is left
    assert len(packs_before) - len(packs_after) == out["prune"]["delete_packs"] >= 2
    assert out["prune"]["keep_packs"] == len(packs_after)

    assert cli("verify", "--repo", repo, "--read-data").returncode == 0
    for i in (3, 4):
        restored = restore(repo, "src", tmp_path / f"kept-{i}.db", "--snapshot", snaps[i]["id"])
        assert_same_db(copies[i], restored)
    gone = cli("restore", "--repo", repo, "--db", "src", "--snapshot", snaps[0]["id"], "--to", tmp_path / "x.db")
    assert gone.returncode == 2 and not (tmp_path / "x.db").exists()


def test_copy_then_restore_from_the_copy(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=1)
    repo, offsite = tmp_path / "repo", tmp_path / "offsite"
    first = backup(src, repo)
    change_rows(src, 10)
    second = backup(src, repo)
    result = cli("copy", "--repo", repo, "--to", offsite, "--json")
    assert result.returncode == 0, result
    assert len(json.loads(result.stdout)["snapshots_to_copy"]) == 2
    again = json.loads(cli("copy", "--repo", repo, "--to", offsite, "--json").stdout)
    assert again["snapshots_to_copy"] == [] and again["packs_to_copy"] == 0 and again["snapshots_already_there"] == 2

    assert cli("verify", "--repo", offsite, "--read-data").returncode == 0
    listed = json.loads(cli("snapshots", "--repo", offsite, "--json").stdout)["snapshots"]
    assert [s["id"] for s in listed] == [first["id"], second["id"]]
    out = restore(offsite, "src", tmp_path / "from-copy.db")
    assert_same_db(src, out)
    # incremental: a third snapshot copies only its own packs
    change_rows(src, 10, seed=3)
    backup(src, repo)
    third = json.loads(cli("copy", "--repo", repo, "--to", offsite, "--json").stdout)
    assert len(third["snapshots_to_copy"]) == 1 and third["packs_to_copy"] == 1
    assert_same_db(src, restore(offsite, "src", tmp_path / "from-copy-3.db"))


# --------------------------------------------------------------------------- encryption

PASSPHRASE = "correct horse battery staple 7f3c9a"


def test_encryption(tmp_path: Path) -> None:
    src = make_db(tmp_path / "src.db", mb=1)
    execute_script(src, f"CREATE TABLE secrets(s TEXT); INSERT INTO secrets VALUES ('plaintext-marker-{'q' * 20}');")
    repo = tmp_path / "repo"
    key: dict[str, str | None] = {"DBRE_ENCRYPTION_KEY": PASSPHRASE}
    outputs: list[str] = []

    def run(*args: Any, env: dict[str, str | None] | None = key, subprocess: bool = False) -> Any:
        result = (run_dbre if subprocess else cli)(*args, env=env)
        outputs.extend([result.stdout, result.stderr])
        return result

    assert run("backup", src, "--repo", repo, "--json").returncode == 0
    change_rows(src, 5)
    assert run("backup", src, "--repo", repo).returncode == 0
    assert json.loads((repo / "config").read_text())["encryption"]["cipher"] == "aes-256-gcm"

    assert run("restore", "--repo", repo, "--db", "src", "--to", tmp_path / "ok.db").returncode == 0
    assert_same_db(src, tmp_path / "ok.db")
    key_file = tmp_path / "key.txt"
    key_file.write_text(PASSPHRASE + "\n")
    ok2 = run("restore", "--repo", repo, "--db", "src", "--to", tmp_path / "ok2.db", "--key-file", key_file, env={})
    assert ok2.returncode == 0, ok2
    assert_same_db(src, tmp_path / "ok2.db")
    assert run("verify", "--repo", repo, "--read-data").returncode == 0
    assert run("snapshots", "--repo", repo).returncode == 0
    assert run("copy", "--repo", repo, "--to", tmp_path / "offsite").returncode == 0
    assert run("restore", "--repo", tmp_path / "offsite", "--db", "src", "--to", tmp_path / "ok3.db").returncode == 0
    assert_same_db(src, tmp_path / "ok3.db")

    wrong = run("restore", "--repo", repo, "--db", "src", "--to", tmp_path / "bad.db",
                env={"DBRE_ENCRYPTION_KEY": PASSPHRASE + "x"}, subprocess=True)
    assert_one_line_error(wrong, 1, "wrong encryption key")
    assert not (tmp_path / "bad.db").exists()
    wrong_backup = run("backup", src, "--repo", repo, env={"DBRE_ENCRYPTION_KEY": "nope"}, subprocess=True)
    assert_one_line_error(wrong_backup, 1, "wrong encryption key")
    for args in (("restore", "--repo", repo, "--db", "src", "--to", tmp_path / "bad.db"),
                 ("snapshots", "--repo", repo), ("backup", src, "--repo", repo)):
        missing = run(*args, env={}, subprocess=args[0] == "restore")
        assert_one_line_error(missing, 1, "encrypted", "DBRE_ENCRYPTION_KEY")
    assert not (tmp_path / "bad.db").exists()
    assert len(snapshot_files(repo)) == 2

    # the passphrase and the plaintext never reach the repository or any output
    needles = [PASSPHRASE.encode(), PASSPHRASE.encode("utf-16le"), b"plaintext-marker"]
    for root in (repo, tmp_path / "offsite"):
        for p in root.rglob("*"):
            if p.is_file():
                data = p.read_bytes()
                assert not any(n in data for n in needles), p
    assert not any(PASSPHRASE in text for text in outputs)
    # the library never shows the key either
    r = Repository.open(str(repo), Secret(PASSPHRASE))
    assert PASSPHRASE not in repr(r) and PASSPHRASE not in repr(r.sealer)


# --------------------------------------------------------------------------- S3


def test_s3_roundtrip(tmp_path: Path, s3_repo_url: str) -> None:
    src = make_db(tmp_path / "src.db", mb=3)
    full = backup(src, s3_repo_url)
    assert full["pages_added"] == full["pages"]
    change_rows(src, 5)
    inc = backup(src, s3_repo_url)
    assert inc["parent"] == full["id"] and 1 <= inc["pages_added"] <= 40
    assert backup(src, s3_repo_url)["pages_added"] == 0

    out = restore(s3_repo_url, "src", tmp_path / "restored.db")
    assert_same_db(src, out)
    older = restore(s3_repo_url, "src", tmp_path / "older.db", "--snapshot", full["id"])
    assert integrity(older) == "ok"
    assert sqlite3.connect(older).execute("SELECT count(*) FROM items").fetchone() == \
        sqlite3.connect(src).execute("SELECT count(*) FROM items").fetchone()

    verified = cli("verify", "--repo", s3_repo_url, "--read-data", "--json")
    assert verified.returncode == 0, verified
    report = json.loads(verified.stdout)
    assert report["ok"] and report["snapshots"] == 3 and report["packs_read"] >= 2

    # offsite: local -> S3, restore from S3
    local = tmp_path / "local-repo"
    backup(src, local)
    offsite = s3_repo_url.rstrip("/") + "-offsite"
    copied = cli("copy", "--repo", local, "--to", offsite, "--json")
    assert copied.returncode == 0, copied
    assert cli("verify", "--repo", offsite, "--read-data").returncode == 0
    assert_same_db(src, restore(offsite, "src", tmp_path / "from-s3-copy.db"))
    # and S3 -> local
    back = tmp_path / "back"
    assert cli("copy", "--repo", s3_repo_url, "--to", back).returncode == 0
    assert_same_db(src, restore(back, "src", tmp_path / "from-local-copy.db"))
