"""The documents of a requirements analysis, rendered with Jinja2 from dbre/report/templates/.

``write_documents`` writes into one folder: report.md (charts as charts/*.png beside it),
report.html (self-contained: inline CSS, charts as base64 PNG, nothing fetched from anywhere),
backup-policy.md, recovery-runbook.md and dr-plan.md, the last three following the structure
of the seed's templates and filled from the policy and the measurements. Every file is written
to a temp name and renamed, so a reader never sees half a document.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre.report.requirements_model import (
    AT_RISK,
    MET,
    NO_TARGET,
    NOT_MET,
    TIER_GUIDANCE,
    DatabaseReport,
    Recommendation,
    RequirementsReport,
    fmt_seconds,
)
from dbre.repository.manifest import parse_time
from dbre.units import human_bytes as fmt_bytes

if TYPE_CHECKING:
    from dbre.policy import Policy

TEMPLATES = Path(__file__).parent / "templates"
DOCUMENTS = {
    "report.md": "report.md.j2",
    "report.html": "report.html.j2",
    "backup-policy.md": "backup-policy.md.j2",
    "recovery-runbook.md": "recovery-runbook.md.j2",
    "dr-plan.md": "dr-plan.md.j2",
}
# The CLI commands a runbook may use when the caller does not say which exist.
BASE_COMMANDS = frozenset({"backup", "snapshots", "restore", "verify", "forget", "copy", "unlock"})
DEFAULT_SCRATCH = "/var/tmp/dbre-scratch"
TIER_ORDER = ["critical", "high", "standard", "low"]
TIER_MEANING = {
    "critical": ("loss stops the business", "transactions, payments, credentials"),
    "high": ("loss disrupts work", "user profiles, orders in progress, settings"),
    "standard": ("can be rebuilt, with effort", "logs, analytics, derived data"),
    "low": ("easily rebuilt", "caches, scratch data"),
}


@dataclass
class Installation:
    """What the documents' commands need to be exact for this installation."""

    repo: str
    offsite: list[str] = field(default_factory=list)
    key_ref: str | None = None
    scratch: str = DEFAULT_SCRATCH
    commands: frozenset[str] = BASE_COMMANDS
    policy_path: str | None = None

    def has(self, command: str) -> bool:
        return command in self.commands

    @property
    def key_setup(self) -> str | None:
        """Shell lines that put the repository key where `dbre` reads it (DBRE_ENCRYPTION_KEY)."""
        ref = self.key_ref
        if not ref:
            return None
        if ref.startswith("env:"):
            name = ref[4:]
            if name == "DBRE_ENCRYPTION_KEY":
                return "# the key is read from $DBRE_ENCRYPTION_KEY: make sure it is set in this shell"
            return f'export DBRE_ENCRYPTION_KEY="${name}"'
        block = ref.split(":", 1)[1]
        return ("export DBRE_ENCRYPTION_KEY=\"$(python -c \"from prefect.blocks.system import Secret; "
                f"print(Secret.load('{block}').get())\")\"")


def installation(report: RequirementsReport, policy: Policy | None, commands: Iterable[str] | None) -> Installation:
    return Installation(
        repo=report.repository,
        offsite=list(report.offsite),
        key_ref=policy.repositories.encryption_key if policy else None,
        scratch=(policy.drills.scratch_dir if policy and policy.drills.scratch_dir else DEFAULT_SCRATCH),
        commands=frozenset(commands) if commands is not None else BASE_COMMANDS,
        policy_path=report.policy_path,
    )


# -- formatting helpers for the templates --------------------------------------------------------


def pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def num(x: float | None, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{(x if round(x, digits) != 0 else 0.0):,.{digits}f}"  # never "-0.0"


def cell(value: Any) -> str:
    """A markdown table cell: no pipes or newlines, '-' for nothing."""
    if value is None or value == "":
        return "-"
    return str(value).replace("|", "\\|").replace("\n", " ")


def q(value: str) -> str:
    """Shell-quote a value for a copy-and-paste command."""
    return shlex.quote(value)


def date(iso_text: str, days: int = 0) -> str:
    return (parse_time(iso_text) + timedelta(days=days)).strftime("%Y-%m-%d")


def money(value: float | None, currency: str = "USD", exact: bool = False) -> str:
    """An amount: cents, or four decimals below a cent; ``exact`` (prices) keeps every digit that matters."""
    if value is None:
        return "-"
    symbol = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}.get(currency)
    if exact:
        text = f"{value:.6f}".rstrip("0").rstrip(".")
    else:
        text = f"{value:,.2f}" if value >= 0.01 or value == 0 else f"{value:.4f}"
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def code_html(text: str) -> Any:
    """HTML of a sentence whose `backticked` parts are code (everything else escaped)."""
    from markupsafe import Markup, escape

    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def status_class(status: str) -> str:
    return {MET: "met", AT_RISK: "risk", NOT_MET: "notmet", NO_TARGET: "none"}.get(status, "none")


def status_icon(status: str) -> str:
    return {MET: "✅ met", AT_RISK: "⚠️ at risk", NOT_MET: "❌ not met", NO_TARGET: "➖ no target"}.get(status, status)


