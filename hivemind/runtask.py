"""`hivemind-worker run-task PATH`: run one task directory or zip through the daemon's executors,
print its output live, and write the result archive next to it. For task authors."""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import shutil
import sys
import time
import uuid
import zipfile
from pathlib import Path

from hivemind.archive import ArchiveRules
from hivemind.config import Config, load_config, parse_config
from hivemind.errors import StartupError
from hivemind.executors.base import ExitReason, Limits, OutputLine
from hivemind.executors.select import select_executor
from hivemind.logging_setup import setup_logging
from hivemind.output import TaskOutput
from hivemind.runner import RunnerPaths, RunnerResult, TaskRunner

GIB = 1024 ** 3


def zip_directory(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.rglob("*")):
            if f.is_file() and not f.is_symlink():
                zf.write(f, f.relative_to(path).as_posix())
    return buf.getvalue()


def _config(args: argparse.Namespace) -> Config:
    from hivemind.devmode import default_dev_state_dir

    cfg = load_config(args.config) if args.config else parse_config(
        {"node": {"state_dir": str(default_dev_state_dir())}, "logging": {"target": "stderr"}})
    if args.executor:
        cfg = dataclasses.replace(cfg, executor=dataclasses.replace(cfg.executor, kind=args.executor))
    return cfg


def run_task_command(args: argparse.Namespace) -> int:
    cfg = _config(args)
    setup_logging(cfg.logging.level, "stderr", cfg.node_id)
    log = logging.getLogger("hivemind")
    src: Path = args.path
    if not src.exists():
        print(f"run-task: {src} does not exist", file=sys.stderr)
        return 2
    archive = zip_directory(src) if src.is_dir() else src.read_bytes()
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"node.state_dir: can't create {cfg.state_dir}: {exc.strerror or exc}") from None
    executor, status = select_executor(cfg, log)
    task_id = f"local-{uuid.uuid4().hex[:12]}"
    task_dir = cfg.state_dir / "run-task" / task_id
    task_dir.mkdir(parents=True, exist_ok=True)
    paths = RunnerPaths(workspace=task_dir / "workspace", output_log=task_dir / "output.log",
                        result_zip=task_dir / "result.zip")
    pc = cfg.executor.podman

    def show(_tid: str, line: OutputLine) -> None:
        stream = sys.stderr if line.stream == "stderr" else sys.stdout
        print(line.text if line.stream != "prepare" else f"(prepare) {line.text}", file=stream, flush=True)

    results: list[RunnerResult] = []
    runner = TaskRunner(
        task_id, executor=executor, paths=paths, archive=archive,
        limits=Limits(cpus=args.cpus, memory_bytes=args.memory_gb * GIB, pids=pc.pids_limit,
                      timeout_s=cfg.executor.task_timeout_s, tmpfs_bytes=pc.tmpfs_mb * 1024 * 1024,
                      network=pc.network == "outbound",
                      output_bytes=cfg.executor.max_output_mb * 1024 * 1024),
        labels={"hivemind.node_id": cfg.node_id}, node_id=cfg.node_id,
        rules=ArchiveRules.from_config(cfg.archive), max_result_bytes=cfg.archive.max_result_mb * 1024 * 1024,
        stop_grace_s=cfg.executor.stop_grace_s, task_timeout_s=cfg.executor.task_timeout_s,
        output=TaskOutput(task_id, paths.output_log, show,
                          max_bytes=cfg.executor.max_output_mb * 1024 * 1024), advance=lambda tid, st: None,
        started=lambda h: None, finished=results.append, logger=log, accepted_at=time.time())
    print(f"running {src} with the {executor.name} executor ({status.reason})", file=sys.stderr)
    runner.start()
    try:
        while not runner.join(0.2):
            pass
    except KeyboardInterrupt:
        runner.request_stop("interrupted")
        runner.join()
    finally:
        close = getattr(executor, "close", None)
        if close is not None:
            close()
    if not results:
        return 1
    res = results[0]
    out: Path = args.out or src.with_name(src.name.removesuffix(".zip") + ".result.zip")
    shutil.copyfile(res.result_zip, out)
    shutil.rmtree(task_dir, ignore_errors=True)
    e = res.exit
    print(f"task ended: {e.reason.value}, exit code {e.exit_code}; result written to {out}"
          + (" (truncated at the result cap)" if res.truncated else ""), file=sys.stderr)
    return 0 if e.reason == ExitReason.EXITED and e.exit_code == 0 else 1
