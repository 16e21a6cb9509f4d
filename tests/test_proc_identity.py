"""A process's identity (pid + start time) read from /proc, as the venv executor and the Podman
service record keep it: the same number psutil gives (records written by either compare equal),
and a zombie or a reused pid is not the process."""

from __future__ import annotations

import os
import subprocess
import time

import psutil

from hivemind.executors.proc import process_start_time, same_process


def test_start_time_is_psutils_create_time() -> None:
    compared = 0
    for pid in psutil.pids():
        try:
            want = psutil.Process(pid).create_time()
        except psutil.Error:
            continue
        got = process_start_time(pid)
        if got is None:      # it ended between the two reads
            continue
        assert abs(got - want) < 1e-6, (pid, got, want)
        compared += 1
    assert compared > 5


def test_same_process_tells_a_live_process_from_a_zombie_a_stranger_and_a_gone_one() -> None:
    assert same_process(os.getpid(), psutil.Process().create_time())
    assert not same_process(os.getpid(), psutil.Process().create_time() - 60)   # a reused pid
    child = subprocess.Popen(["sleep", "0"])
    start = process_start_time(child.pid)
    assert start is not None
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not same_process(child.pid, start)
    child.wait()
    assert not same_process(child.pid, start)
    assert process_start_time(child.pid) is None
