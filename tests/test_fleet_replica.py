"""A fleet of sqld namespaces read through one embedded replica per namespace (``replica_url``).

sqld addresses a namespace by a header (what /dump uses: a full read every round) or by the first
label of the host (what an embedded replica can use: a round then syncs only what changed). In
production the hostnames come from a wildcard DNS record. This machine has none, so the fleet runs
in a child process in a private mount namespace (``unshare -rm``) whose /etc/hosts maps each
namespace's hostname to 127.0.0.1, as that record would; the child uses the session's Prefect API
server and a real sqld. Nothing here is mocked: the replicas sync from sqld's replication log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from uuid import UUID

import apsw
import pytest
import yaml

from dbre.errors import SourceError, UsageError
from dbre.policy import load_policy
from dbre.repository.repo import Repository
from dbre.restore.full import apply_restore, plan_restore
from dbre.sources.remote import RemoteLibsqlSource
from tests.prefect_fixtures import artifacts_of
from tests.sqld import SqldServer, sqld_namespaces, with_hostnames  # noqa: F401 - the session's sqld

pytestmark = pytest.mark.usefixtures("prefect_harness")

DOMAIN = "dbre-fleet.test"

CHILD = r'''
import json, sys
from flows.fleet import fleet_backup_flow
policy, repo = sys.argv[1], sys.argv[2]
for round_ in ("full", "incremental"):
    state = fleet_backup_flow(policy=policy, repo=repo, max_concurrency=2, concurrency_limit="", return_state=True)
    result = state.result()
    print(json.dumps({"round": round_, "backups": result["backups"], "failed": result.get("failed"),
                      "run": str(state.state_details.flow_run_id)}), flush=True)
    if round_ == "full":
        sys.stdin.readline()  # the test changes the namespaces meanwhile
'''


def _fill(server: SqldServer, ns: str, rows: int) -> None:
    server.create_namespace(ns)
    server.pipeline([
        "CREATE TABLE orders(id INTEGER PRIMARY KEY, total REAL, note TEXT)",
        f"WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows}) "
        "INSERT INTO orders SELECT x, x / 7.0, hex(randomblob(40)) FROM c",
    ], namespace=ns)


def _content(rows: list[list[object]]) -> list[tuple[object, ...]]:
    return [tuple(r) for r in rows]


def test_a_fleet_round_reads_each_namespace_through_its_replica(sqld_namespaces: SqldServer,  # noqa: F811
                                                                tmp_path: Path) -> None:
    server = sqld_namespaces
    port = server.url.rsplit(":", 1)[1]
    names = ["fr-alpha", "fr-beta", "fr-gamma"]
    for i, ns in enumerate(names):
        _fill(server, ns, 1500 + 100 * i)
    repo = tmp_path / "repo"
    policy = tmp_path / "policy.yaml"
    template = f"http://{{namespace}}.{DOMAIN}:{port}"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": str(repo)},
        "databases": [{"name": ns, "source": server.url, "namespace": ns, "replica_url": template,
                       "rpo": "1h", "rto": "15m"} for ns in names],
        "retention": {"keep_last": 5},
    }))
    # fr-gamma's hostname does not resolve: its replica cannot sync, /dump reads it (the fallback)
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "DBRE_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    child = subprocess.Popen(
        with_hostnames([sys.executable, script, policy, repo], "127.0.0.1", [f"{ns}.{DOMAIN}" for ns in names[:2]],
                       tmp_path / "hosts"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None and child.stdin is not None
        first = json.loads(child.stdout.readline() or "null")
        assert first and first["round"] == "full" and not first["failed"], (first, child.stderr.read()[-3000:]
                                                                            if first is None else "")
        replicas = sorted((tmp_path / "cache" / "replicas").glob("*/replica.db"))
        assert len(replicas) == 2, replicas  # one per resolvable namespace
        inodes = {p: p.stat().st_ino for p in replicas}
        for ns in names:
            server.pipeline(["UPDATE orders SET total = total + 1 WHERE id % 50 = 0",
                             "INSERT INTO orders(total, note) VALUES (1.5, 'new')"], namespace=ns)
        child.stdin.write("go\n")
        child.stdin.flush()
        second = json.loads(child.stdout.readline() or "null")
        assert second and second["round"] == "incremental" and not second["failed"], second
        assert child.wait(timeout=120) == 0, child.stderr.read()[-3000:]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # the run's summary says which database was read whole, and why; its table how each was read
    artifacts = artifacts_of(UUID(second["run"]))
    summary = next(a.data for a in artifacts if (a.key or "").endswith("-summary"))
    assert "## Read through /dump instead of the replica" in summary and f"fr-gamma.{DOMAIN}" in summary, summary
    assert "fr-alpha:" not in summary and "fr-beta:" not in summary
    rows = next(json.loads(a.data) for a in artifacts if a.type == "table")
    assert {r["db"]: r["read"] for r in rows} == {"fr-alpha": "replica", "fr-beta": "replica", "fr-gamma": "dump"}
    # the replicas were kept and synced again, not made anew
    assert {p: p.stat().st_ino for p in replicas} == inodes
    r = Repository.open(str(repo))
    for ns in names:
        snaps = sorted(r.snapshots(ns), key=lambda m: m.time)
        assert len(snaps) == 2, ns
        methods = [m.stats.get("source_method") for m in snaps]
        if ns == "fr-gamma":
            assert methods == ["dump", "dump"], methods
            assert f"fr-gamma.{DOMAIN}" in snaps[-1].stats["source_fallback"]
        else:
            assert methods == ["replica", "replica"], methods
        assert snaps[-1].source["namespace"] == ns and snaps[-1].parent == snaps[0].id
        # the newest snapshot is the namespace as it is now
        out = tmp_path / f"{ns}.db"
        apply_restore(r, plan_restore(r, ns, str(out)))
        conn = apsw.Connection(str(out))
        mine = conn.execute("SELECT id, total, note FROM orders ORDER BY id").fetchall()
        conn.close()
        theirs = server.execute("SELECT id, total, note FROM orders ORDER BY id", namespace=ns)
        assert _content(mine) == _content(theirs), ns


def test_replica_url_is_checked_before_anything_runs(tmp_path: Path) -> None:
    """A replica URL sqld would not read the namespace from, or one without a namespace, or carrying
    a token, is refused at once, in one line that says how to write it."""
    with pytest.raises(SourceError, match="does not start with the namespace 'alpha'"):
        RemoteLibsqlSource("http://127.0.0.1:8080", namespace="alpha", replica_url="http://beta.sqld.internal:8080")
    with pytest.raises(SourceError, match="does not start with the namespace"):
        RemoteLibsqlSource("http://127.0.0.1:8080", namespace="alpha", replica_url="http://alpha:8080")
    with pytest.raises(SourceError, match="without a namespace"):
        RemoteLibsqlSource("http://127.0.0.1:8080", replica_url="http://{namespace}.sqld.internal:8080")
    with pytest.raises(SourceError, match="carries a token") as err:
        RemoteLibsqlSource("http://127.0.0.1:8080", namespace="alpha",
                           replica_url="http://{namespace}.sqld.internal:8080?authToken=s3cr3t")
    assert "s3cr3t" not in str(err.value) + err.value.hint
    src = RemoteLibsqlSource("libsql://127.0.0.1:8080?tls=0", namespace="alpha",
                             replica_url="libsql://{namespace}.sqld.internal:8080?tls=0")
    assert src.replica_base == "http://alpha.sqld.internal:8080"
    assert json.loads(src.sync_request())["url"] == "http://alpha.sqld.internal:8080"
    # in a policy: the file, the entry and the fix in one line
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({
        "repositories": {"primary": str(tmp_path / "repo")},
        "databases": [{"name": "alpha", "source": "http://127.0.0.1:8080", "namespace": "alpha",
                       "replica_url": "http://{namespace}x.sqld.internal:8080", "rpo": "1h", "rto": "1h"}],
        "retention": {"keep_last": 3}}))
    with pytest.raises(UsageError) as bad:
        load_policy(policy)
    assert "alphax.sqld.internal" in bad.value.message and "first label" in bad.value.message
