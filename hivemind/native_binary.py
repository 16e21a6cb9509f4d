"""Where the worker's compiled helpers (native/) are: an installed `hivemind/_native/` copy (the
Nix package links them there), then a checkout's `native/build/`."""

from __future__ import annotations

import os
from pathlib import Path


def native_binary(name: str) -> Path | None:
    """The executable `name`, or None where it wasn't built (callers have a fallback)."""
    package = Path(__file__).resolve().parent        # hivemind/
    for candidate in (package / "_native" / name, package.parent / "native" / "build" / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None
