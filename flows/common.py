"""What every flow shares: the policy and its overrides, and the artifacts a run publishes."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from dbre.errors import DbreError, UsageError
from dbre.policy import Policy, check_base_url, load_policy

POLICY_ENV = "DBRE_POLICY"


def load(policy: str | None) -> Policy | None:
    """The policy a flow parameter names, else the file in $DBRE_POLICY, else none."""
    path = policy or os.environ.get(POLICY_ENV)
    return load_policy(path) if path else None


@dataclass
class Repos:
    """The repositories a run uses: parameters override the policy."""

    primary: str
    offsite: list[str] = field(default_factory=list)
    key: str | None = None


def repos(policy: Policy | None, repo: str | None = None, offsite: Sequence[str] | None = None,
          key: str | None = None) -> Repos:
    """Primary and offsite repositories and the key reference, from parameters, then the policy."""
    if repo is None and policy is None:
        raise UsageError("no repository given", f"pass the repo parameter, or a policy (parameter or ${POLICY_ENV})")
    pr = policy.repositories if policy else None
    return Repos(
        primary=repo or (pr.primary if pr else ""),
        offsite=list(offsite) if offsite is not None else (list(pr.offsite) if pr else []),
        key=key or (pr.encryption_key if pr else None),
    )


# -- artifacts -----------------------------------------------------------------------------------


def artifact_key(*parts: str) -> str:
    """A key Prefect accepts (lowercase letters, digits, dashes): the UI keeps one history per key."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")[:100]


REPORTS_DIR_ENV = "DBRE_REPORTS_DIR"
REPORTS_URL_ENV = "DBRE_REPORTS_URL"
MARKDOWN_LIMIT = 60_000  # characters of one markdown artifact: the UI stays quick, the rest is in the files


@dataclass(frozen=True)
class ReportSite:
    """Where this worker writes reports (``root``, absolute), why there, and the http(s) URL serving it."""

    root: Path
    base_url: str | None = None
    origin: str = "the default location"

    def url(self, path: str | os.PathLike[str]) -> str | None:
        """``base_url`` + the path below ``root``; None when not served or the path lies elsewhere."""
        if not self.base_url:
            return None
        try:
            rel = Path(os.path.abspath(path)).relative_to(self.root)
        except ValueError:
            return None
        return self.base_url + "/" + quote(rel.as_posix())


def reports_site(policy: Policy | None) -> ReportSite:
    """The reports folder: $DBRE_REPORTS_DIR, else the policy's reports.dir, else the worker's data dir
    (``$XDG_DATA_HOME/dbre/reports``, ``~/.local/share/dbre/reports``); its URL: $DBRE_REPORTS_URL, else
    the policy's reports.base_url."""
    conf = policy.reports if policy else None
    url = os.environ.get(REPORTS_URL_ENV, "").strip() or (conf.base_url if conf else None)
    if url:
        try:
            url = check_base_url(url)
        except ValueError as err:
            raise UsageError(f"${REPORTS_URL_ENV}: {err}", "set it to the http(s) URL that serves the reports folder") \
                from None
    env_dir = os.environ.get(REPORTS_DIR_ENV, "").strip()
    if env_dir:
        root = Path(env_dir).expanduser()
        if not root.is_absolute():
            raise UsageError(f"${REPORTS_DIR_ENV}: must be an absolute path, not {env_dir!r}",
                             "set it to an absolute folder, or unset it")
        return ReportSite(Path(os.path.normpath(root)), url, f"${REPORTS_DIR_ENV}")
    if conf and conf.dir:
        return ReportSite(Path(os.path.normpath(conf.dir)), url, "the policy's reports.dir")
    data = os.environ.get("XDG_DATA_HOME", "").strip()
    base = Path(data) if data and Path(data).is_absolute() else Path.home() / ".local" / "share"
    return ReportSite(base / "dbre" / "reports", url, "the default location (no reports.dir in the policy)")


def report_folder(site: ReportSite, given: str | None, sub: str) -> Path:
    """The absolute folder a flow writes into: the ``given`` parameter, else ``site.root / sub``."""
    return Path(os.path.abspath(Path(given).expanduser())) if given else site.root / sub


