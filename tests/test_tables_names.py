"""CLI tables fit the terminal without cutting what users paste, and every flow run is named for what it does
(issue 15).

Tables: `dbre snapshots` and `dbre status` run as real subprocesses (`python -m dbre.cli`) with COLUMNS=80 and
COLUMNS=200 on a real repository. Flow runs: each flow runs under the session's Prefect test harness and its run's
name is read back from the API.
"""

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from flows.backup import backup_flow
from flows.drill import drill_flow
from flows.fleet import fleet_backup_flow
from flows.names import drill_name, fleet_name, retention_name, verify_name
from flows.requirements import requirements_report_flow
from flows.retention import retention_flow
from flows.status import status_flow
from flows.verify import verify_flow
from tests.dbfactory import run_dbre

HIDDEN = "hidden: use --json or a wider terminal)"
SNAPSHOT_COLUMNS = ["id", "db", "taken at (UTC)", "pages", "size", "added", "parent", "tags", "source"]
STATUS_COLUMNS = ["db", "snapshots", "newest point age", "backup success", "RPO attained", "RTO attained",
                  "since drill", "stored", "growth", "state"]
DBS = ["shop", "orders-eu-west-primary"]


def make_db(path: Path, rows: int) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, body TEXT)")
    conn.executemany("INSERT INTO t(body) VALUES (?)", [(f"row {i} " * 20,) for i in range(rows)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A repository under a long path: two databases, three snapshots each, one tagged."""
    root = tmp_path_factory.mktemp("tables")
    url = str(root / "a-repository-path-users-paste" / "repo")
    repository = Repository.open_or_init(url)
    for db in DBS:
        live = root / f"{db}.db"
        for i in range(3):
            make_db(live, 200)
            backup(repository, LocalFileSource(live), db, tags=["nightly"] if i == 2 else ())
    return url


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line]


@pytest.mark.parametrize("command", ["snapshots", "status"])
def test_at_80_columns_ids_and_names_are_whole_and_no_line_is_wider(repo: str, command: str) -> None:
    """Every snapshot id (in `snapshots`) and every database name appears uncut on one line; nothing is wider
    than 80 columns; the columns that did not fit are counted in a note."""
    ids = [m["id"] for m in json.loads(run_dbre("snapshots", "--repo", repo, "--json").stdout)["snapshots"]]
    assert len(ids) == 6
    result = run_dbre(command, "--repo", repo, env={"COLUMNS": "80"})
    assert result.returncode == 0, result
    lines = lines_of(result.stdout)
    assert max(len(line) for line in lines) <= 80, result.stdout
    for name in DBS:
        assert any(name in line for line in lines), (name, result.stdout)
    if command == "snapshots":
        for snap_id in ids:
            assert any(snap_id in line for line in lines), (snap_id, result.stdout)
        assert "…" not in result.stdout
        assert any("2026" in line or ":" in line for line in lines)
    note = [line for line in lines if line.endswith(HIDDEN)]
    assert len(note) == 1, result.stdout
    hidden = int(note[0].strip("(").split()[0])
    columns = SNAPSHOT_COLUMNS if command == "snapshots" else STATUS_COLUMNS
    header = "\n".join(lines[:6])
    shown = [c for c in columns if all(word in header for word in c.split())]
    assert 0 < hidden < len(columns) and len(shown) >= len(columns) - hidden, (hidden, shown, result.stdout)
    # the most important columns are the ones kept
    for c in (["id", "db", "taken at (UTC)", "size"] if command == "snapshots" else ["db", "state", "RPO attained"]):
        assert c in shown or all(word in header for word in c.split()), (c, result.stdout)


@pytest.mark.parametrize("command", ["snapshots", "status"])
def test_at_200_columns_every_column_is_shown_on_one_header_line(repo: str, command: str) -> None:
    result = run_dbre(command, "--repo", repo, env={"COLUMNS": "200"})
    assert result.returncode == 0, result
    lines = lines_of(result.stdout)
    assert max(len(line) for line in lines) <= 200
    assert HIDDEN not in result.stdout
    columns = SNAPSHOT_COLUMNS if command == "snapshots" else STATUS_COLUMNS
    header = next(line for line in lines if line.startswith("┃"))
    assert [c for c in columns if f" {c} " in header] == columns, header
    if command == "snapshots":
        ids = [m["id"] for m in json.loads(run_dbre("snapshots", "--repo", repo, "--json").stdout)["snapshots"]]
        rows = [line for line in lines if line.startswith("│")]
        assert len(rows) == len(ids) and all(snap_id in row for snap_id, row in zip(ids, rows, strict=True))
        assert all(repo.rsplit("/", 2)[0] in row for row in rows)  # the source path, whole


def test_piped_without_columns_nothing_is_cut(repo: str) -> None:
    """A log or a pipe (no terminal, no COLUMNS) gets the whole table, as before."""
    result = run_dbre("status", "--repo", repo, env={"COLUMNS": None})
    assert result.returncode == 0, result
    assert HIDDEN not in result.stdout
    header = next(line for line in lines_of(result.stdout) if line.startswith("┃"))
    assert all(f" {c} " in header for c in STATUS_COLUMNS), header


# --------------------------------------------------------------------------- flow run names


def run_name_of(state: Any) -> str:
    with get_client(sync_client=True) as client:
        return str(client.read_flow_run(state.state_details.flow_run_id).name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two live databases, a repository with a snapshot of each, and a policy listing both."""
    root = tmp_path_factory.mktemp("names")
    sources = {db: make_db(root / f"{db}.db", 50) for db in ("app", "shop")}
    repo = str(root / "repo")
    repository = Repository.open_or_init(repo)
    for db, live in sources.items():
        backup(repository, LocalFileSource(live), db)
    policy = root / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": repo, "offsite": []},
        "databases": [{"name": n, "source": str(s), "rpo": "1h", "rto": "15m"} for n, s in sources.items()],
        "retention": {"keep_last": 5}, "drills": {"target": "random"}}))
    return {"repo": repo, "policy": str(policy), "app": str(sources["app"]), "root": str(root)}


