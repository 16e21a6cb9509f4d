"""Task ids arrive from the network; this is the one gate they pass before naming anything.

A valid id is safe as a path component, a container name suffix, a SQLite key and a log field:
`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`. The leading alphanumeric rules out `.`, `..` and option-like
ids (`-rf`).
"""

from __future__ import annotations

import re

from hivemind.errors import HivemindError

_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHOWN = 40


class InvalidTaskId(HivemindError):
    """A task id breaks the id rule; the message shows a truncated repr of it, never the raw text."""


def validate_task_id(raw: str) -> str:
    """Return `raw` unchanged when it is a valid task id; raise InvalidTaskId otherwise."""
    if isinstance(raw, str) and _TASK_ID.fullmatch(raw):
        return raw
    raise InvalidTaskId(
        f"invalid task id {describe_id(raw)}: must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
    )


def describe_id(raw: object) -> str:
    """A bounded, printable rendering of an untrusted id for error messages."""
    if not isinstance(raw, str):
        return f"<{type(raw).__name__}>"
    if len(raw) <= _SHOWN:
        return repr(raw)
    # repr escapes control characters and newlines, so a hostile id can't forge log lines.
    return f"{raw[:_SHOWN]!r}... ({len(raw)} chars)"
