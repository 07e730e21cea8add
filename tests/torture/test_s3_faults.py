"""Storage faults (issue 11): dbre's commands as real processes against a real S3 server (moto_server)
through tests/faultproxy.py, which resets connections (before a request reaches the server, and after:
the PUT happened, its answer is lost), answers 500, 503 SlowDown and 429 without forwarding, delays
answers and cuts bodies short, at ~8% of requests, seeded.

For every run: exit 0, or a non-zero exit with exactly one "dbre: ..." line and no traceback (a
warning that a lock could not be removed may precede it), within `RUN_BOUND` seconds. The bound comes
from the retry budget: each store operation is tried by `RetryingStore` at most 5 times (sleeps
0.1-1.6 s between), each try is botocore's 3 attempts (its backoff up to 2 and 4 s), and no try
starts more than `RetryingStore.budget` (120 s) after the first; an injected delay is at most 1 s.
Against a store that fails everything one operation gives up after 15-25 s; a failed run spends that
on the failing operation and again on removing each lock it holds (a copy holds two: ~65 s measured).

After the faulty phase, with the proxy off: `verify --read-data` is clean, every snapshot listed
restores to the content recorded when it was taken, every commit the replicator reported shipped
restores, and every object listed in either repository reads whole.

The CI part: 8% of requests (DBRE_S3_FAULT_RATE), 6 backups. --runslow adds 30% and the failing-store
runs of every command; DBRE_TORTURE_TRIALS scales the rounds, DBRE_TORTURE_SEED picks another fault
plan. The figures (runs, faults per kind and operation, failures with their line, data lost, the
longest run) are printed and added to the torture tally.
"""

# test-group: heavy

from __future__ import annotations

import http.client
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from dbre.repository.repo import Repository
from tests.dbfactory import change_rows, make_db
from tests.faultproxy import FaultPlan, FaultProxy
from tests.replication import make_source, read_log, restored_seq, start_writer, wait_for_generation
from tests.test_crash import rewrite_rows
from tests.torture.harness import CI_TOTAL, SEED, TRIALS, Oracle, Tally, cli, content_digest, remove_db, verify_clean
from tests.torture.launcher import Launcher, Run
from tests.torture.test_kill_replicate import shipped_txids

RATE = float(os.environ.get("DBRE_S3_FAULT_RATE", "0.08"))  # of requests that get a fault
RUN_BOUND = 90.0  # s: the longest any run may take (see the module docstring)
SCALE = max(1.0, TRIALS / CI_TOTAL)
BACKUPS = round(4 * SCALE)  # backups before the prune (each through the faults)
WRITE_SECONDS = 4.0 * min(SCALE, 5)
BASE_ROWS = 200


STALE_LOCK = re.compile(r"^lock locks/[0-9a-f]+: could not remove it \(.*\); it goes stale in ")


@dataclass
class Figures:
    runs: int = 0
    succeeded: int = 0
    failed: list[str] = field(default_factory=list)  # "command: its one line"
    longest: tuple[float, str] = (0.0, "")
    data_lost: int = 0

    def lines(self, proxy: FaultProxy, rate: float) -> list[str]:
        out = [f"storage faults (seed {SEED}, {rate:.0%} of requests): {self.runs} runs, {self.succeeded} succeeded, "
               f"{len(self.failed)} failed with one line, data lost {self.data_lost}, "
               f"longest run {self.longest[0]:.1f} s ({self.longest[1]})"]
        out += [f"  failed: {line}" for line in self.failed]
        out += proxy.log.lines()
        return out


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's moto_server (faults off until a test sets its plan)."""
    p = FaultProxy(moto_server)
    try:
        yield p
    finally:
        p.stop()


def through(launcher: Launcher, proxy: FaultProxy, argv: list[Any]) -> Run:
    return launcher.start([str(a) for a in argv], env={"AWS_ENDPOINT_URL": proxy.endpoint})


