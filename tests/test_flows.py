"""The Prefect layer: flows end to end under one session-scoped test harness, tasks through ``.fn()``.

Flows run against local repositories and a real S3-compatible server (moto_server); the retry
test stops its own moto_server and starts it again while a backup task is failing.
"""

from tests.prefect_fixtures import artifacts_of, task_runs_named, wait_for  # noqa: I001 - sets Prefect's env first

# isort: split

import json
import logging
import sqlite3
import threading
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import apsw
import pytest
import yaml
from prefect import get_client
from prefect.blocks.system import Secret as SecretBlock
from prefect.states import Completed, Failed
from pydantic import ValidationError

from dbre.errors import IntegrityError, LockedError, RepositoryError, SourceError, UsageError
from dbre.repository.repo import Repository, pack_key
from dbre.secrets import Secret
from dbre.storage.base import PermanentError, TransientError
from flows.backup import backup_flow
from flows.fleet import fleet_backup_flow
from flows.restore import RestoreRequest, restore_flow
from flows.retention import retention_flow
from flows.verify import verify_flow
from tasks.backup import backup_database, copy_to_offsite, list_snapshots
from tasks.restore import plan_whole_restore, restore_whole
from tasks.retention import forget_snapshots, prune_repository
from tasks.retry import is_transient, retry_on_transient
from tasks.secrets import resolve_key, resolve_secret
from tasks.verify import check_restored, restore_check, verify_repository
from tests.sqld import SqldServer, sqld_namespaces  # noqa: F401 - the session's sqld with namespaces

pytestmark = pytest.mark.usefixtures("prefect_harness")  # the session's one harness (conftest), started on first use

# --------------------------------------------------------------------------- helpers


def make_db(path: Path, orders: int = 500) -> Path:
    """A WAL database with two related tables: customers and orders (a foreign key between them)."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        PRAGMA journal_mode=WAL;
        CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL);
        CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                            total REAL, note TEXT);
        CREATE INDEX orders_customer ON orders(customer_id);
        """
    )
    conn.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"customer {i}") for i in range(1, 51)])
    conn.executemany("INSERT INTO orders(customer_id, total, note) VALUES (?, ?, ?)",
                     [(i % 50 + 1, i * 1.25, "n" * (i % 300)) for i in range(orders)])
    conn.commit()
    conn.close()
    return path


def add_orders(path: Path, n: int) -> None:
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO orders(customer_id, total, note) VALUES (1, ?, 'later')", [(i,) for i in range(n)])
    conn.commit()
    conn.close()


def content(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in ("customers", "orders")}
    finally:
        conn.close()


