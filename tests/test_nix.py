"""The Nix files, evaluated for real where this machine can.

- Every .nix file parses; the NixOS unit directives equal units/*.service.
- nix/module.nix is evaluated with nixpkgs' lib 26.05 (lib.evalModules) and stub NixOS option
  declarations (tests/nix/eval-module.nix) over a table of configs. Each bad config fails an
  assertion or the build-time check (check-config on the rendered file, run here exactly as the
  module's derivation script runs it) with the message the operator sees, and the auth assertion
  says what check-config says, config for config.
- nix/package.nix is evaluated with stub packages to read its check-phase attributes and file
  set; test_package_check_phase then rebuilds that file set from the git index (what a flake's
  source holds), composes pytest's command line as nixpkgs' pytestCheckHook (>= 25.05) does, and
  runs it as nobody without network, with only the tools the build sandbox would have on PATH.

nixpkgs itself can't be fetched here, so packages are not built; `nix flake check` does that.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from unitfile import parse_unit

REPO = Path(__file__).resolve().parents[1]
LIB = REPO.parent / "shared/nixpkgs-lib/26.05/lib"
if not LIB.is_dir():
    LIB = Path("/work/shared/nixpkgs-lib/26.05/lib")
NIX_FILES = sorted({*REPO.glob("*.nix"), *REPO.glob("nix/*.nix"), *REPO.glob("tests/nix/*.nix"),
                    REPO / "native/default.nix", REPO / "images/default.nix"})
DEBIAN_PATHS = {"@bin@": "/opt/hivemind-worker/bin/hivemind-worker",
                "@config@": "/etc/hivemind/worker.yaml", "@kill@": "/bin/kill",
                "@podman@": "/usr/bin/podman", "@sh@": "/bin/sh"}
UNIT_NAMES = ["hivemind-worker", "hivemind-podman", "hivemind-podman.socket"]

pytestmark = pytest.mark.skipif(not shutil.which("nix-instantiate"), reason="nix-instantiate not installed")
needs_lib = pytest.mark.skipif(not LIB.is_dir(), reason=f"nixpkgs lib 26.05 not found at {LIB}")


def nix_eval(expr: str, *args: str) -> Any:
    out = subprocess.run(["nix-instantiate", "--store", "dummy://", "--eval", "--strict", "--json",
                          *args, "-E", expr], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def eval_module(host: str) -> dict[str, Any]:
    """The module with `host` (a NixOS module, as Nix text) and the stubs, under lib 26.05."""
    result = nix_eval(f"import ./tests/nix/eval-module.nix {{ lib = import {LIB}; hostConfig = {host}; }}")
    assert isinstance(result, dict)
    return result


def host(settings: str = "", extra: str = "", password: bool = True,
         auth: str = 'settings.server.auth.legacy_allowed_peers = [ "203.0.113.7" ];') -> str:
    pw = 'passwordFile = "/run/keys/hivemind-pool-password";' if password else ""
    return (f'{{ lib, ... }}: {{ services.hivemind-worker = {{ enable = true; {pw} '
            f'settings.pool.address = "pool.example.org:50051"; {auth} {settings} }}; {extra} }}')


def run_build_check(evaluated: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The module's check derivation, run as its builder would: the script, with the rendered
    settings at their store path's place and the worker on PATH (nativeBuildInputs)."""
    check = evaluated["etc"]["check"]
    assert check is not None, "the module must check its settings at build time"
    rendered = tmp_path / "hivemind-worker.yaml"
    # JSON is YAML: the daemon reads what pkgs.formats.yaml would have written.
    rendered.write_text(json.dumps(evaluated["rendered"]["value"]))
    script = check["script"].replace(evaluated["rendered"]["path"], str(rendered))
    assert check["nativeBuildInputs"] and check["nativeBuildInputs"][0].endswith("-hivemind-worker")
    build = tmp_path / "build"
    build.mkdir()
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "out": str(tmp_path / "out"),
           "HOME": "/homeless-shelter", "LANG": "C.UTF-8"}
    return subprocess.run(["bash", "-euc", script], capture_output=True, text=True, cwd=build, env=env,
                          timeout=120)


def problems_of(run: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.strip()[2:] for line in run.stderr.splitlines() if line.strip().startswith("- ")]


