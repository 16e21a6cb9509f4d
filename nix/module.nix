# services.hivemind-worker: the worker as a hardened systemd service with rootless Podman.
#
# Units, as on Debian: hivemind-worker (fully hardened), hivemind-podman.service, the service
# user's rootless Podman API service that runs the tasks (it carries every relaxation rootless
# Podman needs), started through its socket hivemind-podman.socket, and (NixOS only)
# hivemind-task-image.service, a oneshot that loads the pinned task image. Their directives come
# from units/*.unit.json, the files that render units/* for Debian, so both systems carry the same
# hardening and the same documented relaxations (the reasons are in `hardeningNotes` below and in
# the option docs). Scalar directives are mkDefault: override any one line. List directives
# (Environment, SystemCallFilter, DeviceAllow, ...) are plain values, so an operator's additions
# merge with them instead of replacing them; mkForce replaces. Secrets are paths read at service
# start through LoadCredential=, never copied into the store.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkPackageOption mkIf mkDefault types;

  cfg = config.services.hivemind-worker;
  yaml = pkgs.formats.yaml { };

  podman = lib.getExe config.virtualisation.podman.package;

  # The config lives at a fixed path, so a settings change is a reload (or restart) of the same
  # ExecStart line rather than a new unit.
  configPath = "/etc/hivemind/worker.yaml";

  substitute = builtins.replaceStrings
    [ "@bin@" "@config@" "@kill@" "@podman@" "@sh@" ]
    [ (lib.getExe cfg.package) configPath "${pkgs.coreutils}/bin/kill" podman pkgs.runtimeShell ];

  directives = import ./unit-directives.nix { inherit substitute; };
  podmanDirectives = import ./unit-directives.nix { inherit substitute; name = "hivemind-podman"; };
  socketDirectives = import ./unit-directives.nix { inherit substitute; name = "hivemind-podman.socket"; };
  splitWords = attrs: key: lib.splitString " " (attrs.${key} or "");
  # Keys that map onto NixOS options of their own (wants, after, ...) rather than unitConfig.
  listKeys = [ "Description" "Wants" "Requires" "After" ];
  # Scalars are overridable one by one. Directives that add up (Environment=, SystemCallFilter=,
  # ExecReload=, ...) are plain lists, so NixOS concatenates an operator's entries with ours;
  # mkDefault would let any definition replace them (an added HTTPS_PROXY dropping
  # XDG_RUNTIME_DIR). mkForce still replaces.
  additive = [ "Environment" "SystemCallFilter" "DeviceAllow" "ExecStartPre" "ExecStartPost" "ExecReload"
               "ReadWritePaths" "LoadCredential" ];
  overridable = lib.mapAttrs (key: v: if builtins.elem key additive then lib.toList v else mkDefault v);
  # User=/Group= come from options, so a renamed service user reaches every unit.
  withUser = attrs: attrs // { User = cfg.user; Group = cfg.group; };

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

  finalSettings = lib.recursiveUpdate cfg.settings secretSettings;
  renderedConfig = yaml.generate "hivemind-worker.yaml" finalSettings;

  # The nixpkgs checkConfig pattern: the daemon's own validator runs on the rendered file at build
  # time, so a typo or a refused combination fails `nixos-rebuild` with check-config's message.
  # Credentials are placeholders here (their files are read at unit start, never at build time).
  configFile = if !cfg.checkConfig then renderedConfig else
    pkgs.runCommand "hivemind-worker-checked.yaml"
      {
        nativeBuildInputs = [ cfg.package ];
        preferLocalBuild = true;
        passthru.unchecked = renderedConfig;
      } ''
      export CREDENTIALS_DIRECTORY=$PWD/credentials
      mkdir -p "$CREDENTIALS_DIRECTORY"
      for name in ${lib.escapeShellArgs (builtins.attrNames credentials)}; do
        echo placeholder >"$CREDENTIALS_DIRECTORY/$name"
      done
      hivemind-worker check-config --config ${renderedConfig}
      cp ${renderedConfig} $out
    '';

  # Mirrors hivemind.daemon's LIVE_SECTIONS / LIVE_KEYS: a change confined to these is applied by
  # `systemctl reload` (SIGHUP); any other change restarts the worker. tests/test_nix.py compares
  # the two lists.
  liveSections = [ "logging" "shutdown" "archive" ];
  liveKeys = [
    "pool.heartbeat_interval_s" "pool.register_interval_s" "pool.result_min_delay_s"
    "executor.task_timeout_s" "executor.stop_grace_s" "resources.default_memory_gb"
  ];
  # (A section left empty is dropped: `resources: {}` and no resources key read the same.)
  withoutLive = settings: lib.filterAttrs (_: v: v != { }) (lib.mapAttrs
    (section: value:
      let live = map (key: lib.removePrefix "${section}." key)
        (builtins.filter (lib.hasPrefix "${section}.") liveKeys);
      in if builtins.isAttrs value then builtins.removeAttrs value live else value)
    (builtins.removeAttrs settings liveSections));
  restartSettings = yaml.generate "hivemind-worker-restart-keys.yaml" (withoutLive finalSettings);

  # check-config's auth rule (hivemind/server/auth.py choose_mode), on the settings the worker
  # will read, with its messages. Returns the problems; [] means the rule passes.
  authProblems =
    let
      auth = finalSettings.server.auth or { };
      set = key: (auth.${key} or "") != "";
      hasTls = set "cert_file" && set "key_file";
      mode = auth.mode or "auto";
      partial = builtins.filter set [ "cert_file" "key_file" "client_ca_file" "token_file" ];
      needs = m: keys: map (k: "server.auth.mode: '${m}' needs server.auth.${k}")
        (builtins.filter (k: !set k) keys);
      legacy = lib.optional ((auth.legacy_allowed_peers or [ ]) == [ ])
        ("server.auth: no credentials configured and server.auth.legacy_allowed_peers is "
          + "empty; set cert_file and key_file plus client_ca_file (mtls) or token_file "
          + "(token), or list the pool's IP addresses in legacy_allowed_peers");
    in
    if mode == "auto" then
      (if hasTls && set "client_ca_file" then [ ]
      else if hasTls && set "token_file" then [ ]
      else if partial != [ ] then [
        ("server.auth.mode: auto found ${lib.concatMapStringsSep ", " (k: "server.auth.${k}") partial} "
          + "but not a complete secure setup (mtls needs cert_file, key_file and "
          + "client_ca_file; token needs cert_file, key_file and token_file); complete it, "
          + "or set server.auth.mode: legacy explicitly")
      ]
      else legacy)
    else if mode == "mtls" then needs "mtls" [ "cert_file" "key_file" "client_ca_file" ]
    else if mode == "token" then needs "token" [ "cert_file" "key_file" "token_file" ]
    else if mode == "legacy" then legacy
    else [ "server.auth.mode: '${mode}' is not one of auto, mtls, token, legacy" ];

  # Secret-file keys set in settings by hand, as paths: they would put a path the build-time
  # check can't see (and tempt a store path); the *File options are the way.
  handSetSecretPaths =
    let
      keys = [ [ "pool" "password_file" ] [ "server" "auth" "token_file" ] [ "server" "auth" "cert_file" ]
               [ "server" "auth" "key_file" ] [ "server" "auth" "client_ca_file" ] [ "status" "token_file" ] ];
      value = path: lib.attrByPath path "" cfg.settings;
    in
    map (lib.concatStringsSep ".") (builtins.filter (path: lib.hasInfix "/" (value path)) keys);

  # NixOS's allocator (autoSubUidGidRange, update-users-groups.pl) hands out 65536-id blocks
  # upward from 100000, one per user that asks, skipping blocks already taken. An explicit range
  # is provably clear of it when it starts above every block the allocator could reach.
  subIdRangeIsFree =
    let
      users = builtins.attrValues (builtins.removeAttrs config.users.users [ cfg.user ]);
      asking = builtins.length (builtins.filter (u: (u.autoSubUidGidRange or false) || (u.isNormalUser or false)) users);
      explicit = builtins.concatMap (u: map (r: { start = r.startUid; count = r.count; }) (u.subUidRanges or [ ])) users;
      allocatorCeiling = 100000 + 65536 * (asking + builtins.length explicit);
      r = cfg.subIdRange;
      overlaps = o: r.start < o.start + o.count && o.start < r.start + r.count;
    in
    r == null || (r.start >= allocatorCeiling && !(builtins.any overlaps explicit));

  taskImageRef = "${cfg.taskImage.imageName}:${cfg.taskImage.imageTag}";

  # Loads the pinned task image into the service user's rootless storage, once per image. Its own
  # oneshot unit: a cold load of a large image takes minutes, longer than any API service start
  # should be allowed to, and the rootless CLI needs newuidmap, which the worker's unit forbids.
  loadTaskImage = pkgs.writeShellScript "hivemind-load-task-image" ''
    set -eu
    if ! ${podman} image exists ${lib.escapeShellArg taskImageRef}; then
      ${cfg.taskImage} | ${podman} load
    fi
  '';

  # What the Podman unit relaxes, and why: the same text as units/hivemind-podman.unit.json.
  hardeningNotes = ''
    hivemind-worker.service keeps every hardening directive (exposure 1.4 with systemd 252) apart
    from: KillMode=process (venv tasks outlive a restart and are reattached under
    shutdown.policy leave); AF_NETLINK in RestrictAddressFamilies (glibc's getaddrinfo and the
    primary-address lookup); ProtectKernelLogs also hides /dev/kmsg, so a cgroup v1 OOM kill reads
    as a plain exit; MemoryDenyWriteExecute=yes (venv tasks that JIT-compile need it set to no).
    hivemind-podman.service (and hivemind-task-image.service) relax, for rootless Podman:
    NoNewPrivileges=no and no seccomp-based directive (each forces no_new_privs, which breaks the
    setuid newuidmap/newgidmap); CapabilityBoundingSet=CAP_SETUID CAP_SETGID; DeviceAllow
    /dev/fuse and /dev/net/tun (fuse-overlayfs, slirp4netns); Delegate=yes; KillMode=process
    (containers outlive the API service).
  '';
