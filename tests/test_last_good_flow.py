"""The last-good flow (issue 13: "a Prefect flow and a form field do the same from the UI"), under the session's
Prefect harness: it finds the same point as `dbre last-good`, publishes the probes as a table and the restore command,
restores the point found when asked (dry run by default), fails the run when nothing is good, and refuses a bad check
or a literal key before any work."""

from tests.prefect_fixtures import artifacts_of  # noqa: I001 - sets Prefect's environment first

# isort: split

import sqlite3
import time
from pathlib import Path

import pytest

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.restore.lastgood import find_last_good
from dbre.sources import open_source
from deployments.serve import deployment_specs, load_flow
from flows.last_good import last_good_flow

pytestmark = pytest.mark.usefixtures("prefect_harness")
CHECK = "SELECT count(*) >= 1000 FROM t"


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str], Path]:
    """Six snapshots of "app": t grows by 100 rows each; before the fifth, half its rows are deleted."""
    tmp = tmp_path_factory.mktemp("last_good_flow")
    src = tmp / "src.db"
    with sqlite3.connect(src, isolation_level=None) as c:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)")
        c.executemany("INSERT INTO t(name) VALUES (?)", [(f"r{i}",) for i in range(900)])
    repo = Repository.open_or_init(str(tmp / "repo"))
    ids = []
    for i in range(6):
        with sqlite3.connect(src, isolation_level=None) as c:
            c.executemany("INSERT INTO t(name) VALUES (?)", [(f"s{i}-{j}",) for j in range(100)])
            if i == 4:
                c.execute("DELETE FROM t WHERE id % 2 = 0")
        ids.append(backup(repo, open_source(str(src)), "app", checksums=False).manifest.id)
        time.sleep(0.01)
    return str(tmp / "repo"), ids, tmp


def test_the_flow_finds_what_the_cli_finds_and_publishes_the_probes(history: tuple[str, list[str], Path]) -> None:
    url, ids, tmp = history
    state = last_good_flow("app", checks=[CHECK], repo=url, return_state=True)
    assert state.is_completed(), state.message
    out = state.result()
    direct = find_last_good(Repository.open(url), "app", [CHECK])
    assert direct.found is not None and out["found"]["snapshot"] == direct.found.point.snapshot == ids[3]
    assert out["first_bad"]["snapshot"] == ids[4]
    assert out["restore_command"].endswith(f"--snapshot {ids[3]} --to app-last-good.db")
    assert out["restored"] is None  # a dry run by default: nothing written
    assert not (tmp / "app-last-good.db").exists()
    arts = {a.key: a for a in artifacts_of(state.state_details.flow_run_id)}
    summary = next(a for k, a in arts.items() if k.startswith("last-good") and "summary" in k)
    assert f"snapshot {ids[3]}" in summary.data and "To restore it" in summary.data
    table = next(a for k, a in arts.items() if k.startswith("last-good") and "table" in k)
    assert f"snapshot {ids[4]}" in str(table.data) and "check 1" in str(table.data)


def test_the_flow_restores_the_point_found_when_asked(history: tuple[str, list[str], Path]) -> None:
    url, ids, tmp = history
    target = tmp / "restored.db"
    state = last_good_flow("app", checks=[CHECK], repo=url, restore_to=str(target), dry_run=False,
                           return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["restored"]["check"]["ok"]
    with sqlite3.connect(target) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 900 + 4 * 100
    again = last_good_flow("app", checks=[CHECK], repo=url, restore_to=str(target), dry_run=False,
                           return_state=True)
    assert again.is_failed() and "--force" in (again.message or "") + str(again.result(raise_on_failure=False))


def test_nothing_good_fails_the_run_and_bad_input_is_refused_before_any_work(
        history: tuple[str, list[str], Path]) -> None:
    url, _, _ = history
    state = last_good_flow("app", checks=["SELECT count(*) > 100000 FROM t"], repo=url, return_state=True)
    assert state.is_failed() and "no good point of app" in str(state.result(raise_on_failure=False))
    state = last_good_flow("app", checks=["DELETE FROM t"], repo=url, return_state=True)
    assert state.is_failed() and "check 1" in str(state.result(raise_on_failure=False))
    state = last_good_flow("app", checks=[CHECK], repo=url, key="a literal passphrase", return_state=True)
    assert state.is_failed() and "a literal passphrase" not in str(state.result(raise_on_failure=False))


def test_it_is_a_deployment_with_a_dry_run_form() -> None:
    spec = next(s for s in deployment_specs() if s["name"] == "last-good")
    assert load_flow(spec["entrypoint"]) is last_good_flow
    assert spec["parameters"]["dry_run"] is True