def action_command(rec: Recommendation, inst: Installation, report: RequirementsReport) -> str | None:
    """The command that carries out a recommendation, in this installation's terms."""
    db = rec.db or "DB"
    d = next((x for x in report.databases if x.name == rec.db), None)
    if rec.cron:
        return f'cron "{rec.cron}"'
    if rec.action == "drill":
        if inst.has("drill"):
            policy = f" --policy {q(inst.policy_path)}" if inst.policy_path else ""
            return f"dbre drill --repo {q(inst.repo)} --db {q(db)}{policy}"
        return "run the `dbre-drill` deployment (monthly drill) for this database"
    if rec.action == "suites":
        target = f"expectations/{db}"
        if inst.has("expectations"):
            src = d.source if d and d.source else "SOURCE"
            return f"dbre expectations profile {q(src)} --out {q(target)}"
        return f"write Great Expectations suites as JSON files in {target}/"
    return None


def who(contacts: list[dict[str, Any]], role_pattern: str) -> str | None:
    """The name of the first contact whose role matches (case-insensitive regex), or None."""
    return next((str(c["name"]) for c in contacts if re.search(role_pattern, str(c.get("role", "")), re.I)), None)


def tiers_in(report: RequirementsReport) -> list[tuple[str, list[DatabaseReport]]]:
    """Databases grouped by tier, most critical first (databases without a tier last)."""
    groups: list[tuple[str, list[DatabaseReport]]] = []
    for tier in TIER_ORDER + [None]:
        dbs = [d for d in report.databases if d.tier == tier]
        if dbs:
            groups.append((tier or "unclassified", dbs))
    return groups


def dr_strategy(d: DatabaseReport) -> tuple[str, str]:
    """The seed's DR site model for a database's RTO and measured restore time: (hot/warm/cold, why)."""
    rto, restore = d.rto, d.restore.seconds
    if rto is None:
        return "cold", "no RTO set: restore from the repository on demand"
    took = "no restore measured"
    if restore is not None:
        took = f"a restore takes {fmt_seconds(restore)} ({d.restore.basis})"
    if rto < 3600:
        if restore is not None and restore <= rto / 2:
            return "warm", (f"RTO under an hour and {took}: a practised restore from the repository fits; "
                            "keep a standby host ready to receive it")
        return "hot", f"RTO under an hour and {took}: a continuous replica with failover; restores are the fallback"
    if rto <= 4 * 3600:
        return "warm", f"RTO of hours, {took}: a scripted restore onto a prepared standby host"
    return "cold", f"RTO over four hours, {took}: restore from the (offsite) repository on demand"


def _env() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(code_html=code_html, secs=fmt_seconds, size=fmt_bytes, pct=pct, num=num, cell=cell, q=q,
                       date=date, status_class=status_class, status_icon=status_icon)
    env.tests["search"] = lambda value, pattern: re.search(pattern, str(value or "")) is not None
    env.globals.update(who=who, money=money, action_command=action_command, tiers_in=tiers_in, dr_strategy=dr_strategy,
                       TIER_GUIDANCE=TIER_GUIDANCE, TIER_MEANING=TIER_MEANING, MET=MET, AT_RISK=AT_RISK,
                       NOT_MET=NOT_MET, NO_TARGET=NO_TARGET)
    return env


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def render(report: RequirementsReport, name: str, inst: Installation, charts: dict[str, bytes]) -> str:
    """One document (a key of DOCUMENTS) as text."""
    context = {
        "r": report,
        "inst": inst,
        "charts": {k: f"charts/{k}" for k in charts},
        "charts_b64": {k: base64.b64encode(v).decode() for k, v in charts.items()} if name.endswith(".html") else {},
    }
    text = str(_env().get_template(DOCUMENTS[name]).render(**context))
    return _with_provider_history(name, text, report)


# -- the provider's own history (the first layer), beside dbre's -------------------------------------------
# Added to the rendered documents at a heading each template has, so the templates stay as they are.

_PROVIDER_ANCHORS = {"report.md": "\n## Recommendations", "report.html": "<section>\n  <h2>Recommendations</h2>",
                     "recovery-runbook.md": "\n## Appendix"}


def dbre_adds(d: DatabaseReport, report: RequirementsReport) -> str:
    """What dbre keeps beside the provider's history, in a few words."""
    where = f"a copy outside the provider ({report.repository}" + (f", offsite {len(report.offsite)}" if
                                                                     report.offsite else "") + ")"
    n = len(d.history)
    snaps = f"{n} snapshot{'' if n == 1 else 's'}"
    if d.replication_lag_seconds is not None:
        snaps += ", every transaction replicated"
    restore = f"restore {fmt_seconds(d.restore.seconds)} ({d.restore.basis})"
    return f"{where}; {snaps}; {restore}; table and row repair; drills"


def _provider_rows(report: RequirementsReport) -> list[tuple[DatabaseReport, Any]]:
    from dbre.report.requirements_model import provider_history

    return [(d, d.provider or provider_history(d.source)) for d in report.databases]


