"""verify reads every snapshot's fast runs (xxh3 per page) too: a damaged or missing one is named,
as breaking no snapshot (restore never needs it), and restore and the next backup still work."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from dbre.repository.backup import backup
from dbre.repository.repo import Repository, pack_key
from dbre.sources.local import LocalFileSource


def _source(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    con.executemany("INSERT INTO t VALUES (?, ?)", ((i, os.urandom(300)) for i in range(3000)))
    con.commit()
    con.close()
    return path


def _dbre(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dbre.cli", *args], capture_output=True, text=True, timeout=120)


def test_a_damaged_fast_run_is_named_and_breaks_nothing(tmp_path: Path) -> None:
    src = _source(tmp_path / "src.db")
    repo = Repository.open_or_init(str(tmp_path / "repo"))
    m = backup(repo, LocalFileSource(src), "app", checksums=False).manifest
    assert m.fast_runs and all(f.pack not in {r.pack for r in m.runs} or f.offset != r.offset
                               for f in m.fast_runs for r in m.runs)
    ok = _dbre("verify", "--repo", str(tmp_path / "repo"), "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    fast = m.fast_runs[0]
    path = tmp_path / "repo" / pack_key(fast.pack)
    raw = bytearray(path.read_bytes())
    raw[fast.offset + fast.length // 2] ^= 0x40  # one flipped bit inside the fast run's sealed blob
    os.chmod(path, 0o644)
    path.write_bytes(bytes(raw))

    bad = _dbre("verify", "--repo", str(tmp_path / "repo"), "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    report = json.loads(bad.stdout)
    assert report["damaged_snapshots"] == []  # restore does not need it
    details = [p["detail"] for p in report["problems"]]
    assert any("cannot read fast run" in d and "no restore needs it" in d for d in details), details

    out = tmp_path / "restored.db"
    r = _dbre("restore", "--repo", str(tmp_path / "repo"), "--db", "app", "--to", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    with sqlite3.connect(out) as a, sqlite3.connect(src) as b:
        assert a.execute("SELECT sum(length(v)), count(*) FROM t").fetchone() == \
            b.execute("SELECT sum(length(v)), count(*) FROM t").fetchone()
    nxt = backup(repo, LocalFileSource(src), "app", checksums=False)  # reads every page again, succeeds
    assert nxt.manifest.parent == m.id and nxt.pages_added == 0