def write_policy(path: Path, primary: str, sources: dict[str, Path], offsite: list[str] | None = None,
                 **sections: Any) -> str:
    data: dict[str, Any] = {
        "repositories": {"primary": primary, "offsite": offsite or []},
        "databases": [{"name": n, "source": str(s), "rpo": "1h", "rto": "15m"} for n, s in sources.items()],
        "retention": {"keep_last": 2},
        **sections,
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def by_kind(artifacts: list[Any]) -> dict[str, list[Any]]:
    """A run's artifacts as summary / table / link (Prefect stores a link artifact as markdown: the key tells)."""
    out: dict[str, list[Any]] = {}
    for a in artifacts:
        key = a.key or ""
        kind = "summary" if key.endswith("-summary") else "table" if a.type == "table" else \
            "link" if "-link-" in key else f"other: {a.type} {a.data!r:.200}"
        out.setdefault(kind, []).append(a)
    return out


# --------------------------------------------------------------------------- backup


def test_backup_flow_backs_up_then_copies_offsite(tmp_path: Path, s3_repo_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    passphrase = "correct horse battery staple"
    monkeypatch.setenv("DBRE_TEST_KEY", passphrase)
    src = make_db(tmp_path / "shop.db")
    repo = str(tmp_path / "repo")
    first = backup_flow("shop", source=str(src), repo=repo, offsite=[s3_repo_url], key="env:DBRE_TEST_KEY")
    add_orders(src, 100)
    state = backup_flow("shop", source=str(src), repo=repo, offsite=[s3_repo_url], key="env:DBRE_TEST_KEY",
                        return_state=True)
    assert state.is_completed(), state.message
    second = state.result()
    assert second["snapshot"]["parent"] == first["snapshot"]["id"]  # incremental against the first
    assert second["snapshot"]["bytes_added"] < first["snapshot"]["bytes_added"]
    assert second["copies"][0]["snapshots_copied"] == 1 and second["copies"][0]["already_there"] == 1
    ids = [first["snapshot"]["id"], second["snapshot"]["id"]]
    for url in (repo, s3_repo_url):  # primary and offsite hold the same snapshots, encrypted
        assert [m.id for m in Repository.open(url, Secret(passphrase)).snapshots("shop")] == ids
    with pytest.raises(RepositoryError, match="encrypted"):
        Repository.open(repo)

    arts = by_kind(artifacts_of(state.state_details.flow_run_id))
    assert set(arts) == {"summary", "table"}  # locations are text in the summary, not link artifacts
    summary = arts["summary"][0]
    assert summary.key == "backup-shop-summary" and ids[1] in summary.data and "incremental" in summary.data
    rows = json.loads(arts["table"][0].data)
    assert [r["step"] for r in rows] == ["backup", "copy"] and all(r["result"] == "ok" for r in rows)
    assert f"repository {s3_repo_url}: `{s3_repo_url}`" in summary.data
    with get_client(sync_client=True) as client:  # the run records the reference, never the key
        params = client.read_flow_run(state.state_details.flow_run_id).parameters
    assert params["key"] == "env:DBRE_TEST_KEY"
    assert all(passphrase not in json.dumps(x) for x in (params, rows, summary.data))


def test_backup_flow_takes_the_database_from_the_policy(tmp_path: Path) -> None:
    src = make_db(tmp_path / "ledger.db")
    policy = write_policy(tmp_path / "policy.yaml", str(tmp_path / "repo"), {"ledger": src})
    result = backup_flow("ledger", policy=policy)
    assert result["copies"] == [] and result["snapshot"]["db"] == "ledger"
    state = backup_flow("unknown", policy=policy, return_state=True)
    assert state.is_failed() and "not in the policy" in (state.message or "")


def test_backup_flow_refuses_a_moved_source_unless_accepted(tmp_path: Path) -> None:
    """The database moved to another path: the flow refuses (nothing written, the message names the
    flow's parameter), then accept_new_source=True takes it into the same chain."""
    (tmp_path / "old").mkdir()
    src = make_db(tmp_path / "old" / "ledger.db")
    repo = str(tmp_path / "repo")
    first = backup_flow("ledger", source=str(src), repo=repo)
    (tmp_path / "new").mkdir()
    moved = src.rename(tmp_path / "new" / "ledger.db")
    before = sorted(p.name for p in (tmp_path / "repo" / "snapshots" / "ledger").iterdir())
    state = backup_flow("ledger", source=str(moved), repo=repo, return_state=True)
    assert state.is_failed() and "accept_new_source" in (state.message or ""), state.message
    assert sorted(p.name for p in (tmp_path / "repo" / "snapshots" / "ledger").iterdir()) == before
    second = backup_flow("ledger", source=str(moved), repo=repo, accept_new_source=True)
    assert second["snapshot"]["parent"] == first["snapshot"]["id"]
    third = backup_flow("ledger", source=str(moved), repo=repo)  # the new place is now the chain's source
    assert third["snapshot"]["parent"] == second["snapshot"]["id"]


# --------------------------------------------------------------------------- restore


def test_restore_flow_dry_run_then_apply(tmp_path: Path) -> None:
    src = make_db(tmp_path / "shop.db")
    repo = str(tmp_path / "repo")
    snap = backup_database.fn("shop", str(src), repo)
    at_snapshot = content(src)
    add_orders(src, 25)  # the live database moves on; the restore must give the snapshot's state
    target = tmp_path / "restored.db"
    request = RestoreRequest(database="shop", target=str(target))
    assert request.dry_run  # the form's default is safe

    dry = restore_flow(request, repo=repo, return_state=True)
    assert dry.is_completed(), dry.message
    assert dry.result()["plan"]["snapshot"] == snap["id"] and not target.exists()
    assert "Dry run" in by_kind(artifacts_of(dry.state_details.flow_run_id))["summary"][0].data

    apply = request.model_copy(update={"dry_run": False})
    done = restore_flow(apply, repo=repo, return_state=True)
    assert done.is_completed(), done.message
    assert content(target) == at_snapshot
    arts = by_kind(artifacts_of(done.state_details.flow_run_id))
    assert [r["step"] for r in json.loads(arts["table"][0].data)] == ["plan", "restore", "validate"]
    assert f"`{target}` on host" in arts["summary"][0].data and "link" not in arts
    assert "row counts and checksums match" in arts["summary"][0].data

    again = restore_flow(apply, repo=repo, return_state=True)  # never over an existing file without force
    assert again.is_failed() and "already exists" in (again.message or "")
    forced = restore_flow(apply.model_copy(update={"force": True, "snapshot": snap["id"][:6]}), repo=repo)
    assert forced["result"]["snapshot"] == snap["id"]


def test_restore_falls_back_to_the_offsite_copy(tmp_path: Path) -> None:
    src = make_db(tmp_path / "crm.db")
    offsite = str(tmp_path / "offsite")
    backup_database.fn("crm", str(src), offsite)
    policy = write_policy(tmp_path / "policy.yaml", str(tmp_path / "lost-primary"), {"crm": src}, [offsite])
    target = tmp_path / "crm-restored.db"
    result = restore_flow(RestoreRequest(database="crm", target=str(target), dry_run=False), policy=policy)
    assert result["result"]["repository"] == offsite and content(target) == content(src)


def test_restore_request_is_validated() -> None:
    with pytest.raises(ValidationError, match="not both"):
        RestoreRequest(database="a", target="x.db", snapshot="ab12", at=datetime.now(UTC))
    with pytest.raises(ValidationError, match="needs exactly one table and a where"):
        RestoreRequest(database="a", target="x.db", scenario="rows", tables=["orders"])
    with pytest.raises(ValidationError, match="needs at least one table"):
        RestoreRequest(database="a", target="x.db", scenario="table")
    with pytest.raises(ValidationError, match="leave tables and where empty"):
        RestoreRequest(database="a", target="x.db", tables=["orders"])
    with pytest.raises(ValidationError):
        RestoreRequest(database="a", target="x.db", colour="red")  # type: ignore[call-arg]
    schema = RestoreRequest.model_json_schema()  # what the UI draws the form from
    assert schema["properties"]["scenario"]["enum"] == ["whole", "table", "rows"]
    assert set(schema["required"]) == {"database"}  # (target: a file; a provider restore into a new database has none)


def test_restore_flow_repairs_rows_then_restores_a_table(tmp_path: Path) -> None:
    live = make_db(tmp_path / "live.db")
    repo = str(tmp_path / "repo")
    snap = backup_database.fn("shop", str(live), repo)
    before = content(live)
    conn = sqlite3.connect(live)
    conn.execute("DELETE FROM orders WHERE customer_id = 3")  # the mistakes an on-call engineer undoes
    conn.execute("UPDATE orders SET total = 0 WHERE id = 11")
    conn.commit()
    conn.close()

    rows = RestoreRequest(database="shop", target=str(live), scenario="rows", tables=["orders"],
                          where="customer_id = 3 OR id = 11")
    dry = restore_flow(rows, repo=repo, return_state=True)
    assert dry.is_completed(), dry.message
    plan = dry.result()["plan"]
    assert plan["snapshot"] == snap["id"] and plan["counts"]["insert"] == 10 and plan["counts"]["update"] == 1
    assert content(live) != before  # a dry run changes nothing
    summary = by_kind(artifacts_of(dry.state_details.flow_run_id))["summary"][0].data
    assert "Dry run" in summary and "10 insert" in summary and "total: 0.0 -> 12.5" in summary
    done = restore_flow(rows.model_copy(update={"dry_run": False}), repo=repo)["result"]
    assert (done["inserted"], done["updated"]) == (10, 1) and done["audit_record"]
    assert content(live) == before

    conn = sqlite3.connect(live)
    conn.execute("DELETE FROM orders WHERE id > 100")
    conn.commit()
    conn.close()
    table = RestoreRequest(database="shop", target=str(live), scenario="table", tables=["orders"], dry_run=False)
    copy = restore_flow(table, repo=repo)["result"]  # default: beside the live table, as orders_restored
    assert [(t["target"], t["action"]) for t in copy["tables"]] == [("orders_restored", "create copy")]
    check = sqlite3.connect(live)
    try:
        assert check.execute("SELECT * FROM orders_restored ORDER BY id").fetchall() == before["orders"]
        assert check.execute("SELECT count(*) FROM orders").fetchone() == (100,)
    finally:
        check.close()
    replaced = restore_flow(table.model_copy(update={"replace_tables": True}), repo=repo, return_state=True)
    assert replaced.is_completed(), replaced.message
    assert replaced.result()["result"]["safety_snapshot"]  # the live table was saved before it was replaced
    assert content(live) == before
    arts = by_kind(artifacts_of(replaced.state_details.flow_run_id))
    assert "after safety snapshot" in arts["summary"][0].data and "Audit record" in arts["summary"][0].data

    unknown = restore_flow(table.model_copy(update={"tables": ["nope"]}), repo=repo, return_state=True)
    assert unknown.is_failed() and "nope" in (unknown.message or "")


# --------------------------------------------------------------------------- verify


def test_verify_flow_passes_then_names_a_missing_pack(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    for name, n in (("alpha", 300), ("beta", 700)):
        backup_database.fn(name, str(make_db(tmp_path / f"{name}.db", n)), repo)
    good = verify_flow(repo=repo, cycle_weeks=1, return_state=True)  # a one-week cycle reads every pack
    assert good.is_completed(), good.message
    report = good.result()["repository"]
    assert report["ok"] and report["packs_read"] == report["packs"] > 0
    checks = good.result()["checks"]
    assert [c["db"] for c in checks] == ["alpha", "beta"] and all(c["ok"] and c["tables"] == 2 for c in checks)
    table = json.loads(by_kind(artifacts_of(good.state_details.flow_run_id))["table"][0].data)
    assert [r["result"] for r in table] == ["ok", "ok"]

    beta = Repository.open(repo).snapshots("beta")[0]
    alpha_packs = set(Repository.open(repo).snapshots("alpha")[0].packs)
    lost = next(p for p in beta.packs if p not in alpha_packs)
    (Path(repo) / pack_key(lost)).unlink()
    bad = verify_flow(repo=repo, return_state=True)
    assert bad.is_failed()
    assert lost in (bad.message or "") and "1 of 2 restore checks failed" in (bad.message or "")
    md = by_kind(artifacts_of(bad.state_details.flow_run_id))["summary"][0].data
    assert "**damaged**" in md and lost in md


# --------------------------------------------------------------------------- fleet


def test_fleet_backup_isolates_a_broken_source(tmp_path: Path) -> None:
    good = {f"tenant-{i}": make_db(tmp_path / f"tenant-{i}.db", 200 + 50 * i) for i in range(3)}
    policy = write_policy(
        tmp_path / "policy.yaml", str(tmp_path / "repo"), {**good, "tenant-broken": tmp_path / "missing.db"},
        [str(tmp_path / "offsite")],
        fleet={"max_concurrency": 2, "concurrency_limit": "dbre-test-fleet", "concurrency_limit_slots": 3},
    )
    state = fleet_backup_flow(policy=policy, copy_offsite=True, retention=True, return_state=True)
    assert state.is_failed()
    assert "1 of 4 backups failed: tenant-broken: source" in (state.message or "")
    for url in (tmp_path / "repo", tmp_path / "offsite"):
        assert Repository.open(str(url)).databases() == sorted(good)

    arts = by_kind(artifacts_of(state.state_details.flow_run_id))
    table = {r["db"]: r for r in json.loads(arts["table"][0].data)}
    assert [table[n]["status"] for n in sorted(table)] == ["ok", "ok", "ok", "failed"]
    assert "no such file" in table["tenant-broken"]["error"]
    md = arts["summary"][0].data
    assert "3 of 4 databases backed up" in md and "| copy |" in md and "| prune |" in md

    runs = wait_for(lambda: [r for r in task_runs_named("backup tenant-broken") if r.state and r.state.is_final()],
                    what="the failed backup's final state")
    assert runs[0].state.is_failed() and runs[0].run_count == 1  # a missing file is not retried
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("dbre-test-fleet").limit == 3


def test_fleet_backup_on_a_dask_task_runner(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBRE_DASK_PROCESSES", "0")  # a local cluster of threads: starts in a second
    dbs = {f"dask-{i}": make_db(tmp_path / f"dask-{i}.db", 100 * (i + 1)) for i in range(3)}
    policy = write_policy(tmp_path / "policy.yaml", str(tmp_path / "repo"), dbs)
    result = fleet_backup_flow(policy=policy, task_runner="dask", max_concurrency=2, concurrency_limit="")
    assert result["backups"] == 3 and result["failed"] == 0
    assert Repository.open(str(tmp_path / "repo")).databases() == sorted(dbs)


def test_fleet_backup_of_sqld_namespaces(tmp_path: Path, sqld_namespaces: SqldServer) -> None:  # noqa: F811
    """A realistic fleet: one sqld, a namespace per tenant (Turso's database-per-tenant pattern)."""
    names = [f"flow-ns-{i}" for i in range(3)]
    for i, ns in enumerate(names):
        sqld_namespaces.create_namespace(ns)
        sqld_namespaces.pipeline(["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
                                  *[("INSERT INTO t(v) VALUES (?)", [f"{ns}-{j}" * (i + 1)]) for j in range(50)]],
                                 namespace=ns)
    policy = sqld_namespaces.write_fleet_policy(tmp_path / "policy.yaml", tmp_path / "repo", names, rto="1h",
                                                keep_last=3)
    assert fleet_backup_flow(policy=str(policy), max_concurrency=3, concurrency_limit="")["failed"] == 0
    target = tmp_path / "tenant-2.db"
    restore_whole.fn(str(tmp_path / "repo"), names[2], str(target))
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("SELECT count(*), min(v) FROM t").fetchone() == (50, f"{names[2]}-0" * 3)
    finally:
        conn.close()


# --------------------------------------------------------------------------- retention


def test_retention_flow_dry_run_then_forget_and_prune(tmp_path: Path) -> None:
    src = make_db(tmp_path / "log.db")
    repo = str(tmp_path / "repo")
    for _ in range(3):
        backup_database.fn("log", str(src), repo)
        add_orders(src, 200)
    dry = retention_flow(repo=repo, keep_last=1, dry_run=True)
    assert dry["steps"][0]["forgotten"] == 2 and len(Repository.open(repo).snapshots("log")) == 3
    done = retention_flow(repo=repo, keep_last=1)
    assert [s["step"] for s in done["steps"]] == ["forget", "prune"]
    assert len(Repository.open(repo).snapshots("log")) == 1
    target = tmp_path / "after-prune.db"
    restore_whole.fn(repo, "log", str(target))  # what is kept still restores
    assert check_restored.fn(repo, "log", Repository.open(repo).snapshots("log")[0].id, str(target))["ok"]
    state = retention_flow(repo=repo, return_state=True)
    assert state.is_failed() and "no retention rule given" in (state.message or "")


# --------------------------------------------------------------------------- tasks, directly


def test_tasks_run_directly_through_fn(tmp_path: Path) -> None:
    src = make_db(tmp_path / "direct.db")
    repo, offsite = str(tmp_path / "repo"), str(tmp_path / "offsite")
    snap = backup_database.fn("direct", str(src), repo, checksums=False)
    assert snap["db"] == "direct" and snap["parent"] is None
    assert [s["id"] for s in list_snapshots.fn(repo, db="direct")] == [snap["id"]]
    assert copy_to_offsite.fn(repo, offsite)["snapshots_copied"] == 1
    assert copy_to_offsite.fn(repo, offsite)["already_there"] == 1
    plan = plan_whole_restore.fn(offsite, "direct", str(tmp_path / "out.db"))
    assert plan["snapshot"] == snap["id"] and not plan["replaces_existing"]
    restored = restore_whole.fn(offsite, "direct", str(tmp_path / "out.db"))
    assert content(tmp_path / "out.db") == content(src) and restored["size"] == snap["size"]
    assert verify_repository.fn(repo, read_data=True)["ok"]
    half = verify_repository.fn(repo, read_data=True, subset=(1, 2))
    assert half["ok"] and half["read_data_subset"] == "1/2" and half["packs_read"] <= half["packs"]
    check = restore_check.fn(repo, "direct", scratch_dir=str(tmp_path / "scratch"))
    assert check["ok"] and check["problems"] == [] and list((tmp_path / "scratch").iterdir()) == []
    assert forget_snapshots.fn(repo, {"last": 1}, ["direct", "never-backed-up"])["forgotten"] == 0
    assert prune_repository.fn(repo, dry_run=True)["delete_packs"] == 0


def test_restore_check_names_what_differs_from_the_manifest(tmp_path: Path) -> None:
    from tasks.verify import integrity_problems

    src = make_db(tmp_path / "drift.db")
    repo = str(tmp_path / "repo")
    backup_database.fn("drift", str(src), repo)
    manifest = Repository.open(repo).snapshots("drift")[0]
    conn = sqlite3.connect(src)
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("UPDATE orders SET total = total + 1 WHERE id = 7")
    conn.execute("DELETE FROM customers WHERE id = 50")  # orders of customer 50 now dangle
    conn.commit()
    conn.close()
    problems = integrity_problems(src, manifest)
    assert "foreign_key_check on orders.customer_id: 10 rows refer to missing rows of customers" in problems
    assert "row_count on customers: 1 rows missing: expected 50, found 49" in problems
    assert any(p.startswith("checksum on orders: content differs from the backup") for p in problems)


# --------------------------------------------------------------------------- retries and secrets


def _caused(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (TransientError("put packs/x: server busy or failing (503)"), True),
        (LockedError("repository is locked by prune"), True),
        (_caused(SourceError("backup of a: database is locked"), apsw.BusyError("database is locked")), True),
        (ConnectionRefusedError(111, "refused"), True),
        (urllib.error.URLError("timed out"), True),
        (SourceError("source libsql://x: cannot reach the server: Connection refused"), True),
        (SourceError("source http://x: /dump failed with HTTP 503: unavailable"), True),
        (SourceError("source /x.db: no such file"), False),
        (urllib.error.HTTPError("http://x", 404, "not found", {}, None), False),  # type: ignore[arg-type]
        (PermanentError("put x: access denied"), False),
        (IntegrityError("packs/ab: page 3 does not match its hash"), False),
        (UsageError("no snapshots of database 'x'"), False),
        (_caused(RepositoryError("wrapped"), TransientError("throttled")), True),
        (ValueError("bug"), False),
    ],
)
def test_only_transient_errors_are_retried(exc: BaseException, transient: bool) -> None:
    from prefect.task_engine import TaskRunTimeoutError

    assert is_transient(exc) is transient
    assert is_transient(TaskRunTimeoutError("ran out of time")) is False


def test_retry_condition_reads_the_failed_state() -> None:
    from prefect import task

    @task
    def noop() -> None: ...

    run: Any = type("Run", (), {"name": "backup x"})()
    assert retry_on_transient(noop, run, Failed(data=TransientError("503"))) is True
    assert retry_on_transient(noop, run, Failed(data=UsageError("bad name"))) is False
    assert retry_on_transient(noop, run, Completed(data=None)) is False


def test_backup_retries_while_s3_is_down(tmp_path: Path, spawn_moto: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A real moto_server is stopped before the run and started again once Prefect schedules a retry."""
    bucket = "dbre-retry-test"
    server = spawn_moto(buckets=(bucket,))  # the launcher recreates the bucket on every start
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    url = f"s3://{bucket}/repo"
    src = make_db(tmp_path / "flaky.db")
    restarted = threading.Event()

    class RestartOnRetry(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Retry 1/" in record.getMessage() and "backup flaky" in str(getattr(record, "task_run_name", "")) \
                    and not restarted.is_set():
                restarted.set()
                threading.Thread(target=server.start, daemon=True).start()

    handler = RestartOnRetry()
    task_logger = logging.getLogger("prefect.task_runs")
    task_logger.addHandler(handler)
    server.stop()
    try:
        state = backup_flow("flaky", source=str(src), repo=url, copy_offsite=False, return_state=True)
    finally:
        task_logger.removeHandler(handler)
    assert restarted.is_set(), "the backup never failed, so nothing was retried"
    assert state.is_completed(), state.message
    assert [m.db for m in Repository.open(url).snapshots()] == ["flaky"]
    runs = wait_for(lambda: [r for r in task_runs_named("backup flaky") if r.state and r.state.is_completed()],
                    what="the backup's completed state")
    assert runs[0].run_count >= 2


def test_secret_references_resolve_at_the_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBRE_TEST_TOKEN", "tok-123")
    assert resolve_secret("env:DBRE_TEST_TOKEN").reveal() == "tok-123"
    monkeypatch.delenv("DBRE_TEST_TOKEN")
    with pytest.raises(UsageError, match="environment variable DBRE_TEST_TOKEN is not set"):
        resolve_secret("env:DBRE_TEST_TOKEN")
    with pytest.raises(UsageError, match="a literal secret is not allowed") as info:
        resolve_secret("tok-123")
    assert "tok-123" not in str(info.value)

    SecretBlock(value="block-secret").save("dbre-test-key", overwrite=True)
    secret = resolve_secret("prefect-secret:dbre-test-key")
    assert secret.reveal() == "block-secret" and "block-secret" not in repr(secret)
    with pytest.raises(UsageError, match="no Prefect Secret block named 'dbre-missing'"):
        resolve_secret("prefect-secret:dbre-missing")

    monkeypatch.setenv("DBRE_ENCRYPTION_KEY", "from-env")
    key = resolve_key(None)  # like the CLI: DBRE_ENCRYPTION_KEY when no reference is given
    assert key is not None and key.reveal() == "from-env"


def test_backup_task_records_each_attempt_for_the_success_rate(tmp_path: Path) -> None:
    """The backups records `dbre status` counts: a success with its snapshot, a failure with its cause."""
    src = make_db(tmp_path / "app.db")
    repo = str(tmp_path / "repo")
    summary = backup_database.fn("app", str(src), repo)
    with pytest.raises(SourceError):
        backup_database.fn("app", str(tmp_path / "missing.db"), repo)
    records = Repository.open(repo).records("backups", "app")
    assert [r["ok"] for r in records] == [True, False]
    assert records[0]["snapshot"] == summary["id"]
    assert "no such file" in records[1]["error"]
