"""The status API's token when `status.token_file` is unset: generated once, kept in the state dir.

Task lists and output tails always need a token (any local user can reach a loopback port), so
a worker without a configured one makes its own rather than serving task data to everyone or
nothing to anyone: STATE_DIR/status-token, mode 0600, readable by root and the worker's user,
reused across restarts so an open monitor tab keeps working.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from hivemind.secrets import Secret

TOKEN_FILE = "status-token"


def generated_token(state_dir: Path) -> tuple[Secret, Path]:
    path = state_dir / TOKEN_FILE
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    if not value:
        value = secrets.token_urlsafe(32)
        tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(value + "\n")
        os.replace(tmp, path)
    os.chmod(path, 0o600)
    return Secret(value), path
