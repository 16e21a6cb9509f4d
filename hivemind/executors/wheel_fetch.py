"""The two pip steps of a task's requirements: fetch wheels (network), install them (no network).

    parse (requirements.py) ──> fetch: pip download --only-binary=:all: ──> install: pip install
      refuse options/paths/URLs    wheels only: no build backend,            --no-index --find-links
                                   no setup.py, nothing of the archive runs   WHEELS, in a namespace
                                   index and proxy from the worker's config   with no network

Why the split: pip executes code only when it builds a distribution (PEP 517 backends,
setup.py). `--only-binary=:all:` makes pip refuse every sdist, so the step that has network runs
only pip itself, on a requirements file the worker wrote (validated specifiers, no options).
The step that puts packages in place has no network at all. pip's own configuration is used
only when `index_url` is empty (the host's default index, chosen by whoever administers the
host); otherwise pip runs `--isolated` with the configured index and proxy and nothing else.

Everything here builds argument lists and environments; running them is the executor's job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hivemind.config import RequirementsConfig

HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# pip reads these from the environment; passed to the fetch step only when the host's own pip
# configuration is in use (index_url empty), never credentials-like variables beyond pip's.
_PIP_ENV_PASSTHROUGH = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT",
                        "PIP_DEFAULT_TIMEOUT", "PIP_PROXY", "PIP_TRUSTED_HOST", "PIP_RETRIES")
_COMMON = ("--no-input", "--disable-pip-version-check", "--progress-bar", "off")


@dataclass(frozen=True)
class TargetTags:
    """The interpreter wheels are fetched for when pip doesn't run under it (a container image)."""

    python_version: str                # "3.11"
    implementation: str                # "cp"
    abis: tuple[str, ...]              # ("cp311", "abi3", "none")
    platforms: tuple[str, ...]         # ("manylinux_2_36_x86_64", ..., "linux_x86_64")

    def pip_args(self) -> list[str]:
        args = ["--python-version", self.python_version, "--implementation", self.implementation]
        for abi in self.abis:
            args += ["--abi", abi]
        for plat in self.platforms:
            args += ["--platform", plat]
        return args


# Run under the target interpreter (`python3 -c`): its supported tags, as pip computes them.
TAGS_PROBE = (
    "import json, sys\n"
    "from pip._vendor.packaging import tags\n"
    "ts = list(tags.sys_tags())\n"
    "print(json.dumps({'python_version': '%d.%d' % sys.version_info[:2],"
    " 'implementation': tags.interpreter_name(),"
    " 'abis': sorted({t.abi for t in ts}), 'platforms': sorted({t.platform for t in ts} - {'any'})}))\n")


def parse_tags(text: str) -> TargetTags:
    import json

    d = json.loads(text.strip().splitlines()[-1])
    return TargetTags(str(d["python_version"]), str(d["implementation"]),
                      tuple(str(a) for a in d["abis"]), tuple(str(p) for p in d["platforms"]))


def index_args(cfg: RequirementsConfig, ca_bundle: str | None = HOST_CA_BUNDLE) -> list[str]:
    """Where pip fetches from: the configured index (isolated from pip.conf and PIP_*), or the
    host's pip configuration when none is configured."""
    args: list[str] = []
    if cfg.index_url:
        args += ["--isolated", "--index-url", cfg.index_url]
        if ca_bundle and os.path.isfile(ca_bundle):
            args += ["--cert", ca_bundle]
    return args


def download_argv(pip: list[str], requirements_file: Path, dest: Path, cfg: RequirementsConfig,
                  target: TargetTags | None = None, proxy: str = "{proxy}") -> list[str]:
    """`pip download` of wheels only: pip refuses any sdist, so no build backend ever runs.
    `proxy`: where pip sends every request; by default the placeholder the fetch relay fills
    in (its way to the worker's filtering proxy, which forwards to `cfg.proxy` if set)."""
    return [*pip, "download", *_COMMON, "--only-binary=:all:", "--dest", str(dest),
            *index_args(cfg), "--proxy", proxy, *(target.pip_args() if target else []),
            "-r", str(requirements_file)]


def install_argv(pip: list[str], requirements_file: Path, wheels: str,
                 target_dir: str | None = None) -> list[str]:
    """Offline install from the fetched wheels; `target_dir` for `--target` (container pydeps)."""
    argv = [*pip, "install", *_COMMON, "--isolated", "--no-index", "--only-binary=:all:",
            "--no-cache-dir", "--no-warn-script-location", "--find-links", wheels]
    if target_dir:
        argv += ["--target", target_dir]
    return [*argv, "-r", str(requirements_file)]


def fetch_env(cfg: RequirementsConfig, home: Path | None, environ: dict[str, str] | None = None
              ) -> dict[str, str]:
    """The fetch step's environment: nothing of the worker's but, when the host's pip config is
    in use, pip's own PIP_* settings (the worker's secrets never reach pip)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    if home is not None:
        env["HOME"] = str(home)
    if cfg.index_url:
        env["PIP_CONFIG_FILE"] = os.devnull
    else:
        src = os.environ if environ is None else environ
        env.update({k: src[k] for k in _PIP_ENV_PASSTHROUGH if k in src})
    return env
