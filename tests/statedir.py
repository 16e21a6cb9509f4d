"""Where tests keep worker state that a venv task user must traverse: /var/tmp, since pytest's
tmp_path sits under a 0700 directory. A Nix build sandbox has no /var/tmp; it runs unprivileged,
so tasks run as the same user and the temporary directory serves."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def state_root() -> Path:
    var_tmp = Path("/var/tmp")
    if var_tmp.is_dir() and os.access(var_tmp, os.W_OK | os.X_OK):
        return var_tmp
    return Path(tempfile.gettempdir())
