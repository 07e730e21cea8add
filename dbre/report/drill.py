"""The drill report: Markdown and self-contained HTML, with charts of RTO and RPO over past drills.

``write_drill_report`` writes, into one folder per drill:
  index.html      the report; CSS inline, charts embedded as PNG data URIs: no network needed
  report.md       the same in Markdown (charts as the PNG files beside it)
  results.json    the drill record, every check, every GX expectation outcome and GX's own results
  history.png     RTO and RPO of every drill of the database, with the targets
  expectations.png  passed and failed expectations per table (when suites ran)
GX's own Data Docs go to data-docs/ when the drill built them (they load CSS from CDNs: offline
they render unstyled, which is why this report does not depend on them).
matplotlib and jinja2 are imported only here, inside the functions that use them.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dbre.repository.manifest import parse_time
from dbre.units import human_bytes as size_text

if TYPE_CHECKING:
    from dbre.validate.checks import CheckResult
    from dbre.validate.suites import SuiteRun

TEMPLATES = Path(__file__).parent / "templates"
HISTORY_LIMIT = 24  # drills shown in the history table (the chart shows all)


def seconds_text(s: float | None) -> str:
    """``0.2`` -> ``200 ms``, ``42.3`` -> ``42.3 s``, ``130`` -> ``2 min 10 s``, ``5400`` -> ``1h 30m``."""
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m} min {sec} s" if sec else f"{m} min"
    if s < 48 * 3600:
        h, m = divmod(int(round(s / 60)), 60)
        return f"{h}h {m}m" if m else f"{h}h"
    return f"{s / 86400:.1f} days"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def target_on_scale(values: list[float], targets: list[float]) -> tuple[bool, list[float]]:
    """Whether the current target (the last of ``targets``) is drawn, and the targets the axis makes room
    for. A target far above every value would flatten the points to the axis: it is named instead of drawn.
    Judged by the current target: an older, looser one just runs off the top of the chart."""
    top = 3 * max(max(values, default=0.0), 1e-9)
    on_scale = bool(targets) and targets[-1] <= top
    return on_scale, [t for t in targets if t <= top] if on_scale else []


def history_chart(history: list[dict[str, Any]]) -> bytes:
    """RTO and RPO of each drill over time, targets as dashed lines, failed drills in red."""
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.6))
    axes = fig.subplots(2, 1, sharex=True)
    times = [parse_time(r["started_at"]) for r in history]
    for ax, key, target_key, label in ((axes[0], "rto_seconds", "rto_target_seconds", "RTO"),
                                       (axes[1], "rpo_seconds", "rpo_target_seconds", "RPO")):
        values = [float(r.get(key) or 0.0) for r in history]
        known = [float(r[target_key]) for r in history if r.get(target_key) is not None]
        on_scale, near = target_on_scale(values, known)
        unit, scale = _unit([*values, *near])
        ys = [v / scale for v in values]
        ax.plot(times, ys, color="#4a6fa5", linewidth=1.2, zorder=1)
        colors = ["#2e8540" if r.get("passed") else "#c0392b" for r in history]
        ax.scatter(times, ys, c=colors, s=28, zorder=2)
        if on_scale:
            targets = [r.get(target_key) for r in history]
            if len(set(known)) == 1:
                ax.axhline(known[-1] / scale, color="#888888", linestyle="--", linewidth=1, label="target")
            else:
                ax.step(times, [float(t) / scale if t is not None else float("nan") for t in targets], where="post",
                        color="#888888", linestyle="--", linewidth=1, label="target")
                # (the step reaches the current target only at the last drill: a line says what it is now)
                ax.axhline(known[-1] / scale, color="#888888", linestyle=":", linewidth=1,
                           label=f"target now ({seconds_text(known[-1])})")
            ax.legend(loc="upper left", fontsize=8, frameon=False)
        elif known:
            ax.text(0.01, 0.97, f"target {seconds_text(known[-1])} (far above every drill)", transform=ax.transAxes,
                    fontsize=8, color="#616e7c", va="top")
        ax.set_ylabel(f"{label} ({unit})")
        ax.set_ylim(bottom=0, top=max(ys + [known[-1] / scale if on_scale else 0.0]) * 1.2 or 1)
        ax.grid(axis="y", color="#e5e5e5")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    if len(set(times)) == 1:  # one drill: a week around it, not an axis of years
        axes[1].set_xlim(times[0] - timedelta(days=3.5), times[0] + timedelta(days=3.5))
    locator = AutoDateLocator()
    axes[1].xaxis.set_major_locator(locator)
    axes[1].xaxis.set_major_formatter(ConciseDateFormatter(locator))
    axes[0].set_title("Drills: time to a validated restore (RTO) and age of the newest restorable point (RPO)",
                      fontsize=10, loc="left")
    return _png(fig)


def _unit(values: list[float]) -> tuple[str, float]:
    top = max(values) if values else 0.0
    if top >= 2 * 86400:
        return "days", 86400.0
    if top >= 2 * 3600:
        return "hours", 3600.0
    if top >= 180:
        return "minutes", 60.0
    return "seconds", 1.0


def expectations_chart(suite_run: SuiteRun) -> bytes:
    """Passed and failed expectations per table, as horizontal stacked bars."""
    from matplotlib.figure import Figure

    tables: dict[str, list[int]] = {}
    for o in suite_run.outcomes:
        counts = tables.setdefault(o.table, [0, 0])
        counts[0 if o.success else 1] += 1
    names = sorted(tables)
    fig = Figure(figsize=(9, 0.45 * len(names) + 1.0))
    ax = fig.subplots()
    ok = [tables[n][0] for n in names]
    bad = [tables[n][1] for n in names]
    ax.barh(names, ok, color="#2e8540", label="passed")
    ax.barh(names, bad, left=ok, color="#c0392b", label="failed")
    for i, (a, b) in enumerate(zip(ok, bad, strict=True)):
        ax.text(a + b + 0.2, i, f"{a}/{a + b}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("expectations")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2, fontsize=8, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title("Great Expectations results per table", fontsize=10, loc="left")
    return _png(fig)


def _history_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in reversed(history[-HISTORY_LIMIT:]):
        rows.append({
            "started_at": r["started_at"][:19].replace("T", " "),
            "snapshot": r.get("snapshot", "")[:12],
            "rto": seconds_text(r.get("rto_seconds")),
            "rpo": seconds_text(r.get("rpo_seconds")),
            "result": "passed" if r.get("passed") else "failed",
            "failed": len(r.get("failures") or []),
        })
    return rows


def _context(record: dict[str, Any], history: list[dict[str, Any]], checks: list[CheckResult],
             suite_run: SuiteRun | None) -> dict[str, Any]:
    suites: dict[str, list[dict[str, Any]]] = {}
    if suite_run is not None:
        for o in suite_run.outcomes:
            row = asdict(o)
            row["result_text"] = o.to_check().detail
            suites.setdefault(o.table, []).append(row)
    phases = record.get("phases") or {}
    return {
        "r": record,
        "cc": record.get("cross_check"),
        "title": f"Recovery drill of {record['db']}",
        "rto": seconds_text(record.get("rto_seconds")),
        "rpo": seconds_text(record.get("rpo_seconds")),
        "rto_target": seconds_text(record.get("rto_target_seconds")),
        "rpo_target": seconds_text(record.get("rpo_target_seconds")),
        "size": size_text(record.get("size")),
        "phases": [(name, seconds_text(phases.get(key))) for name, key in (
            ("restore (every page checked)", "restore_seconds"),
            ("SQLite and manifest checks", "checks_seconds"),
            ("Great Expectations suites", "expectations_seconds"),
            ("of which importing GX", "gx_import_seconds"),
            ("load into a new sqld namespace and count its rows", "namespace_seconds"),
            ("cross-check with the provider's history (after the clock)", "cross_check_seconds"))
            if phases.get(key) is not None and (key != "gx_import_seconds" or phases[key] >= 0.05)],
        "checks": [c.to_dict() | {"where": c.where} for c in checks if not c.check.startswith("gx.")],
        "suites": suites,
        "gx": suite_run.summary() if suite_run else None,
        "history": _history_rows(history),
        "drills": len(history),
        "passed_drills": sum(1 for h in history if h.get("passed")),
        "generated": record.get("finished_at"),
    }


def _env() -> Any:
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                              autoescape=jinja2.select_autoescape(["html.j2", "html"]),
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render_html(record: dict[str, Any], history: list[dict[str, Any]], checks: list[CheckResult],
                suite_run: SuiteRun | None, *, data_docs: str | None = None) -> str:
    ctx = _context(record, history, checks, suite_run)
    ctx["history_png"] = base64.b64encode(history_chart(history)).decode() if history else None
    ctx["gx_png"] = base64.b64encode(expectations_chart(suite_run)).decode() if suite_run and suite_run.outcomes \
        else None
    ctx["data_docs"] = data_docs
    return str(_env().get_template("drill.html.j2").render(**ctx))


def render_markdown(record: dict[str, Any], history: list[dict[str, Any]], checks: list[CheckResult],
                    suite_run: SuiteRun | None, *, images: bool = True) -> str:
    ctx = _context(record, history, checks, suite_run)
    ctx["images"] = images
    ctx["has_gx_chart"] = bool(suite_run and suite_run.outcomes)
    return str(_env().get_template("drill.md.j2").render(**ctx))


def report_folder(report_dir: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """``DIR/drill-<db>-<start time>[-<record suffix>]``: one folder per drill, in time order."""
    stamp = parse_time(record["started_at"]).strftime("%Y%m%dT%H%M%SZ")
    suffix = f"-{record['record_id'].rsplit('-', 1)[-1]}" if record.get("record_id") else ""
    return Path(report_dir) / f"drill-{record['db']}-{stamp}{suffix}"


def write_drill_report(report_dir: str | os.PathLike[str], record: dict[str, Any], history: list[dict[str, Any]],
                       checks: list[CheckResult], suite_run: SuiteRun | None) -> dict[str, str]:
    """Write the report files of one drill into ``report_dir/drill-<db>-<time>/``; returns their paths.

    ``history`` is every drill record of the database, oldest first (this one included, or it is
    added). A data-docs/ folder already in the drill's folder is linked from the report."""
    if not any(h.get("started_at") == record["started_at"] for h in history):
        history = [*history, record]
    history = sorted(history, key=lambda h: h["started_at"])
    out = report_folder(report_dir, record)
    out.mkdir(parents=True, exist_ok=True)
    docs = out / "data-docs" / "index.html"
    data_docs = "data-docs/index.html" if docs.exists() else None
    paths: dict[str, str] = {}

    def put(name: str, data: bytes | str) -> None:
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
        paths[name.rsplit(".", 1)[0]] = str(path)

    put("history.png", history_chart(history))
    if suite_run is not None and suite_run.outcomes:
        put("expectations.png", expectations_chart(suite_run))
    put("index.html", render_html(record, history, checks, suite_run, data_docs=data_docs))
    put("report.md", render_markdown(record, history, checks, suite_run))
    results = {"record": record, "checks": [c.to_dict() for c in checks],
               "expectations": suite_run.to_dict() if suite_run else None}
    put("results.json", json.dumps(results, indent=1, default=str))
    if data_docs:
        paths["data-docs"] = str(docs)
    paths["html"] = paths.pop("index")
    paths["markdown"] = paths.pop("report")
    return paths


def check_writable(folder: Path, option: str) -> None:
    """Refuse, in one line, a report folder the drill could not write (created if missing), before the
    drill's restore runs: a report that cannot be written is found now, not after the drill."""
    import tempfile

    from dbre.errors import UsageError

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".dbre-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"report folder {folder} cannot be written ({err.strerror or err})",
                         f"pass a {option} this user can write, or leave it out") from None
