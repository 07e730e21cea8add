"""The restore form the on-call engineer fills in at 3 a.m.: key and token fields take references only (a literal
is refused before any work, and a resolved secret shows nowhere), ``at`` is a described date-time, ``txid`` restores
to a transaction, the database is a choice of the policy's, and a run's name says what it does. Flows run under the
session's ``prefect_test_harness``; the form itself is read from a real ``prefect server`` serving the deployments.
"""

from tests.prefect_fixtures import artifacts_of, wait_for  # noqa: I001 - sets Prefect's environment first

# isort: split

import inspect
import json
import os
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from prefect import get_client
from prefect.blocks.system import Secret as SecretBlock
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId, TaskRunFilter

from dbre.replicate.segment import list_generations, read_base
from dbre.repository.repo import Repository
from deployments.serve import deployment_specs, load_flow
from flows.backup import backup_flow
from flows.references import REFUSED, SECRET_REF_PATTERN, as_reference
from flows.restore import RestoreRequest, restore_flow, run_name
from tasks.backup import backup_database
from tests.replication import make_source, restored_seq, start_replicator, stop_replicator, wait_for_generation
from tests.test_e2e_prefect import (
    _OPENER,
    CHROMIUM,
    Served,
    _deployment,
    _run_to_end,
    api_call,
    free_port,
    served,  # noqa: F401 - the real Prefect server serving the deployments
)

PASSPHRASE = "correct horse battery staple 3am"
KEY_VALUE = "the-real-repository-key-9f2c71"
# every flow a deployment serves (a new one is covered without being listed here)
FLOWS = sorted({spec["entrypoint"].removeprefix("flows/") for spec in deployment_specs()})


