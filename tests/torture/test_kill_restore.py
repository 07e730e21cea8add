"""kill -9 of `dbre restore` at random instants, from a local and an S3 repository, to a path that is
empty, or over an old database with --force (rollback mode, or WAL mode with frames not yet
checkpointed; with and without the safety snapshot). After each kill the target is the old
database (byte for byte in rollback mode; the same content in WAL mode, which the hold checkpoints),
absent if it was absent, or the whole restored snapshot — never anything else; a safety snapshot the
killed run committed holds the old database; the repository verifies and every snapshot restores;
and the next run succeeds at once, leaving no temp file with content beside the target."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.dbfactory import integrity, make_db
from tests.test_crash import rewrite_rows
from tests.torture.harness import Oracle, Tally, Trial, cli, content_digest, full_check, remove_db, rng_for, trials
from tests.torture.launcher import Launcher

PER_REPOSITORY = 6
NEXT_RUN_BOUND = 30.0  # s
VARIANTS = ("absent", "force rollback", "force wal", "force wal --no-safety-snapshot")

# Leaves WAL frames the database file does not have yet: commit, then exit without closing (a
# closing last connection would checkpoint them and delete the -wal).
_LEAVE_FRAMES = ("import os, sqlite3, sys\n"
                 "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                 "c.execute('PRAGMA journal_mode=WAL')\n"
                 "c.execute('UPDATE items SET n = n + 7 WHERE id % 3 = 0')\n"
                 "os._exit(0)\n")


def file_hash(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def leftovers(target: Path) -> dict[str, int]:
    """The restore temp files beside ``target``, with their sizes."""
    return {p.name: p.stat().st_size for p in target.parent.glob(f".{target.name}.dbre-*")}


def old_databases(folder: Path, seed: int) -> dict[str, Path]:
    """One old database per variant, built once and copied over the target before each trial
    (building one, with a process that leaves WAL frames, costs more than a trial)."""
    folder.mkdir()
    out = {}
    for i, variant in enumerate(VARIANTS[1:3]):
        path = make_db(folder / f"{i}.db", mb=0.5, journal="delete" if "rollback" in variant else "wal",
                       seed=seed + i)
        if "wal" in variant:
            subprocess.run([sys.executable, "-c", _LEAVE_FRAMES, str(path)], check=True, timeout=60)
            assert Path(f"{path}-wal").stat().st_size > 0
            Path(f"{path}-shm").unlink(missing_ok=True)  # SQLite rebuilds it from the WAL
        out[variant] = path
    out[VARIANTS[3]] = out[VARIANTS[2]]
    return out


def old_database(target: Path, variant: str, templates: dict[str, Path]) -> None:
    remove_db(target)
    if variant == "absent":
        return
    shutil.copyfile(templates[variant], target)
    if Path(f"{templates[variant]}-wal").exists():
        shutil.copyfile(f"{templates[variant]}-wal", f"{target}-wal")


def test_kill_restore(backend: str, repo_url: Callable[[str], str], launcher: Launcher, tally: Tally,
                      tmp_path: Path) -> None:
    cell = tally.cell("restore", backend)
    rng = rng_for("restore", backend)
    began = time.monotonic()
    src = make_db(tmp_path / "src.db", mb=rng.uniform(2, 3), journal="wal", seed=rng.randrange(1 << 30))
    templates = old_databases(tmp_path / "old", rng.randrange(1 << 30))
    target = tmp_path / "place" / "app.db"
    target.parent.mkdir()
    oracle: Oracle | None = None
    url = ""
    originals: list[str] = []
    estimate = 0.3
    for i in range(trials("restore", backend)):
        if i % PER_REPOSITORY == 0:
            url = repo_url(f"repo-{i}")
            oracle = Oracle(url, tmp_path, cell)
            originals = []
            for _ in range(3):
                rewrite_rows(src, rng.uniform(0.2, 0.6), seed=rng.randrange(1 << 30))
                r = cli("backup", src, "--repo", url, "--db", "app")
                assert r.returncode == 0, r
                (new,) = oracle.ids() - set(originals)
                oracle.expect(new, content_digest(src))
                originals.append(new)
        assert oracle is not None
        variant = rng.choice(VARIANTS)
        snap = rng.choice(originals)
        old_database(target, variant, templates)
        old_digest = content_digest(target, copy=True) if target.exists() else None
        old_bytes = file_hash(target)
        args: list[str | Path] = ["restore", "--repo", url, "--db", "app", "--snapshot", snap, "--to", target]
        if variant.startswith("force"):
            args += ["--force", *variant.split()[2:]]
        trial = Trial("restore", backend, i, rng.uniform(0, 1.3) * estimate, f" ({variant})")
        before = oracle.ids()
        run = launcher.start(args)
        cut = run.kill_after(trial.delay)
        cell.trials += 1
        cell.kills += cut
        cell.finished_first += not cut
        with trial.checking():
            assert cut or run.returncode == 0, run
            now = content_digest(target, copy=True) if target.exists() else None
            if now is None:
                assert old_digest is None, "the old database is gone and nothing replaced it"
            else:
                assert now in (old_digest, oracle.digests[snap]), "the target is neither the old database nor the new"
                if now == old_digest and now != oracle.digests[snap] and variant == "force rollback":
                    assert file_hash(target) == old_bytes, "the old rollback-mode database changed"
            for safety in oracle.ids() - before:  # a safety snapshot of the old database
                assert "--no-safety-snapshot" not in args and old_digest is not None, f"unexpected snapshot {safety}"
                oracle.expect(safety, old_digest)
            oracle.check(only_new=not full_check(backend, i))
            # the next run: the same command (with --force if the killed one placed its file)
            there = content_digest(target, copy=True) if target.exists() else None
            before = oracle.ids()
            again_args = args if there is None or "--force" in args else [*args, "--force", "--no-safety-snapshot"]
            again = launcher.start(again_args)
            assert again.finish(NEXT_RUN_BOUND) == 0, again
            took = time.monotonic() - again.started
            cell.next_run_max_s = max(cell.next_run_max_s, took)
            estimate = 0.7 * estimate + 0.3 * took
            assert integrity(target) == "ok"
            assert content_digest(target, copy=True) == oracle.digests[snap]
            full = {name: size for name, size in leftovers(target).items() if size}
            assert not full, f"temp files with content left beside the target after the next run: {full}"
            for safety in oracle.ids() - before:
                assert there is not None
                oracle.expect(safety, there)
    cell.seconds += time.monotonic() - began
    assert cell.kills >= cell.trials // 3, f"only {cell.kills} of {cell.trials} runs were cut by the kill"
