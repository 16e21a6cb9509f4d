"""`hivemind-worker probe`: ask one executor, in one mode, whether it can run tasks here.

`scripts/setup` ends with it so a missing runtime piece (catatonit, runc, the image) fails the
set-up with the probe's own reason instead of a worker that quietly falls back to the venv."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from hivemind.config import Config, load_config, parse_config
from hivemind.executors.base import ExecutorStatus

# Probe messages that point at a package the host lacks, and the fix to print with them.
_FIXES = (
    ("catatonit", "install Podman's init: apt-get install catatonit"),
    ("executable file `runc`", "install the OCI runtime: apt-get install runc"),
    ("podman is not installed", "apt-get install podman"),
    ("newuidmap", "install the user-namespace helpers: apt-get install uidmap"),
)


def fix_for(reason: str) -> str:
    for needle, fix in _FIXES:
        if needle in reason:
            return fix
    return ""


def _config(args: argparse.Namespace) -> Config:
    from hivemind.devmode import default_dev_state_dir

    cfg = load_config(args.config) if args.config else parse_config(
        {"node": {"state_dir": str(default_dev_state_dir())}, "logging": {"target": "stderr"}})
    if args.mode:
        podman = dataclasses.replace(cfg.executor.podman, mode=args.mode)
        cfg = dataclasses.replace(cfg, executor=dataclasses.replace(cfg.executor, podman=podman))
    return cfg


def describe(kind: str, mode: str, status: ExecutorStatus) -> str:
    where = f"{kind} {mode}".strip()
    if not status.usable:
        fix = fix_for(status.reason)
        return f"{where}: UNUSABLE: {status.reason}" + (f" (fix: {fix})" if fix else "")
    enf = status.enforcement
    limits = ""
    if enf is not None:
        applied = [name for name, on in (("memory", enf.memory), ("cpu", enf.cpu), ("pids", enf.pids)) if on]
        limits = f"; limits enforced: {', '.join(applied) or 'none'}"
    return f"{where}: usable ({status.reason}){limits}"


def run_probe_command(args: argparse.Namespace) -> int:
    from hivemind.executors.select import executor_for

    cfg = _config(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    executor = executor_for(args.executor, cfg, logging.getLogger("hivemind"))
    try:
        status = executor.probe()
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()
    mode = cfg.executor.podman.mode if args.executor == "podman" else ""
    print(describe(args.executor, mode, status), file=sys.stdout if status.usable else sys.stderr)
    return 0 if status.usable else 3