def judge(run: Run, figures: Figures, bound: float = RUN_BOUND) -> int:
    """The run's exit code, once it ended: 0, or non-zero with one "dbre: ..." line and no traceback."""
    code = run.finish(bound)
    name = " ".join(run.argv[:1])
    figures.runs += 1
    figures.longest = max(figures.longest, (run.seconds, name))
    err, out = run.err(), run.out()
    assert "Traceback" not in err and "Traceback" not in out, f"{name} printed a traceback: {run}"
    if code == 0:
        figures.succeeded += 1
        return 0
    lines = [line for line in err.splitlines() if line.strip()]
    # the one warning a failed run may print before its line: a lock it could not remove (it goes stale)
    warnings = [line for line in lines if STALE_LOCK.search(line)]
    errors = [line for line in lines if line not in warnings]
    assert len(errors) == 1 and errors[0].startswith("dbre: "), f"{name} failed without one 'dbre:' line: {run}"
    figures.failed.append(f"{name} (exit {code}): {errors[0]}" + (f" [+ {len(warnings)} stale-lock warning]"
                                                                   if warnings else ""))
    return code


def readable(url: str) -> int:
    """Every object listed in the repository reads whole (a listed object that fails to read is half-written)."""
    repo = Repository.open(url)
    n = 0
    for key in repo.store.list(""):
        repo.store.get(key)
        n += 1
    return n


@pytest.mark.parametrize("rate", [RATE, pytest.param(0.3, marks=pytest.mark.slow)], ids=lambda r: f"{r:.0%}")
def test_s3_faults(rate: float, launcher: Launcher, proxy: FaultProxy, s3_bucket: str, tally: Tally,
                   tmp_path: Path, request: pytest.FixtureRequest) -> None:
    began = time.monotonic()
    cell = tally.cell(f"storage faults {rate:.0%}", "s3")
    figures = Figures()
    url, offsite = f"s3://{s3_bucket}/repo", f"s3://{s3_bucket}/offsite"
    src = make_db(tmp_path / "main.db", mb=1.5, journal="delete", seed=SEED % 1000)
    oracle = Oracle(url, tmp_path, cell)
    proxy.plan = FaultPlan.uniform(rate, f"{SEED}:s3-faults:{rate}", max_delay=1.0)
    made: list[str] = []  # the backups' snapshots, oldest first
    copied = Oracle(offsite, tmp_path, cell)
    try:
        # 1. backups, incremental, under churn (so later ones repack sparse packs: prune compacts)
        for i in range(BACKUPS + 2):
            rewrite_rows(src, 0.3, seed=SEED + i)
            digest, before = content_digest(src), oracle.ids()
            code = judge(through(launcher, proxy, ["backup", src, "--repo", url, "--db", "main"]), figures)
            new = oracle.ids() - before
            assert len(new) == (1 if code == 0 else len(new)) and len(new) <= 1, f"backup {i}: new snapshots {new}"
            for snap in new:  # a failed run may still have committed its manifest: then it must be whole
                oracle.expect(snap, digest)
                made.append(snap)

        # 2. replicate: a writer commits while the replicator ships through the faults
        app, log = tmp_path / "app.db", tmp_path / "writer.log"
        make_source(app, BASE_ROWS)
        writer = start_writer(app, log, WRITE_SECONDS, start_seq=BASE_ROWS, pause=0.01, ckpt_every=150)
        rep = through(launcher, proxy, ["replicate", app, "--repo", url, "--db", "app", "--interval", "200ms"])
        try:
            assert writer.wait(timeout=60) == 0
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
            rep_code = rep.terminate(RUN_BOUND) if rep.running() else rep.finish(1)
        # terminate() waited: judge() only checks what it printed
        reported = max([0, *shipped_txids(rep)])
        assert judge(rep, figures) == rep_code
        commits, _ = read_log(log)
        check_replicated(url, tmp_path / "app-restored.db", reported, commits[-1].seq if rep_code == 0 else None)

        # 3. copy to an offsite repository (S3 to S3, both through the proxy)
        code = judge(through(launcher, proxy, ["copy", "--repo", url, "--to", offsite]), figures)
        if copied.exists():
            there = copied.ids()
            assert code != 0 or there >= oracle.ids(), f"copy succeeded but the offsite lacks {oracle.ids() - there}"
            copied.digests = {k: v for k, v in oracle.digests.items() if k in there}

        # 4. forget --prune: keep the 2 newest of each database, delete the rest's packs
        code = judge(through(launcher, proxy, ["forget", "--repo", url, "--keep-last", "2", "--prune",
                                               "--grace", "0"]), figures)
        listed = oracle.ids()
        keep = made[-2:]
        assert set(keep) <= listed, f"forget removed a snapshot it had to keep: {set(keep) - listed}"
        oracle.gone = set(oracle.digests) - listed
        assert code != 0 or len([s for s in listed if s in oracle.digests]) == 2

        # 5. restore every snapshot through the faults: the recorded content, or one line and no file
        out = tmp_path / "restored.db"
        for snap in sorted(set(oracle.digests) - oracle.gone):
            remove_db(out)
            code = judge(through(launcher, proxy, ["restore", "--repo", url, "--db", "main", "--snapshot", snap,
                                                   "--to", out]), figures)
            if code == 0:
                if content_digest(out) != oracle.digests[snap]:
                    figures.data_lost += 1
                    raise AssertionError(f"snapshot {snap} restored through the faults to other content")
                cell.snapshots_restored += 1
            else:
                assert not out.exists(), f"a failed restore left {out}"
        remove_db(out)
    finally:
        proxy.plan.enabled = False
        cell.seconds += time.monotonic() - began
        cell.trials += figures.runs
        cell.finished_first += figures.succeeded
        cell.data_lost += figures.data_lost
        cell.next_run_max_s = max(cell.next_run_max_s, figures.longest[0])
        report = figures.lines(proxy, rate)
        print("\n" + "\n".join(report))
        request.node.user_properties.append(("storage_faults", report))

    # 6. the faults off: both repositories verify, every snapshot restores, every object reads whole
    oracle.check()
    if copied.exists():
        copied.check()
        readable(offsite)
    assert readable(url) > 0
    assert sum(proxy.log.faults.values()) > 0.5 * rate * sum(proxy.log.requests.values()), "too few faults"
    assert {"reset_before", "reset_after", "truncate"} <= set(proxy.log.faults), proxy.log.faults
    assert figures.data_lost == 0


