"""End to end on a real Prefect server: ``prefect server start``, ``deployments/serve.py`` serving every
deployment, a restore started through the REST API the way the UI starts one, and the UI itself in
headless Chromium (the DOM it renders, and screenshots).

By default the browser test checks the rendered DOM; with DBRE_UPDATE_SCREENSHOTS=1 it also takes
screenshots and replaces those in docs/img/ (prefect-*.png).
"""

from tests.prefect_fixtures import wait_for  # noqa: I001 - sets Prefect's environment first

# isort: split

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbre.repository.backup import backup
from dbre.repository.repo import Repository
from dbre.sources import open_source

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

pytestmark = pytest.mark.timeout(300)


@dataclass
class Served:
    ui: str
    api: str
    workdir: Path
    source: Path
    repo: str
    snapshot: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Stop a process this test started, by its pid: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def api_call(api: str, method: str, path: str, body: Any = None) -> Any:
    """One JSON call to the Prefect REST API, as the UI makes it; a 503 (its SQLite database busy) is retried."""
    data = json.dumps(body).encode() if body is not None else None
    for attempt in range(6):
        req = urllib.request.Request(f"{api}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=30) as resp:
                raw = resp.read()
            break
        except urllib.error.HTTPError as err:
            if err.code != 503 or attempt == 5:
                raise AssertionError(f"{method} {path}: HTTP {err.code}: {err.read()[:1000]!r}") from None
            time.sleep(0.5 * 2**attempt)
    return json.loads(raw) if raw else None


def _healthy(api: str) -> bool:
    try:
        _OPENER.open(f"{api}/health", timeout=2).close()
        return True
    except OSError:
        return False


def make_shop(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE customers(id INTEGER PRIMARY KEY, name TEXT NOT NULL);
        CREATE TABLE orders(id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), total REAL);
        """
    )
    conn.executemany("INSERT INTO customers VALUES (?, ?)", [(i, f"customer {i}") for i in range(1, 101)])
    conn.executemany("INSERT INTO orders(customer_id, total) VALUES (?, ?)",
                     [(i % 100 + 1, i / 4) for i in range(3000)])
    conn.commit()
    conn.close()
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A Prefect server on a free port and serve.py serving the deployments against it (~30-60 s to start)."""
    work = tmp_path_factory.mktemp("e2e")
    source = make_shop(work / "shop.db")
    repo = str(work / "repo")
    snap = backup(Repository.open_or_init(repo), open_source(str(source)), "shop").manifest.id
    policy = work / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": repo},
        "databases": [{"name": "shop", "source": str(source), "tier": "critical", "rpo": "1h", "rto": "15m"}],
        "retention": {"keep_daily": 7},
        "schedules": {"timezone": "Europe/Berlin"},
    }))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RUNNER_POLL_FREQUENCY": "2", "DBRE_POLICY": str(policy), "PYTHONPATH": str(ROOT)}
    env.pop("AWS_ENDPOINT_URL", None)
    bin_dir = Path(sys.executable).parent
    logs = [open(work / name, "wb") for name in ("server.log", "serve.log")]  # noqa: SIM115
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=logs[0], stderr=logs[0], stdin=subprocess.DEVNULL)
    serve = None
    try:
        wait_for(lambda: server.poll() is not None or _healthy(api), timeout=120, what="prefect server health")
        assert server.poll() is None, (work / "server.log").read_text()[-2000:]
        serve = subprocess.Popen([sys.executable, str(ROOT / "deployments" / "serve.py")], cwd=ROOT, env=env,
                                 stdout=logs[1], stderr=logs[1], stdin=subprocess.DEVNULL)
        wait_for(lambda: serve.poll() is not None or _deployment(api, "dbre-restore", "restore"), timeout=120,
                 what="served deployments")
        assert serve.poll() is None, (work / "serve.log").read_text()[-2000:]
        yield Served(f"http://127.0.0.1:{port}", api, work, source, repo, snap)
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGINT)  # like Ctrl-C: serve pauses its schedules and exits
            try:
                serve.wait(20)
            except subprocess.TimeoutExpired:
                stop_process(serve)
        stop_process(server, timeout=15)
        for log in logs:
            log.close()


def _deployment(api: str, flow: str, name: str) -> dict[str, Any] | None:
    try:
        return api_call(api, "GET", f"/deployments/name/{flow}/{name}")  # type: ignore[no-any-return]
    except AssertionError:
        return None


def _run_to_end(api: str, flow_run_id: str, timeout: float = 120) -> dict[str, Any]:
    def final() -> dict[str, Any] | None:
        run = api_call(api, "GET", f"/flow_runs/{flow_run_id}")
        return run if run["state"] and run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_for(final, timeout=timeout, what=f"flow run {flow_run_id} to finish")


