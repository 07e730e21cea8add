"""Safety snapshots (issue 15): the snapshot `restore-table --replace --apply` takes of the live
database before changing it is tagged ``safety``, shown so in `dbre snapshots`, and skipped by a
plain restore, by restore-table's default snapshot and by drills (``--snapshot ID`` still reaches
it); the next regular backup dedups against it but checks its source against the regular chain;
forget keeps it out of the count rules and keeps it at least 7 days."""

from __future__ import annotations

import json
import shlex
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from dbre.repository.keep import KeepPolicy, apply_policy
from dbre.repository.manifest import Manifest, iso
from dbre.repository.repo import Repository
from dbre.validate.drill import begin_drill, pick_snapshot
from tests.dbfactory import cli


@pytest.fixture(params=["local", "s3"])
def repo_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "repo") if request.param == "local" else request.getfixturevalue("s3_repo_url")


def sql(path: Path, text: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        if ";" in text.strip().rstrip(";"):
            conn.executescript(text)
            return []
        rows = conn.execute(text).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def make_shop(path: Path) -> Path:
    sql(path, "PRAGMA journal_mode=WAL; CREATE TABLE orders(id INTEGER PRIMARY KEY, total REAL);"
              "CREATE TABLE events(id INTEGER PRIMARY KEY, what TEXT);"
              + "".join(f"INSERT INTO orders(total) VALUES ({i});" for i in range(1, 51)))
    return path


def ok(*args: Any) -> str:
    r = cli(*args)
    assert r.returncode == 0, r
    return r.stdout


def snapshots(repo: str) -> list[dict[str, Any]]:
    return list(json.loads(ok("snapshots", "--repo", repo, "--json"))["snapshots"])


def test_safety_snapshot_is_tagged_shown_and_skipped_by_restore_and_drill(tmp_path: Path, repo_url: str) -> None:
    live = make_shop(tmp_path / "shop.db")
    regular = json.loads(ok("backup", live, "--repo", repo_url, "--json"))["id"]
    # after the backup: a new event (only the safety snapshot has it), and orders damaged
    sql(live, "INSERT INTO events(what) VALUES ('after the backup'); UPDATE orders SET total = -1;")
    out = ok("restore-table", "--repo", repo_url, "--db", "shop", "--live", live, "--table", "orders",
             "--replace", "--apply")
    snaps = snapshots(repo_url)
    assert [s["tags"] for s in snaps] == [[], ["safety"]]
    safety = snaps[1]["id"]
    assert safety in out and snaps[1]["source"]["purpose"].startswith("restore-table replace")
    table = ok("snapshots", "--repo", repo_url)
    assert "safety" in table and "tags" in table and str(live) in table

    # a plain restore brings back the newest regular snapshot: without the event
    plain = tmp_path / "plain.db"
    assert ok("restore", "--repo", repo_url, "--db", "shop", "--to", plain).startswith(f"restored snapshot {regular}")
    assert sql(plain, "SELECT count(*) FROM events") == [(0,)]
    # --snapshot ID still reaches the safety snapshot: the event, and the damaged orders it saved
    undo = tmp_path / "undo.db"
    ok("restore", "--repo", repo_url, "--db", "shop", "--to", undo, "--snapshot", safety[:8])
    assert sql(undo, "SELECT count(*) FROM events") == [(1,)]
    assert sql(undo, "SELECT min(total), max(total) FROM orders") == [(-1.0, -1.0)]

    repo = Repository.open(repo_url)
    assert repo.find_snapshot("shop").id == regular
    assert pick_snapshot(repo, "shop", "newest").id == regular
    assert {pick_snapshot(repo, "shop", "random", seed=s).id for s in range(8)} == {regular}
    assert pick_snapshot(repo, "shop", iso(datetime.now(UTC))).id == regular  # a time after the safety one
    drill = begin_drill(repo, "shop", scratch_dir=tmp_path / "scratch")
    assert drill.snapshot.id == regular and drill.newest.id == regular  # RPO: the backup schedule's

    # the next regular backup dedups against the safety snapshot (its parent), untagged
    nxt = json.loads(ok("backup", live, "--repo", repo_url, "--json"))
    assert nxt["parent"] == safety and nxt["pages_added"] < snaps[1]["pages"]
    assert snapshots(repo_url)[-1]["tags"] == []
    assert Repository.open(repo_url).find_snapshot("shop").id == nxt["id"]


def test_a_repair_of_another_file_does_not_move_the_source(tmp_path: Path) -> None:
    """restore-table into a copy at another path: its safety snapshot names that copy, yet the
    next backup of the database's own file is compared with the regular chain and accepted."""
    repo = str(tmp_path / "repo")
    live = make_shop(tmp_path / "shop.db")
    first = json.loads(ok("backup", live, "--repo", repo, "--json"))["id"]
    copy = tmp_path / "staging" / "shop-copy.db"
    copy.parent.mkdir()
    ok("restore", "--repo", repo, "--db", "shop", "--to", copy)
    sql(copy, "UPDATE orders SET total = 0")
    ok("restore-table", "--repo", repo, "--db", "shop", "--live", copy, "--table", "orders", "--replace", "--apply")
    safety = snapshots(repo)[-1]
    assert safety["tags"] == ["safety"] and safety["source"]["path"] == str(copy)
    nxt = json.loads(ok("backup", live, "--repo", repo, "--json"))
    assert nxt["parent"] == safety["id"]
    # and the copy itself, as a regular backup under that name, is still another source
    r = cli("backup", copy, "--repo", repo, "--db", "shop")
    assert r.returncode == 2 and str(live) in r.stderr, r
    assert first != nxt["id"]


def test_only_safety_snapshots_are_still_restorable(tmp_path: Path) -> None:
    """A database whose only snapshot is a safety one (restore-table into a database never backed
    up under that name): a plain restore takes it rather than refusing."""
    repo = str(tmp_path / "repo")
    live = make_shop(tmp_path / "shop.db")
    ok("backup", live, "--repo", repo)
    other = make_shop(tmp_path / "other.db")
    sql(other, "UPDATE orders SET total = 7")
    ok("restore-table", "--repo", repo, "--db", "shop", "--live", other, "--table", "orders", "--replace", "--apply",
       "--snapshot", snapshots(repo)[0]["id"])
    r = Repository.open(repo)
    for m in r.snapshots("shop"):
        if not m.is_safety:
            r.store.delete(r.manifest_key(m))
    r = Repository.open(repo)
    assert r.find_snapshot("shop").is_safety
    assert pick_snapshot(r, "shop").is_safety


def manifest(snap_id: str, t: datetime, safety: bool = False) -> Manifest:
    return Manifest(id=snap_id, db="app", taken_at=iso(t), page_size=4096, page_count=1, runs=[], packs=[],
                    stats={"tags": ["safety"]} if safety else {})


def test_forget_keeps_safety_snapshots_out_of_the_counts_and_for_seven_days() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    h = timedelta(hours=1)
    snaps = [
        manifest("r1", now - 10 * 24 * h), manifest("s-old", now - 9 * 24 * h, safety=True),
        manifest("r2", now - 3 * h), manifest("s1", now - 2 * h, safety=True),
        manifest("s2", now - 90 * 60 * timedelta(seconds=1), safety=True), manifest("r3", now - h),
    ]
    kept = apply_policy(snaps, KeepPolicy(last=2), now=now)
    # the two newest regular ones, not the two newest; the recent safety ones by their own rule
    assert kept == {"r3": ["last"], "r2": ["last"], "s1": ["safety 7d"], "s2": ["safety 7d"]}
    assert "s-old" not in kept and "r1" not in kept  # older than 7 days: goes with the counts' leftovers
    kept = apply_policy(snaps, KeepPolicy(last=1, within="30d"), now=now)
    assert kept["s-old"] == ["within 30d"] and kept["s1"] == ["within 30d", "safety 7d"]
    # a daily rule counts days of regular snapshots only; its "oldest" is the oldest regular one
    kept = apply_policy(snaps, KeepPolicy(daily=5), now=now)
    assert kept["r1"] == ["daily"] and kept["r3"] == ["daily"] and "r2" not in kept
    assert "s-old" not in kept


def test_forget_on_a_repository_keeps_a_fresh_safety_snapshot(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    live = make_shop(tmp_path / "shop.db")
    ok("backup", live, "--repo", repo)
    ok("restore-table", "--repo", repo, "--db", "shop", "--live", live, "--table", "orders", "--replace", "--apply")
    sql(live, "INSERT INTO events(what) VALUES ('x')")
    ok("backup", live, "--repo", repo)
    ids = [s["id"] for s in snapshots(repo)]
    plan = json.loads(ok("forget", "--repo", repo, "--keep-last", "1", "--json"))
    kept = {k["id"]: k["reasons"] for k in plan["keep"]}
    assert kept == {ids[2]: ["last"], ids[1]: ["safety 7d"]}
    assert [s["id"] for s in snapshots(repo)] == ids[1:]


def test_tags_live_in_stats_because_readers_refuse_unknown_top_level_fields() -> None:
    """Why ``stats.tags`` and not a top-level ``tags``: the manifest reader (as in every dbre of
    format 2 so far) refuses an unknown top-level field, which the repository reports as a damaged
    manifest; inside ``stats`` an older reader keeps the tag and sees a regular snapshot."""
    m = manifest("s", datetime(2026, 12, 1, tzinfo=UTC), safety=True)
    back = Manifest.from_json(m.to_json())
    assert back.is_safety and back.summary()["tags"] == ["safety"]
    raw = json.loads(m.to_json())
    raw["tags"] = ["safety"]
    with pytest.raises(TypeError):
        Manifest.from_json(json.dumps(raw).encode())
    assert not manifest("r", datetime(2026, 12, 1, tzinfo=UTC)).is_safety


def test_status_ages_the_schedule_not_a_repair(tmp_path: Path) -> None:
    """`dbre status`: a safety snapshot taken just now must not hide that the last scheduled
    backup is old (the RPO alert still fires), though it is counted among the snapshots."""
    from dbre.metrics import Expectations, database_status

    repo_url = str(tmp_path / "repo")
    live = make_shop(tmp_path / "shop.db")
    first = json.loads(ok("backup", live, "--repo", repo_url, "--json"))
    time.sleep(3)
    ok("restore-table", "--repo", repo_url, "--db", "shop", "--live", live, "--table", "orders", "--replace", "--apply")
    repo = Repository.open(repo_url)
    safety = repo.snapshots("shop")[-1]
    assert safety.is_safety
    now = safety.time + timedelta(seconds=1)  # the repair is 1 s old, the scheduled backup 4 s or more
    st = database_status(repo, "shop", Expectations(rpo_seconds=2.5), now=now, window=timedelta(days=1))
    assert st.snapshots == 2
    assert st.newest_snapshot_at == first["taken_at"]
    assert st.newest_restorable_age_seconds is not None and st.newest_restorable_age_seconds >= 4
    assert any("over the RPO" in a.message for a in st.alerts), st.alerts


def test_restore_at_a_time_after_a_recovery_skips_its_safety_snapshot(tmp_path: Path, repo_url: str) -> None:
    """The on-call's recovery: rows deleted by mistake, the backup restored over the live file with
    --force (which snapshots the damaged database first, tagged safety). A later `restore --at` or
    `sql --at` a time after that must give the backup history's state, not the damage the recovery
    replaced; --snapshot ID still reaches the safety snapshot."""
    live = make_shop(tmp_path / "shop.db")
    regular = json.loads(ok("backup", live, "--repo", repo_url, "--json"))["id"]
    sql(live, "DELETE FROM orders")
    out = ok("restore", "--repo", repo_url, "--db", "shop", "--to", live, "--force")
    snaps = snapshots(repo_url)
    assert [s["tags"] for s in snaps] == [[], ["safety"]]
    # the line names the whole command that brings the replaced database back, to a new file beside it
    back = out.split("to get it back: ", 1)[1].splitlines()[0]
    words = shlex.split(back)
    assert words[:2] == ["dbre", "restore"] and snaps[1]["id"] in words, back
    ok(*words[1:])
    assert sql(tmp_path / "shop-replaced.db", "SELECT count(*) FROM orders") == [(0,)]
    assert sql(live, "SELECT count(*) FROM orders") == [(50,)]
    time.sleep(0.01)
    now = iso(datetime.now(UTC))
    at = tmp_path / "at.db"
    r = cli("restore", "--repo", repo_url, "--db", "shop", "--at", now, "--to", at)
    assert r.returncode == 0 and r.stdout.startswith(f"restored snapshot {regular}"), r
    # it says what it passed over, and how to get that back (one line, stderr; in --json too)
    safety = snaps[1]["id"]
    assert f"note: passed over safety snapshot {safety}" in r.stderr and f"--snapshot {safety}" in r.stderr, r
    plan = json.loads(ok("restore", "--repo", repo_url, "--db", "shop", "--at", now, "--to", tmp_path / "x.db",
                         "--dry-run", "--json"))
    assert [s["snapshot"] for s in plan["skipped_safety_snapshots"]] == [safety], plan
    r = cli("restore", "--repo", repo_url, "--db", "shop", "--snapshot", regular, "--to", tmp_path / "y.db")
    assert r.returncode == 0 and "passed over" not in r.stderr, r  # (named: nothing passed over)
    assert sql(at, "SELECT count(*) FROM orders") == [(50,)]
    counted = ok("sql", "--repo", repo_url, "--db", "shop", "--at", now, "SELECT count(*) FROM orders")
    assert "50" in counted, counted
    damage = tmp_path / "damage.db"
    ok("restore", "--repo", repo_url, "--db", "shop", "--snapshot", snaps[1]["id"], "--to", damage)
    assert sql(damage, "SELECT count(*) FROM orders") == [(0,)]
