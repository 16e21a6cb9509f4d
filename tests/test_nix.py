"""The Nix files: every one parses, the NixOS unit directives equal units/hivemind-{worker,podman}.service,
and the flake's metadata and lock evaluate. nixpkgs can't be fetched here, so the module itself,
the packages and the VM test are only parsed (they are built by `nix flake check` elsewhere)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from unitfile import parse_unit

REPO = Path(__file__).resolve().parents[1]
NIX_FILES = sorted({*REPO.glob("*.nix"), *REPO.glob("nix/*.nix"), REPO / "native/default.nix",
                    REPO / "images/default.nix"})
DEBIAN_PATHS = {"@bin@": "/opt/hivemind-worker/bin/hivemind-worker",
                "@config@": "/etc/hivemind/worker.yaml", "@kill@": "/bin/kill",
                "@podman@": "/usr/bin/podman", "@sh@": "/bin/sh"}

pytestmark = pytest.mark.skipif(not shutil.which("nix-instantiate"), reason="nix-instantiate not installed")


def nix_eval(expr: str) -> object:
    out = subprocess.run(["nix-instantiate", "--store", "dummy://", "--eval", "--strict", "--json", "-E", expr],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_parses(path: Path) -> None:
    assert path.exists()
    run = subprocess.run(["nix-instantiate", "--store", "dummy://", "--parse", str(path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_expected_files_exist() -> None:
    names = {str(p.relative_to(REPO)) for p in NIX_FILES}
    assert {"flake.nix", "nix/module.nix", "nix/package.nix", "nix/vm-test.nix",
            "native/default.nix", "images/default.nix"} <= names


@pytest.mark.parametrize("name", ["hivemind-worker", "hivemind-podman"])
def test_module_unit_equals_debian_unit(name: str) -> None:
    """The module's directives (nix/unit-directives.nix, evaluated by Nix) against the parsed
    units/NAME.service, with the Debian paths substituted."""
    froms = " ".join(json.dumps(k) for k in DEBIAN_PATHS)
    tos = " ".join(json.dumps(v) for v in DEBIAN_PATHS.values())
    evaluated = nix_eval(f"import ./nix/unit-directives.nix {{ name = {json.dumps(name)}; "
                         f"substitute = builtins.replaceStrings [ {froms} ] [ {tos} ]; }}")
    assert isinstance(evaluated, dict)
    unit = parse_unit((REPO / f"units/{name}.service").read_text())

    def as_lists(attrs: dict[str, Any]) -> dict[str, list[str]]:
        return {k: v if isinstance(v, list) else [v] for k, v in attrs.items()}

    debian_service = dict(unit["Service"])
    if name == "hivemind-worker":
        # Credentials are the one intended difference: NixOS builds them from *File options.
        assert debian_service.pop("LoadCredential") == ["pool-password:/etc/hivemind/pool-password"]
    assert as_lists(evaluated["service"]) == debian_service
    assert as_lists(evaluated["unit"]) == dict(unit["Unit"])
    assert as_lists(evaluated["install"]) == dict(unit.get("Install", {}))


def test_module_wires_the_podman_unit() -> None:
    module = (REPO / "nix/module.nix").read_text()
    assert 'name = "hivemind-podman"' in module
    assert "systemd.services.hivemind-podman" in module
    assert 'requires = splitWords unitDirectives "Requires"' in module
    # The worker is told about the socket the Podman unit serves (%t is /run for system units).
    assert 'podmanSocket = "/run/hivemind-podman/podman.sock"' in module
    assert 'executor.podman.socket = mkDefault "unix://${podmanSocket}"' in module
    # The rootless CLI (image load) runs in the Podman unit: newuidmap fails under the worker's.
    podman_unit = module.split("systemd.services.hivemind-podman = {", 1)[1].split("\n    };", 1)[0]
    assert "loadTaskImage" in podman_unit and "/run/wrappers" in podman_unit


def test_module_reads_the_shared_directives_and_keeps_secrets_out_of_the_store() -> None:
    module = (REPO / "nix/module.nix").read_text()
    assert "import ./unit-directives.nix" in module
    assert "LoadCredential = lib.mapAttrsToList" in module
    # Secret options are strings (never `types.path`, which would copy the file into the store).
    assert 'types.nullOr (types.strMatching "/.+")' in module
    assert "types.path" not in module
    for option in ("passwordFile", "tokenFile", "openFirewall", "subUidRanges", "subGidRanges",
                   "freeformType = yaml.type", "pool.address", "server.advertise_host", "node.id",
                   "executor.kind", "executor.slots"):
        assert option in module, option


def test_flake_lock_pins_nixpkgs() -> None:
    lock = json.loads((REPO / "flake.lock").read_text())
    node = lock["nodes"]["nixpkgs"]
    assert node["original"] == {"owner": "NixOS", "ref": "nixos-24.11", "repo": "nixpkgs", "type": "github"}
    assert len(node["locked"]["rev"]) == 40 and node["locked"]["narHash"].startswith("sha256-")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("nix"), reason="nix flake commands need root here")
def test_flake_metadata_evaluates(tmp_path: Path) -> None:
    # A copy: the checkout's untracked files are invisible to a git flake, and `path:` on the
    # checkout would copy .venv into the store.
    src = tmp_path / "flake"
    src.mkdir()
    for name in ("flake.nix", "flake.lock"):
        shutil.copy(REPO / name, src / name)
    for name in ("nix", "units"):
        shutil.copytree(REPO / name, src / name)
    for name in ("native/default.nix", "images/default.nix"):
        (src / name).parent.mkdir(exist_ok=True)
        shutil.copy(REPO / name, src / name)
    run = subprocess.run(["nix", "--extra-experimental-features", "nix-command flakes",
                          "--option", "substituters", "", "flake", "metadata", "--json", f"path:{src}"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    meta = json.loads(run.stdout)
    assert meta["description"].startswith("hivemind-worker")
    assert meta["locks"]["nodes"]["nixpkgs"]["locked"]["rev"] == "50ab793786d9de88ee30ec4e4c24fb4236fc2674"
