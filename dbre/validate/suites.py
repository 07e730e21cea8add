"""Great Expectations suites: JSON files in expectations/<db>/<table>.json, run on a restored file.

The suites are plain GX 1.x ExpectationSuite JSON, loaded at run time into an ephemeral GX
context (``ExpectationSuite(**json)``); no gx/ project folder. They run through GX's SQLite
datasource, so every metric is a SQL query inside SQLite (a 10-million-row table is never loaded
into memory), offline, with GX's progress bars off. GX is imported only inside ``run_suites``:
it takes several seconds to import and the CLI must stay fast.

Suite parameters a suite may use (``{"$PARAMETER": name}``), resolved from the snapshot's time so
a freshness expectation means "fresh when the backup was taken", whichever snapshot is restored:
  snapshot_time                 the snapshot time, ISO-8601 text
  snapshot_minus_<N>d / <N>h    that time minus N days / hours, as text "YYYY-MM-DD[ HH:MM:SS]"
  snapshot_minus_<N>d_epoch     ... as Unix seconds; ``_epoch_ms`` as milliseconds
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from dbre.errors import UsageError
from dbre.validate.checks import CheckResult

_PARAM = re.compile(r"^snapshot_minus_(\d+)([dh])(_epoch_ms|_epoch)?$")


@dataclass
class Suite:
    """One GX suite for one table of a database."""

    table: str
    name: str
    data: dict[str, Any]
    path: Path | None = None

    @property
    def expectations(self) -> list[dict[str, Any]]:
        return list(self.data.get("expectations", []))


def suite_file_name(table: str) -> str:
    return urllib.parse.quote(table, safe="") + ".json"


def suites_dir_for(expectations: str | os.PathLike[str], db: str) -> Path:
    """``DIR/<db>`` when it exists (DIR is the expectations/ root), else DIR itself."""
    root = Path(expectations)
    if not root.is_dir():
        raise UsageError(f"expectations folder {root} does not exist",
                         "pass --expectations expectations/ or write suites with `dbre expectations profile`")
    return root / db if (root / db).is_dir() else root


def load_suites(directory: str | os.PathLike[str]) -> list[Suite]:
    """Every ``*.json`` suite in a folder, by file name; UsageError naming a file that is not a suite."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UsageError(f"expectation suite {path}: cannot read it ({err})", "fix or remove the file") from None
        if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
            raise UsageError(f"expectation suite {path}: not a GX suite (no \"expectations\" list)",
                             "write suites with `dbre expectations profile`")
        table = (data.get("meta") or {}).get("dbre", {}).get("table") or urllib.parse.unquote(path.stem)
        out.append(Suite(table=table, name=str(data.get("name") or path.stem), data=data, path=path))
    return out


def suite_parameters(suites: list[Suite], snapshot_time: datetime) -> dict[str, Any]:
    """Values for every ``$PARAMETER`` the suites use; UsageError for a name dbre does not know."""
    names: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if set(obj) == {"$PARAMETER"}:
                names.add(str(obj["$PARAMETER"]))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for s in suites:
        walk(s.expectations)
    out: dict[str, Any] = {}
    for name in sorted(names):
        if name == "snapshot_time":
            out[name] = snapshot_time.isoformat()
            continue
        m = _PARAM.match(name)
        if not m:
            raise UsageError(f"expectation suites use the parameter {name!r}, which dbre cannot fill",
                             "use snapshot_time or snapshot_minus_<N>d / <N>h [_epoch|_epoch_ms]")
        n, unit, epoch = int(m.group(1)), m.group(2), m.group(3)
        t = snapshot_time - (timedelta(days=n) if unit == "d" else timedelta(hours=n))
        if epoch == "_epoch":
            out[name] = int(t.timestamp())
        elif epoch == "_epoch_ms":
            out[name] = int(t.timestamp() * 1000)
        else:
            # text compares as text: a day-precision cutoff is below any time on that day, in any
            # of the usual formats ("2026-11-26", "2026-11-26 10:00:00", "2026-11-26T10:00:00Z")
            out[name] = t.strftime("%Y-%m-%d") if unit == "d" else t.strftime("%Y-%m-%d %H:%M:%S")
    return out


