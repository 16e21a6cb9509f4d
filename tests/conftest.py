"""Shared fixtures. Worker state for end-to-end tests lives under /var/tmp (the venv executor's
task user must traverse it); whatever a test created there is removed even when it failed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from statedir import state_root

STATE_ROOT = state_root()
PATTERN = "hivemind-e2e-*"


@pytest.fixture(autouse=True)
def _remove_e2e_state_dirs() -> Iterator[None]:
    before = set(STATE_ROOT.glob(PATTERN))
    yield
    for d in set(STATE_ROOT.glob(PATTERN)) - before:
        shutil.rmtree(d, ignore_errors=True)
