# Stub nixpkgs for evaluating the module and the flake without nixpkgs: packages are
# store-path-shaped attribute sets, formats.yaml keeps the value (the tests render it as JSON, a
# YAML subset the daemon's loader reads), runCommand returns its script for tests/test_nix.py to run.
{ lib }:

let
  inherit (lib) types;
  pkg = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta = { mainProgram = name; } // (extra.meta or { });
  } // builtins.removeAttrs extra [ "meta" ];

  file = name: attrs: attrs // { inherit name; outPath = "/nix/store/11111111111111111111111111111111-${name}"; };

  valueType = types.nullOr (types.oneOf [ types.bool types.int types.float types.str
    (types.attrsOf valueType) (types.listOf valueType) ]) // { description = "YAML value"; };

in
{
  formats.yaml = _: { type = valueType; generate = name: value: file name { format = "yaml"; inherit value; }; };
  formats.toml = _: { type = valueType; generate = name: value: file name { format = "toml"; inherit value; }; };
  runCommand = name: env: script: file name { builder = "runCommand"; inherit env script; };
  writeShellScript = name: text: file name { inherit text; };
  runtimeShell = "/nix/store/22222222222222222222222222222222-bash/bin/sh";
  hivemind-worker = pkg "hivemind-worker" { };
  coreutils = pkg "coreutils" { };
  util-linux = pkg "util-linux" { };
  fuse-overlayfs = pkg "fuse-overlayfs" { };
  slirp4netns = pkg "slirp4netns" { };
  shadow = pkg "shadow" { };
  podman = pkg "podman" { };
  stdenv.hostPlatform.system = "x86_64-linux";
  # For the flake's outputs: every package is a store-path-shaped stand-in named after its file.
  callPackage = path: _args: pkg ({ "package.nix" = "hivemind-worker"; images = "hivemind-task-image";
    native = "hivemind-metrics"; }.${baseNameOf (toString path)} or (baseNameOf (toString path))) {
    imageName = "localhost/hivemind-task";
    imageTag = "stub";
  };
}
