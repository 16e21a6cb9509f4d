"""Read secrets from files or systemd credentials, never from the YAML itself.

A secret reference is either an absolute or relative path, or a bare name (no slash) which is
looked up in $CREDENTIALS_DIRECTORY, where systemd's LoadCredential= puts it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from hivemind.errors import SecretError


class Secret:
    """A string that refuses to show itself in repr/str, so it can't slip into a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)


def resolve_secret_path(ref: str, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if "/" not in ref and env.get("CREDENTIALS_DIRECTORY"):
        return Path(env["CREDENTIALS_DIRECTORY"]) / ref
    return Path(ref)


def read_secret(key: str, ref: str, environ: Mapping[str, str] | None = None) -> Secret:
    """Read the secret named by `ref`; `key` is the config key, used only in error messages."""
    path = resolve_secret_path(ref, environ)
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise SecretError([f"{key}: secret file {str(path)!r} does not exist; create it or fix the path"]) from None
    except PermissionError:
        raise SecretError([f"{key}: secret file {str(path)!r} is not readable by uid {os.getuid()}; fix its owner or mode"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError([f"{key}: secret file {str(path)!r} can't be read ({type(exc).__name__})"]) from None
    if not value:
        raise SecretError([f"{key}: secret file {str(path)!r} is empty"])
    return Secret(value)