@dataclass
class ExpectationOutcome:
    """The result of one expectation on one table, reduced to what a report shows."""

    suite: str
    table: str
    column: str | None
    expectation: str
    success: bool
    observed: Any = None
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    sample: list[Any] = field(default_factory=list)
    error: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str | None = None

    def to_check(self) -> CheckResult:
        if self.error:
            detail = f"could not run: {self.error}"
        elif self.success:
            detail = "ok"
            if isinstance(self.observed, int | float | str) and not isinstance(self.observed, bool):
                detail = f"ok (observed {self.observed!r})"
        elif self.unexpected_count is not None:
            detail = f"{self.unexpected_count} unexpected values"
            if self.sample:
                detail += " (e.g. " + ", ".join(repr(v) for v in self.sample[:3]) + ")"
        else:
            detail = f"observed {self.observed!r}" + _bounds(self.kwargs)
        return CheckResult(f"gx.{self.expectation}", self.success, self.table, self.column, detail)


def _bounds(kwargs: dict[str, Any]) -> str:
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is None and hi is None:
        return ""
    return f", expected between {lo!r} and {hi!r}"


@dataclass
class SuiteRun:
    """Every expectation outcome of one GX run, GX's own JSON results, and how long it took."""

    outcomes: list[ExpectationOutcome]
    seconds: float
    import_seconds: float
    gx_version: str
    parameters: dict[str, Any] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    data_docs: str | None = None
    context: Any = field(default=None, repr=False, compare=False)  # the GX context, for Data Docs afterwards

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    def checks(self) -> list[CheckResult]:
        return [o.to_check() for o in self.outcomes]

    def summary(self) -> dict[str, Any]:
        return {
            "gx_version": self.gx_version,
            "suites": len({o.suite for o in self.outcomes}),
            "expectations": len(self.outcomes),
            "failed": sum(not o.success for o in self.outcomes),
            "seconds": round(self.seconds, 3),
            "import_seconds": round(self.import_seconds, 3),
            "data_docs": self.data_docs,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary(), "parameters": self.parameters,
                "outcomes": [asdict(o) for o in self.outcomes], "results": self.results}


def _column_of(kwargs: dict[str, Any], meta: dict[str, Any]) -> str | None:
    if kwargs.get("column"):
        return str(kwargs["column"])
    if kwargs.get("column_A") and kwargs.get("column_B"):
        return f"{kwargs['column_A']}, {kwargs['column_B']}"
    if kwargs.get("column_list"):
        return ", ".join(str(c) for c in kwargs["column_list"])
    dbre_meta = meta.get("dbre")
    if not isinstance(dbre_meta, dict):
        dbre_meta = {}
    col = meta.get("column") or dbre_meta.get("column")
    return str(col) if col else None


def _error_of(exception_info: dict[str, Any]) -> str | None:
    if not exception_info:
        return None
    if "raised_exception" in exception_info:
        infos = [exception_info]
    else:
        infos = [v for v in exception_info.values() if isinstance(v, dict)]
    for info in infos:
        if info.get("raised_exception") or info.get("exception_message"):
            msg = str(info.get("exception_message") or "raised an exception")
            return msg.splitlines()[0][:300]
    return None


def _quiet_gx() -> Any:
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    return gx