def test_deployments_are_served_with_their_schedules(served: Served) -> None:
    expected = {("dbre-fleet-backup", "backup-hourly"): "0 * * * *",
                ("dbre-fleet-backup", "backup-nightly"): "30 1 * * *", ("dbre-verify", "verify-weekly"): "0 4 * * 0",
                ("dbre-drill", "drill-monthly"): "0 3 1 * *", ("dbre-restore", "restore"): None}
    for (flow, name), cron in expected.items():
        dep = _deployment(served.api, flow, name)
        assert dep is not None, f"{flow}/{name} is not served"
        if cron is None:
            assert dep["schedules"] == []
        else:
            (sched,) = dep["schedules"]
            assert (sched["schedule"]["cron"], sched["schedule"]["timezone"]) == (cron, "Europe/Berlin")


def test_restore_deployment_runs_from_the_api_like_the_ui(served: Served) -> None:
    dep = _deployment(served.api, "dbre-restore", "restore")
    assert dep is not None and dep["parameter_openapi_schema"]["required"] == ["request"]
    target = served.workdir / "restored-shop.db"
    request = {"database": "shop", "target": str(target), "scenario": "whole", "dry_run": False}
    # the UI's "Run > Custom run" form posts exactly this: the parameters and a scheduled state
    run = api_call(served.api, "POST", f"/deployments/{dep['id']}/create_flow_run",
                   {"parameters": {"request": request}, "state": {"type": "SCHEDULED", "message": "Run from the UI"}})
    started = time.monotonic()
    done = _run_to_end(served.api, run["id"])
    assert done["state"]["type"] == "COMPLETED", done["state"]["message"]
    assert time.monotonic() - started < 90
    conn = sqlite3.connect(target)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        total = sum(i / 4 for i in range(3000))
        assert conn.execute("SELECT count(*), sum(total) FROM orders").fetchone() == (3000, total)
    finally:
        conn.close()
    artifacts = api_call(served.api, "POST", "/artifacts/filter",
                         {"artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    keys = {a["key"] for a in artifacts}
    assert {"restore-shop-summary", "restore-shop-table"} <= keys
    assert not any(k and k.startswith("restore-shop-link") for k in keys)  # one key per flow and database
    summary = next(a for a in artifacts if a["key"] == "restore-shop-summary")
    assert served.snapshot in summary["data"] and "file://" not in summary["data"]
    served.workdir.joinpath("restore-run-id").write_text(run["id"])


def test_ui_shows_deployments_restore_form_and_artifacts(served: Served) -> None:
    """Headless Chromium renders the UI pages: their DOM names what we expect, and screenshots are kept."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    run_file = served.workdir / "restore-run-id"
    if not run_file.exists():
        pytest.skip("the restore run test did not run")
    dep = _deployment(served.api, "dbre-restore", "restore")
    assert dep is not None
    run_id = run_file.read_text()
    artifacts = api_call(served.api, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    summary = next(a for a in artifacts if a["key"] == "restore-shop-summary")
    pages = {
        "prefect-deployments": (f"{served.ui}/deployments", ["backup-hourly", "restore", "drill-monthly"]),
        "prefect-restore-form": (f"{served.ui}/deployments/deployment/{dep['id']}/run",
                                 ["Database to restore", "Dry Run", "whole"]),
        "prefect-restore-run": (f"{served.ui}/runs/flow-run/{run_id}", ["restore shop @ newest", "Completed"]),
        "prefect-restore-artifact": (f"{served.ui}/artifacts/artifact/{summary['id']}",
                                     ["Restore of", served.snapshot, "row counts and checksums match"]),
    }
    shots = os.environ.get("DBRE_UPDATE_SCREENSHOTS") == "1"
    out = served.workdir / "img"
    out.mkdir(exist_ok=True)

    def render(name: str, url: str) -> tuple[str, str]:
        height = 1700 if name == "prefect-restore-form" else 1000
        base = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--virtual-time-budget=10000", f"--window-size=1600,{height}", f"--user-data-dir={out / name}-profile"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        if shots:
            subprocess.run([*base, f"--screenshot={out / name}.png", url], capture_output=True, timeout=120)
        return name, dom

    with ThreadPoolExecutor(max_workers=len(pages)) as pool:
        doms = dict(pool.map(lambda item: render(item[0], item[1][0]), pages.items()))
    for name, (_, needles) in pages.items():
        missing = [n for n in needles if n not in doms[name]]
        assert not missing, f"{name}: the rendered page lacks {missing}"
    if shots:
        for name in pages:
            assert (out / f"{name}.png").stat().st_size > 20_000, f"{name}: the screenshot looks empty"
            shutil.copy(out / f"{name}.png", ROOT / "docs" / "img" / f"{name}.png")