def _everything_of(flow_run_id: UUID) -> str:
    """All a run left behind that a person can read: its parameters, name, state, logs, artifacts, task runs."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    parts = [json.dumps(run.parameters), run.name, str(run.state and run.state.message)]
    parts += [log.message for log in logs]
    parts += [f"{a.key} {a.description} {a.data}" for a in artifacts_of(flow_run_id)]
    parts += [f"{t.name} {t.state and t.state.message}" for t in tasks]
    return "\n".join(parts)


def _task_runs(flow_run_id: UUID) -> list[Any]:
    with get_client(sync_client=True) as client:
        return list(client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                          task_run_filter=TaskRunFilter()))


# --------------------------------------------------------------------------- the types, no server


def test_key_and_token_parameters_of_every_flow_take_references_only() -> None:
    for entry in FLOWS:
        fl = load_flow(f"flows/{entry}")
        schema = fl.parameters.model_dump()
        secret_params = [p for p in inspect.signature(fl.fn).parameters if p in ("key", "token", "passphrase")]
        assert "key" in secret_params, entry
        for name in secret_params:
            field = schema["properties"][name]
            branches = field["anyOf"]
            strings = [b for b in branches if b.get("type") == "string"]
            # no branch takes free text: a string must match the reference pattern, or it is a Secret block
            assert strings == [{"type": "string", "pattern": SECRET_REF_PATTERN, "title": "secret:NAME or env:NAME"}], \
                (entry, name, branches)
            assert {"$ref": "#/definitions/Secret"} in branches and {"type": "null"} in branches  # (the UI sends null)
            assert "Secret" in schema["definitions"]
    assert as_reference("secret:dbre-key") == "prefect-secret:dbre-key"
    assert as_reference("env:DBRE_KEY") == "env:DBRE_KEY" and as_reference(None) is None
    for literal in (PASSPHRASE, "hunter2", "secret:Has Spaces", "env:1BAD", SecretBlock(value="unsaved")):
        assert as_reference(literal) == REFUSED


def test_restore_form_fields_are_typed_and_described() -> None:
    schema = load_flow("flows/restore.py:restore_flow").parameters.model_dump()
    assert schema["required"] == ["request"]
    for name, field in schema["properties"].items():
        assert field.get("description"), f"flow parameter {name} has no description"
    req = schema["definitions"]["RestoreRequest"]["properties"]
    for name, field in req.items():
        assert field.get("description"), f"request.{name} has no description"
        assert "anyOf" not in field, f"request.{name} is drawn as a union: {field}"
        assert field.get("default", "") is not None, f"the form would fill request.{name} with null"
    assert (req["at"]["type"], req["at"]["format"]) == ("string", "date-time")
    assert "zone" in req["at"]["description"] and "UTC" in req["at"]["description"]
    assert (req["txid"]["type"], req["txid"]["minimum"]) == ("integer", 1)
    assert "SecretStr" not in json.dumps(schema) and PASSPHRASE not in json.dumps(schema)
    # a time without a zone is UTC; the run name says what the run does
    naive = RestoreRequest(database="app", target="x.db", at=datetime(2026, 12, 1, 2, 14), dry_run=False)
    assert naive.at == datetime(2026, 12, 1, 2, 14, tzinfo=UTC)
    assert run_name(naive) == "restore app @ 2026-12-01T02:14Z"
    berlin = RestoreRequest.model_validate({"database": "app", "target": "x.db", "at": "2026-12-01T03:14:30+01:00"})
    assert run_name(berlin) == "dry run: restore app @ 2026-12-01T02:14:30Z"
    assert run_name(RestoreRequest(database="app", target="x.db", txid=812, dry_run=False)) == "restore app @ txid 812"
    rows = RestoreRequest(database="app", target="x.db", scenario="rows", tables=["orders"], where="id < 5")
    assert run_name(rows) == "dry run: repair rows of app.orders @ newest"
    with pytest.raises(ValueError, match="not both"):
        RestoreRequest(database="app", target="x.db", txid=3, snapshot="ab12")
    with pytest.raises(ValueError, match="txid restores a whole database"):
        RestoreRequest(database="app", target="x.db", txid=3, scenario="table", tables=["t"])


# --------------------------------------------------------------------------- flows under the harness


@pytest.mark.usefixtures("prefect_harness")
def test_literal_key_is_refused_before_any_work(tmp_path: Path) -> None:
    src = tmp_path / "app.db"
    make_source(src, 50)
    repo = str(tmp_path / "repo")
    backup_database.fn("app", str(src), repo)
    target = tmp_path / "restored.db"
    request = RestoreRequest(database="app", target=str(target), dry_run=False)
    state = restore_flow(request, repo=repo, key=PASSPHRASE, return_state=True)
    assert state.is_failed()
    message = state.message or ""
    assert message.startswith("restore: the key parameter is not a reference to a secret (give a reference: "
                              "secret:NAME"), message
    assert "policy file" not in message and PASSPHRASE not in message
    run_id = state.state_details.flow_run_id
    assert _task_runs(run_id) == [] and not target.exists()  # refused before any work
    (art,) = [a for a in artifacts_of(run_id) if a.key == "restore-refused-summary"]
    assert "secret:BLOCK-NAME" in art.data and "env:VARIABLE" in art.data and "Secret block" in art.data
    everything = _everything_of(run_id)
    assert PASSPHRASE not in everything and "horse" not in everything  # not even in the stored parameters
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).parameters["key"] == REFUSED


@pytest.mark.usefixtures("prefect_harness")
def test_a_literal_token_of_the_backup_flow_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "app.db"
    make_source(src, 10)
    repo = tmp_path / "repo"
    state = backup_flow("app", source=str(src), repo=str(repo), token=PASSPHRASE, return_state=True)
    assert state.is_failed() and "backup: the token parameter is not a reference" in (state.message or "")
    run_id = state.state_details.flow_run_id
    assert _task_runs(run_id) == [] and not repo.exists()
    assert any(a.key == "backup-refused-summary" for a in artifacts_of(run_id))
    assert PASSPHRASE not in _everything_of(run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_restore_with_a_secret_block_key_shows_the_key_nowhere(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "app.db"
    make_source(src, 50)
    repo = str(tmp_path / "repo")
    monkeypatch.setenv("DBRE_FORM_TEST_KEY", KEY_VALUE)
    backup_database.fn("app", str(src), repo, "env:DBRE_FORM_TEST_KEY")  # an encrypted repository
    monkeypatch.delenv("DBRE_FORM_TEST_KEY")
    monkeypatch.delenv("DBRE_ENCRYPTION_KEY", raising=False)
    SecretBlock(value=KEY_VALUE).save("dbre-form-test-key", overwrite=True)
    target = tmp_path / "restored.db"
    request = RestoreRequest(database="app", target=str(target), dry_run=False)
    done = restore_flow(request, repo=repo, key="secret:dbre-form-test-key", return_state=True)
    assert done.is_completed(), done.message
    assert restored_seq(target) == (50, 50, 50)
    run_id = done.state_details.flow_run_id
    everything = _everything_of(run_id)
    assert "restore app @ newest" in everything and "Restore of `app`" in everything  # name, summary were read
    assert KEY_VALUE not in everything
    # the key is needed: without it the same restore fails, naming the block, not the key
    wrong = restore_flow(request.model_copy(update={"force": True}), repo=repo, key="env:DBRE_FORM_TEST_KEY",
                         return_state=True)
    assert wrong.is_failed() and "DBRE_FORM_TEST_KEY is not set" in (wrong.message or "")
    assert KEY_VALUE not in _everything_of(wrong.state_details.flow_run_id)


@pytest.mark.usefixtures("prefect_harness")
def test_unknown_database_lists_the_policy_names(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": str(tmp_path / "repo")},
        "databases": [{"name": n, "source": str(tmp_path / f"{n}.db"), "rpo": "1h", "rto": "15m"}
                      for n in ("orders", "app")], "retention": {"keep_last": 2}}))
    state = restore_flow(RestoreRequest(database="ordres", target=str(tmp_path / "x.db")), policy=str(policy),
                         return_state=True)
    assert state.is_failed()
    assert state.message == "restore: no database 'ordres' in the policy (choose one of app, orders)"
    assert "\n" not in (state.message or "").strip() and "Traceback" not in (state.message or "")
    run_id = state.state_details.flow_run_id
    assert _task_runs(run_id) == []
    (art,) = [a for a in artifacts_of(run_id) if a.key == "restore-refused-summary"]
    assert "- `app`" in art.data and "- `orders`" in art.data


@pytest.mark.usefixtures("prefect_harness")
def test_txid_restores_exactly_that_transaction(tmp_path: Path) -> None:
    src = tmp_path / "app.db"
    make_source(src, 50)
    repo_url = str(tmp_path / "repo")
    Repository.open_or_init(repo_url)
    rep = start_replicator(src, repo_url, interval="200ms")
    try:
        wait_for_generation(repo_url, proc=rep)
        conn = sqlite3.connect(src, isolation_level=None)
        for seq in range(51, 56):  # five transactions, each its own txid
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t(seq, pad) VALUES (?, randomblob(300))", (seq,))
            conn.execute("UPDATE counter SET n = ?", (seq,))
            conn.execute("COMMIT")
            time.sleep(0.25)
        conn.close()
        repo = Repository.open(repo_url)

        def shipped() -> bool:
            gens = list_generations(repo, "app")
            return bool(gens) and any(n.last >= read_base(repo, "app", g).base_txid + 5 for g, names in gens.items()
                                      for n in names)

        wait_for(shipped, timeout=30, what="five transactions replicated")
    finally:
        code, err = stop_replicator(rep)
    assert code == 0, err
    (gen_id,) = list_generations(repo, "app")
    base_txid = read_base(repo, "app", gen_id).base_txid
    target = tmp_path / "at-txid.db"
    request = RestoreRequest(database="app", target=str(target), txid=base_txid + 3)
    dry = restore_flow(request, repo=repo_url, return_state=True)
    assert dry.is_completed(), dry.message
    assert not target.exists() and dry.result()["plan"]["txid"] == base_txid + 3
    done = restore_flow(request.model_copy(update={"dry_run": False}), repo=repo_url, return_state=True)
    assert done.is_completed(), done.message
    assert restored_seq(target) == (53, 53, 53)  # the base's 50 rows and exactly three transactions
    with get_client(sync_client=True) as client:
        names = [client.read_flow_run(s.state_details.flow_run_id).name for s in (dry, done)]
    assert names == [f"dry run: restore app @ txid {base_txid + 3}", f"restore app @ txid {base_txid + 3}"]
    summary = next(a for a in artifacts_of(done.state_details.flow_run_id) if a.key == "restore-app-summary")
    assert f"up to txid {base_txid + 3}" in summary.data and "Applied 3 transactions" in summary.data
    assert "integrity_check and foreign_key_check pass" in summary.data
    # the form left empty (no snapshot, time or txid): the newest replicated state, as `dbre restore`
    newest = tmp_path / "newest.db"
    plain = restore_flow(RestoreRequest(database="app", target=str(newest), dry_run=False), repo=repo_url,
                         return_state=True)
    assert plain.is_completed(), plain.message
    assert restored_seq(newest) == (55, 55, 55)  # all five transactions, not the base snapshot's 50 rows
    summary = next(a for a in artifacts_of(plain.state_details.flow_run_id) if a.key == "restore-app-summary")
    assert "as of its newest replicated transaction" in summary.data and "Applied 5 transactions" in summary.data


# --------------------------------------------------------------------------- the form on a real Prefect server


def test_the_served_form_takes_references_and_policy_databases(served: Served) -> None:  # noqa: F811
    dep = _deployment(served.api, "dbre-restore", "restore")
    assert dep is not None and dep["enforce_parameter_schema"]
    schema = dep["parameter_openapi_schema"]
    props, req = schema["properties"], schema["definitions"]["RestoreRequest"]["properties"]
    assert [b.get("type") for b in props["key"]["anyOf"]] == [None, "string"]  # a Secret block, or a reference
    for name, field in props.items():  # drawn as one type, not "X | None", and not filled with null
        assert {"type": "null"} not in field.get("anyOf", []) and field.get("default", "") is not None, name
    assert props["key"]["anyOf"][1]["pattern"] == SECRET_REF_PATTERN and "reference" in props["key"]["description"]
    assert req["database"]["enum"] == ["shop"]  # the policy's databases, a drop-down
    assert (req["at"]["type"], req["at"]["format"]) == ("string", "date-time") and "zone" in req["at"]["description"]
    assert req["txid"]["type"] == "integer" and all(f.get("description") for f in req.values())

    def create(params: dict[str, Any]) -> dict[str, Any]:
        return api_call(served.api, "POST", f"/deployments/{dep['id']}/create_flow_run",  # type: ignore[no-any-return]
                        {"parameters": params, "state": {"type": "SCHEDULED", "message": "Run from the UI"}})

    target = str(served.workdir / "form-restore.db")
    # a passphrase typed into the key field: the server refuses the run; nothing is stored with it
    for bad in ({"request": {"database": "shop", "target": target}, "key": PASSPHRASE},
                {"request": {"database": "shpo", "target": target}}):
        with pytest.raises(AssertionError, match="HTTP (409|422)"):
            create(bad)
    # a reference is taken: a run scheduled a year ahead (never started) with a key reference is stored
    later = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    parked = api_call(served.api, "POST", f"/deployments/{dep['id']}/create_flow_run", {
        "parameters": {"request": {"database": "shop", "target": target}, "key": "secret:shop-key"},
        "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}})
    assert parked["parameters"]["key"] == "secret:shop-key"
    api_call(served.api, "DELETE", f"/flow_runs/{parked['id']}")
    runs = api_call(served.api, "POST", "/flow_runs/filter", {})
    assert PASSPHRASE not in json.dumps(runs) and "shpo" not in json.dumps(runs)
    # a run from the form: at, with a zone; it is named for what it does, and restores the snapshot before it
    at = (datetime.now(UTC) + timedelta(minutes=5)).replace(second=0, microsecond=0)
    run = create({"request": {"database": "shop", "target": target, "at": at.isoformat(), "dry_run": False}})
    done = _run_to_end(served.api, run["id"])
    assert done["state"]["type"] == "COMPLETED", done["state"]["message"]
    assert done["name"] == f"restore shop @ {at:%Y-%m-%dT%H:%M}Z"
    with sqlite3.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (3000,)
    # the form in the UI itself (headless Chromium): described fields, and an untouched optional field does not
    # stop the UI's own check (an "at" filled with null did); fill database and target, Submit, and the run goes
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install chromium)")
    ui_target = str(served.workdir / "from-the-form.db")
    text, = _in_browser(f"{served.ui}/deployments/deployment/{dep['id']}/run", [FILL_AND_SUBMIT % ui_target],
                        served.workdir / "browser", os.environ.get("DBRE_FORM_SCREENSHOT"))
    for needle in ("Database to restore", "At (time, with zone)", "Txid (transaction)", "Repository key, as a "
                   "reference", "secret:NAME or env:NAME"):
        assert needle in text, f"the rendered form lacks {needle!r}"

    def submitted() -> dict[str, Any] | None:
        found = api_call(served.api, "POST", "/flow_runs/filter", {})
        return next((r for r in found if (r["parameters"].get("request") or {}).get("target") == ui_target), None)

    from_form = _run_to_end(served.api, wait_for(submitted, timeout=30, what="the run the form submitted")["id"])
    assert from_form["state"]["type"] == "COMPLETED", from_form["state"]["message"]
    assert from_form["name"] == "dry run: restore shop @ newest"  # the form's default: a dry run
    # a passphrase typed into the key field's text choice: the UI's check refuses it, no run is created
    typed = str(served.workdir / "typed-key.db")
    checks, = _in_browser(f"{served.ui}/deployments/deployment/{dep['id']}/run", [TYPE_KEY % (typed, PASSPHRASE)],
                          served.workdir / "browser2")
    refused = [reply for url, reply in checks if "schemas/validate" in url and '"valid":false' in reply]
    assert refused and '"property":"key"' in refused[0], checks
    time.sleep(2)
    found = api_call(served.api, "POST", "/flow_runs/filter", {})
    assert PASSPHRASE not in json.dumps(found) and typed not in json.dumps(found)


FILL_AND_SUBMIT = """(async () => {
  const field = (name) => [...document.querySelectorAll('.schema-form-property')]
    .find(e => e.querySelector('.schema-form-property__label')?.textContent.trim().startsWith(name));
  const text = document.body.innerText;
  const db = field('Database').querySelector('select');
  db.value = 'shop'; db.dispatchEvent(new Event('change', {bubbles: true}));
  const target = field('Target').querySelector('input, textarea');
  target.value = '%s'; target.dispatchEvent(new Event('input', {bubbles: true}));
  await new Promise(r => setTimeout(r, 800));
  [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Submit').click();
  await new Promise(r => setTimeout(r, 4000));
  return text;
})()"""


TYPE_KEY = """(async () => {
  const replies = [];
  const open = XMLHttpRequest.prototype.open, send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) { this.dbreUrl = url; return open.apply(this, arguments); };
  XMLHttpRequest.prototype.send = function () {
    this.addEventListener('load', () => replies.push([this.dbreUrl, String(this.responseText).slice(0, 2000)]));
    return send.apply(this, arguments);
  };
  const field = (name) => [...document.querySelectorAll('.schema-form-property')]
    .find(e => e.querySelector('.schema-form-property__label')?.textContent.trim().startsWith(name));
  const db = field('Database').querySelector('select');
  db.value = 'shop'; db.dispatchEvent(new Event('change', {bubbles: true}));
  const target = field('Target').querySelector('input, textarea');
  target.value = '%s'; target.dispatchEvent(new Event('input', {bubbles: true}));
  const key = field('key');
  [...key.querySelectorAll('button')].find(b => b.textContent.trim() === 'secret:NAME or env:NAME').click();
  await new Promise(r => setTimeout(r, 800));
  const input = field('key').querySelector('input, textarea');
  input.value = '%s'; input.dispatchEvent(new Event('input', {bubbles: true}));
  await new Promise(r => setTimeout(r, 800));
  [...document.querySelectorAll('button')].find(b => b.textContent.trim() === 'Submit').click();
  await new Promise(r => setTimeout(r, 4000));
  return replies;
})()"""


def _in_browser(url: str, scripts: list[str], profile: Path, screenshot: str | None = None) -> list[Any]:
    """Open ``url`` in headless Chromium and evaluate each script there (DevTools protocol); their values."""
    import asyncio
    import base64

    import websockets

    port = free_port()
    proc = subprocess.Popen([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                             "--disable-background-networking", f"--remote-debugging-port={port}",
                             "--window-size=1400,2600", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def page() -> str | None:
        try:
            found = json.loads(_OPENER.open(f"http://127.0.0.1:{port}/json", timeout=2).read())
        except OSError:
            return None
        return next((p["webSocketDebuggerUrl"] for p in found if p["type"] == "page"), None)

    async def drive(ws_url: str) -> list[Any]:
        async with websockets.connect(ws_url, max_size=50_000_000) as ws:
            ids = iter(range(1, 1000))

            async def call(method: str, **params: Any) -> dict[str, Any]:
                n = next(ids)
                await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    msg = json.loads(await ws.recv())
                    if msg.get("id") == n:
                        return msg  # type: ignore[no-any-return]

            await call("Page.navigate", url=url)
            await asyncio.sleep(8)  # the UI loads the deployment and draws the form
            if screenshot:
                Path(screenshot).write_bytes(base64.b64decode((await call("Page.captureScreenshot"))["result"]["data"]))
            values = []
            for script in scripts:
                res = await call("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
                values.append(res["result"]["result"].get("value"))
            return values

    try:
        return asyncio.run(drive(wait_for(page, timeout=30, what="chromium's DevTools")))
    finally:
        proc.kill()
        proc.wait()
