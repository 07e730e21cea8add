"""What every flow shares: the policy and its overrides, and the artifacts a run publishes."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from dbre.errors import DbreError, UsageError
from dbre.policy import Policy, load_policy

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


def link_for(location: str) -> str:
    """A clickable link for a repository or file: file:// for paths, as-is for URLs."""
    return location if "://" in location else Path(location).expanduser().absolute().as_uri()


def publish(key: str, markdown: str, table: list[dict[str, Any]] | None = None,
            links: Sequence[tuple[str, str]] = (), description: str | None = None) -> None:
    """Publish a run's artifacts: the markdown summary, the table, and links (url, text)."""
    create_markdown_artifact(markdown, key=artifact_key(key, "summary"), description=description)
    if table:
        create_table_artifact(table, key=artifact_key(key, "table"), description=description)
    for url, text in links:
        create_link_artifact(link_for(url), link_text=text, key=artifact_key(key, "link", text),
                             description=description)


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