def check_replicated(url: str, out: Path, reported: int, last_seq: int | None) -> None:
    """Every commit up to the reported txid restores (the faults are off); ``last_seq``: the replicator
    exited 0 on SIGTERM after the writer stopped ("ships what is committed"), so every commit restores
    as the newest state (a base taken late may hold them all, with no segment reported)."""
    top = 0
    if reported:
        remove_db(out)
        r = cli("restore", "--repo", url, "--db", "app", "--txid", str(reported), "--to", out)
        assert r.returncode == 0, r
        count, top, n = restored_seq(out)
        assert count == top == n, f"txid {reported}: not one consistent state ({count}, {top}, {n})"
    if not reported and last_seq is None:
        return
    remove_db(out)
    r = cli("restore", "--repo", url, "--db", "app", "--to", out)
    assert r.returncode == 0, r
    newest = restored_seq(out)
    assert newest[0] == newest[1] == newest[2] >= top, f"the newest state {newest} is before the shipped {top}"
    if last_seq is not None:
        assert newest[1] == last_seq, f"replicate exited 0 but restores seq {newest[1]}, last commit {last_seq}"
    remove_db(out)


# --------------------------------------------------------------------------- a lost answer to a conditional put


@pytest.mark.parametrize("path", ["/snapshots/", "/locks/"])
def test_backup_conditional_put_answer_lost(path: str, launcher: Launcher, proxy: FaultProxy, s3_bucket: str,
                                            tmp_path: Path) -> None:
    """The manifest's (or the lock's) conditional put reaches the server and its answer is lost; botocore
    retries inside and meets its own object (412): the backup still succeeds, one snapshot, whole."""
    url = f"s3://{s3_bucket}/repo"
    src = make_db(tmp_path / "main.db", mb=0.5, journal="delete")
    assert cli("init", "--repo", url).returncode == 0
    proxy.plan = FaultPlan({"reset_after": 1.0}, ops=frozenset({"PutObject(If-None-Match)"}), paths=(path,), limit=1)
    figures = Figures()
    assert judge(through(launcher, proxy, ["backup", src, "--repo", url, "--db", "main"]), figures) == 0, \
        figures.failed
    assert proxy.log.faults["reset_after"] == 1, proxy.log.lines()
    proxy.plan.enabled = False
    oracle = Oracle(url, tmp_path, Tally().cell("x", "s3"))
    (snap,) = oracle.ids()
    oracle.expect(snap, content_digest(src))
    oracle.check()