def run_suites(db_path: str | os.PathLike[str], suites: list[Suite], *, snapshot_time: datetime) -> SuiteRun:
    """Run ``suites`` on the SQLite file at ``db_path``; a missing table fails its suite, named.

    Data Docs are not built here (they take seconds and are not part of validating a restore):
    call ``build_data_docs`` afterwards."""
    t0 = time.perf_counter()
    gx = _quiet_gx()
    from great_expectations.core.expectation_suite import ExpectationSuite
    from great_expectations.data_context.types.base import ProgressBarsConfig

    import_seconds = time.perf_counter() - t0
    params = suite_parameters(suites, snapshot_time)
    path = Path(db_path).absolute()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_sqlite("restored", connection_string=f"sqlite:///{path}")
    tables = _tables(path)
    outcomes: list[ExpectationOutcome] = []
    definitions = []
    by_suite: dict[str, Suite] = {}
    assets: dict[str, Any] = {}
    for i, s in enumerate(suites):
        name = s.name if s.name not in by_suite else f"{s.name}.{i}"
        if s.table not in tables:
            outcomes.append(ExpectationOutcome(name, s.table, None, "table_exists", False,
                                               error=f"table {s.table!r} is not in the restored database"))
            continue
        asset = assets.get(s.table)
        if asset is None:
            asset = assets[s.table] = source.add_table_asset(name=s.table, table_name=s.table)
        batch = asset.add_batch_definition_whole_table(f"suite-{i}")
        try:
            suite = context.suites.add(ExpectationSuite(**{**s.data, "name": name}))
        except Exception as err:  # noqa: BLE001 - GX raises many kinds for a bad suite
            raise UsageError(f"expectation suite {s.path or s.name}: GX rejects it ({err})",
                             "fix the suite file") from None
        by_suite[name] = s
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validate-{i}", data=batch, suite=suite)))
    results: list[dict[str, Any]] = []
    if definitions:
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name="dbre-validate", validation_definitions=definitions, result_format="SUMMARY"))
        try:
            run = checkpoint.run(expectation_parameters=params)
        finally:
            _dispose(source)
        for suite_result in run.run_results.values():
            d = suite_result.to_json_dict()
            results.append(d)
            s = by_suite[d["suite_name"]]
            for r in d["results"]:
                outcomes.append(_outcome(d["suite_name"], s.table, r))
    order = {name: i for i, name in enumerate(by_suite)}
    outcomes.sort(key=lambda o: (order.get(o.suite, -1), o.success, o.column or "", o.expectation))
    return SuiteRun(outcomes, time.perf_counter() - t0, import_seconds, str(gx.__version__), params, results,
                    context=context)


