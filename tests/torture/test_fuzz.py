"""Bad input, fuzzed with hypothesis: policy files, CLI arguments, and stored manifests, segments and
generation bases (mutated bytes of a real plain and encrypted repository, and, in the plain one, mutated
contents re-sealed with the repository's own checksum key, as anyone with bucket write access can).

Every run ends in success, or in one "dbre: ..." line with a non-zero exit code (2 for bad input) — never
a traceback, never "unexpected error", never a change to the repository or the target, and a restore that
succeeds gives exactly the state the intact repository gives. Examples are derandomized (CI is stable);
the counts are modest so the file stays under a minute.
"""

# test-group: heavy

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbre.repository.repo import Repository
from tests.dbfactory import CliResult, assert_same_db, tree_hashes
from tests.replication import make_source, start_replicator, stop_replicator

PASSPHRASE = "fuzz-passphrase-not-secret"
EXAMPLES: dict[str, int] = {}  # examples run per fuzzer (printed with -s)


def fuzz(n: int) -> Callable[[Any], Any]:
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


_COMMAND: Any = None


def run(*args: str | Path, env: dict[str, str | None] | None = None) -> CliResult:
    """The CLI in this process (its click command built once), no key in the env unless given."""
    global _COMMAND
    from typer.testing import CliRunner

    from dbre.cli import app

    if _COMMAND is None:
        _COMMAND = typer.main.get_command(app)
    built = typer.testing._get_command
    typer.testing._get_command = lambda app: _COMMAND  # type: ignore[assignment]
    try:
        r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True,
                               env={"DBRE_ENCRYPTION_KEY": None, "DBRE_KEY_FILE": None, "DBRE_POLICY": None,
                                    **(env or {})})
    finally:
        typer.testing._get_command = built
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a traceback: the test fails showing it
    return CliResult(r.exit_code, r.stdout, r.stderr)


def check_clean(r: CliResult, codes: tuple[int, ...] = (0, 1, 2), *, one_line: bool = True) -> None:
    """No traceback, no "unexpected error", an allowed code; a failure is one "dbre: ..." line (with ``one_line``)."""
    text = r.stdout + r.stderr
    assert "Traceback" not in text, r
    assert "unexpected error" not in r.stderr, r
    assert r.returncode in codes, r
    if r.returncode != 0 and one_line:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("dbre: "), r


# --------------------------------------------------------------------------- the repositories


@dataclass
class Repo:
    path: Path
    key: Path | None
    reference: Path  # the intact repository's default restore (the newest replicated state)
    objects: list[str] = field(default_factory=list)  # manifests, generation bases, segments

    def opts(self) -> list[str | Path]:
        return ["--key-file", self.key] if self.key else []


@dataclass
class World:
    root: Path
    plain: Repo
    encrypted: Repo


def _writes(paths: list[Path], seconds: float) -> None:
    conns = [sqlite3.connect(p, isolation_level=None, timeout=5) for p in paths]
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for c in conns:
                c.execute("INSERT INTO t(pad) VALUES (randomblob(200))")
                c.execute("UPDATE counter SET n = last_insert_rowid()")
            time.sleep(0.02)
    finally:
        for c in conns:
            c.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """A plain and an encrypted repository, each with db ``app`` replicated (a base and segments), then backed up."""
    root = tmp_path_factory.mktemp("fuzz")
    key = root / "key"
    key.write_text(PASSPHRASE)
    repos, procs, srcs = {}, [], []
    names = ("plain", "encrypted")
    for name in names:  # two snapshots first, then replication: the newest state is a replicated one
        src = root / f"{name}.db"
        make_source(src, 300)
        srcs.append(src)
        opts = ["--key-file", str(key)] if name == "encrypted" else []
        for _ in range(2):
            assert run("backup", src, "--repo", root / name, "--db", "app", *opts).returncode == 0
            _writes([src], 0.2)
    try:
        for name, src in zip(names, srcs, strict=True):
            env = {"DBRE_ENCRYPTION_KEY": PASSPHRASE} if name == "encrypted" else {}
            procs.append(start_replicator(src, str(root / name), "app", interval="200ms", env=env))
        deadline = time.monotonic() + 60
        while not all(any((root / n / "segments" / "app").glob("*/base")) for n in names):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no generation"
            time.sleep(0.1)
        _writes(srcs, 1.5)
        time.sleep(1.0)
    finally:
        for p in procs:
            code, err = stop_replicator(p)
            assert code == 0, err
    for name, src in zip(names, srcs, strict=True):
        opts = ["--key-file", str(key)] if name == "encrypted" else []
        ref = root / f"{name}-reference.db"
        r = run("restore", "--repo", root / name, "--db", "app", "--to", ref, *opts)
        assert r.returncode == 0, r
        assert_same_db(src, ref)
        objects = sorted(str(p.relative_to(root / name)) for sub in ("snapshots", "segments")
                         for p in (root / name / sub).rglob("*") if p.is_file())
        repos[name] = Repo(root / name, key if name == "encrypted" else None, ref, objects)
    assert any("/base" in o for o in repos["plain"].objects) and any(o.startswith("snapshots/")
                                                                     for o in repos["plain"].objects)
    return World(root, repos["plain"], repos["encrypted"])


