"""Shared fixtures. Worker state for end-to-end tests lives under /var/tmp (the venv executor's
task user must traverse it); whatever a test created there is removed even when it failed.

Only the directories this pytest process made (e2e.STATE_DIRS) are removed: a glob of /var/tmp
would also take those of another test run on the same machine, under its running workers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from e2e import STATE_DIRS


@pytest.fixture(autouse=True)
def _remove_e2e_state_dirs() -> Iterator[None]:
    before = len(STATE_DIRS)
    yield
    for d in STATE_DIRS[before:]:
        shutil.rmtree(d, ignore_errors=True)
    del STATE_DIRS[before:]
