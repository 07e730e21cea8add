"""One dbre backup or restore in a child process, so its peak RSS is measured on its own.

The parent (``run_child``) starts ``python -m benchmarks.worker ...`` and reaps it with
``os.wait4``, which returns that child's own rusage (ru_maxrss, KiB on Linux). The child times
only the engine call (not the interpreter's start-up) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _backup(args: argparse.Namespace) -> dict[str, Any]:
    from dbre.repository.backup import backup
    from dbre.repository.repo import Repository
    from dbre.sources.local import LocalFileSource

    repo = Repository.open_or_init(args.repo)
    source = LocalFileSource(args.source)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    started = time.perf_counter()
    # (the updated twin is the same database at another path: a moved source, accepted)
    result = backup(repo, source, args.db, checksums=args.checksums, accept_new_source=True)
    seconds = time.perf_counter() - started
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.profile_lines)
        Path(args.profile).write_text(out.getvalue())
    return {"seconds": seconds, "bytes_added": result.bytes_added, "pages_added": result.pages_added,
            "pages": result.manifest.page_count, "snapshot": result.manifest.id}


def _restore(args: argparse.Namespace) -> dict[str, Any]:
    from dbre.repository.repo import Repository
    from dbre.restore.full import apply_restore, plan_restore

    repo = Repository.open(args.repo)
    started = time.perf_counter()
    plan = plan_restore(repo, args.db, args.to)
    result = apply_restore(repo, plan)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes_read": plan.bytes_to_read, "size": plan.manifest.size,
            "snapshot": plan.manifest.id, "apply_seconds": result.seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("backup")
    b.add_argument("--repo", required=True)
    b.add_argument("--source", required=True)
    b.add_argument("--db", required=True)
    b.add_argument("--checksums", action="store_const", const=True, default=False)
    b.add_argument("--default-checksums", dest="checksums", action="store_const", const=None,
                   help="dbre's default: table checksums up to 256 MiB")
    b.add_argument("--profile")
    b.add_argument("--profile-lines", type=int, default=25)
    r = sub.add_parser("restore")
    r.add_argument("--repo", required=True)
    r.add_argument("--db", required=True)
    r.add_argument("--to", required=True)
    args = p.parse_args(argv)
    out = _backup(args) if args.cmd == "backup" else _restore(args)
    out["hwm_bytes"] = _high_water_mark()
    print(json.dumps(out))
    return 0


def _high_water_mark() -> int | None:
    """This process's peak RSS since its exec (VmHWM). The rusage ``wait4`` gives also counts the
    parent's resident pages the child had between fork and exec: a large parent (a test run)
    would be measured instead of the worker."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _env() -> dict[str, str]:
    """The environment with this checkout first on the path, whatever the current directory."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_child(args: list[str]) -> dict[str, Any]:
    """Run the worker with ``args``; its JSON plus ``rss_bytes`` (peak RSS) and ``wall`` seconds."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", *args], stdout=out, stderr=err,
                                env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {' '.join(args[:1])} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    # the child's own peak when it could read it, else rusage's (KiB on Linux; see _high_water_mark)
    result["rss_bytes"] = result.get("hwm_bytes") or usage.ru_maxrss * 1024
    result["wall"] = wall
    return result


if __name__ == "__main__":
    sys.exit(main())