FLOW_RUNS: list[tuple[str, Callable[[dict[str, str]], Any], str]] = [
    ("backup", lambda f: backup_flow("app", source=f["app"], repo=f["repo"], return_state=True), "backup app"),
    ("backup full", lambda f: backup_flow("app", source=f["app"], repo=f["repo"], full=True, return_state=True),
     "backup app (full)"),
    ("fleet", lambda f: fleet_backup_flow(policy=f["policy"], concurrency_limit="", return_state=True),
     "fleet: 2 databases"),
    ("fleet + retention", lambda f: fleet_backup_flow(["shop"], policy=f["policy"], retention=True,
                                                      concurrency_limit="", return_state=True),
     "fleet: 1 database, then retention"),
    ("verify", lambda f: verify_flow(["app"], repo=f["repo"], return_state=True), "verify app"),
    ("verify, policy", lambda f: verify_flow(policy=f["policy"], read_data=False, restore=False,
                                             return_state=True),
     "verify app, shop (no data read, no restore check)"),
    ("drill", lambda f: drill_flow(["app"], repo=f["repo"], target="random", data_docs=False, return_state=True),
     "drill app (random)"),
    ("drill, policy", lambda f: drill_flow(policy=f["policy"], data_docs=False, return_state=True),
     "drill app, shop (random)"),
    ("status", lambda f: status_flow(policy=f["policy"], notify=False, return_state=True),
     "status of app, shop (no alerts)"),
    ("retention dry run", lambda f: retention_flow(repo=f["repo"], keep_last=1, dry_run=True, return_state=True),
     "retention (dry run)"),
    ("retention", lambda f: retention_flow(["shop"], repo=f["repo"], keep_last=5, prune=False, return_state=True),
     "retention of shop (no prune)"),
    ("report", lambda f: requirements_report_flow(f["root"] + "/reports", repo=f["repo"], expectations=None,
                                                  restore_throughput=1e8, dated=False, return_state=True),
     "requirements report of all databases to {root}/reports"),
]


@pytest.mark.usefixtures("prefect_harness")
@pytest.mark.parametrize(("case", "start", "expected"), FLOW_RUNS, ids=[c[0] for c in FLOW_RUNS])
def test_each_flow_run_is_named_for_what_it_does(fleet: dict[str, str], case: str,
                                                  start: Callable[[dict[str, str]], Any], expected: str) -> None:
    state = start(fleet)
    assert state.is_completed(), (case, state)
    assert run_name_of(state) == expected.format(**fleet)


@pytest.mark.usefixtures("prefect_harness")
def test_a_run_whose_policy_cannot_be_read_is_named_by_its_flow_and_fails_in_its_body(tmp_path: Path) -> None:
    state = verify_flow(policy=str(tmp_path / "missing.yaml"), return_state=True)
    assert state.is_failed()
    assert run_name_of(state) == "verify"
    assert "missing.yaml" in str(state.message)


def test_names_count_many_databases() -> None:
    many = [f"db{i}" for i in range(12)]
    assert fleet_name(many) == "fleet: 12 databases"
    assert verify_name(many) == "verify 12 databases"
    assert drill_name(["app"]) == "drill app (newest)"
    assert drill_name(many, target="2026-12-01T02:00:00Z") == "drill 12 databases (2026-12-01T02:00:00Z)"
    assert retention_name(dry_run=True) == "retention (dry run)"
    assert fleet_name(["a"], copy_offsite=True, retention=True, full=True) == \
        "fleet: 1 database, then copy and retention (full)"