# a segment's key holds "<gen>/<first txid>-<last txid>-...": "-0000000000" is in no base, lease or lock key
@pytest.mark.parametrize("path", ["/base", "/leases/", "-0000000000"])
def test_replicate_conditional_put_answer_lost(path: str, launcher: Launcher, proxy: FaultProxy, s3_bucket: str,
                                               tmp_path: Path) -> None:
    """The same for replicate's conditional puts: a generation's base, its lease, a segment. The
    replicator goes on (no false "another replicator" conflict) and ships every commit."""
    url = f"s3://{s3_bucket}/repo"
    app, log = tmp_path / "app.db", tmp_path / "writer.log"
    make_source(app, BASE_ROWS)
    assert cli("init", "--repo", url).returncode == 0
    proxy.plan = FaultPlan({"reset_after": 1.0}, ops=frozenset({"PutObject(If-None-Match)"}), paths=(path,), limit=1)
    rep = through(launcher, proxy, ["replicate", app, "--repo", url, "--db", "app", "--interval", "200ms"])
    writer = None
    try:
        wait_for_generation(url, timeout=30)  # the commits come after the base: segments ship them
        writer = start_writer(app, log, 2.0, start_seq=BASE_ROWS, pause=0.01)
        assert writer.wait(timeout=60) == 0
        commits, _ = read_log(log)
        deadline = time.monotonic() + 20  # SIGTERM ships the rest; one segment must have gone before it
        while rep.running() and time.monotonic() < deadline and not shipped_txids(rep):
            time.sleep(0.1)
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
            writer.wait()
        code = rep.terminate(RUN_BOUND) if rep.running() else rep.finish(1)
    assert code == 0, rep
    assert proxy.log.faults["reset_after"] == 1, proxy.log.lines()
    check_replicated(url, tmp_path / "restored.db", max([0, *shipped_txids(rep)]), commits[-1].seq)


# a run against a store that answers 503 SlowDown to everything (from the start, or after its first
# MIDWAY requests, about half of what it makes here): its argv (REPO, OFFSITE, SNAP, DB, OUT filled in)
FAILING = {
    "backup": ["backup", "DB", "--repo", "REPO", "--db", "main"],
    "restore": ["restore", "--repo", "REPO", "--db", "main", "--snapshot", "SNAP", "--to", "OUT"],
    "copy": ["copy", "--repo", "REPO", "--to", "OFFSITE"],
    "forget --prune": ["forget", "--repo", "REPO", "--keep-last", "1", "--prune", "--grace", "0"],
    "replicate": ["replicate", "DB", "--repo", "REPO", "--db", "app", "--interval", "200ms"],
    "verify": ["verify", "--repo", "REPO", "--read-data"],
}
MIDWAY = {"backup": 12, "restore": 7, "copy": 25, "forget --prune": 15, "replicate": 10, "verify": 7}


