{
  description = "hivemind-worker: a compute node of a HiveMind node pool";

  # A supported release: python3Packages.systemd-python and the pytest hook that takes
  # disabledTestMarks. Current nixpkgs.lib needs Nix >= 2.18.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
    in
    {
      overlays.default = final: _prev: {
        hivemind-native = final.callPackage ./native { };
        hivemind-worker = final.callPackage ./nix/package.nix { native = final.hivemind-native; };
        hivemind-task-image = final.callPackage ./images { };
      };

      packages = forAllSystems (_system: pkgs:
        let
          native = pkgs.callPackage ./native { };
          worker = pkgs.callPackage ./nix/package.nix { inherit native; };
        in
        {
          inherit native worker;
          default = worker;
          task-image = pkgs.callPackage ./images { };
        });

      apps = forAllSystems (system: pkgs:
        let
          # With no arguments, a development pool and a worker on loopback; otherwise the CLI.
          launcher = pkgs.writeShellScript "hivemind-worker-app" ''
            if [ "$#" -eq 0 ]; then set -- dev; fi
            exec ${self.packages.${system}.worker}/bin/hivemind-worker "$@"
          '';
        in
        {
          worker = { type = "app"; program = "${launcher}"; };
          default = self.apps.${system}.worker;
        });

      nixosModules.default = { pkgs, ... }: {
        imports = [ ./nix/module.nix ];
        services.hivemind-worker.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.worker;
        services.hivemind-worker.taskImage =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.task-image;
      };

      checks = forAllSystems (system: pkgs: {
        # The package's checkPhase runs the Python unit tests (no Podman, no systemd as PID 1).
        worker = self.packages.${system}.worker;
        native = self.packages.${system}.native;
        # The NixOS unit and units/hivemind-worker.service come from one JSON file; this proves
        # the committed .service is still its rendering.
        unit-file = pkgs.runCommand "hivemind-unit-file-check" { nativeBuildInputs = [ pkgs.python3 ]; } ''
          cp -r ${./units} units && chmod -R u+w units
          python3 units/gen-unit --check
          touch $out
        '';
        vm-test = pkgs.testers.runNixOSTest (import ./nix/vm-test.nix { inherit self; });
      });

      devShells = forAllSystems (system: pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${system}.native ];
          packages = [
            (pkgs.python3.withPackages (ps: import ./nix/python-deps.nix ps ++ import ./nix/test-deps.nix ps))
            pkgs.go
            pkgs.podman
            pkgs.ruff
            pkgs.nixpkgs-fmt
          ];
        };
      });

      formatter = forAllSystems (_system: pkgs: pkgs.nixpkgs-fmt);
    };
}
