"""The requirements report and runbook name each database's provider history beside what dbre adds,
and the runbook's "use the provider's history" commands are ones `dbre restore` accepts."""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dbre.report.requirements import analyze
from dbre.report.requirements_docs import write_documents
from dbre.report.requirements_model import RequirementsReport, provider_history
from dbre.repository.manifest import iso
from dbre.repository.repo import Repository
from dbre.sources.local import LocalFileSource
from tests.dbfactory import cli, make_db


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> tuple[RequirementsReport, dict[str, str]]:
    """A report of one local database, plus the same measured as a Turso and a sqld database."""
    tmp = tmp_path_factory.mktemp("provider-report")
    src = make_db(tmp / "shop.db", mb=0.2)
    repo = tmp / "repo"
    assert cli("backup", str(src), "--repo", str(repo), "--db", "shop").returncode == 0
    report = analyze(Repository.open(str(repo)), {"shop": LocalFileSource(str(src))}, measure_restore=False,
                     expectations_dir=None)
    local = report.databases[0]
    report.databases += [
        dataclasses.replace(local, name="cloud", source="libsql://cloud-acme.turso.io",
                            provider=provider_history("libsql://cloud-acme.turso.io")),
        dataclasses.replace(local, name="edge", source="http://10.0.0.5:8080",
                            provider=provider_history("http://10.0.0.5:8080", "tenant-7")),
    ]
    out = tmp / "docs"
    paths = write_documents(report, out)
    return report, {name: Path(p).read_text() for name, p in paths.items() if name.endswith((".md", ".html"))}


def test_provider_of_a_source() -> None:
    assert provider_history(None).provider == "none"
    assert provider_history("/data/app.db").restore is None
    turso = provider_history("libsql://shop-acme.turso.io?tls=1")
    assert turso.provider == "turso" and "90 days (Pro)" in turso.retention and "15 s" in turso.granularity
    assert "--url http://10.0.0.5:8080 " in (provider_history("libsql://u:pw@10.0.0.5:8080?tls=0").restore or "")
    sqld = provider_history("wss://db.example.com", "t1")
    assert sqld.provider == "sqld" and "--enable-bottomless-replication" in sqld.retention
    assert sqld.restore and "--namespace t1 --url https://db.example.com" in sqld.restore


def test_report_lists_provider_guarantees_beside_what_dbre_adds(docs: tuple[RequirementsReport, dict[str, str]]
                                                                 ) -> None:
    _, text = docs
    md = text["report.md"]
    section = md[md.index("## Provider history beside dbre"):md.index("## Recommendations")]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert set(rows) == {"Database", "shop", "cloud", "edge"}
    assert "| none |" in rows["shop"] and "| turso |" in rows["cloud"] and "| sqld |" in rows["edge"]
    assert "24 h (Free), 10 days (Developer), 30 days (Scaler), 90 days (Pro)" in rows["cloud"]
    assert all("a copy outside the provider" in rows[n] and "1 snapshot;" in rows[n] for n in ("shop", "cloud"))
    html = text["report.html"]
    assert html.index("<h2>Provider history beside dbre</h2>") < html.index("<h2>Recommendations</h2>")
    assert "<td><b>cloud</b></td><td>turso</td>" in html


def test_runbook_procedure_commands_are_accepted_by_restore(docs: tuple[RequirementsReport, dict[str, str]],
                                                            tmp_path: Path) -> None:
    _, text = docs
    runbook = text["recovery-runbook.md"]
    scenario = runbook[runbook.index("## Scenario 4: use the provider's history"):runbook.index("## Appendix")]
    commands = re.findall(r"`(dbre restore --provider [^`]+)`", scenario)
    assert len(commands) == 2 and "#### Step 4: compare with dbre's copy" in scenario
    when = iso(datetime.fromtimestamp(time.time() - 60, UTC))
    for i, command in enumerate(commands):
        argv = (command.replace("ADMIN_URL", "http://127.0.0.1:1").replace("TIME", when)
                .replace("FILE", str(tmp_path / f"out{i}.db")).replace("ORG", "acme").replace("DB", "cloud")
                .split()[1:] + ["--dry-run"])
        r = cli(*argv, env={"TURSO_API_TOKEN": None})
        assert r.returncode == 0, (command, r)
        assert r.stdout.startswith("would restore "), r