@pytest.mark.parametrize("command,after", [
    pytest.param(c, after, id=f"{c}-{'midway' if after else 'start'}",
                 marks=[] if (c, bool(after)) == ("backup", True) else pytest.mark.slow)
    for c in FAILING for after in (0, MIDWAY[c])])
def test_failing_store_one_line_within_the_budget(command: str, after: int, launcher: Launcher, proxy: FaultProxy,
                                                  s3_bucket: str, tmp_path: Path) -> None:
    """A store that answers 503 SlowDown to everything (from the start or midway): the run gives up with
    one line naming the cause, within the retry budget; no snapshot appears or goes, no restore target
    is left; with the store back the same run succeeds at once (no stale lock) and verify is clean."""
    url, offsite = f"s3://{s3_bucket}/repo", f"s3://{s3_bucket}/offsite"
    src = make_db(tmp_path / "main.db", mb=0.2, journal="wal" if command == "replicate" else "delete")
    for i in range(2):
        change_rows(src, seed=i)
        assert cli("backup", src, "--repo", url, "--db", "main").returncode == 0
    assert cli("copy", "--repo", url, "--to", offsite).returncode == 0
    change_rows(src, seed=3)
    if command == "copy":  # one snapshot the offsite lacks, for the copy to fail midway
        assert cli("backup", src, "--repo", url, "--db", "main").returncode == 0
    before = dict(_objects(url))
    oracle, copied = Oracle(url, tmp_path, Tally().cell("x", "s3")), Oracle(offsite, tmp_path, Tally().cell("x", "s3"))
    snaps, copies = oracle.ids(), copied.ids()
    fill = {"REPO": url, "OFFSITE": offsite, "SNAP": sorted(snaps)[0], "DB": str(src), "OUT": str(tmp_path / "out.db")}
    argv = [fill.get(a, a) for a in FAILING[command]]
    proxy.plan = FaultPlan({"status_503": 1.0}, after=after)
    figures = Figures()
    run = through(launcher, proxy, argv)
    if command == "replicate" and after:
        time.sleep(1.0)  # started: the faults begin midway, a replicator must give up in the budget too
    code = judge(run, figures)
    print(f"\n{command} (faults after {after} requests): exit {code} after {run.seconds:.1f} s: {figures.failed}")
    print("\n".join(f"  {op} {path} {kind or ''}" for op, path, kind in proxy.log.trace[max(0, after - 3):after + 4]))
    # the cause named: SlowDown, or 503 where the failing request was a HEAD (a HEAD's answer has no body to
    # carry the code; which request meets the first fault moves whenever a run's request sequence does)
    assert code != 0 and ("SlowDown" in figures.failed[0] or "server busy or failing (503" in figures.failed[0]), \
        figures.failed
    assert run.seconds < RUN_BOUND, run.seconds
    proxy.plan.enabled = False
    assert oracle.ids() == snaps and copied.ids() == copies, "a failed run added or removed a snapshot"
    assert not (tmp_path / "out.db").exists(), "a failed restore left its target"
    if not after:
        assert _objects(url) == before, "a run that could not read the config changed the repository"
    if command != "replicate":
        again = through(launcher, proxy, argv)
        assert again.finish(RUN_BOUND) == 0, again
        assert again.seconds < 15, f"the next run took {again.seconds:.1f} s: {again}"
    verify_clean(url)
    verify_clean(offsite)


def _objects(url: str) -> dict[str, bytes]:
    repo = Repository.open(url)
    return {key: repo.store.get(key) for key in repo.store.list("")}


@pytest.mark.slow
def test_failed_lock_write_names_its_cause(launcher: Launcher, proxy: FaultProxy, s3_bucket: str,
                                           tmp_path: Path) -> None:
    """The lock's HEAD after its PUT fails (503), and so does the delete that cleans it up: the backup's
    one line names the HEAD ("stat locks/..."), the cause, not the cleanup."""
    url = f"s3://{s3_bucket}/repo"
    src = make_db(tmp_path / "main.db", mb=0.2, journal="delete")
    assert cli("init", "--repo", url).returncode == 0
    proxy.plan = FaultPlan({"status_503": 1.0}, ops=frozenset({"HeadObject", "DeleteObject"}), paths=("/locks/",))
    figures = Figures()
    assert judge(through(launcher, proxy, ["backup", src, "--repo", url, "--db", "main"]), figures) != 0
    assert "stat locks/" in figures.failed[0], figures.failed