def build_data_docs(run: SuiteRun, out_dir: str | os.PathLike[str]) -> str | None:
    """GX's own Data Docs for a finished run, into ``out_dir``, made self-contained; returns index.html's path
    (None if no run).

    GX's pages load Bootstrap, jQuery, bootstrap-table and Vega from CDNs, and its index builds its tables in
    JavaScript from them: offline (a drill host, a recovery site) the index is empty and the pages unstyled.
    So every page loses its CDN tags and gains a small inline stylesheet, and the index is written again as
    plain HTML (``_offline_docs``): nothing a page shows then needs the internet."""
    if run.context is None or not run.results:
        return None
    docs_dir = Path(out_dir).absolute()
    run.context.add_data_docs_site(site_name="dbre", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    run.context.build_data_docs(site_names=["dbre"])
    _offline_docs(docs_dir, run)
    run.data_docs = str(docs_dir / "index.html")
    return run.data_docs


# A <script src="http..."></script> or <link href="http..."> (stylesheets, fonts): what GX loads from CDNs
_REMOTE_TAG = re.compile(r"<script\b[^>]*\bsrc=[\"']?(?:https?:)?//[^>]*>\s*</script>|"
                         r"<link\b[^>]*\bhref=[\"']?(?:https?:)?//[^>]*>", re.IGNORECASE)
_OFFLINE_CSS = """<style>/* dbre: self-contained Data Docs (GX's CDN styles removed) */
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:1.5rem auto;max-width:1100px;
color:#222;line-height:1.4;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3}
.text-success,.ge-success-icon{color:#2e8540}.text-danger,.ge-failed-icon{color:#c0392b}
.tooltip-text,.cooltip .top{display:none}
img[src*="logo"]{display:none}
nav,footer,.ge-footer{font-size:.85rem;color:#666}
code,pre{background:#f6f6f6;padding:0 .2rem}
.ok{color:#2e8540}.failed{color:#c0392b}
.fa-check-circle::before{content:"\\2714";color:#2e8540}.fa-times::before{content:"\\2718";color:#c0392b}
.fa-times-circle::before{content:"\\2718";color:#c0392b}.fa-exclamation-triangle::before{content:"\\26A0"}
</style>"""


def _offline_docs(docs_dir: Path, run: SuiteRun) -> None:
    """Make the Data Docs under ``docs_dir`` render without the internet: CDN tags out, an inline stylesheet in,
    and a plain-HTML index of the validation results and suites instead of GX's JavaScript-built one."""
    import html

    for page in docs_dir.rglob("*.html"):
        text = _REMOTE_TAG.sub("", page.read_text(encoding="utf-8"))
        text = re.sub(r"</head>", lambda _: _OFFLINE_CSS + "</head>", text, count=1, flags=re.IGNORECASE)
        page.write_text(text, encoding="utf-8")
    failed: dict[str, int] = {}
    total: dict[str, int] = {}
    for o in run.outcomes:
        total[o.suite] = total.get(o.suite, 0) + 1
        failed[o.suite] = failed.get(o.suite, 0) + (not o.success)

    def suite_of(rel: Path, base: str) -> str:  # validations/<suite parts>/<run>/<time>/<batch>.html
        parts = rel.relative_to(base).parts
        return ".".join(parts[:-3] if base == "validations" else (*parts[:-1], Path(parts[-1]).stem))

    rows = []
    for page in sorted(docs_dir.glob("validations/**/*.html")):
        rel = page.relative_to(docs_dir)
        suite = suite_of(rel, "validations")
        n, bad = total.get(suite), failed.get(suite, 0)
        verdict = "-" if n is None else (f'<span class="ok">passed</span> ({n} expectations)' if not bad
                                         else f'<span class="failed">failed</span> ({bad} of {n} expectations)')
        rows.append(f'<tr><td><a href="{html.escape(rel.as_posix())}">{html.escape(suite)}</a></td>'
                    f"<td>{html.escape(rel.parts[-2])}</td><td>{verdict}</td></tr>")
    suites = [f'<li><a href="{html.escape(p.relative_to(docs_dir).as_posix())}">'
              f"{html.escape(suite_of(p.relative_to(docs_dir), 'expectations'))}</a></li>"
              for p in sorted(docs_dir.glob("expectations/**/*.html"))]
    (docs_dir / "index.html").write_text(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Data Docs</title>" + _OFFLINE_CSS + "</head><body>"
        f"<h1>Data Docs</h1><p>Great Expectations {html.escape(run.gx_version)}: what the drill's suites checked "
        "on the restored database. Self-contained: nothing here needs the internet.</p>"
        "<h2>Validation results</h2><table><tr><th>suite</th><th>run</th><th>result</th></tr>"
        + "".join(rows) + "</table><h2>Expectation suites</h2><ul>" + "".join(suites) + "</ul></body></html>",
        encoding="utf-8")


def _outcome(suite: str, table: str, r: dict[str, Any]) -> ExpectationOutcome:
    config = r.get("expectation_config") or {}
    kwargs = {k: v for k, v in (config.get("kwargs") or {}).items() if k != "batch_id"}
    meta = config.get("meta") or {}
    res = r.get("result") or {}
    sample = list(res.get("partial_unexpected_list") or [])[:5]
    return ExpectationOutcome(
        suite=suite,
        table=table,
        column=_column_of(kwargs, meta),
        expectation=str(config.get("type")),
        success=bool(r.get("success")),
        observed=res.get("observed_value"),
        unexpected_count=res.get("unexpected_count"),
        unexpected_percent=res.get("unexpected_percent"),
        sample=sample,
        error=_error_of(r.get("exception_info") or {}),
        kwargs=kwargs,
        description=config.get("description") or (meta.get("dbre") or {}).get("description"),
    )


def _tables(path: Path) -> set[str]:
    from dbre.validate.checks import open_restored

    conn = open_restored(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type IN ('table', 'view')")}
    finally:
        conn.close()


def _dispose(source: Any) -> None:
    """Close GX's SQLAlchemy engine so the scratch file can be removed at once."""
    try:
        source.get_engine().dispose()
    except Exception:  # noqa: BLE001 - best effort: the file is removed either way
        pass
