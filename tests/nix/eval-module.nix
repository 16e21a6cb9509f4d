# Evaluates nix/module.nix for real with nixpkgs' lib (lib.evalModules) and stub declarations of
# the NixOS options it sets, merged the way NixOS merges them (systemd directives: lists
# concatenate, anything else must agree, as nixos/lib/systemd-lib.nix's unitOption). pkgs is a
# stub too: packages are store-path-shaped attribute sets, formats.yaml renders JSON (a YAML
# subset the daemon's loader reads), runCommand returns its script for tests/test_nix.py to run.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --arg lib 'import .../nixpkgs-lib/26.05/lib' --arg hostConfig '{ ... }'
{ lib, hostConfig, extraModules ? [ ], module ? ../../nix/module.nix }:

let
  inherit (lib) mkOption types;

  pkg = name: extra: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta = { mainProgram = name; } // (extra.meta or { });
  } // builtins.removeAttrs extra [ "meta" ];

  file = name: attrs: attrs // { inherit name; outPath = "/nix/store/11111111111111111111111111111111-${name}"; };

  valueType = types.nullOr (types.oneOf [ types.bool types.int types.float types.str
    (types.attrsOf valueType) (types.listOf valueType) ]) // { description = "YAML value"; };

  pkgs = {
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
  };

  unitOption = lib.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let defs' = lib.filterOverrides defs; in
      if lib.any (def: lib.isList def.value) defs'
      then lib.concatMap (def: lib.toList def.value) defs'
      else lib.mergeEqualOption loc defs';
  };
  strList = mkOption { type = types.listOf types.str; default = [ ]; };
  unitSection = mkOption { type = types.attrsOf unitOption; default = { }; };
  unit = types.submodule {
    options = {
      description = mkOption { type = types.str; default = ""; };
      wants = strList; requires = strList; after = strList; before = strList; wantedBy = strList;
      bindsTo = strList;
      path = mkOption { type = types.listOf (types.either types.package types.str); default = [ ]; };
      reloadTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      restartTriggers = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      environment = mkOption { type = types.attrsOf types.str; default = { }; };
      unitConfig = unitSection; serviceConfig = unitSection; socketConfig = unitSection;
    };
  };

  stubs = {
    options = {
      assertions = mkOption { type = types.listOf types.unspecified; default = [ ]; };
      warnings = mkOption { type = types.listOf types.str; default = [ ]; };
      systemd.services = mkOption { type = types.attrsOf unit; default = { }; };
      systemd.sockets = mkOption { type = types.attrsOf unit; default = { }; };
      systemd.tmpfiles.settings = mkOption { type = types.attrsOf (types.attrsOf (types.attrsOf types.unspecified)); default = { }; };
      users.users = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options = {
            isSystemUser = mkOption { type = types.bool; default = false; };
            isNormalUser = mkOption { type = types.bool; default = false; };
            group = mkOption { type = types.str; default = ""; };
            description = mkOption { type = types.str; default = ""; };
            home = mkOption { type = types.str; default = "/var/empty"; };
            autoSubUidGidRange = mkOption { type = types.bool; default = false; };
            subUidRanges = mkOption { type = types.listOf (types.attrsOf types.int); default = [ ]; };
            subGidRanges = mkOption { type = types.listOf (types.attrsOf types.int); default = [ ]; };
          };
        });
      };
      users.groups = mkOption { type = types.attrsOf (types.attrsOf types.unspecified); default = { }; };
      environment.etc = mkOption {
        default = { };
        type = types.attrsOf (types.submodule {
          options = {
            source = mkOption { type = types.unspecified; };
            mode = mkOption { type = types.str; default = "symlink"; };
            user = mkOption { type = types.str; default = "+0"; };
            group = mkOption { type = types.str; default = "+0"; };
          };
        });
      };
      networking.firewall.allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      virtualisation.podman.enable = mkOption { type = types.bool; default = false; };
      virtualisation.podman.package = mkOption { type = types.package; default = pkgs.podman; };
      meta = mkOption { type = types.attrsOf types.unspecified; default = { }; };
    };
  };

  evaluated = lib.evalModules {
    modules = [ stubs module hostConfig ] ++ extraModules;
    specialArgs = { inherit pkgs; };
  };
  inherit (evaluated) config options;

  # What the tests read: failed assertions, the units, the rendered config and its build check.
  plainUnit = u: {
    inherit (u) description wants requires after before wantedBy bindsTo unitConfig serviceConfig socketConfig;
    path = map toString u.path;
    reloadTriggers = map toString u.reloadTriggers;
    restartTriggers = map toString u.restartTriggers;
  };
  etc = config.environment.etc."hivemind/worker.yaml" or null;
  source = if etc == null then null else etc.source;
  checked = source != null && source ? script;
  yamlFile = f: { path = toString f; inherit (f) value; };
  worker = config.systemd.services.hivemind-worker or null;
in
{
  inherit pkgs;
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  services = lib.mapAttrs (_: plainUnit) config.systemd.services;
  sockets = lib.mapAttrs (_: plainUnit) config.systemd.sockets;
  users = lib.mapAttrs (_: u: { inherit (u) group autoSubUidGidRange subUidRanges subGidRanges isSystemUser home; }) config.users.users;
  groups = builtins.attrNames config.users.groups;
  etc = if etc == null then null else {
    inherit (etc) mode user group;
    source = toString source;
    check = if checked then { inherit (source) script; nativeBuildInputs = map toString source.env.nativeBuildInputs; } else null;
  };
  # The rendered settings (the file the build check reads) and the restart-relevant subset.
  rendered = if source == null then null else yamlFile (if checked then source.env.passthru.unchecked else source);
  restartSettings = if worker == null then null else map yamlFile worker.restartTriggers;
  packageDefaultText = options.services.hivemind-worker.package.defaultText.text or null;
  moduleMeta = config.meta;
  hardening = config.services.hivemind-worker.hardening;
}
