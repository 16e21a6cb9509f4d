"""Fault points: inert unless armed from the environment, each action does what it says, and a
typo in the spec is an error (a test must not believe it armed a point it didn't)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from hivemind import faults


def test_unarmed_points_do_nothing() -> None:
    assert "HIVEMIND_FAULTS" not in os.environ
    assert not faults.armed()
    for point in faults.POINTS:
        faults.hit(point, "t1")


def test_parse_names_the_bad_part() -> None:
    armed = faults.parse("result_packed=kill, upload_in_flight@t-9=sleep:1.5,task_exited=error")
    assert armed["result_packed"][0].action == "kill"
    f = armed["upload_in_flight"][0]
    assert (f.action, f.seconds, f.task_id) == ("sleep", 1.5, "t-9")
    with pytest.raises(ValueError, match="unknown point"):
        faults.parse("result_pakced=kill")
    with pytest.raises(ValueError, match="action"):
        faults.parse("result_packed=explode")
    with pytest.raises(ValueError, match="seconds"):
        faults.parse("result_packed=sleep:soon")


def _run(env_spec: str, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if env_spec:
        env[faults.ENV] = env_spec
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)


def test_kill_is_a_sigkill_of_the_process_at_the_point() -> None:
    code = ("from hivemind import faults\n"
            "print('before', flush=True)\n"
            "faults.hit('result_pending', 'other')\n"     # a different task: passes
            "print('other passed', flush=True)\n"
            "faults.hit('result_pending', 'mine')\n"
            "print('after', flush=True)\n")
    p = _run("result_pending@mine=kill", code)
    assert p.returncode == -signal.SIGKILL
    assert p.stdout.split() == ["before", "other", "passed"]
    assert "FAULT result_pending task=mine kill" in p.stderr


def test_error_raises_and_the_same_code_without_the_env_runs_through() -> None:
    code = ("from hivemind import faults\n"
            "try:\n    faults.hit('task_exited', 'x')\nexcept faults.FaultInjected as e:\n"
            "    print('raised', e)\nelse:\n    print('passed')\n")
    assert _run("task_exited=error", code).stdout.startswith("raised fault injected at task_exited")
    assert _run("", code).stdout.strip() == "passed"


def test_a_bad_spec_stops_the_process_at_import() -> None:
    p = _run("no_such_point=kill", "import hivemind.faults")
    assert p.returncode != 0 and "unknown point" in p.stderr
