"""`dbre report requirements`: the requirements analysis (dbre.report.requirements) and its documents.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from dbre.cli import (
    JsonOpt,
    KeyFileOpt,
    PolicyOpt,
    _key,
    _policy,
    _print_json,
    _run,
    _table,
    _token,
    app,
)
from dbre.errors import UsageError
from dbre.secrets import Secret

report_app = typer.Typer(help="Reports: the requirements analysis with its policy, runbook and DR plan.",
                         no_args_is_help=True)
app.add_typer(report_app, name="report")


def _named_sources(specs: list[str], pol: Any) -> dict[str, Any]:
    """Sources by database name: NAME=SOURCE, or SOURCE named as `dbre backup` names it; with no
    SOURCE, the policy's sources (their tokens from env:NAME references)."""
    import re

    from dbre.repository.manifest import check_db_name
    from dbre.sources import open_source

    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if sep and rest and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            out[check_db_name(name)] = open_source(rest, _token())
        else:
            src = open_source(spec, _token())
            out[check_db_name(src.name)] = src
    if not specs and pol is not None:
        for d in pol.databases:
            token = _token()
            if d.auth_token and d.auth_token.startswith("env:") and os.environ.get(d.auth_token[4:]):
                token = Secret(os.environ[d.auth_token[4:]])
            out[d.name] = open_source(d.source, token)
    return out


@report_app.command("requirements")
def report_requirements(
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md/.html, backup-policy.md, "
                                                    "recovery-runbook.md, dr-plan.md.")],
    sources: Annotated[list[str] | None, typer.Argument(
        help="Databases to inspect live: a file or URL, or NAME=SOURCE (default: the policy's sources).")] = None,
    repo: Annotated[str | None, typer.Option("--repo", "-r", help="Repository (default: policy's primary).")] = None,
    policy: PolicyOpt = None,
    expectations: Annotated[Path, typer.Option("--expectations", help="Folder of GX suites to look for.")] = Path(
        "expectations"),
    price_gb_month: Annotated[float | None, typer.Option(
        "--price-gb-month", help="Storage price per GB-month (default: policy costs, else 0.023 USD).")] = None,
    price_put: Annotated[float | None, typer.Option("--price-put", help="Price per 1000 PUT/LIST requests.")] = None,
    price_get: Annotated[float | None, typer.Option("--price-get", help="Price per 1000 GET requests.")] = None,
    restore_throughput: Annotated[float | None, typer.Option(
        "--restore-throughput", help="Restore speed in bytes/s for RTO estimates (default: measured).")] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Requirements analysis: inventory, growth, classification, RPO/RTO feasibility, storage cost, documents."""

    def go() -> None:
        from dataclasses import replace

        from dbre.report.requirements import analyze
        from dbre.report.requirements_docs import write_documents
        from dbre.report.requirements_model import MET, NO_TARGET, Prices
        from dbre.repository.repo import Repository
        from dbre.units import human_bytes as fmt_bytes

        for opt, value in (("--price-gb-month", price_gb_month), ("--price-put", price_put),
                           ("--price-get", price_get), ("--restore-throughput", restore_throughput)):
            if value is not None and (value < 0 or (opt == "--restore-throughput" and value == 0)):
                raise UsageError(f"{opt} must be a positive number", f"e.g. {opt} 0.023")
        pol = _policy(policy)
        url = repo or (pol.repositories.primary if pol else None)
        if not url:
            raise UsageError("no repository given", "pass --repo, or a --policy naming the primary repository")
        key = _key(key_file)
        if key is None and pol is not None and (ref := pol.repositories.encryption_key or "").startswith("env:"):
            key = Secret(os.environ[ref[4:]]) if os.environ.get(ref[4:]) else None
        repository = Repository.open(url, key)
        prices = Prices(**pol.costs.model_dump()) if pol is not None else Prices()
        prices = replace(prices, storage_gb_month=prices.storage_gb_month if price_gb_month is None else price_gb_month,
                         put_per_1000=prices.put_per_1000 if price_put is None else price_put,
                         get_per_1000=prices.get_per_1000 if price_get is None else price_get)
        policy_path = str(policy or os.environ.get("DBRE_POLICY")) if pol is not None else None
        result = analyze(repository, _named_sources(sources or [], pol), pol, policy_path=policy_path, prices=prices,
                         restore_throughput=restore_throughput, expectations_dir=expectations, key=key)
        commands = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
        commands |= {g.name for g in app.registered_groups if g.name}
        paths = write_documents(result, out, pol, commands)
        counts = result.status_counts()
        if json_out:
            _print_json({"out": str(out), "files": sorted(str(p) for p in paths.values()), "targets": counts,
                         "checks": [vars(c) for d in result.databases for c in d.checks],
                         "recommendations": [vars(r) for r in result.recommendations]})
            return
        rows = [[c.db, c.target, c.status, c.measured, c.reason] for d in result.databases for c in d.checks
                if c.status not in (MET, NO_TARGET)]
        if rows:
            _table("targets at risk or not met", ["db", "target", "status", "measured", "reason"], rows,
                   whole={"db"}, priority=["target", "status", "reason", "measured"])
        tables = sum(len(d.tables) for d in result.databases)
        print(f"{len(result.databases)} databases, {tables} tables, {fmt_bytes(sum(d.size for d in result.databases))}"
              f"; targets: {counts['met']} met, {counts['at risk']} at risk, {counts['not met']} not met; "
              f"{len(result.recommendations)} recommendations")
        print(f"wrote {out}: report.html, report.md, backup-policy.md, recovery-runbook.md, dr-plan.md")

    _run(go)
