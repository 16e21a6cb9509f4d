# services.hivemind-worker: the worker as a hardened systemd service with rootless Podman.
#
# Two units, as on Debian: hivemind-worker (fully hardened) and hivemind-podman, the service
# user's rootless Podman API service that runs the tasks (it carries every relaxation rootless
# Podman needs). Their directives come from units/hivemind-{worker,podman}.unit.json, the files
# that render units/*.service for Debian, so both systems carry the same hardening (and the same
# documented relaxations). Each directive is mkDefault: override any one line in your config.
# Secrets are paths read at service start through LoadCredential=, never copied into the store.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf mkDefault types;

  cfg = config.services.hivemind-worker;
  yaml = pkgs.formats.yaml { };

  podman = lib.getExe config.virtualisation.podman.package;

  substitute = builtins.replaceStrings
    [ "@bin@" "@config@" "@kill@" "@podman@" "@sh@" ]
    [ (lib.getExe cfg.package) "${configFile}" "${pkgs.coreutils}/bin/kill" podman pkgs.runtimeShell ];

  directives = import ./unit-directives.nix { inherit substitute; };
  podmanDirectives = import ./unit-directives.nix { inherit substitute; name = "hivemind-podman"; };
  unitDirectives = directives.unit;
  splitWords = attrs: key: lib.splitString " " (attrs.${key} or "");
  # Keys that map onto NixOS options of their own (wants, after, ...) rather than unitConfig.
  listKeys = [ "Description" "Wants" "Requires" "After" ];

  podmanSocket = "/run/hivemind-podman/podman.sock";

  # A secret option: an absolute path as a string, so the file never enters the Nix store.
  secretPath = description: mkOption {
    type = types.nullOr (types.strMatching "/.+");
    default = null;
    example = "/run/keys/hivemind-pool-password";
    inherit description;
  };

  # Credential name -> file; the config refers to the name (resolved in $CREDENTIALS_DIRECTORY).
  credentials = lib.filterAttrs (_: path: path != null) {
    pool-password = cfg.passwordFile;
    server-token = cfg.tokenFile;
    tls-cert = cfg.tls.certFile;
    tls-key = cfg.tls.keyFile;
    tls-client-ca = cfg.tls.clientCaFile;
    status-token = cfg.statusTokenFile;
  };

  secretSettings = lib.filterAttrsRecursive (_: v: v != null) {
    pool.password_file = if cfg.passwordFile != null then "pool-password" else null;
    server.auth = {
      token_file = if cfg.tokenFile != null then "server-token" else null;
      cert_file = if cfg.tls.certFile != null then "tls-cert" else null;
      key_file = if cfg.tls.keyFile != null then "tls-key" else null;
      client_ca_file = if cfg.tls.clientCaFile != null then "tls-client-ca" else null;
    };
    status.token_file = if cfg.statusTokenFile != null then "status-token" else null;
  };

  configFile = yaml.generate "hivemind-worker.yaml" (lib.recursiveUpdate cfg.settings secretSettings);

  stateDir = "/var/lib/hivemind-worker";

  # Rootless Podman settings for the service user only: tasks get no network unless asked.
  userContainersConf = (pkgs.formats.toml { }).generate "containers.conf" {
    containers.netns = if cfg.settings.executor.podman.network == "none" then "none" else "slirp4netns";
  };

  taskImageRef = "${cfg.taskImage.imageName}:${cfg.taskImage.imageTag}";

  # Loads the pinned task image into the service user's rootless storage, once per image. Runs
  # in hivemind-podman.service: the rootless CLI needs newuidmap, which the worker's unit forbids.
  loadTaskImage = pkgs.writeShellScript "hivemind-load-task-image" ''
    set -eu
    if ! ${podman} image exists ${lib.escapeShellArg taskImageRef}; then
      ${cfg.taskImage} | ${podman} load
    fi
  '';
