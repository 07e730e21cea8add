"""Charts of the requirements report as PNG bytes: sizes, growth with projection, RPO/RTO against targets.

matplotlib is imported inside ``_pyplot`` (Agg backend, no display) so importing this module
stays cheap; every chart function returns None when there is nothing to draw.
"""

from __future__ import annotations

import io
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from dbre.repository.manifest import parse_time
from dbre.units import human_bytes as fmt_bytes

if TYPE_CHECKING:
    from dbre.report.requirements_model import DatabaseReport, RequirementsReport

STATUS_COLORS = {"met": "#2e7d32", "at risk": "#ef8f00", "not met": "#c62828", "no target": "#78909c"}
DATA_COLOR, INDEX_COLOR, TREND_COLOR = "#1f5fa8", "#8fb8e8", "#c2185b"
DPI = 144
HALF, FULL = 5.6, 11.5  # inches: at 144 dpi a half-width and a full-width chart of the HTML report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False,
        "axes.titlesize": 10, "axes.titleweight": "bold", "axes.grid": True, "grid.color": "#e5e7eb",
        "grid.linewidth": 0.6, "axes.edgecolor": "#9ca3af", "axes.axisbelow": True,
    })
    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _unit(largest: float) -> tuple[float, str]:
    """A divisor and label that keep an axis of byte counts readable."""
    for div, label in ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if largest >= div:
            return float(div), label
    return 1.0, "B"


def sizes_chart(report: RequirementsReport, limit: int = 16) -> bytes | None:
    """Horizontal stacked bars: data and index bytes of the largest tables (live databases only)."""
    rows = [(f"{d.name}.{t.name}", t.inventory.table_bytes or 0, t.inventory.index_bytes or 0)
            for d in report.databases for t in d.tables if t.inventory.table_bytes is not None]
    if not rows:
        return None
    rows.sort(key=lambda r: r[1] + r[2], reverse=True)
    rows = rows[:limit][::-1]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(FULL, 0.3 * len(rows) + 1.1))
    labels = [r[0] for r in rows]
    div, unit = _unit(max(r[1] + r[2] for r in rows))
    data = [r[1] / div for r in rows]
    index = [r[2] / div for r in rows]
    ax.barh(labels, data, color=DATA_COLOR, label="table")
    ax.barh(labels, index, left=data, color=INDEX_COLOR, label="indexes")
    ax.set_xlabel(unit)
    ax.set_title("Bytes per table and its indexes (dbstat)", loc="left")
    ax.grid(axis="y", visible=False)
    ax.legend(loc="lower right", frameon=False)
    return _png(fig)


def growth_chart(d: DatabaseReport) -> bytes | None:
    """Database size over the snapshot history, the fitted line, and its 12-month projection."""
    h = d.history
    if len(h) < 2:
        return None
    plt = _pyplot()
    times = [parse_time(t) for t in h.taken_at]
    t0 = times[0]
    fig, ax = plt.subplots(figsize=(HALF, 3.0))
    tr = d.size_trend
    div, unit = _unit(max(max(h.sizes), tr.projected))
    ax.plot(times, [s / div for s in h.sizes], color=DATA_COLOR, linewidth=1.6, label="size at each snapshot")
    end = times[-1] + timedelta(days=365)
    fit_x = [times[0], times[-1]]
    fit_y = [tr.intercept / div, (tr.intercept + tr.slope_per_day * h.days[-1]) / div]
    ax.plot(fit_x, fit_y, color=TREND_COLOR, linewidth=1.0, alpha=0.8, label="fitted trend")
    ax.plot([times[-1], end], [fit_y[-1], tr.projected / div], color=TREND_COLOR, linestyle="--", linewidth=1.4,
            label=f"projection: {fmt_bytes(tr.projected)} in 12 months")
    ax.scatter([end], [tr.projected / div], color=TREND_COLOR, s=18, zorder=3)
    ax.set_ylabel(unit)
    ax.set_ylim(bottom=0)
    ax.set_xlim(t0, end + timedelta(days=10))
    ax.set_title(f"{d.name}: growing {fmt_bytes(tr.slope_per_day * 30.44)}/month", loc="left")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    _dates(ax)
    return _png(fig)


def rows_chart(d: DatabaseReport, limit: int = 6) -> bytes | None:
    """Row counts of the fastest-growing tables over the history."""
    h = d.history
    tables = [t for t in d.tables if t.rows_trend.points >= 2]
    if len(h) < 2 or not tables:
        return None
    tables.sort(key=lambda t: t.rows_trend.slope_per_day, reverse=True)
    plt = _pyplot()
    times = [parse_time(t) for t in h.taken_at]
    fig, ax = plt.subplots(figsize=(HALF, 3.0))
    for t in tables[:limit]:
        pts = [(x, r) for x, r in zip(times, t.rows_history, strict=True) if r is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.4,
                label=f"{t.name} ({t.rows_trend.slope_per_day:+,.0f}/day)")
    ax.set_ylabel("rows")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{d.name}: rows per table", loc="left")
    ax.legend(loc="upper left", frameon=False, fontsize=8)
    ax.yaxis.set_major_formatter(_thousands())
    _dates(ax)
    return _png(fig)


def _dates(ax: Any) -> None:
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator(minticks=3, maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))


def _thousands() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:,.0f}")


def _duration_ticks(ax: Any, lo: float, hi: float) -> None:
    ticks = [(1, "1 s"), (10, "10 s"), (60, "1 min"), (600, "10 min"), (3600, "1 h"), (4 * 3600, "4 h"),
             (86400, "1 d"), (7 * 86400, "1 w"), (30 * 86400, "30 d")]
    chosen = [(v, label) for v, label in ticks if lo / 1.5 <= v <= hi * 1.5] or ticks
    ax.set_xticks([v for v, _ in chosen])
    ax.set_xticklabels([label for _, label in chosen])
    ax.minorticks_off()


