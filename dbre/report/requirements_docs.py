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
    return str(_env().get_template(DOCUMENTS[name]).render(**context))


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
