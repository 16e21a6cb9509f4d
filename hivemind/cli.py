"""Command line: `hivemind-worker run | check-config | dev | submit | run-task`.

Exit codes (also in README):
  0  success
  1  runtime failure (the daemon stopped on an error, a task failed in run-task, submit failed)
  2  usage, configuration or environment error (nothing was started: a bad key, a state
     directory that can't be created, a port already taken)
  3  no executor usable on this machine (run, dev, run-task, probe)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hivemind import __version__
from hivemind.config import DEFAULT_CONFIG_PATH, check_daemon_config, describe_defaults, load_config
from hivemind.errors import ConfigError, ExecutorUnavailable, HivemindError, StartupError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_NO_EXECUTOR = 3


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH,
                   help=f"YAML configuration file (default: {DEFAULT_CONFIG_PATH})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hivemind-worker",
        description="Compute node of a HiveMind node pool.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage/config/environment error, 3 no usable executor.",
    )
    parser.add_argument("--version", action="version", version=f"hivemind-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="run the worker daemon",
                           description="Run the worker daemon (systemd Type=notify aware).")
    _add_config_arg(p_run)

    p_check = sub.add_parser("check-config", help="validate a configuration file and exit",
                             description="Validate the configuration and the secret files it names; "
                                         "exit 0 when valid, 2 with one line per problem otherwise.")
    _add_config_arg(p_check)
    p_check.add_argument("--defaults", action="store_true",
                         help="print every key with its default and doc instead")

    p_dev = sub.add_parser("dev", help="run a worker together with a local development pool",
                           description="Start an in-process development node pool on loopback and a "
                                       "worker registered with it; with --demo, submit a sample task.")
    p_dev.add_argument("--state-dir", default="",
                       help="state directory (default: /var/lib/hivemind-worker-dev as root, else ~/.local/state/hivemind-worker-dev)")
    p_dev.add_argument("--executor", default="auto", choices=("auto", "podman", "venv"))
    p_dev.add_argument("--pool-listen", default="127.0.0.1:50051", help="dev pool address")
    p_dev.add_argument("--worker-host", default="127.0.0.2", help="loopback address the worker binds and advertises")
    p_dev.add_argument("--worker-port", type=int, default=50052)
    p_dev.add_argument("--status-port", type=int, default=8080)
    p_dev.add_argument("--pool-only", action="store_true", help="start only the development pool")
    p_dev.add_argument("--demo", action="store_true", help="submit the bundled sample task, print its output and exit")
    p_dev.add_argument("--config", default="", help="worker config to start from (dev overrides pool and ports)")
    p_dev.add_argument("--protocol", default="2026-04", choices=("2026-04", "2025-10"),
                       help="pool protocol generation the development pool and the worker speak")
    p_dev.add_argument("--token-ttl", type=float, default=3600.0,
                       help="lifetime in seconds of the development pool's login tokens (renewal tests)")

    p_submit = sub.add_parser("submit", help="upload a task to a pool and follow it",
                              description="Upload a task directory or zip, print its output live, save the result zip.")
    p_submit.add_argument("path", type=Path)
    p_submit.add_argument("--pool", default="127.0.0.1:50051", help="pool address host:port")
    p_submit.add_argument("--user", default="dev")
    p_submit.add_argument("--password-file", default="", help="file holding the password (default: the dev pool's)")
    p_submit.add_argument("--memory-gb", type=int, default=1)
    p_submit.add_argument("--cpu-score", type=int, default=0)
    p_submit.add_argument("--out", type=Path, default=None, help="where to save the result zip")
    p_submit.add_argument("--timeout", type=float, default=3600.0)
    p_submit.add_argument("--protocol", default="2026-04", choices=("2026-04", "2025-10"),
                          help="protocol generation the pool speaks")

    p_rt = sub.add_parser("run-task", help="run one task locally through the worker's executors",
                          description="Run a task directory or zip through the same executors the daemon "
                                      "uses, print its output live and write the result zip next to it.")
    p_rt.add_argument("path", type=Path)
    p_rt.add_argument("--config", "-c", default="", help="worker config (default: built-in defaults)")
    p_rt.add_argument("--executor", default="", choices=("", "auto", "podman", "venv"))
    p_rt.add_argument("--memory-gb", type=int, default=1)
    p_rt.add_argument("--cpus", type=float, default=1.0)
    p_rt.add_argument("--out", type=Path, default=None)

    p_probe = sub.add_parser("probe", help="check that an executor can run tasks on this machine",
                             description="Probe one executor the way the daemon does at start (Podman: a "
                                         "container with exactly the task options); exit 0 when usable, "
                                         "3 with the reason otherwise.")
    p_probe.add_argument("--config", "-c", default="", help="worker config (default: built-in defaults)")
    p_probe.add_argument("--executor", default="podman", choices=("podman", "venv"))
    p_probe.add_argument("--mode", default="", help="Podman mode to probe (default: the config's)")
    return parser


def _print_problems(err: ConfigError) -> None:
    print("hivemind-worker: invalid configuration:", file=sys.stderr)
    for problem in err.problems:
        print(f"  - {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    # gRPC's fork handlers only log noise here: children are always exec'd (subprocess), never
    # plain-forked (a loaded Go runtime would hang in such a child anyway).
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            if args.defaults:
                sys.stdout.write(describe_defaults())
                return EXIT_OK
            checked = load_config(args.config)
            check_daemon_config(checked)
            print(f"{args.config}: OK (pool protocol {checked.pool.protocol})")
            return EXIT_OK
        if args.command == "run":
            cfg = load_config(args.config)
            check_daemon_config(cfg)
            from hivemind.daemon import run_daemon

            return run_daemon(cfg, config_path=args.config)
        if args.command == "dev":
            from hivemind.devmode import run_dev

            return run_dev(args)
        if args.command == "submit":
            from hivemind.devmode import run_submit

            return run_submit(args)
        if args.command == "run-task":
            from hivemind.runtask import run_task_command

            return run_task_command(args)
        if args.command == "probe":
            from hivemind.probe import run_probe_command

            return run_probe_command(args)
    except ConfigError as err:
        _print_problems(err)
        return EXIT_CONFIG
    except ExecutorUnavailable as err:
        print(f"hivemind-worker: {err}", file=sys.stderr)
        return EXIT_NO_EXECUTOR
    except StartupError as err:
        print(f"hivemind-worker: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except HivemindError as err:
        print(f"hivemind-worker: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as err:
        # Last resort: an unexpected I/O failure still ends in one line, not a traceback.
        where = f": {err.filename}" if err.filename else ""
        print(f"hivemind-worker: {err.strerror or err}{where}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
