"""Serve every dbre deployment from one process, no work pool needed: ``python deployments/serve.py``.

The deployments (names, entrypoints, parameters, tags, schedules) are read from
deployments/prefect.yaml, so `prefect deploy` and this process run the same definitions. When
DBRE_POLICY (or ``--policy``) names a policy file, its ``schedules`` section sets the schedules.
``--start-server`` also starts a local Prefect server (UI at http://127.0.0.1:PORT), serves
against it, and stops it on exit: that is ``make serve``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python deployments/serve.py` from a checkout finds flows/ and tasks/


def deployment_specs(prefect_file: Path = PREFECT_FILE) -> list[dict[str, Any]]:
    """The ``deployments`` entries of a prefect.yaml (anchors resolved)."""
    return list(yaml.safe_load(prefect_file.read_text())["deployments"])


def load_flow(entrypoint: str) -> Any:
    """The flow object an entrypoint ``flows/x.py:name`` names."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def build_deployments(prefect_file: Path = PREFECT_FILE, policy_path: str | None = None) -> list[Any]:
    """A RunnerDeployment per entry of ``prefect_file``; schedules from the policy when one is given."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.schedules import Cron

    from dbre.policy import WORKFLOWS, load_policy

    policy = load_policy(policy_path) if policy_path else None
    out = []
    for spec in deployment_specs(prefect_file):
        schedules = [Cron(s["cron"], timezone=s.get("timezone")) for s in spec.get("schedules") or []]
        workflow = spec["name"].replace("-", "_")
        if policy is not None and workflow in WORKFLOWS:
            s = getattr(policy.schedules, workflow)
            schedules = [Cron(s.cron, timezone=s.timezone)] if s.enabled else []
        limit = spec.get("concurrency_limit")
        deployment = load_flow(spec["entrypoint"]).to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=schedules,
            concurrency_limit=ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit,
        )
        plain_optionals(deployment._parameter_openapi_schema.properties)
        if policy is not None:
            choose_databases(deployment._parameter_openapi_schema.definitions, [d.name for d in policy.databases])
        out.append(deployment)
    return out


def plain_optionals(properties: dict[str, Any]) -> None:
    """Draw an optional parameter (``X | None = None``) as X alone: the form shows "anyOf [X, null]" as an
    "X | None" choice ("Property is type None"), and fills a field that has a null default with null, which
    the UI's own check then refuses. Without both, an untouched field is left out and the flow's default
    (None) applies; the flow still validates what it is given. (``properties`` changed in place.)"""
    for field in properties.values():
        branches = field.get("anyOf")
        if field.get("default", "") is not None or not branches or {"type": "null"} not in branches:
            continue
        del field["default"]
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) == 1:
            del field["anyOf"]
            field.update({k: v for k, v in rest[0].items() if k not in field})
        else:
            field["anyOf"] = rest


def choose_databases(definitions: dict[str, Any], names: list[str]) -> None:
    """Make the forms' ``database`` fields a choice of the policy's databases (``definitions`` changed in place).

    The request model's ``database`` (the restore form) becomes a drop-down, and the server refuses a
    run naming another database before it is stored (``enforce_parameter_schema``)."""
    for model in definitions.values() if names else ():
        field = (model.get("properties") or {}).get("database")
        if field is not None and field.get("type") == "string":
            field["enum"] = sorted(names)


def start_server(port: int, log_path: Path, timeout: float = 90) -> subprocess.Popen[bytes]:
    """Start ``prefect server start`` on 127.0.0.1:port and wait until /api/health answers."""
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_SERVER_UI_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = Path(sys.executable).parent / "prefect"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve: prefect server exited (see {log_path})")
        try:
            opener.open(f"{api}/health", timeout=2).close()
            return proc
        except OSError:
            time.sleep(0.5)
    stop(proc)
    raise SystemExit(f"serve: prefect server did not answer on {api} within {timeout:.0f} s (see {log_path})")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=os.environ.get("DBRE_POLICY"), help="policy file (default $DBRE_POLICY)")
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_FILE)
    parser.add_argument("--start-server", action="store_true", help="start a local Prefect server first")
    parser.add_argument("--port", type=int, default=4200, help="port of the local Prefect server")
    parser.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    server = None
    if args.start_server:
        log = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser() / "dbre-server.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        server = start_server(args.port, log)
        # set before Prefect reads its settings, so that this process and its flow runs use the server
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{args.port}/api"
        print(f"Prefect UI: http://127.0.0.1:{args.port}  (server log: {log})", flush=True)
    try:
        from prefect import serve

        if args.policy:
            os.environ["DBRE_POLICY"] = str(Path(args.policy).expanduser().absolute())
        serve(*build_deployments(args.prefect_file, args.policy), limit=args.limit)
    finally:
        if server is not None:
            stop(server)


if __name__ == "__main__":
    main()