# --------------------------------------------------------------------------- the proxy itself


def test_proxy_forwards_what_the_client_sent(proxy: FaultProxy, s3_bucket: str, s3_client: Any) -> None:
    """On one kept-alive connection: a chunked PUT, an aws-chunked PUT (botocore's streaming framing,
    decoded by the server), a PUT with Expect: 100-continue arrive as sent; a HEAD and a GET after them
    answer right; a
    truncated answer keeps its Content-Length and is cut (the client sees an incomplete read)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("PUT", f"/{s3_bucket}/chunked", body=iter([b"abc", b"defg"]), encode_chunked=True)
        assert _status(conn) == 200
        framed = b"5;chunk-signature=00\r\nhello\r\n6;chunk-signature=00\r\n world\r\n0;chunk-signature=00\r\n\r\n"
        conn.request("PUT", f"/{s3_bucket}/aws-chunked", body=framed, headers={
            "Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": "11",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"})
        assert _status(conn) == 200
        conn.request("PUT", f"/{s3_bucket}/expect", body=b"x" * 70000, headers={"Expect": "100-continue"})
        assert _status(conn) == 200  # http.client skips the proxy's 100 Continue
    finally:
        conn.close()
    # signed requests through the proxy: a HEAD's Content-Length is the object's, and no body follows
    through_proxy = boto3.session.Session().client("s3", endpoint_url=proxy.endpoint)
    assert through_proxy.head_object(Bucket=s3_bucket, Key="expect")["ContentLength"] == 70000
    assert through_proxy.get_object(Bucket=s3_bucket, Key="chunked")["Body"].read() == b"abcdefg"
    got = {k: s3_client.get_object(Bucket=s3_bucket, Key=k)["Body"].read()
           for k in ("chunked", "aws-chunked", "expect")}
    assert got == {"chunked": b"abcdefg", "aws-chunked": b"hello world", "expect": b"x" * 70000}
    assert proxy.log.framing["chunked"] == 1 and proxy.log.framing["content-length+aws-chunked+streaming"] == 1
    proxy.plan = FaultPlan({"truncate": 1.0}, ops=frozenset({"GetObject"}))
    answer = through_proxy.get_object(Bucket=s3_bucket, Key="expect")
    assert answer["ContentLength"] == 70000
    with pytest.raises(botocore.exceptions.HTTPClientError):  # ResponseStreamingError: an incomplete read
        answer["Body"].read()
    assert proxy.log.faults["truncate"] == 1


def _status(conn: http.client.HTTPConnection) -> int:
    resp = conn.getresponse()
    resp.read()
    return resp.status


def test_cut_object_lock_answer_is_retried(launcher: Launcher, proxy: FaultProxy, s3_bucket: str,
                                           tmp_path: Path) -> None:
    """The answer to GetObjectLockConfiguration (a 404 ObjectLockConfigurationNotFoundError on a bucket
    without Object Lock) is cut short once: the backup still succeeds."""
    url = f"s3://{s3_bucket}/repo"
    src = make_db(tmp_path / "main.db", mb=0.2, journal="delete")
    assert cli("init", "--repo", url).returncode == 0
    proxy.plan = FaultPlan({"truncate": 1.0}, ops=frozenset({"GetObjectLockConfiguration"}), limit=1)
    figures = Figures()
    code = judge(through(launcher, proxy, ["backup", src, "--repo", url, "--db", "main"]), figures)
    assert proxy.log.faults["truncate"] == 1, proxy.log.lines()
    assert code == 0, figures.failed
