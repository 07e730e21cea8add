"""Numbers a reader can trust (issue 15): Prometheus samples in full precision (a timestamp in 6
significant digits was up to 5,000 s off), and `restore --json`'s replaces_existing as planned (it
said true after every restore: the file was checked after writing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dbre.metrics import compute_status, prometheus_text
from dbre.repository.manifest import parse_time
from dbre.repository.repo import Repository
from tests.dbfactory import cli, make_db


def _sample(text: str, name: str) -> str:
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, text
    return m.group(1)


def test_prometheus_timestamps_and_sizes_are_exact(tmp_path: Path) -> None:
    src, repo = tmp_path / "app.db", str(tmp_path / "repo")
    make_db(src, mb=0.5)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    status = compute_status(Repository.open(repo))
    text = prometheus_text(status)
    stamp = _sample(text, "dbre_status_timestamp_seconds")
    assert float(stamp) == parse_time(status.generated_at).timestamp() and "e+" not in stamp
    size = status.databases[0].size_bytes
    assert size is not None and size > 10**5 and _sample(text, "dbre_database_size_bytes") == str(size)


def test_restore_json_says_whether_it_replaced_a_file(tmp_path: Path) -> None:
    src, repo = tmp_path / "app.db", str(tmp_path / "repo")
    make_db(src, mb=0.2)
    assert cli("backup", src, "--repo", repo, "--db", "app").returncode == 0
    out = tmp_path / "out.db"
    first = cli("restore", "--repo", repo, "--db", "app", "--to", out, "--json")
    assert first.returncode == 0, first
    assert json.loads(first.stdout)["replaces_existing"] is False
    again = cli("restore", "--repo", repo, "--db", "app", "--to", out, "--json", "--force")
    assert again.returncode == 0, again
    assert json.loads(again.stdout)["replaces_existing"] is True
