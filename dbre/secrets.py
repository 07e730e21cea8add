"""A string type for keys and tokens that never shows its value in logs, reprs or tracebacks."""

from __future__ import annotations


class Secret:
    """Holds a secret value; ``str``/``repr`` print ``**redacted**``, ``reveal()`` returns it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        self._value = value

    def reveal(self) -> str | bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**redacted**')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> str | tuple[object, ...]:  # never pickle a secret into a result store
        raise TypeError("a Secret cannot be pickled")


def edge_spaces(secret: Secret) -> bool:
    """Whether the passphrase begins or ends with white space: a --key-file is read stripped, so such a
    passphrase could never be given that way (refused where one is set: a new repository, `key passwd`)."""
    raw = secret.reveal()
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return text != text.strip()