def where(location: str | os.PathLike[str], text: str, site: ReportSite | None = None) -> str:
    """A location as markdown: a link when it is http(s) or served by ``site``, else text naming the host
    (a file:// link opens nothing from a browser, and means another machine when the worker is remote)."""
    loc = str(location)
    url = loc if loc.startswith(("http://", "https://")) else site.url(loc) if site and "://" not in loc else None
    if url:
        return f"[{text}]({url.replace(' ', '%20').replace('(', '%28').replace(')', '%29')})"
    if "://" in loc:
        return f"{text}: `{loc}`"
    return f"{text}: `{os.path.abspath(Path(loc).expanduser())}` on host `{socket.gethostname()}`"


def truncate(markdown: str, limit: int, rest: str = "") -> str:
    """``markdown`` cut to ``limit`` characters at a line end, with a note saying so (and where ``rest`` is)."""
    if len(markdown) <= limit:
        return markdown
    cut = markdown.rfind("\n", 0, limit)
    cut = cut if cut > limit // 2 else limit
    note = f"*Truncated here: {len(markdown) - cut:,} more characters" + (f" in {rest}" if rest else "") + ".*"
    return markdown[:cut].rstrip() + "\n\n" + note + "\n"


def publish(key: str, markdown: str, table: list[dict[str, Any]] | None = None,
            links: Sequence[tuple[str, str]] = (), description: str | None = None,
            site: ReportSite | None = None) -> None:
    """Publish a run's artifacts under one key per flow and database: the markdown summary (with the
    ``links`` (location, text) in it: links when http(s), else where they are) and the table."""
    if links:
        markdown = markdown.rstrip() + "\n\n" + "\n".join(f"- {where(loc, text, site)}" for loc, text in links)
    create_markdown_artifact(truncate(markdown, MARKDOWN_LIMIT), key=artifact_key(key, "summary"),
                             description=description)
    if table:
        create_table_artifact(table, key=artifact_key(key, "table"), description=description)


def failures(failed: Sequence[tuple[str, Any]], todo: Sequence[str]) -> list[str]:
    """A summary's failures, for whoever is called at night: each failed step with its error, then what to do
    (the summary names them even though the table artifact has them too: a failure must not need a second look)."""
    if not failed:
        return []
    return ["## Failed", "", *[f"- **{what}**: {str(err).replace(chr(10), ' ')}" for what, err in failed], "",
            "What to do:", "", *[f"{i}. {step}" for i, step in enumerate(todo, 1)], ""]


def md_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table of ``rows`` with ``columns`` (missing values as '-')."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    return str(v).replace("|", "\\|").replace("\n", " ")


# -- outcomes ------------------------------------------------------------------------------------


class RunFailed(DbreError):
    """Some steps of a flow run failed; the message names each (the artifacts have the details)."""


def outcome(state: Any) -> tuple[bool, Any]:
    """(True, result) for a completed task state, (False, 'ExceptionType: message') for a failed one."""
    if state.is_completed():
        return True, state.result()
    exc = state.result(raise_on_failure=False)
    if isinstance(exc, BaseException):
        return False, str(exc) or type(exc).__name__
    return False, state.message or state.name


def check_known(names: list[str], pol: Policy | None, primary: str, key: str | None, what: str) -> None:
    """Names typed into a run's form that neither the policy lists nor the repository holds: refused before
    any work (a typo must not complete having done nothing, nor run a repository-wide prune having forgotten
    nothing)."""
    from tasks.backup import known_databases

    listed = {d.name for d in pol.databases} if pol is not None else set()
    unknown = [n for n in names if n not in listed]
    if not unknown:
        return
    held = known_databases(primary, key)
    unknown = [n for n in unknown if n not in held]
    if unknown:
        choices = sorted(listed | set(held))
        raise UsageError(f"{what}: no database {unknown[0]!r} in the policy or in {primary}",
                         "choose one of " + ", ".join(choices) if choices else "the repository holds no database yet")


def refused(err: DbreError) -> Any:
    """A run refused before any work (a form's value that cannot be used): one line in its log, no traceback,
    and the Failed state the flow returns, with that line as its message."""
    from prefect import get_run_logger
    from prefect.states import Failed

    get_run_logger().error("%s", err)
    return Failed(message=str(err))
