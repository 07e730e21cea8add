"""`dbre audit` and `dbre audit show ID`: the audit records table restores and row repairs write
into the repository (records/audits/<db>/<id>), read back.

Registered on the main app by dbre/cli.py, which holds the shared options and helpers."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from dbre.cli import DbOpt, JsonOpt, KeyFileOpt, _key, _print_json, _run, _table, app

audit_app = typer.Typer(help="Audit records of table restores and row repairs: `dbre audit --repo R` lists "
                             "them, `dbre audit show ID --repo R` shows one.")
app.add_typer(audit_app, name="audit")

OptionalRepoOpt = Annotated[str | None, typer.Option("--repo", "-r", help="Repository: a local path or "
                                                     "s3://bucket/prefix.")]


def touched(record: dict[str, Any]) -> str:
    """What the change touched, in a few words: tables (and their rows) or rows of one table."""
    if record.get("operation") == "repair-rows":
        return (f"{record.get('table')}: {record.get('inserted', 0)} inserted, {record.get('updated', 0)} updated, "
                f"{record.get('deleted', 0)} deleted")
    parts = []
    for t in record.get("tables") or []:
        target = t.get("target")
        name = str(t.get("table")) + (f" as {target}" if target and target != t.get("table") else "")
        parts.append(f"{name} ({t.get('action')}, {t.get('snapshot_rows')} rows)")
    return "; ".join(parts) or "-"


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(field, value) rows of a JSON record: nested fields as a.b and a[0].b, scalars as text."""
    if isinstance(value, dict) and value:
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(value, list) and value and any(isinstance(v, dict) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}[{i}]")]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return [(prefix, "\n".join(value))]  # statements, commands: one a line
    if value == []:
        return [(prefix, "-")]
    if value is None or value == {}:
        return [(prefix, "-")]
    return [(prefix, value if isinstance(value, str) else json.dumps(value))]


@audit_app.callback(invoke_without_command=True)
def audit_list(
    ctx: typer.Context,
    repo: OptionalRepoOpt = None,
    db: DbOpt = None,
    last: Annotated[int | None, typer.Option("--last", help="Only the newest N records.", min=1)] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """List the audit records, oldest first: time, command, database, what it touched, safety snapshot."""
    if ctx.invoked_subcommand is not None:
        return

    def go() -> None:
        from dbre.errors import UsageError
        from dbre.repository.repo import Repository
        from dbre.restore.live import read_audits

        if repo is None:
            raise UsageError("audit: --repo is missing", "pass --repo R (a local path or s3://bucket/prefix)")
        records = read_audits(Repository.open(repo, _key(key_file)), db, last)
        if json_out:
            _print_json(records, "records")
            return
        if not records:
            print("no audit records" + (f" of {db}" if db else ""))
            return
        _table("audit records", ["time", "id", "command", "db", "touched", "safety snapshot", "who"],
               [[r.get("time", "-"), r["record_id"], r.get("operation", "-"), r["db"], touched(r),
                 r.get("safety_snapshot") or "-", r.get("who", "-")] if "damaged" not in r else
                ["-", r["record_id"], "DAMAGED", r["db"], r["damaged"], "-", "-"] for r in records],
               whole={"time", "id", "db", "safety snapshot"}, priority=["command", "touched", "who"])
        bad = [r["record_id"] for r in records if "damaged" in r]
        if bad:
            print(f"dbre: {len(bad)} audit records could not be read ({', '.join(bad[:3])}"
                  f"{', ...' if len(bad) > 3 else ''}): damaged or planted; the offsite copy has them",
                  file=sys.stderr)

    _run(go)


@audit_app.command("show")
def audit_show(
    record_id: Annotated[str, typer.Argument(help="The audit record's id (or a unique prefix).", metavar="ID")],
    repo: Annotated[str, typer.Option("--repo", "-r", help="Repository: a local path or s3://bucket/prefix.")],
    db: DbOpt = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Show one audit record in full: every field, the undo commands and the row keys included."""

    def go() -> None:
        from dbre.repository.repo import Repository
        from dbre.restore.live import find_audit

        record = find_audit(Repository.open(repo, _key(key_file)), record_id, db)
        if json_out:
            _print_json(record)
            return
        _table(f"audit record {record['record_id']}", ["field", "value"], [list(r) for r in flatten(record)],
               whole={"field"})

    _run(go)
