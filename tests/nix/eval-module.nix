# Evaluates nix/module.nix for real with nixpkgs' lib (lib.evalModules) and stub declarations of
# the NixOS options it sets, merged the way NixOS merges them (systemd directives: lists
# concatenate, anything else must agree, as nixos/lib/systemd-lib.nix's unitOption). pkgs is a
# stub too (stub-pkgs.nix): packages are store-path-shaped attribute sets, formats.yaml renders JSON (a YAML
# subset the daemon's loader reads), runCommand returns its script for tests/test_nix.py to run.
#
#   nix-instantiate --eval --strict --json tests/nix/eval-module.nix \
#     --arg lib 'import .../nixpkgs-lib/26.05/lib' --arg hostConfig '{ ... }'
{ lib, hostConfig, extraModules ? [ ], module ? ../../nix/module.nix }:

let
  inherit (lib) mkOption types;

  pkgs = import ./stub-pkgs.nix { inherit lib; };

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