in
{
  meta = {
    maintainers = [ ];
    doc = ./module.md;
  };

  options.services.hivemind-worker = {
    enable = mkEnableOption "the HiveMind worker node";

    package = mkPackageOption pkgs "hivemind-worker" { };

    user = mkOption {
      type = types.str;
      default = "hivemind";
      description = ''
        Service user of the worker and of its rootless Podman service (they share its home, the
        state directory). Created by the module when it is "hivemind".
      '';
    };

    group = mkOption {
      type = types.str;
      default = "hivemind";
      description = "Group of the service user.";
    };

    taskImage = mkOption {
      type = types.nullOr types.package;
      default = null;
      description = ''
        The task image (a dockerTools.streamLayeredImage) loaded into the service user's rootless
        Podman storage by hivemind-task-image.service before the worker starts, and used for
        tasks. Null: manage images yourself.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Run `hivemind-worker check-config` on the rendered settings at build time, so an invalid
        configuration fails the build with the daemon's own message instead of failing at start.
      '';
    };

    hardening = mkOption {
      type = types.str;
      readOnly = true;
      default = hardeningNotes;
      description = ''
        What the units relax from full hardening, and why (read-only; each directive can be
        overridden in systemd.services.<name>.serviceConfig). ${hardeningNotes}
      '';
    };

    settings = mkOption {
      default = { };
      description = ''
        worker.yaml as Nix, written to ${configPath}; any key of `hivemind-worker check-config
        --defaults`. Changes to logging, shutdown, archive and the live timeouts reload the
        worker; any other change restarts it. Secrets do not belong here: use the *File
        options, which pass paths through LoadCredential=.
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
            default = "/var/lib/hivemind-worker";
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
          shutdown.drain_timeout_s = mkOption {
            type = types.ints.unsigned;
            default = 60;
            description = ''
              Longest wait for running tasks when the worker stops; the unit's TimeoutStopSec is
              this plus 30 s, so systemd never kills a worker in mid-drain.
            '';
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
      type = types.nullOr (types.submodule {
        options.start = mkOption { type = types.ints.positive; description = "First subordinate id."; };
        options.count = mkOption { type = types.ints.positive; default = 65536; description = "Number of ids."; };
      });
      default = null;
      description = ''
        Subordinate uid/gid range of the service user (rootless Podman maps task users into it).
        Null (the default): NixOS allocates a free 65536-id range (autoSubUidGidRange). An
        explicit range must lie above every range the allocator can hand out, which an assertion
        checks.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.passwordFile != null || (finalSettings.pool.password_file or "") != "";
        message = "services.hivemind-worker.passwordFile must be set: the worker logs in to the pool with it.";
      }
      {
        # The same rule check-config applies (choose_mode): never listen unauthenticated to
        # everyone, and never run plaintext when someone set half a TLS setup.
        assertion = authProblems == [ ];
        message = "services.hivemind-worker: ${lib.concatStringsSep "; " authProblems} "
          + "(NixOS: tokenFile, tls.certFile, tls.keyFile, tls.clientCaFile, "
          + "settings.server.auth.legacy_allowed_peers)";
      }
      {
        assertion = handSetSecretPaths == [ ];
        message = "services.hivemind-worker.settings: ${lib.concatStringsSep ", " handSetSecretPaths} "
          + "name a file; use passwordFile, tokenFile, statusTokenFile or tls.* instead (LoadCredential=).";
      }
      {
        assertion = subIdRangeIsFree;
        message = "services.hivemind-worker.subIdRange overlaps subordinate ids NixOS may give other "
          + "users (blocks of 65536 from 100000 up); set it to null (automatic) or start it higher.";
      }
    ];

    services.hivemind-worker.settings = {
      logging.target = mkDefault "journal";
      executor.podman.image = mkIf (cfg.taskImage != null) (mkDefault taskImageRef);
      executor.podman.socket = mkDefault "unix://${podmanSocket}";
      # NixOS has no /usr/bin: a venv task (and run.sh's bash) finds its tools in the system profile.
      executor.venv.task_path = mkDefault "/run/current-system/sw/bin";
    };

    virtualisation.podman.enable = mkDefault true;

    environment.etc."hivemind/worker.yaml" = {
      source = configFile;
      mode = "0440";
      user = "root";
      inherit (cfg) group;
    };

    users.users = mkIf (cfg.user == "hivemind") {
      hivemind = {
        isSystemUser = true;
        inherit (cfg) group;
        description = "HiveMind worker";
        home = "/var/lib/hivemind-worker";
        # Rootless Podman maps the task's users into these; sysusers on Debian can't, see units/install.
        autoSubUidGidRange = cfg.subIdRange == null;
        subUidRanges = lib.optional (cfg.subIdRange != null) { startUid = cfg.subIdRange.start; count = cfg.subIdRange.count; };
        subGidRanges = lib.optional (cfg.subIdRange != null) { startGid = cfg.subIdRange.start; count = cfg.subIdRange.count; };
      };
    };
    users.groups = mkIf (cfg.group == "hivemind") { hivemind = { }; };

    systemd.tmpfiles.settings."10-hivemind-worker" = {
      "/var/lib/hivemind-worker/.config/containers".d = { inherit (cfg) user group; mode = "0750"; };
      "/var/lib/hivemind-worker/.config/containers/containers.conf"."L+".argument = "${(pkgs.formats.toml { }).generate "containers.conf" {
        # Rootless Podman settings for the service user only: tasks get no network unless asked.
        containers.netns = if cfg.settings.executor.podman.network == "none" then "none" else "slirp4netns";
      }}";
    };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.settings.server.port ];

    systemd.sockets.hivemind-podman = {
      description = socketDirectives.unit.Description;
      wantedBy = lib.splitString " " socketDirectives.install.WantedBy;
      unitConfig = overridable (builtins.removeAttrs socketDirectives.unit listKeys);
      socketConfig = overridable socketDirectives.socket // {
        SocketUser = cfg.user;
        SocketGroup = cfg.group;
      };
    };

    systemd.services.hivemind-podman = {
      description = podmanDirectives.unit.Description;
      requires = splitWords podmanDirectives.unit "Requires";
      after = splitWords podmanDirectives.unit "After";

      # newuidmap/newgidmap must be the setuid wrappers, so /run/wrappers comes first.
      path = [ "/run/wrappers" config.virtualisation.podman.package pkgs.fuse-overlayfs pkgs.slirp4netns
               pkgs.shadow pkgs.coreutils ];

      unitConfig = overridable (builtins.removeAttrs podmanDirectives.unit listKeys);
      serviceConfig = withUser (overridable podmanDirectives.service);
    };

    systemd.services.hivemind-task-image = mkIf (cfg.taskImage != null) {
      description = "Load the HiveMind task image into the worker's rootless Podman storage";
      before = [ "hivemind-worker.service" ];
      path = [ "/run/wrappers" config.virtualisation.podman.package pkgs.fuse-overlayfs pkgs.shadow pkgs.coreutils ];
      unitConfig = overridable (builtins.removeAttrs podmanDirectives.unit (listKeys ++ [ "StartLimitIntervalSec" "StartLimitBurst" ]));
      # The Podman unit's sandbox (the rootless CLI needs the same relaxations), as a oneshot.
      serviceConfig = withUser (overridable (builtins.removeAttrs podmanDirectives.service
        [ "ExecStart" "Restart" "RestartSec" "TimeoutStartSec" "TimeoutStopSec" "KillMode" "Delegate" "Type" ]) // {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${loadTaskImage}";
        # A cold load of the image (hundreds of MB through fuse-overlayfs) can take minutes.
        TimeoutStartSec = mkDefault 900;
      });
    };

    systemd.services.hivemind-worker = {
      description = directives.unit.Description;
      wants = splitWords directives.unit "Wants" ++ lib.optional (cfg.taskImage != null) "hivemind-task-image.service";
      after = splitWords directives.unit "After" ++ lib.optional (cfg.taskImage != null) "hivemind-task-image.service";
      wantedBy = lib.splitString " " directives.install.WantedBy;
      # A change in live keys only (logging, shutdown, archive, timeouts) is a reload; anything
      # else restarts (switch-to-configuration restarts when both lists changed).
      reloadTriggers = [ configFile ];
      restartTriggers = [ restartSettings ];

      # The podman executor checks that the CLI exists; it talks to hivemind-podman's API only.
      # util-linux: the venv executor runs tasks through prlimit (and setpriv/unshare as root).
      path = [ config.virtualisation.podman.package pkgs.util-linux ];

      unitConfig = overridable (builtins.removeAttrs directives.unit listKeys);

      serviceConfig = withUser (overridable directives.service) // {
        LoadCredential = lib.mapAttrsToList (name: path: "${name}:${path}") credentials;
        # Room for the configured drain plus result uploads, so systemd never kills mid-drain.
        TimeoutStopSec = mkDefault (cfg.settings.shutdown.drain_timeout_s + 30);
      };
    };
  };
}
