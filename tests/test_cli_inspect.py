"""`dbre diff` and `dbre stats` (issue 15: what restic's and pgBackRest's users expect) against real repositories
made by `dbre backup`: a local folder, and S3 on the session's moto_server.

diff: tables added, dropped and changed between two snapshots of one database, row counts before and after;
"changed" judged by the snapshots' table checksums (a row updated in place, the count unchanged, is a change), or,
for snapshots taken with --no-checksums, by restoring both and comparing. Ids by unique prefix or 'latest';
errors in one line, exit 2. stats: per database, its snapshots, sizes, what is stored, dedup and compression,
and the replicated segments with the window they restore exactly."""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dbre.metrics import storage_used
from dbre.replicate.segment import list_generations, to_time
from dbre.repository.repo import Repository
from tests.dbfactory import assert_one_line_error, change_rows, cli, make_db
from tests.replication import make_source, start_replicator, start_writer, stop_replicator, wait_for_generation


def _sql(path: Path, script: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executescript(script)
    finally:
        conn.close()


def _source(path: Path) -> Path:
    """Four tables: `keep` stays as it is, `grow` gains rows, `edit` has a row updated in place, `gone` is dropped."""
    _sql(path, """
        CREATE TABLE keep(id INTEGER PRIMARY KEY, v TEXT);
        CREATE TABLE grow(id INTEGER PRIMARY KEY, v TEXT);
        CREATE TABLE edit(id INTEGER PRIMARY KEY, v TEXT);
        CREATE TABLE gone(id INTEGER PRIMARY KEY, v TEXT);
        WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
        INSERT INTO keep(v) SELECT printf('k%d', i) FROM n;
        INSERT INTO grow(v) SELECT v FROM keep LIMIT 100;
        INSERT INTO edit(v) SELECT v FROM keep LIMIT 50;
        INSERT INTO gone(v) SELECT v FROM keep LIMIT 7;
    """)
    return path


_CHANGES = """
    INSERT INTO grow(v) SELECT v FROM keep LIMIT 25;
    UPDATE edit SET v = 'changed' WHERE id = 10;
    DROP TABLE gone;
    CREATE TABLE fresh(id INTEGER PRIMARY KEY, v TEXT);
    INSERT INTO fresh(v) VALUES ('a'), ('b'), ('c');
"""


def _backup(src: Path, repo: str | Path, db: str = "app", *extra: str) -> str:
    result = cli("backup", src, "--repo", repo, "--db", db, "--json", *extra)
    assert result.returncode == 0, result
    return str(json.loads(result.stdout)["id"])


def _two_snapshots(tmp_path: Path, repo: str | Path, *extra: str) -> tuple[str, str]:
    src = _source(tmp_path / "app.db")
    first = _backup(src, repo, "app", *extra)
    _sql(src, _CHANGES)
    return first, _backup(src, repo, "app", *extra)


def _diff_json(*args: str | Path) -> dict[str, Any]:
    result = cli("diff", *args, "--json")
    assert result.returncode == 0, result
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _by_table(out: dict[str, Any]) -> dict[str, tuple[str, int | None, int | None]]:
    return {t["table"]: (t["change"], t["rows_before"], t["rows_after"]) for t in out["tables"]}


EXPECTED = {
    "keep": ("unchanged", 300, 300),
    "grow": ("changed", 100, 125),
    "edit": ("changed", 50, 50),  # same count, one row updated: the checksum tells
    "gone": ("dropped", 7, None),
    "fresh": ("added", None, 3),
}


# -- diff ----------------------------------------------------------------------------------------


def test_diff_by_table_checksums(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first, second = _two_snapshots(tmp_path, repo)
    out = _diff_json(first[:6], "latest", "--repo", repo)  # a unique prefix and 'latest'
    assert out["db"] == "app" and out["from"]["id"] == first and out["to"]["id"] == second
    assert out["basis"] == "table checksums"
    assert _by_table(out) == EXPECTED
    assert (out["added"], out["dropped"], out["changed"], out["unchanged"]) == (1, 1, 2, 1)
    grow = next(t for t in out["tables"] if t["table"] == "grow")
    assert grow["rows_difference"] == 25
    # the other way round: what was added is dropped
    back = _by_table(_diff_json(second, first, "--repo", repo))
    assert back["fresh"] == ("dropped", 3, None) and back["gone"] == ("added", None, 7)
    # a snapshot against itself: nothing changed, judged from the page map without reading a page
    same = _diff_json("latest", second, "--repo", repo, "--db", "app")
    assert same["basis"] == "same pages" and same["changed"] == same["added"] == same["dropped"] == 0


def test_diff_table_output_names_every_change_and_keeps_ids_whole(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first, second = _two_snapshots(tmp_path, repo)
    result = cli("diff", first, second, "--repo", repo, env={"COLUMNS": "80"})
    assert result.returncode == 0, result
    assert first in result.stdout and second in result.stdout  # never cut, even at 80 columns
    lines = result.stdout.splitlines()
    for table, change in (("grow", "changed"), ("edit", "changed"), ("gone", "dropped"), ("fresh", "added")):
        assert any(table in line and change in line for line in lines), (table, result.stdout)
    assert not any("keep" in line for line in lines)  # unchanged tables are counted, not listed
    assert "1 added, 1 dropped, 2 changed, 1 unchanged" in result.stdout
    assert any("grow" in line and "+25" in line for line in lines)


def test_diff_without_checksums_restores_both_and_compares(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first, second = _two_snapshots(tmp_path, repo, "--no-checksums")
    manifest = Repository.open(str(repo)).find_snapshot("app", first)
    assert all(t.checksum is None for t in manifest.tables.values())  # the premise: nothing to compare cheaply
    out = _diff_json(first, second, "--repo", repo)
    assert out["basis"] == "restored and compared"
    assert _by_table(out) == EXPECTED


def test_diff_sees_a_schema_change(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = _source(tmp_path / "app.db")
    first = _backup(src, repo)
    _sql(src, "ALTER TABLE keep ADD COLUMN note TEXT")
    _backup(src, repo)
    out = _diff_json(first, "latest", "--repo", repo)
    keep = next(t for t in out["tables"] if t["table"] == "keep")
    assert keep["change"] == "changed" and keep["schema_changed"] and keep["rows_difference"] == 0


def test_diff_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    first, second = _two_snapshots(tmp_path, repo)
    other = _backup(make_db(tmp_path / "other.db", mb=0.1), repo, "other")
    assert_one_line_error(cli("diff", "ffffffffffffffff", second, "--repo", repo), 2, "no snapshot", "ffffffffffffffff")
    assert_one_line_error(cli("diff", "nothex", second, "--repo", repo), 2, "not a snapshot id")
    assert_one_line_error(cli("diff", first, other, "--repo", repo), 2, "app", "other", "one database")
    # with two databases, 'latest' alone does not say which
    assert_one_line_error(cli("diff", "latest", "latest", "--repo", repo), 2, "latest", "--db")
    assert_one_line_error(cli("diff", first, "latest", "--repo", repo, "--db", "nosuch"), 2, "nosuch")
    # --db limits where an id is looked for
    assert_one_line_error(cli("diff", other, "latest", "--repo", repo, "--db", "app"), 2, "no snapshot of 'app'")
    assert_one_line_error(cli("diff", first, second, "--repo", tmp_path / "none"), 1, "no repository")
    # 'latest' takes its database from the other argument
    assert _diff_json(other, "latest", "--repo", repo)["db"] == "other"


def test_diff_ambiguous_prefix_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = _source(tmp_path / "app.db")
    ids = []
    for i in range(40):  # 40 random ids: some pair shares its first hex digit
        _sql(src, f"INSERT INTO grow(v) VALUES ('{i}')")
        ids.append(_backup(src, repo))
    prefix = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    result = cli("diff", prefix, "latest", "--repo", repo)
    assert_one_line_error(result, 2, "snapshots", f"'{prefix}'", "more of the id")


def test_diff_on_s3(tmp_path: Path, s3_repo_url: str) -> None:
    first, second = _two_snapshots(tmp_path, s3_repo_url)
    out = _diff_json(first, second[:8], "--repo", s3_repo_url)
    assert _by_table(out) == EXPECTED
    assert_one_line_error(cli("diff", "0123456789abcdef", second, "--repo", s3_repo_url), 2, "no snapshot")


# -- stats ---------------------------------------------------------------------------------------


def _stats(*args: str | Path) -> dict[str, Any]:
    result = cli("stats", *args, "--json")
    assert result.returncode == 0, result
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def _three_backups(tmp_path: Path, repo: str | Path) -> list[str]:
    src = make_db(tmp_path / "big.db", mb=2, row_bytes=200)
    _sql(src, "UPDATE items SET payload = zeroblob(200) WHERE id % 2 = 0")  # half the rows compress well
    ids = [_backup(src, repo, "big")]
    for seed in (1, 2):
        change_rows(src, 5, seed=seed)
        ids.append(_backup(src, repo, "big"))
    return ids


def test_stats_per_database(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    ids = _three_backups(tmp_path, repo)
    small = _backup(_source(tmp_path / "app.db"), repo, "app")
    out = _stats("--repo", repo)
    repository = Repository.open(str(repo))
    total, exact, per_db = storage_used(repository)
    assert out["storage_bytes"] == total and out["storage_exact"] is exact is True
    dbs = {d["db"]: d for d in out["databases"]}
    assert set(dbs) == {"big", "app"}
    big = dbs["big"]
    snaps = repository.snapshots("big")
    assert big["snapshots"] == 3
    assert big["oldest"]["id"] == ids[0] and big["newest"]["id"] == ids[-1] and dbs["app"]["newest"]["id"] == small
    assert big["size"] == snaps[-1].size
    assert big["stored_bytes"] == per_db["big"] == sum(m.stats["bytes_added"] for m in snaps)
    assert big["logical_bytes"] == sum(m.size for m in snaps)
    # three snapshots that differ by a few pages: close to 3x dedup; zeroed payloads compress
    assert 2.5 < big["dedup_ratio"] <= 3.0, big
    assert big["compression_ratio"] > 1.2, big
    assert big["ratio"] == pytest.approx(big["dedup_ratio"] * big["compression_ratio"], rel=0.02)
    assert big["segments"] is None
    # --db: only that database
    only = _stats("--repo", repo, "--db", "app")
    assert [d["db"] for d in only["databases"]] == ["app"]
    # the table: every database, ids whole
    table = cli("stats", "--repo", repo, env={"COLUMNS": "80"})
    assert table.returncode == 0, table
    assert ids[-1] in table.stdout and small in table.stdout


def test_stats_errors(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _backup(_source(tmp_path / "app.db"), repo, "app")
    assert_one_line_error(cli("stats", "--repo", repo, "--db", "nosuch"), 2, "nosuch", "known databases: app")
    assert_one_line_error(cli("stats", "--repo", repo, "--db", "../x"), 2, "not allowed")
    assert_one_line_error(cli("stats", "--repo", tmp_path / "none"), 1, "no repository")


def test_stats_on_s3(tmp_path: Path, s3_repo_url: str) -> None:
    ids = _three_backups(tmp_path, s3_repo_url)
    out = _stats("--repo", s3_repo_url)
    (big,) = out["databases"]
    snaps = Repository.open(s3_repo_url).snapshots("big")
    assert big["snapshots"] == 3 and big["newest"]["id"] == ids[-1]
    assert big["stored_bytes"] == sum(m.stats["bytes_added"] for m in snaps)
    # exact on S3 too (the store sums its objects' sizes): packs, manifests, config, page maps
    from dbre.storage.s3 import S3Store

    assert out["storage_exact"] is True and out["storage_bytes"] == S3Store.from_url(s3_repo_url).usage()
    assert out["storage_bytes"] > big["stored_bytes"]
    assert 2.5 < big["dedup_ratio"] <= 3.0


def test_stats_of_a_replicated_database_shows_segments_and_restore_window(tmp_path: Path) -> None:
    src, repo = tmp_path / "app.db", str(tmp_path / "repo")
    make_source(src, 200)
    rep = start_replicator(src, repo, "app", interval="200ms")
    try:
        wait_for_generation(repo, "app", proc=rep)
        writer = start_writer(src, tmp_path / "w.log", 1.5, start_seq=200)
        assert writer.wait(timeout=60) == 0
        time.sleep(1.0)  # the last commits shipped
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    out = _stats("--repo", repo)
    (app,) = out["databases"]
    seg = app["segments"]
    repository = Repository.open(repo)
    gens = list_generations(repository, "app")
    names = [n for ns in gens.values() for n in ns]
    assert names, "the replicator shipped nothing"
    assert seg["generations"] == len(gens) and seg["segments"] == len(names)
    assert 0 < seg["bytes"] < out["storage_bytes"]
    window = seg["window"]
    newest_observed = max(to_time(n.last_us) for n in names)
    assert datetime.fromisoformat(window["to"]) == newest_observed
    # the window runs from the base of the generation (its snapshot) to commits after that snapshot
    base = next(iter(gens))  # the generation's name carries its base snapshot's time
    assert datetime.fromisoformat(window["from"]) == to_time(int(base[:16], 16))
    assert app["oldest"]["taken_at"] <= window["from"] < window["to"]
    assert datetime.fromisoformat(window["to"]) > datetime.fromisoformat(app["newest"]["taken_at"])
    table = cli("stats", "--repo", repo)
    assert table.returncode == 0, table
    assert f"restore window: app: any time from {window['from']} to {window['to']}" in table.stdout