def _provider_md(report: RequirementsReport) -> str:
    lines = ["", "## Provider history beside dbre", "",
             "The provider's own point-in-time history is the first layer; dbre's repository is the copy outside "
             "the provider. Restore from either with `dbre restore` (`--provider` for the provider's).", "",
             "| Database | Provider | Provider keeps | Provider granularity | dbre adds |", "|---|---|---|---|---|"]
    for d, p in _provider_rows(report):
        lines.append(f"| {d.name} | {p.provider} | {cell(p.retention)} | {cell(p.granularity)} | "
                     f"{cell(dbre_adds(d, report))} |")
    return "\n".join(lines) + "\n"


def _provider_html(report: RequirementsReport) -> str:
    from html import escape

    rows = "".join(f"<tr><td><b>{escape(d.name)}</b></td><td>{escape(p.provider)}</td><td>{escape(p.retention)}</td>"
                   f"<td>{escape(p.granularity)}</td><td>{escape(dbre_adds(d, report))}</td></tr>\n"
                   for d, p in _provider_rows(report))
    return ("<section>\n  <h2>Provider history beside dbre</h2>\n  <p>The provider's own point-in-time history is "
            "the first layer; dbre's repository is the copy outside the provider.</p>\n  <div class=\"scroll\"><table>"
            "\n    <tr><th>Database</th><th>Provider</th><th>Provider keeps</th><th>Provider granularity</th>"
            f"<th>dbre adds</th></tr>\n{rows}  </table></div>\n</section>\n\n")


def _runbook_provider(report: RequirementsReport) -> str:
    rows = [(d, p) for d, p in _provider_rows(report) if p.restore]
    out = ["", "## Scenario 4: use the provider's history", "", "### Overview",
           "- **When**: dbre's repository cannot serve the point (unreachable, damaged, the point is between two "
           "snapshots of an unreplicated database), or the provider's history is simply nearer",
           "- **What it gives**: a new file, or a new database or namespace, as the provider kept it at a time; "
           "the live database is never touched", ""]
    if not rows:
        out += ["No database here has a provider history (each is a local file): dbre's repository is the only "
                "history. Use scenarios 1-3.", ""]
        return "\n".join(out)
    out += ["| Database | Provider keeps | Granularity | Restore command |", "|---|---|---|---|"]
    for d, p in rows:
        out.append(f"| {d.name} | {cell(p.retention)} | {cell(p.granularity)} | `{p.restore}` |")
    out += ["", "### Steps", "", "#### Step 1: choose the time (5 min)",
            "Just before the incident, in UTC. The provider restores what it had uploaded by then: allow for its "
            "granularity above (Turso: up to 15 s missing; sqld: its batch interval + 1 s).", "",
            "#### Step 2: show the plan (1 min)",
            "Run the command above with `--dry-run`: it names the temporary database or namespace and asks the "
            "provider nothing. Tokens come from the environment (`TURSO_API_TOKEN`, `LIBSQL_ADMIN_AUTH_KEY`, "
            "`LIBSQL_AUTH_TOKEN`) and are never printed.", "",
            "#### Step 3: restore to a new file (or `--into` / `--into-namespace` for a new database)",
            "A time in the future, or older than the provider keeps, is refused before any request; a time before "
            "a sqld namespace's first bottomless backup is refused after the fork (which is deleted).", "",
            "#### Step 4: compare with dbre's copy (10 min)", "```bash",
            f"dbre restore --repo {q(report.repository)} --db DB --at TIME --to dbre-at-time.db",
            "sqldiff --summary FILE dbre-at-time.db", "```",
            "Differences are the commits between the two points; rows missing from both are gone for good.", "",
            "#### Step 5: switch over, then back it up",
            "Point the application at the restored database (Turso: the new database's URL and a new token, "
            "`turso db tokens create NEW_DB`), then add it to the policy so dbre backs it up: the provider's "
            "history of the old database stays with the old database.", ""]
    return "\n".join(out)


def _with_provider_history(name: str, text: str, report: RequirementsReport) -> str:
    """``text`` with the provider-history section inserted before its anchor heading (kept as is if absent)."""
    anchor = _PROVIDER_ANCHORS.get(name)
    if anchor is None or anchor not in text:
        return text
    section = {"report.md": _provider_md, "report.html": _provider_html,
               "recovery-runbook.md": _runbook_provider}[name](report)
    at = text.index(anchor)
    return text[:at] + section + text[at:]


def write_documents(report: RequirementsReport, out_dir: str | os.PathLike[str], policy: Policy | None = None,
                    commands: Iterable[str] | None = None) -> dict[str, Path]:
    """Write every document and chart into ``out_dir`` (created); returns name -> path."""
    from dbre.report.requirements_charts import all_charts

    out = Path(out_dir)
    (out / "charts").mkdir(parents=True, exist_ok=True)
    inst = installation(report, policy, commands)
    charts = all_charts(report)
    paths: dict[str, Path] = {}
    for name, data in charts.items():
        _atomic_write(out / "charts" / name, data)
        paths[f"charts/{name}"] = out / "charts" / name
    for name in DOCUMENTS:
        _atomic_write(out / name, render(report, name, inst, charts).encode())
        paths[name] = out / name
    return paths