# -- parsing and the shared directives ---------------------------------------------------------


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_parses(path: Path) -> None:
    assert path.exists()
    run = subprocess.run(["nix-instantiate", "--store", "dummy://", "--parse", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_expected_files_exist() -> None:
    names = {str(p.relative_to(REPO)) for p in NIX_FILES}
    assert {"flake.nix", "nix/module.nix", "nix/package.nix", "nix/vm-test.nix", "nix/package-files.nix",
            "native/default.nix", "images/default.nix", "tests/nix/eval-module.nix"} <= names


def _as_lists(attrs: dict[str, Any]) -> dict[str, list[str]]:
    return {k: v if isinstance(v, list) else [v] for k, v in attrs.items()}


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_directives_equal_debian_unit(name: str) -> None:
    """nix/unit-directives.nix (evaluated by Nix) against the parsed units/NAME(.service)."""
    froms = " ".join(json.dumps(k) for k in DEBIAN_PATHS)
    tos = " ".join(json.dumps(v) for v in DEBIAN_PATHS.values())
    evaluated = nix_eval(f"import ./nix/unit-directives.nix {{ name = {json.dumps(name)}; "
                         f"substitute = builtins.replaceStrings [ {froms} ] [ {tos} ]; }}")
    unit_file = REPO / "units" / (name if "." in name else f"{name}.service")
    unit = parse_unit(unit_file.read_text())
    debian_service = dict(unit.get("Service", {}))
    if name == "hivemind-worker":
        # Credentials are the one intended difference: NixOS builds them from *File options.
        assert debian_service.pop("LoadCredential") == ["pool-password:/etc/hivemind/pool-password"]
    assert _as_lists(evaluated["service"]) == debian_service
    assert _as_lists(evaluated["socket"]) == dict(unit.get("Socket", {}))
    assert _as_lists(evaluated["unit"]) == dict(unit["Unit"])
    assert _as_lists(evaluated["install"]) == dict(unit.get("Install", {}))


# -- the module, evaluated with nixpkgs lib 26.05 ----------------------------------------------


@pytest.fixture(scope="module")
def minimal() -> dict[str, Any]:
    if not LIB.is_dir():
        pytest.skip(f"nixpkgs lib 26.05 not found at {LIB}")
    return eval_module(host())


def _nixos_value(value: Any) -> list[str]:
    """A NixOS unit value as systemd reads it (NixOS writes booleans as true/false)."""
    values = value if isinstance(value, list) else [value]
    return ["yes" if v is True else "no" if v is False else str(v) for v in values]


@needs_lib
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_rendered_module_units_equal_debian_units(minimal: dict[str, Any], name: str) -> None:
    """The units the evaluated module defines against units/*, NixOS store paths mapped back to
    the Debian ones. Intended differences, named here: LoadCredential (from the *File options),
    and the socket/service user taken from services.hivemind-worker.user (same default)."""
    kind = "sockets" if name.endswith(".socket") else "services"
    nix_unit = minimal[kind][name.removesuffix(".socket")]
    debian = parse_unit((REPO / "units" / (name if "." in name else f"{name}.service")).read_text())
    store = "/nix/store/00000000000000000000000000000000-"
    to_debian = {f"{store}hivemind-worker/bin/hivemind-worker": DEBIAN_PATHS["@bin@"],
                 f"{store}podman/bin/podman": DEBIAN_PATHS["@podman@"],
                 f"{store}coreutils/bin/kill": DEBIAN_PATHS["@kill@"]}

    def debianize(values: list[str]) -> list[str]:
        out = []
        for v in values:
            for a, b in to_debian.items():
                v = v.replace(a, b)
            out.append(v)
        return out

    section = nix_unit["socketConfig"] if kind == "sockets" else nix_unit["serviceConfig"]
    rendered = {k: debianize(_nixos_value(v)) for k, v in section.items()}
    expected = dict(debian["Socket" if kind == "sockets" else "Service"])
    if name == "hivemind-worker":
        assert rendered.pop("LoadCredential") == ["pool-password:/run/keys/hivemind-pool-password"]
        expected.pop("LoadCredential")
    assert rendered == expected
    unit_section = {k: debianize(_nixos_value(v)) for k, v in nix_unit["unitConfig"].items()}
    for key, option in (("Description", "description"), ("Wants", "wants"), ("Requires", "requires"),
                        ("After", "after")):
        value = nix_unit[option]
        if value:
            unit_section[key] = [value] if isinstance(value, str) else [" ".join(value)]
    assert unit_section == dict(debian["Unit"])
    if "Install" in debian:
        assert [" ".join(nix_unit["wantedBy"])] == debian["Install"]["WantedBy"]


@needs_lib
def test_minimal_config_passes_the_assertions_and_the_build_check(minimal: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    assert minimal["failedAssertions"] == []
    run = run_build_check(minimal, tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out").read_text() == (tmp_path / "hivemind-worker.yaml").read_text()
    # The config sits at a fixed /etc path (readable by the service group only), which the units name.
    assert minimal["etc"]["source"].endswith("-hivemind-worker-checked.yaml")
    assert (minimal["etc"]["mode"], minimal["etc"]["group"]) == ("0440", "hivemind")
    worker = minimal["services"]["hivemind-worker"]["serviceConfig"]
    assert worker["ExecStart"].endswith("hivemind-worker run --config /etc/hivemind/worker.yaml")
    settings = minimal["rendered"]["value"]
    assert settings["executor"]["podman"]["socket"] == "unix:///run/hivemind-podman/podman.sock"
    assert settings["executor"]["venv"]["task_path"] == "/run/current-system/sw/bin"


AUTH_CASES = {
    # name: (host Nix, passes?)
    "legacy-peers": (host(), True),
    "legacy-explicit": (host(auth='settings.server.auth = { mode = "legacy"; legacy_allowed_peers = [ "10.0.0.0/8" ]; };'), True),
    "mtls": (host(auth='tls = { certFile = "/run/keys/c"; keyFile = "/run/keys/k"; clientCaFile = "/run/keys/ca"; };'), True),
    "token": (host(auth='tls = { certFile = "/run/keys/c"; keyFile = "/run/keys/k"; }; tokenFile = "/run/keys/t";'), True),
    "nothing": (host(auth=""), False),
    "token-without-tls": (host(auth='tokenFile = "/run/keys/t";'), False),
    "cert-alone-plus-legacy": (host(auth='tls.certFile = "/run/keys/c"; settings.server.auth.legacy_allowed_peers = [ "203.0.113.7" ];'), False),
    "mtls-without-ca": (host(auth='settings.server.auth.mode = "mtls"; tls = { certFile = "/run/keys/c"; keyFile = "/run/keys/k"; };'), False),
    "token-mode-without-token": (host(auth='settings.server.auth.mode = "token"; tls = { certFile = "/run/keys/c"; keyFile = "/run/keys/k"; };'), False),
    "legacy-mode-no-peers": (host(auth='settings.server.auth.mode = "legacy";'), False),
}


@needs_lib
@pytest.mark.parametrize("case", AUTH_CASES, ids=str)
def test_auth_assertion_mirrors_check_config(case: str, tmp_path: Path) -> None:
    """Every auth mode: the assertion passes exactly when check-config does, with its messages."""
    nix, passes = AUTH_CASES[case]
    evaluated = eval_module(nix)
    auth_failures = [m for m in evaluated["failedAssertions"] if "server.auth" in m]
    run = run_build_check(evaluated, tmp_path)
    assert (run.returncode == 0) == passes, run.stderr
    assert (auth_failures == []) == passes, auth_failures
    if not passes:
        (message,) = auth_failures
        for problem in problems_of(run):
            assert problem in message, (problem, message)


BAD_CONFIGS = {
    # name: (host Nix, where it fails, what the operator reads)
    "freeform-typo": (host('settings.executor.podman.netwrok = "none";'), "build",
                      "executor.podman.netwrok: unknown key"),
    "bad-value": (host("settings.executor.task_timeout_s = 0;"), "build", "executor.task_timeout_s"),
    "no-password": (host(password=False), "assertion", "passwordFile must be set"),
    "secret-path-in-settings": (host('settings.status.token_file = "/etc/hivemind/status-token";'), "assertion",
                                "status.token_file name a file; use passwordFile, tokenFile, statusTokenFile"),
    # The host: its second normal user gets 165536-231071 from the allocator.
    "subid-range-in-allocator-blocks": (host("subIdRange.start = 200000;", extra=(
        "users.users.alice.isNormalUser = true; users.users.bob.isNormalUser = true;")), "assertion",
                                        "subIdRange overlaps subordinate ids NixOS may give other users"),
    "enum-typo": (host('settings.executor.kind = "pdoman";'), "evaluation", "executor.kind"),
}


@needs_lib
@pytest.mark.parametrize("case", BAD_CONFIGS, ids=str)
def test_bad_config_fails_with_its_message(case: str, tmp_path: Path) -> None:
    nix, where, message = BAD_CONFIGS[case]
    if where == "evaluation":
        out = subprocess.run(["nix-instantiate", "--store", "dummy://", "--eval", "--strict", "--json", "-E",
                              f"import ./tests/nix/eval-module.nix {{ lib = import {LIB}; hostConfig = {nix}; }}"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
        assert out.returncode != 0 and message in out.stderr and "is not of type" in out.stderr, out.stderr
        return
    evaluated = eval_module(nix)
    if where == "assertion":
        assert any(message in m for m in evaluated["failedAssertions"]), evaluated["failedAssertions"]
        return
    assert evaluated["failedAssertions"] == []
    run = run_build_check(evaluated, tmp_path)
    assert run.returncode == 2 and any(message in p for p in problems_of(run)), run.stderr


@needs_lib
def test_subid_range_automatic_by_default_and_explicit_above_the_allocator(minimal: dict[str, Any]) -> None:
    user = minimal["users"]["hivemind"]
    assert user["autoSubUidGidRange"] is True and user["subUidRanges"] == [] and user["isSystemUser"]
    # Two normal users take at most two blocks from 100000: 231072 and up is provably free.
    two_users = ('users.users.alice.isNormalUser = true; users.users.bob.isNormalUser = true;')
    ok = eval_module(host("subIdRange.start = 231072;", extra=two_users))
    assert ok["failedAssertions"] == []
    assert ok["users"]["hivemind"]["subUidRanges"] == [{"startUid": 231072, "count": 65536}]
    clash = eval_module(host("subIdRange.start = 165536;", extra=two_users))
    assert any("subIdRange" in m for m in clash["failedAssertions"])


@needs_lib
def test_list_directives_merge_with_an_operator_override(minimal: dict[str, Any]) -> None:
    extra = ('systemd.services.hivemind-worker.serviceConfig = { Environment = [ "HTTPS_PROXY=http://proxy:3128" ]; '
             'SystemCallFilter = [ "~@debug" ]; MemoryDenyWriteExecute = false; };')
    service = eval_module(host(extra=extra))["services"]["hivemind-worker"]["serviceConfig"]
    base = minimal["services"]["hivemind-worker"]["serviceConfig"]
    assert service["Environment"] == [*base["Environment"], "HTTPS_PROXY=http://proxy:3128"]
    assert "XDG_RUNTIME_DIR=%t/hivemind-worker" in service["Environment"]
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged", "~@debug"]
    # A scalar is mkDefault: one definition replaces it.
    assert base["MemoryDenyWriteExecute"] == "yes" and service["MemoryDenyWriteExecute"] is False
    # mkForce still replaces a list.
    forced = eval_module(host(extra='systemd.services.hivemind-worker.serviceConfig.Environment = lib.mkForce [ "A=1" ];'))
    assert forced["services"]["hivemind-worker"]["serviceConfig"]["Environment"] == ["A=1"]


@needs_lib
def test_stop_timeout_follows_the_drain_timeout(minimal: dict[str, Any]) -> None:
    assert minimal["services"]["hivemind-worker"]["serviceConfig"]["TimeoutStopSec"] == 90
    long = eval_module(host("settings.shutdown.drain_timeout_s = 120;"))
    assert long["services"]["hivemind-worker"]["serviceConfig"]["TimeoutStopSec"] == 150


@needs_lib
def test_reload_and_restart_triggers_split_at_the_daemons_live_keys(minimal: dict[str, Any]) -> None:
    """A change confined to the keys the daemon applies on SIGHUP (hivemind.daemon's LIVE_*)
    changes only the reload trigger; any other key changes the restart trigger."""
    from hivemind.daemon import LIVE_KEYS, LIVE_SECTIONS

    worker = minimal["services"]["hivemind-worker"]
    assert worker["reloadTriggers"] == [minimal["etc"]["source"]]
    base_restart = minimal["restartSettings"][0]["value"]
    live = [f"{section}.x_probe" for section in sorted(LIVE_SECTIONS)] + sorted(LIVE_KEYS)
    settings = " ".join(f"settings.{key} = 7;" for key in live)
    changed = eval_module(host(settings))
    assert changed["restartSettings"][0]["value"] == base_restart
    assert changed["rendered"]["value"] != minimal["rendered"]["value"]
    for key, value in (("pool.username", '"w2"'), ("executor.slots", "3"), ("server.port", "50053")):
        other = eval_module(host(f"settings.{key} = {value};"))
        assert other["restartSettings"][0]["value"] != base_restart, key


@needs_lib
def test_units_wiring(minimal: dict[str, Any]) -> None:
    worker = minimal["services"]["hivemind-worker"]
    podman = minimal["services"]["hivemind-podman"]
    socket = minimal["sockets"]["hivemind-podman"]
    # Ordered after the socket, no restart coupling to the Podman service.
    assert "hivemind-podman.socket" in worker["after"] and "hivemind-podman.socket" in worker["wants"]
    assert worker["requires"] == [] and worker["bindsTo"] == []
    assert not any("hivemind-podman.service" in u for u in worker["after"] + worker["wants"])
    assert podman["requires"] == ["hivemind-podman.socket"]
    assert "ExecStartPost" not in podman["serviceConfig"]   # no polling loop
    assert socket["socketConfig"]["ListenStream"] == "%t/hivemind-podman/podman.sock"
    assert (socket["socketConfig"]["SocketUser"], socket["socketConfig"]["SocketMode"]) == ("hivemind", "0600")
    # Reload validates first, then signals.
    reload = worker["serviceConfig"]["ExecReload"]
    assert reload[0].endswith("check-config --config /etc/hivemind/worker.yaml") and "-HUP $MAINPID" in reload[1]
    # util-linux on the worker's PATH (prlimit for venv tasks).
    assert any(p.endswith("-util-linux") for p in worker["path"])
    # No task image configured: no loader unit.
    assert "hivemind-task-image" not in minimal["services"]


@needs_lib
def test_task_image_has_its_own_oneshot_unit_with_a_long_timeout() -> None:
    image = ('taskImage = { type = "derivation"; name = "img"; outPath = "/nix/store/33333333333333333333333333333333-img"; '
             'imageName = "localhost/hivemind-task"; imageTag = "abc"; };')
    evaluated = eval_module(host(image))
    loader = evaluated["services"]["hivemind-task-image"]
    cfg = loader["serviceConfig"]
    assert cfg["Type"] == "oneshot" and cfg["RemainAfterExit"] is True and cfg["TimeoutStartSec"] >= 600
    assert cfg["User"] == "hivemind" and cfg["NoNewPrivileges"] == "no"
    worker = evaluated["services"]["hivemind-worker"]
    assert "hivemind-task-image.service" in worker["after"] and "hivemind-task-image.service" in worker["wants"]
    assert "ExecStartPost" not in evaluated["services"]["hivemind-podman"]["serviceConfig"]
    assert evaluated["rendered"]["value"]["executor"]["podman"]["image"] == "localhost/hivemind-task:abc"


@needs_lib
def test_custom_user_and_group_reach_every_unit() -> None:
    evaluated = eval_module(host('user = "hm"; group = "hm";'))
    assert "hivemind" not in evaluated["users"] and "hivemind" not in evaluated["groups"]
    for name in ("hivemind-worker", "hivemind-podman"):
        cfg = evaluated["services"][name]["serviceConfig"]
        assert (cfg["User"], cfg["Group"]) == ("hm", "hm"), name
    assert evaluated["sockets"]["hivemind-podman"]["socketConfig"]["SocketUser"] == "hm"
    assert evaluated["etc"]["group"] == "hm"


@needs_lib
def test_module_hygiene(minimal: dict[str, Any]) -> None:
    assert minimal["packageDefaultText"] == "pkgs.hivemind-worker"       # mkPackageOption
    assert minimal["moduleMeta"]["maintainers"] == [] and minimal["moduleMeta"]["doc"].endswith("module.md")
    for relaxed in ("KillMode=process", "NoNewPrivileges=no", "CAP_SETUID CAP_SETGID", "Delegate=yes",
                    "AF_NETLINK", "MemoryDenyWriteExecute"):
        assert relaxed in minimal["hardening"], relaxed


FLAKE_MODULE = """
let
  lib = import LIB;
  pkgs = import ./tests/nix/stub-pkgs.nix { inherit lib; };
  nixpkgs = { inherit lib; legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (_: pkgs); };
  self = (import ./flake.nix).outputs { inherit self nixpkgs; };
  evaluated = import ./tests/nix/eval-module.nix {
    inherit lib;
    module = self.nixosModules.default;
    hostConfig = { services.hivemind-worker = { enable = true; passwordFile = "/run/keys/p";
      settings.pool.address = "pool:50051"; settings.server.auth.legacy_allowed_peers = [ "10.0.0.1" ]; }; };
  };
in {
  inherit (evaluated) failedAssertions;
  exec = evaluated.services.hivemind-worker.serviceConfig.ExecStart;
  image = evaluated.rendered.value.executor.podman.image;
  loader = evaluated.services ? hivemind-task-image;
  apps = builtins.attrNames self.apps.x86_64-linux;
  checks = builtins.attrNames self.checks.x86_64-linux;
}
"""


@needs_lib
def test_flake_module_brings_the_flakes_package_and_task_image() -> None:
    """The flake's nixosModules.default, from the flake's outputs (nixpkgs stubbed as above):
    the worker from self.packages and the task image with its loader unit."""
    out = nix_eval(FLAKE_MODULE.replace("LIB", str(LIB)))
    assert out["failedAssertions"] == []
    assert out["exec"] == ("/nix/store/00000000000000000000000000000000-hivemind-worker/bin/hivemind-worker "
                           "run --config /etc/hivemind/worker.yaml")
    assert out["image"] == "localhost/hivemind-task:stub" and out["loader"] is True
    assert {"worker", "default"} <= set(out["apps"])
    assert {"worker", "native", "unit-file", "vm-test"} <= set(out["checks"])


VM_TEST_SCRIPT = """
let
  lib = import LIB;
  stub = name: { type = "derivation"; inherit name; outPath = "/nix/store/44444444444444444444444444444444-${name}";
                 meta.mainProgram = name; };
  pkgs = {
    python3.sitePackages = "lib/python3.13/site-packages";
    python3Packages.six.dist = stub "six-dist";
    runCommand = name: _env: _script: stub name;
    writeTextDir = name: _text: stub name;
  };
  test = import ./nix/vm-test.nix { self = { nixosModules.default = { }; }; } { inherit lib pkgs; };
  nodes.machine.services.hivemind-worker = { package = stub "hivemind-worker";
    settings.executor.podman.image = "localhost/hivemind-task:abc"; };
in { script = test.testScript { inherit nodes; }; inherit (test) name; }
"""


@needs_lib
def test_vm_test_script_is_python_with_every_operator_action() -> None:
    """The VM test can't run here: its script is rendered with stub nodes and compiled, and holds
    a subtest for each action the issue lists."""
    out = nix_eval(VM_TEST_SCRIPT.replace("LIB", str(LIB)))
    compile(out["script"], "vm-test.py", "exec")
    for action in ("an invalid config fails the reload", "stop with a running task", "the watchdog (shipped WatchdogSec)",
                   "a Podman crash leaves the worker running", "a task with requirements.txt",
                   "--out /tmp/hello.result.zip"):
        assert action in out["script"], action


def test_module_keeps_secrets_out_of_the_store() -> None:
    module = (REPO / "nix/module.nix").read_text()
    assert "LoadCredential = lib.mapAttrsToList" in module
    # Secret options are strings (never `types.path`, which would copy the file into the store).
    assert 'types.nullOr (types.strMatching "/.+")' in module
    assert "types.path" not in module


def test_live_keys_of_the_module_are_the_daemons() -> None:
    """The module's copy of the reload-safe keys (it can't import Python) matches hivemind.daemon."""
    from hivemind.daemon import LIVE_KEYS, LIVE_SECTIONS

    module = (REPO / "nix/module.nix").read_text()
    sections = re.search(r"liveSections = \[([^\]]*)\]", module)
    keys = re.search(r"liveKeys = \[([^\]]*)\]", module)
    assert sections and keys
    assert set(re.findall(r'"([^"]+)"', sections.group(1))) == set(LIVE_SECTIONS)
    assert set(re.findall(r'"([^"]+)"', keys.group(1))) == set(LIVE_KEYS)


# -- the flake, the package and the image ------------------------------------------------------


def test_flake_pins_a_supported_release() -> None:
    flake = (REPO / "flake.nix").read_text()
    assert 'inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";' in flake
    lock = REPO / "flake.lock"
    if lock.exists():   # written by the first `nix flake lock` where GitHub is reachable
        node = json.loads(lock.read_text())["nodes"]["nixpkgs"]
        assert node["original"]["ref"] == "nixos-26.05"
    assert "Nix 2.18" in (REPO / "README.md").read_text()


def _stub_pkg(name: str) -> str:
    return f'{{ pname = "{name}"; }}'


PACKAGE_ATTRS = """
let
  names = [ "setuptools" "wheel" "grpcio-tools" "grpcio" "protobuf" "podman" "psutil" "systemd-python"
            "pyyaml" "falcon" "waitress" "prometheus-client" "pytestCheckHook" "pytest" "pytest-timeout"
            "hypothesis" "cryptography" "mypy" "types-pyyaml" "types-psutil" "matplotlib" ];
  ps = builtins.listToAttrs (map (n: { name = n; value = { pname = n; }; }) names) // {
    buildPythonApplication = attrs: attrs;
    python.sitePackages = "lib/python3/site-packages";
  };
  lib = {
    fileset = { toSource = { root, fileset }: map toString fileset; unions = l: l; maybeMissing = p: p; };
    optionalString = c: s: if c then s else "";
    licenses.asl20 = "asl20"; platforms.linux = [ ];
  };
  drv = import ./nix/package.nix { inherit lib; python3Packages = ps; util-linux = { pname = "util-linux"; }; };
in {
  inherit (drv) disabledTestPaths;
  disabledTestMarks = drv.disabledTestMarks or [ ];
  pytestFlags = drv.pytestFlags or [ ];
  pytestFlagsArray = drv.pytestFlagsArray or [ ];
  disabledTests = drv.disabledTests or [ ];
  nativeCheckInputs = map (p: p.pname) drv.nativeCheckInputs;
  dependencies = map (p: p.pname) drv.dependencies;
  src = drv.src;
}
"""


@pytest.fixture(scope="module")
def package() -> dict[str, Any]:
    result = nix_eval(PACKAGE_ATTRS)
    assert isinstance(result, dict)
    return result


def test_package_check_attributes(package: dict[str, Any]) -> None:
    # One word per mark (the hook joins them); no marker expression left to the hook's eval.
    assert package["disabledTestMarks"] == ["podman", "system", "slow"]
    assert package["pytestFlagsArray"] == [] and all(" " not in f for f in package["pytestFlags"])
    assert all(" " not in t for t in package["disabledTests"])   # the hook splits on whitespace
    assert "util-linux" in package["nativeCheckInputs"] and "pytestCheckHook" in package["nativeCheckInputs"]
    assert "systemd-python" in package["dependencies"] and "sdnotify" not in package["dependencies"]
    src = {str(Path(p).relative_to(REPO)) for p in package["src"]}
    assert {"bench", "tests", "hivemind", "units", "README.md"} <= src


def test_declared_dependencies_are_imported(package: dict[str, Any]) -> None:
    """No declared dependency that nothing imports (pyproject.toml and the Nix list agree)."""
    import tomllib

    declared = [re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower()
                for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    modules = {"grpcio": "grpc", "protobuf": "google.protobuf", "psutil": "psutil",
               "systemd-python": "systemd", "pyyaml": "yaml", "falcon": "falcon", "waitress": "waitress"}
    assert sorted(declared) == sorted(modules) == sorted(package["dependencies"])
    # The generated bindings (hivemind/_proto, made by the build) are what import protobuf.
    sources = "\n".join(p.read_text() for p in (REPO / "hivemind").rglob("*.py"))
    for dist, module in modules.items():
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", sources, re.M), dist


def test_task_images_offer_the_same_contents() -> None:
    """images/default.nix (Nix) and images/packages (Debian): the same Python modules, pip,
    `python`, /usr/bin/env and CA certificates."""
    expr = """
    let
      image = import ./images/default.nix {
        lib = { }; coreutils = { outPath = "/coreutils"; pname = "coreutils"; };
        bashInteractive = { pname = "bash"; }; cacert = { pname = "cacert"; outPath = "/cacert"; };
        python3.withPackages = f: { pname = "python3"; outPath = "/python"; packages = map (p: p.pname) (f (
          builtins.mapAttrs (n: _: { pname = n; }) { pip = 1; requests = 1; numpy = 1; pandas = 1;
            matplotlib = 1; munkres = 1; })); };
        dockerTools.streamLayeredImage = attrs: attrs;
      };
    in { inherit (image) fakeRootCommands; contents = map (p: p.pname) image.contents;
         python = (builtins.head image.contents).packages; }
    """
    image = nix_eval(expr)
    debian = (REPO / "images/packages").read_text().split()
    debian_python = sorted(p.removeprefix("python3-") for p in debian if p.startswith("python3-"))
    assert sorted(image["python"]) == debian_python
    assert "ca-certificates" in debian and "cacert" in image["contents"]
    assert "python-is-python3" in debian and "bin/python" in image["fakeRootCommands"]
    assert "usr/bin/env" in image["fakeRootCommands"]


# -- the package's check phase, reproduced -----------------------------------------------------

# What a Nix build sandbox has on PATH for this package: stdenv's tools plus nativeCheckInputs.
STDENV_TOOLS = (
    "bash", "sh", "cat", "cp", "mv", "rm", "ln", "ls", "mkdir", "rmdir", "chmod", "chown",
    "touch", "head", "tail", "tr", "wc", "sort", "uniq", "cut", "env", "true", "false", "sleep",
    "id", "dirname", "basename", "readlink", "realpath", "mktemp", "date", "stat", "test",
    "expr", "printf", "echo", "tee", "seq", "sed", "grep", "egrep", "awk", "gawk", "find",
    "xargs", "diff", "cmp", "tar", "gzip", "gunzip", "xz", "bzip2", "patch", "make", "file",
    "uname",
)
NATIVE_CHECK_TOOLS = {"util-linux": ("prlimit", "setpriv", "unshare", "nsenter", "kill", "mount", "findmnt")}


def _hook_command_line(package: dict[str, Any], python: str) -> list[str]:
    """pytest's argv as pytestCheckHook (nixpkgs >= 25.05) composes it. Without
    __structuredAttrs every list attribute reaches bash as one space-joined string, which
    `concatTo` splits on whitespace; disabledTestMarks become one `-m "not A and not B"`;
    the obsolete pytestFlagsArray is still `eval`ed."""
    def as_bash_words(values: list[str]) -> list[str]:
        return " ".join(values).split()

    argv = [python, "-m", "pytest"]
    for path in as_bash_words(package["disabledTestPaths"]):
        argv.append(f"--deselect={path}" if "::" in path else f"--ignore-glob={path}")
    tests = as_bash_words(package["disabledTests"])
    if tests:
        argv += ["-k", "not " + " and not ".join(tests)]
    marks = as_bash_words(package["disabledTestMarks"])
    if marks:
        argv += ["-m", "not " + " and not ".join(marks)]
    if package["pytestFlagsArray"]:
        argv += shlex.split(" ".join(package["pytestFlagsArray"]))   # what `eval` does to it
    argv += as_bash_words(package["pytestFlags"])
    return argv


def test_hook_command_line_keeps_the_marker_expression_whole(package: dict[str, Any]) -> None:
    argv = _hook_command_line(package, "python3")
    assert argv[argv.index("-m", 3) + 1] == "not podman and not system and not slow"
    assert "--ignore-glob=tests/system" in argv
    # The 24.11 attribute, for contrast: eval split the expression into words (pytest exit 4).
    old = _hook_command_line({**package, "disabledTestMarks": [],
                              "pytestFlagsArray": ["-m", "not podman and not system and not slow"]}, "python3")
    assert "podman" in old and "not podman and not system and not slow" not in old


def _flake_source(tmp_path: Path, package: dict[str, Any]) -> Path:
    """The package's src: the file set's paths, restricted to what git tracks (a flake's source)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=REPO, check=True).stdout
    roots = [Path(p).relative_to(REPO) for p in package["src"]]
    src = tmp_path / "source"
    for rel in (Path(f) for f in tracked.decode().split("\0") if f):
        if any(rel == r or r in rel.parents for r in roots) and (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    return src


def _sandbox_path(build_dir: Path) -> Path:
    """A PATH directory with only the tools a Nix build of this package has."""
    bin_dir = build_dir / "sandbox-bin"
    bin_dir.mkdir()
    for tool in (*STDENV_TOOLS, *(t for tools in NATIVE_CHECK_TOOLS.values() for t in tools)):
        found = shutil.which(tool, path="/usr/bin:/bin:/usr/sbin:/sbin")
        if found:
            (bin_dir / tool).symlink_to(found)
    # The build's interpreter is on PATH too (buildPythonPackage puts python in the build inputs).
    for name in ("python3", "python"):
        (bin_dir / name).symlink_to(sys.executable)
    return bin_dir


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                    reason="needs root to drop to nobody in a network namespace (unshare, setpriv)")
def test_package_check_phase(package: dict[str, Any]) -> None:
    """The package's check phase as Nix runs it: build step (bindings generated by setup.py's
    gen_proto), then the hook's pytest command line in the source tree, as an unprivileged user,
    with no network and only the sandbox's tools on PATH. Slow-marked so the check phase itself
    (which disables slow) doesn't recurse."""
    assert "util-linux" in package["nativeCheckInputs"]
    # The build directory must be reachable by nobody (pytest's tmp_path is 0700).
    tmp_path = Path(tempfile.mkdtemp(prefix="hivemind-nixcheck-", dir="/var/tmp"))
    try:
        os.chmod(tmp_path, 0o755)
        _check_phase(package, tmp_path)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


# Inside the check's namespaces (as root, before dropping to nobody): loopback up, the build
# directory at a short path as Nix's /build is, and no /var/tmp (a build sandbox has none).
SANDBOX_SETUP = """\
{ip} link set lo up
{mount} --rbind {build} /tmp
{mount} -t tmpfs -o ro,mode=0755 tmpfs /var/tmp
cd /tmp/source
exec "$@"
"""


def _check_phase(package: dict[str, Any], tmp_path: Path) -> None:
    """Build (setup.py's build_py generates the bindings), then the hook's pytest command line in
    the source tree, the way a Nix build runs them."""
    src = _flake_source(tmp_path, package)
    sandbox_path = _sandbox_path(tmp_path)
    assert (src / "bench/bench_e2e.py").is_file() and not (src / ".venv").exists()
    subprocess.run([sys.executable, "scripts/gen_proto.py"], cwd=src, check=True, capture_output=True, timeout=300)
    subprocess.run(["chown", "-R", "nobody:nogroup", str(src)], check=True)
    os.chmod(tmp_path, 0o1777)
    argv = _hook_command_line(package, sys.executable) + ["-q", "-p", "no:cacheprovider"]
    env = {"PATH": f"/tmp/{sandbox_path.name}", "HOME": "/homeless-shelter", "TMPDIR": "/tmp", "TMP": "/tmp",
           "TEMP": "/tmp", "NIX_BUILD_TOP": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
           "SOURCE_DATE_EPOCH": "315532800"}
    mount = shutil.which("mount") or "/bin/mount"
    setup = SANDBOX_SETUP.format(ip=shutil.which("ip") or "/usr/sbin/ip", mount=mount, build=tmp_path)
    interpreter = Path(os.path.realpath(sys.executable))
    if interpreter.is_relative_to("/root"):
        # A pyenv interpreter under root's 0700 home: Nix's is in the world-readable store, so
        # show nobody only that tree, on an otherwise empty /root.
        top = Path("/root") / interpreter.relative_to("/root").parts[0]
        stand_in = tmp_path / "root-home"
        (stand_in / top.name).mkdir(parents=True)
        setup = (f"{mount} --bind {top} {stand_in / top.name}\n{mount} --rbind {stand_in} /root\n") + setup
    venv = Path(sys.prefix)
    if venv.is_relative_to("/tmp"):
        # A checkout under /tmp (CI clones anywhere): the build dir is mounted over /tmp, so show
        # the test's venv at its own path inside it.
        inside = tmp_path / venv.relative_to("/tmp")
        inside.mkdir(parents=True, exist_ok=True)
        setup = f"{mount} --bind {venv} {inside}\n" + setup
    unshare, setpriv = shutil.which("unshare") or "unshare", shutil.which("setpriv") or "setpriv"
    run = subprocess.run([unshare, "--net", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec", setup,
                          "sh", setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", *argv],
                         cwd=src, env=env, capture_output=True, text=True, timeout=1700)
    lines = (run.stdout + run.stderr).splitlines()
    summary = next((i for i, line in enumerate(lines) if "short test summary info" in line), len(lines) - 40)
    tail = "\n".join(line for line in lines[max(summary, 0):] if not line.startswith("SKIPPED"))[:20000]
    assert run.returncode == 0, tail
    assert re.search(r"\d+ passed", run.stdout), tail