def target_chart(report: RequirementsReport, which: str) -> bytes | None:
    """Measured value (bar, coloured by status) against the policy target (black tick), log scale.

    ``which`` is "RPO" (worst-case data loss) or "RTO" (restore time, drill or estimate)."""
    rows = []
    for d in report.databases:
        check = next((c for c in d.checks if c.target == which), None)
        value = d.rpo_achieved if which == "RPO" else d.restore.seconds
        target = d.rpo if which == "RPO" else d.rto
        if value is None and target is None:
            continue
        rows.append((d.name, value, target, check.status if check else "no target",
                     d.restore.basis if which == "RTO" else "snapshots"))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(HALF, 0.55 * len(rows) + 1.4))
    names = [r[0] for r in rows][::-1]
    rows = rows[::-1]
    known = [float(r[1]) for r in rows if r[1]] + [float(r[2]) for r in rows if r[2]]
    lo, hi = max(min(known), 0.01), max(known)
    floor = lo / 3
    values = [max(float(r[1] or 0.0), floor) for r in rows]
    ax.set_xscale("log")
    ax.set_xlim(floor, hi * 4)
    ax.barh(names, values, left=floor, color=[STATUS_COLORS.get(r[3], "#78909c") for r in rows], height=0.5)
    for i, r in enumerate(rows):
        if r[2]:
            ax.plot([r[2], r[2]], [i - 0.38, i + 0.38], color="#111827", linewidth=2.2)
        if which == "RTO" and r[4] == "estimate":
            ax.text(values[i] * 1.15, i, "estimate", va="center", fontsize=7.5, color="#4b5563", clip_on=True)
    _duration_ticks(ax, lo, hi)
    ax.grid(axis="y", visible=False)
    title = "RPO: worst-case data loss vs target" if which == "RPO" else "RTO: restore time vs target"
    ax.set_title(title, loc="left")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles: list[Any] = [Patch(color=c, label=s) for s, c in STATUS_COLORS.items() if s in {r[3] for r in rows}]
    handles.append(Line2D([0], [0], color="#111827", linewidth=2.2, label="target"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(rows) > 2 else -0.3),
              ncol=len(handles), frameon=False, fontsize=8)
    return _png(fig)


def storage_chart(report: RequirementsReport) -> bytes | None:
    """Bytes kept under the retention policy, now and in 12 months, per database."""
    rows = [(d.name, d.storage.bytes_kept_now * d.storage.copies, d.storage.bytes_kept_12m * d.storage.copies)
            for d in report.databases if d.storage]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(HALF, 0.6 * len(rows) + 1.3))
    import numpy as np

    y = np.arange(len(rows))
    div, unit = _unit(max(max(r[1], r[2]) for r in rows))
    ax.barh(y - 0.18, [r[1] / div for r in rows], height=0.34, color=DATA_COLOR, label="now")
    ax.barh(y + 0.18, [r[2] / div for r in rows], height=0.34, color=INDEX_COLOR, label="in 12 months")
    ax.set_yticks(y)
    ax.set_yticklabels([r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} stored (all copies)")
    ax.grid(axis="y", visible=False)
    ax.set_title("Storage kept under the retention policy", loc="left")
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    return _png(fig)


def cost_chart(d: DatabaseReport, currency: str = "USD") -> bytes | None:
    """Horizontal bars: cost per month of each option, labelled with its RPO; the policy's own highlighted."""
    if d.cost_per_rpo is None or not d.cost_per_rpo.options:
        return None
    from dbre.report.requirements_model import fmt_seconds

    opts = d.cost_per_rpo.options
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(HALF, 0.42 * len(opts) + 1.1))
    y = list(range(len(opts)))
    colors = [TREND_COLOR if o.current else (DATA_COLOR if o.kind == "replication" else INDEX_COLOR) for o in opts]
    bars = ax.barh(y, [o.total_month for o in opts], height=0.6, color=colors)
    # the value beside each bar: backups cost cents where replication costs dollars
    ax.bar_label(bars, labels=[f"{o.total_month:,.2f}" if o.total_month >= 0.01 else f"{o.total_month:.4f}"
                               for o in opts], padding=3, fontsize=8, fontfamily="DejaVu Sans")
    ax.set_xlim(0, max(o.total_month for o in opts) * 1.15 or 1.0)
    ax.set_yticks(y)
    ax.set_yticklabels([f"RPO {fmt_seconds(o.rpo_seconds)}: {o.label.split(' + ')[0]}" + (" (now)" if o.current else "")
                        for o in opts])
    ax.invert_yaxis()
    ax.set_xlabel(f"{currency} per month (storage + requests, all copies)")
    ax.grid(axis="y", visible=False)
    ax.set_title(f"Cost per RPO: {d.name}", loc="left")
    return _png(fig)


def all_charts(report: RequirementsReport) -> dict[str, bytes]:
    """Every chart of the report by file name (without the ones with nothing to draw)."""
    out: dict[str, bytes | None] = {
        "sizes.png": sizes_chart(report),
        "rpo.png": target_chart(report, "RPO"),
        "rto.png": target_chart(report, "RTO"),
        "storage.png": storage_chart(report),
    }
    for d in report.databases:
        out[f"growth-{d.name}.png"] = growth_chart(d)
        out[f"rows-{d.name}.png"] = rows_chart(d)
        out[f"cost-{d.name}.png"] = cost_chart(d, report.prices.currency)
    return {k: v for k, v in out.items() if v is not None}
