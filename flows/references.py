"""Key and token flow parameters: references to a secret (a Secret block, ``secret:NAME``, ``env:NAME``), never one.

A run's parameters are stored with it and shown on its Parameters tab, so a passphrase typed into a
form would be kept for anyone to read. The parameter types here let through references only:
- the JSON schema (what the UI draws the form from, and what the server checks a run's parameters
  against before storing them, ``enforce_parameter_schema``) allows a Secret block document, or a
  string matching ``SECRET_REF_PATTERN``; the UI refuses anything else before it submits;
- in Python, a value that is no reference is replaced by ``REFUSED`` at once (its text is dropped,
  so no pydantic message, log or traceback can repeat it), also in the parameters stored with a run
  started from Python (``store_references_only``), and the flow's first step,
  ``refuse_literal_secrets``, fails the run with one line and a failure artifact saying what to do.
A ``secret:NAME`` reference is read as ``prefect-secret:NAME`` (the policy file's spelling).
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, TypeVar

from prefect import Flow
from prefect.blocks.system import Secret as SecretBlock
from pydantic import Field, PlainValidator, StringConstraints

from dbre.errors import UsageError
from dbre.policy import BLOCK_REF, ENV_REF

SECRET_REF_PATTERN = r"^(env:[A-Za-z_][A-Za-z0-9_]*|(prefect-)?secret:[a-z0-9][a-z0-9-]*)$"
SECRET_PARAMETERS = ("key", "token")
REFUSED = "refused:a-literal-secret"  # what a value that is no reference becomes; the value is gone
HOW = ("give a reference: secret:NAME (a Prefect Secret block; create one under Blocks > Secret) or env:NAME "
       "(an environment variable of the worker)")


def as_reference(value: Any) -> str | None:
    """The reference ``value`` is, spelled as the policy file does; ``REFUSED`` for anything else."""
    if value is None or value == "":
        return None
    if isinstance(value, SecretBlock):  # a Secret block document chosen in the form
        name = value._block_document_name  # (None: an unsaved block, holding a literal)
        return f"prefect-secret:{name}" if name and BLOCK_REF.match(f"prefect-secret:{name}") else REFUSED
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("secret:"):
            text = "prefect-" + text
        if ENV_REF.match(text) or BLOCK_REF.match(text) or text == REFUSED:
            return text
    return REFUSED


_REFERENCE = Annotated[str, StringConstraints(pattern=SECRET_REF_PATTERN), Field(title="secret:NAME or env:NAME")]

KeyRef = Annotated[str | None, PlainValidator(as_reference, json_schema_input_type=SecretBlock | _REFERENCE | None)]
"""A key or token parameter: a Secret block document, or secret:NAME / env:NAME (see the module docstring).

Its form field offers those two and None (the form fills an untouched field with its default, None)."""
TokenRef = KeyRef


F = TypeVar("F", bound=Flow[Any, Any])


def store_references_only(fl: F) -> F:
    """Decorate a flow (above ``@flow``) so that a run started from Python stores its key and token parameters
    as references: Prefect stores a run's parameters before it validates them, so a literal would be kept."""
    names = [p for p in SECRET_PARAMETERS if p in inspect.signature(fl.fn).parameters]
    serialize = fl.serialize_parameters

    def references_only(parameters: dict[str, Any]) -> dict[str, Any]:
        return serialize({k: as_reference(v) if k in names else v for k, v in parameters.items()})

    fl.serialize_parameters = references_only  # type: ignore[method-assign]
    return fl


def refuse_literal_secrets(flow: str, **params: str | None) -> None:
    """Fail the run (one line, and a failure artifact) when a key or token parameter was no reference.

    Call it first in a flow, before any work; the message names the parameter, never its value."""
    bad = [name for name, value in params.items() if value == REFUSED]
    if not bad:
        return
    from flows.common import publish

    names = " and ".join(bad)
    message = f"{flow}: the {names} parameter{'s are' if len(bad) > 1 else ' is'} not a reference to a secret"
    publish(f"{flow}-refused", "\n".join([
        f"# {flow} refused: {names} is not a reference", "",
        f"The **{names}** parameter must name where the secret is kept, not hold it: a secret typed into a form "
        "is stored with the run and shown on its Parameters tab. Nothing was read or written.", "",
        "What to do:",
        "1. Put the secret in a Prefect Secret block (Blocks > + > Secret), or in an environment variable of the "
        "worker or serve process.",
        f"2. Start the run again with {names} set to `secret:BLOCK-NAME` or `env:VARIABLE`.",
        "3. If a secret was typed into a run before this check existed, delete that run and rotate the secret.",
    ]), description=f"{flow}: {names} refused")
    raise UsageError(message, HOW)