in
{
  options.services.hivemind-worker = {
    enable = mkEnableOption "the HiveMind worker node";

    package = mkOption {
      type = types.package;
      description = "The hivemind-worker package (the flake's module sets its own by default).";
    };

    taskImage = mkOption {
      type = types.nullOr types.package;
      default = null;
      description = ''
        The task image (a dockerTools.streamLayeredImage) loaded into the service user's rootless
        Podman storage before the worker starts, and used for tasks. Null: manage images yourself.
      '';
    };

    settings = mkOption {
      default = { };
      description = ''
        worker.yaml as Nix; any key of `hivemind-worker check-config --defaults`. Secrets do not
        belong here: use the *File options, which pass paths through LoadCredential=.
      '';
      type = types.submodule {
        freeformType = yaml.type;
        options = {
          pool.address = mkOption {
            type = types.strMatching ".+:[0-9]+";
            example = "pool.example.org:50051";
            description = "host:port of the node pool.";
          };
          pool.username = mkOption {
            type = types.str;
            default = "worker";
            description = "Pool account the worker logs in as.";
          };
          pool.protocol = mkOption {
            type = types.enum [ "2026-04" "2025-10" ];
            default = "2026-04";
            description = "Protocol generation the pool speaks; the worker checks it against the pool at start.";
          };
          server.advertise_host = mkOption {
            type = types.str;
            default = "";
            description = "Host the pool dials back; empty means the primary address.";
          };
          server.auth.legacy_allowed_peers = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "203.0.113.7" ];
            description = ''
              IP addresses or networks allowed to call the worker without credentials (what the
              existing pool sends). Leave empty when tokenFile or the tls.* files are set.
            '';
          };
          server.port = mkOption {
            type = types.port;
            default = 50052;
            description = "Port of the worker's gRPC service.";
          };
          node.id = mkOption {
            type = types.str;
            default = "";
            description = "Node id sent to the pool; empty means the pool username.";
          };
          node.state_dir = mkOption {
            type = types.str;
            default = stateDir;
            readOnly = true;
            description = "The unit's StateDirectory; fixed because the hardening is built around it.";
          };
          executor.kind = mkOption {
            type = types.enum [ "auto" "podman" "venv" ];
            default = "podman";
            description = "How tasks run. The module sets up rootless Podman, so podman is the default.";
          };
          executor.slots = mkOption {
            type = types.ints.unsigned;
            default = 0;
            description = "Tasks run at once; 0 means one per logical CPU.";
          };
          executor.podman = mkOption {
            type = types.submodule {
              freeformType = yaml.type;
              options.network = mkOption {
                type = types.enum [ "none" "outbound" ];
                default = "none";
                description = "none, or outbound to let tasks open outbound connections.";
              };
            };
            default = { };
            description = "Podman executor settings.";
          };
        };
      };
    };

    passwordFile = secretPath "File holding the pool password (read by systemd, as root).";
    tokenFile = secretPath "Shared bearer token the pool must send (server.auth token mode).";
    statusTokenFile = secretPath "Bearer token of the status API.";
    tls = {
      certFile = secretPath "The worker's TLS certificate (PEM).";
      keyFile = secretPath "The worker's TLS private key (PEM).";
      clientCaFile = secretPath "CA of the pool's client certificate (mtls).";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open settings.server.port so the pool can reach the worker.";
    };

    subIdRange = mkOption {
      type = types.submodule {
        options.start = mkOption { type = types.ints.positive; default = 200000; description = "First subordinate id."; };
        options.count = mkOption { type = types.ints.positive; default = 65536; description = "Number of ids."; };
      };
      default = { };
      description = "Subordinate uid/gid range of the service user (rootless Podman maps task users into it).";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.passwordFile != null;
        message = "services.hivemind-worker.passwordFile must be set: the worker logs in to the pool with it.";
      }
      {
        # The same rule check-config applies: never listen unauthenticated to everyone.
        assertion = cfg.tokenFile != null
          || (cfg.tls.certFile != null && cfg.tls.keyFile != null && cfg.tls.clientCaFile != null)
          || cfg.settings.server.auth.legacy_allowed_peers != [ ];
        message = ''
          services.hivemind-worker: say who may send tasks: tokenFile (with tls.certFile/keyFile),
          tls.clientCaFile (mtls), or settings.server.auth.legacy_allowed_peers for the existing pool.
        '';
      }
    ];

    services.hivemind-worker.settings = {
      logging.target = mkDefault "journal";
      executor.podman.image = mkIf (cfg.taskImage != null) (mkDefault taskImageRef);
      executor.podman.socket = mkDefault "unix://${podmanSocket}";
    };

    virtualisation.podman.enable = mkDefault true;

    users.users.hivemind = {
      isSystemUser = true;
      group = "hivemind";
      description = "HiveMind worker";
      home = stateDir;
      # Rootless Podman maps the task's users into these; sysusers on Debian can't, see units/install.
      subUidRanges = [ { startUid = cfg.subIdRange.start; count = cfg.subIdRange.count; } ];
      subGidRanges = [ { startGid = cfg.subIdRange.start; count = cfg.subIdRange.count; } ];
    };
    users.groups.hivemind = { };

    systemd.tmpfiles.settings."10-hivemind-worker" = {
      "${stateDir}/.config/containers".d = { user = "hivemind"; group = "hivemind"; mode = "0750"; };
      "${stateDir}/.config/containers/containers.conf"."L+".argument = "${userContainersConf}";
    };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.settings.server.port ];

    systemd.services.hivemind-podman = {
      description = podmanDirectives.unit.Description;

      # newuidmap/newgidmap must be the setuid wrappers, so /run/wrappers comes first.
      path = [ "/run/wrappers" config.virtualisation.podman.package pkgs.fuse-overlayfs pkgs.slirp4netns
               pkgs.shadow pkgs.coreutils ];

      unitConfig = lib.mapAttrs (_: mkDefault) (builtins.removeAttrs podmanDirectives.unit listKeys);

      serviceConfig = lib.mapAttrs (_: mkDefault) podmanDirectives.service // {
        ExecStartPost = [ podmanDirectives.service.ExecStartPost ]
          ++ lib.optional (cfg.taskImage != null) "${loadTaskImage}";
      };
    };

    systemd.services.hivemind-worker = {
      description = unitDirectives.Description;
      wants = splitWords unitDirectives "Wants";
      requires = splitWords unitDirectives "Requires";
      after = splitWords unitDirectives "After";
      wantedBy = lib.splitString " " directives.install.WantedBy;
      restartTriggers = [ configFile ];

      # The podman executor checks that the CLI exists; it talks to hivemind-podman's API only.
      path = [ config.virtualisation.podman.package ];

      unitConfig = lib.mapAttrs (_: mkDefault) (builtins.removeAttrs unitDirectives listKeys);

      serviceConfig = lib.mapAttrs (_: mkDefault) directives.service // {
        ExecStartPre = [ "${lib.getExe cfg.package} check-config --config ${configFile}" ];
        LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") credentials;
      };
    };
  };
}