# --------------------------------------------------------------------------- policy files


def base_policy(world: World) -> dict[str, Any]:
    return {
        "version": 1,
        "repositories": {"primary": str(world.plain.path), "offsite": []},
        "databases": [{"name": "app", "source": str(world.root / "plain.db"), "tier": "standard", "rpo": "1h",
                       "rto": "1h"}],
        "retention": {"keep_last": 3, "keep_daily": 7, "prune": True},
    }


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.sampled_from(["1h", "0s", "-5m", "1e309", "env:X", "prefect-secret:x", "s3://",
                                             "../x", "/", "\x00", "30d", "1y6m", "Europe/Nowhere", "critical"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_policy(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        how = draw(st.sampled_from(["set", "delete", "add"]))
        if not path:
            doc = draw(JSON) if how == "set" else doc
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        if how == "set":
            parent[path[-1]] = draw(JSON)
        elif how == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(JSON)
    return doc


def test_policy_files(world: World, tmp_path: Path) -> None:
    """Mutated policy structures (as YAML and JSON) and raw text: success, or exit 2 with one line; nothing written."""
    target = tmp_path / "restored.db"
    before = tree_hashes(world.plain.path)
    count = 0

    def attempt(policy: Path) -> None:
        nonlocal count
        count += 1
        r = run("restore", "--repo", world.plain.path, "--db", "app", "--to", target, "--dry-run",
                "--policy", policy)
        check_clean(r, (0, 2))
        assert not target.exists()

    @fuzz(150)
    @given(doc=mutated_policy(base_policy(world)), as_json=st.booleans())
    def structures(doc: Any, as_json: bool) -> None:
        policy = tmp_path / ("p.json" if as_json else "p.yaml")
        policy.write_text(json.dumps(doc) if as_json else yaml.safe_dump(doc))
        attempt(policy)

    @fuzz(80)
    @given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode)
           | st.sampled_from([b"version: 1\nrepositories: {primary: [", b"&a [*a]", b"!!python/object:os.system x",
                              b"a: *undefined", b"\xef\xbb\xbf{}", b"- - - -", b"{" * 50, b"[" * 50]))
    def raw_text(raw: bytes) -> None:
        policy = tmp_path / "raw.yaml"
        policy.write_bytes(raw)
        attempt(policy)

    structures()
    raw_text()
    assert tree_hashes(world.plain.path) == before
    EXAMPLES["policy files"] = count


# --------------------------------------------------------------------------- command-line arguments


def times() -> st.SearchStrategy[str]:
    parts = st.tuples(st.integers(-1, 10000), st.integers(-1, 14), st.integers(-1, 33), st.integers(-1, 25),
                      st.integers(-1, 61), st.integers(-1, 61), st.sampled_from(["", "Z", "+25:00", "+05:30", "-00:00",
                                                                                 ".9999999", "+99", "z", " UTC"]))
    built = parts.map(lambda p: f"{p[0]:04d}-{p[1]:02d}-{p[2]:02d}T{p[3]:02d}:{p[4]:02d}:{p[5]:02d}{p[6]}")
    return built | st.text(max_size=30) | st.sampled_from(["now", "yesterday", "1h", "", " ", "9999-12-31T23:59:59Z",
                                                           "0001-01-01T00:00:00+14:00", "2026-02-30", "1e9"])


def durations() -> st.SearchStrategy[str]:
    return (st.tuples(st.sampled_from(["", "-", "+", "0x", " "]), st.integers(0, 10**30) | st.floats(),
                      st.sampled_from(["", "s", "m", "min", "h", "d", "w", "y", "ms", "1y6m", "µs", "S"]))
            .map(lambda t: f"{t[0]}{t[1]}{t[2]}") | st.text(max_size=12))


def sizes() -> st.SearchStrategy[str]:
    return (st.tuples(st.integers(-5, 10**25) | st.floats(), st.sampled_from(["", "B", "KiB", "GiB", "GB", "TiB",
                                                                              "XiB", "kb", " GiB"]))
            .map(lambda t: f"{t[0]}{t[1]}") | st.text(max_size=12))


def names() -> st.SearchStrategy[str]:
    return st.text(max_size=40) | st.sampled_from(["..", ".", "../app", "/etc", "a/b", "a\x00b", "app ", "-app",
                                                   "x" * 129, "APP", "ápp"])


def sql() -> st.SearchStrategy[str]:
    """Selections and statements: a plan or a read-only query must never write (repair-rows without --apply)."""
    return st.text(max_size=40) | st.sampled_from([
        "1); DELETE FROM t; --", "seq > 5; DROP TABLE t", "seq IN (SELECT seq FROM t)", "1=1", "0", "NULL",
        "seq = (SELECT writefile('x', 'y'))", "DELETE FROM t", "ATTACH 'x' AS y",
        "PRAGMA journal_mode=DELETE", "VACUUM INTO 'x.db'", "SELECT * FROM t; DELETE FROM t", "seq > 0 --",
        "CREATE TABLE z(a)", "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 5) SELECT x FROM c"])


def urls() -> st.SearchStrategy[str]:
    return st.text(max_size=30).filter(lambda s: not s.lower().startswith(("s3:", "http", "libsql", "ws"))) \
        | st.sampled_from(["s3://", "s3:///x", "s3://UPPER/x", "s3://a/../b", "s3://-bad-/x", "s3://x y/z",
                           "file:///x", "ftp://h/x", "~nobody/x", "", "\x00", "gs://b/p", "s3://b\x00/p"])


def test_cli_arguments(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Durations, times (--at), sizes, names (--db), snapshot ids and repository URLs: one line and exit 2 when
    wrong, and never a change to the repository or a file at the target."""
    monkeypatch.chdir(tmp_path)  # a relative repository URL names nothing of the project
    repo, target, live = world.plain.path, tmp_path / "restored.db", world.root / "plain.db"
    before = tree_hashes(repo, live)
    count = 0

    @fuzz(300)
    @given(case=st.one_of(
        times().map(lambda v: ["restore", "--repo", repo, "--db", "app", "--to", target, "--dry-run", "--at", v]),
        times().map(lambda v: ["restore-table", "--repo", repo, "--db", "app", "--live", world.root / "plain.db",
                               "--table", "t", "--at", v]),
        durations().map(lambda v: ["forget", "--repo", repo, "--keep-within", v, "--dry-run"]),
        durations().map(lambda v: ["--retry-lock", v, "snapshots", "--repo", repo]),
        durations().map(lambda v: ["status", "--repo", repo, "--window", v, "--json"]),
        sizes().map(lambda v: ["status", "--repo", repo, "--quota", v, "--json"]),
        names().map(lambda v: ["snapshots", "--repo", repo, "--db", v]),
        names().map(lambda v: ["restore", "--repo", repo, "--db", v, "--to", target, "--dry-run"]),
        names().map(lambda v: ["restore", "--repo", repo, "--db", "app", "--to", target, "--dry-run",
                               "--snapshot", v]),
        urls().map(lambda v: ["snapshots", "--repo", v]),
        urls().map(lambda v: ["verify", "--repo", v]),
        sql().map(lambda v: ["repair-rows", "--repo", repo, "--db", "app", "--live", live, "--table", "t",
                             "--where", v]),
        sql().map(lambda v: ["sql", v, "--repo", repo, "--db", "app", "--format", "json"]),
        st.integers(-(2**70), 2**70).map(lambda v: ["restore", "--repo", repo, "--db", "app", "--to", target,
                                                    "--dry-run", "--txid", str(v)]),
        st.text(max_size=10).map(lambda v: ["export", "--repo", repo, "--db", "app", "--table", "t", "--format", v,
                                            "--out", target]),
    ))
    def one(case: list[Any]) -> None:
        nonlocal count
        count += 1
        r = run(*[a.replace("\x00", "") if isinstance(a, str) else a for a in case])  # argv cannot hold a NUL
        # status exits 1 for an alert it prints (several lines), not an error
        check_clean(r, (0, 1, 2), one_line=not (case[0] == "status" and r.returncode == 1))
        assert not target.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [], "a command created a file or repository"

    one()
    assert tree_hashes(repo, live) == before
    EXAMPLES["command lines"] = count


# --------------------------------------------------------------------------- stored objects


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "cut", "append", "overwrite", "empty"]))
    if how == "empty" or not data:
        return b""
    i = draw(st.integers(0, len(data) - 1))
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
    if how == "cut":
        return data[:i]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    chunk = draw(st.binary(min_size=1, max_size=16))
    return data[:i] + chunk + data[i + len(chunk):]


@st.composite
def json_mutation(draw: st.DrawFn, doc: Any) -> bytes:
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    if draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON)
    return json.dumps(doc).encode()


OUTCOMES: dict[str, int] = {}  # restores after a mutation: "refused" or "restored" (the intact state)


def _restore_check(repo: Repo, target: Path, what: str) -> None:
    r = run("restore", "--repo", repo.path, "--db", "app", "--to", target, *repo.opts())
    check_clean(r, (0, 1, 2))
    OUTCOMES["restored" if r.returncode == 0 else "refused"] = OUTCOMES.get("restored" if r.returncode == 0
                                                                           else "refused", 0) + 1
    if r.returncode == 0:
        if hashlib.sha256(target.read_bytes()).digest() != hashlib.sha256(repo.reference.read_bytes()).digest():
            assert_same_db(repo.reference, target)  # a damaged object restored a different state: {what}
        target.unlink()
    else:
        assert not target.exists() and not list(target.parent.glob("*dbre-restore*")), what


def _other_checks(repo: Repo) -> None:
    r = run("verify", "--repo", repo.path, *repo.opts())
    check_clean(r, (0, 1), one_line=False)  # verify names every damaged object on a line of its own
    r = run("snapshots", "--repo", repo.path, "--json", *repo.opts())
    check_clean(r, (0, 1), one_line=False)


def _mutating(repo: Repo, key: str, new: bytes) -> Iterator[None]:
    """``key`` holds ``new`` inside the block; its bytes and the rest of the repository are as before after it."""
    path = repo.path / key
    old = path.read_bytes()
    path.write_bytes(new)
    try:
        yield
    finally:
        path.write_bytes(old)


def test_stored_objects_byte_mutations(world: World, tmp_path: Path) -> None:
    """Random byte mutations of manifests, generation bases, segments and the config, plain and encrypted: restore,
    verify and snapshots fail in one line (verify: a line per damaged object) or, when the bytes still authenticate,
    restore exactly the intact state."""
    target = tmp_path / "restored.db"
    befores = {r.path: tree_hashes(r.path) for r in (world.plain, world.encrypted)}
    count = 0

    @fuzz(120)
    @given(data=st.data(), encrypted=st.booleans())
    def one(data: st.DataObject, encrypted: bool) -> None:
        nonlocal count
        repo = world.encrypted if encrypted else world.plain
        key = data.draw(st.sampled_from([*repo.objects, "config"]))
        new = data.draw(byte_mutation((repo.path / key).read_bytes()))
        with contextlib.contextmanager(_mutating)(repo, key, new):
            count += 1
            _restore_check(repo, target, key)
            if count % 4 == 0:
                _other_checks(repo)

    one()
    for r in (world.plain, world.encrypted):
        assert tree_hashes(r.path) == befores[r.path]
    assert OUTCOMES.get("refused", 0) > count // 2, OUTCOMES  # the mutations reached what restore reads
    EXAMPLES["byte mutations"] = count


def test_resealed_contents(world: World, tmp_path: Path) -> None:
    """The plain repository's manifests, bases and segment headers mutated inside and sealed again with its
    checksum key (what a bucket writer can do to a plain repository): one line or the intact state, never a
    traceback and never a different database."""
    repo, target = world.plain, tmp_path / "restored.db"
    store = Repository.open(str(repo.path))
    before = tree_hashes(repo.path)
    count = 0

    @fuzz(200)
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        nonlocal count
        key = data.draw(st.sampled_from(repo.objects))
        body = store.sealer.unseal((repo.path / key).read_bytes(), key)
        if key.startswith("snapshots/") or key.endswith("/base"):
            new_body = data.draw(json_mutation(json.loads(body)) | byte_mutation(body))
        else:  # a segment: MAGIC, u32 header length, JSON header, transactions
            (n,) = struct.unpack_from("<I", body, 8)
            head = json.loads(body[12:12 + n])
            new_head = data.draw(json_mutation(head) | byte_mutation(body[12:12 + n]))
            new_body = data.draw(st.sampled_from([
                body[:8] + struct.pack("<I", len(new_head)) + new_head + body[12 + n:],
                body[:12] + new_head + body[12 + n:]]))
        with contextlib.contextmanager(_mutating)(repo, key, store.sealer.seal(new_body, key)):
            count += 1
            _restore_check(repo, target, key)
            if count % 4 == 0:
                _other_checks(repo)

    one()
    assert tree_hashes(repo.path) == before
    EXAMPLES["re-sealed contents"] = count
    print("fuzz examples:", EXAMPLES, "restores after a mutation:", OUTCOMES)


def test_deeply_nested_policy_is_one_line(tmp_path: Path) -> None:
    """A policy nested 5000 deep (what the raw-text fuzzer found): exit 2, one line naming the file."""
    policy = tmp_path / "deep.yaml"
    policy.write_text("[" * 5000)
    r = run("restore", "--repo", tmp_path / "none", "--db", "app", "--to", tmp_path / "x.db", "--dry-run",
            "--policy", policy)
    check_clean(r, (2,))


def test_control_characters_stay_on_one_line(tmp_path: Path) -> None:
    """A policy field named "a\\nb\\rc" (what the structure fuzzer found): the error shows it escaped, on one line."""
    policy = tmp_path / "p.yaml"
    policy.write_text(yaml.safe_dump({"version": 1, "repositories": {"primary": str(tmp_path / "none")},
                                      "databases": [{"name": "app", "source": "x.db", "rpo": "1h", "rto": "1h"}],
                                      "retention": {"keep_last": 1}, "a\nb\rc": 1}))
    r = run("restore", "--repo", tmp_path / "none", "--db", "app", "--to", tmp_path / "x.db", "--dry-run",
            "--policy", policy)
    check_clean(r, (2,))
    assert "a\\nb\\rc" in r.stderr, r
    r = run("snapshots", "--repo", tmp_path / "no\nsuch")
    check_clean(r, (1, 2))
    assert "no\\nsuch" in r.stderr, r


def test_repository_path_with_nul_is_one_line(tmp_path: Path) -> None:
    """What the URL fuzzer found: a NUL in a repository path is bad input (exit 2, one line)."""
    check_clean(run("snapshots", "--repo", str(tmp_path / "a\x00b")), (2,))


@pytest.mark.parametrize("body", [b"", b"[]", b'{"wal": []}', b'{"wal": {"salt": "00", "frame": 1}, "db": 5}'])
def test_damaged_generation_base_is_one_line(world: World, tmp_path: Path, body: bytes) -> None:
    """What the byte fuzzer found: a generation base that unseals but is no base (empty, a list, a WAL position
    that is a list, a field of the wrong type) made restore exit 1 with "unexpected error"; now one line naming it."""
    repo = world.plain
    sealer = Repository.open(str(repo.path)).sealer
    key = next(k for k in repo.objects if k.endswith("/base"))
    with contextlib.contextmanager(_mutating)(repo, key, sealer.seal(body, key)):
        r = run("restore", "--repo", repo.path, "--db", "app", "--to", tmp_path / "r.db")
        check_clean(r, (1,))
        assert "generation base is damaged" in r.stderr and key in r.stderr, r


def test_where_refused_by_the_authorizer_is_one_line(world: World) -> None:
    """What the argument fuzzer found: repair-rows --where "load_extension('x')" is bad input (exit 2, one line),
    and the live database is unchanged (it is: the authorizer refuses the call)."""
    live = world.root / "plain.db"
    before = tree_hashes(live)
    r = run("repair-rows", "--repo", world.plain.path, "--db", "app", "--live", live, "--table", "t",
            "--where", "load_extension('x')")
    assert tree_hashes(live) == before
    check_clean(r, (2,))
