# A NixOS VM with the module, a development pool faked inside the VM (no upstream server), the
# task image loaded into the worker's rootless Podman storage, and one task run end to end.
{ self }:
{ lib, pkgs, ... }:

let
  pool = "127.0.0.2:50051";
in
{
  name = "hivemind-worker";

  nodes.machine = { config, pkgs, ... }: {
    imports = [ self.nixosModules.default ];
    virtualisation.memorySize = 2048;
    virtualisation.diskSize = 4096;

    # The pool writes the worker's password at start; the worker is started by the test script.
    systemd.services.hivemind-devpool = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        ExecStart = "${lib.getExe config.services.hivemind-worker.package} dev --pool-only "
          + "--pool-listen ${pool} --state-dir /var/lib/hivemind-devpool";
        StateDirectory = "hivemind-devpool";
      };
    };

    services.hivemind-worker = {
      enable = true;
      passwordFile = "/var/lib/hivemind-devpool/pool-password";
      settings = {
        node.id = "vm-node";
        pool.address = pool;
        server = {
          listen_host = "127.0.0.2";
          advertise_host = "127.0.0.2";
          auth = { mode = "legacy"; legacy_allowed_peers = [ "127.0.0.0/8" ]; };
        };
        executor.kind = "podman";
        executor.slots = 1;
        status.enabled = false;
      };
    };
    systemd.services.hivemind-worker.wantedBy = lib.mkForce [ ];
  };

  testScript = { nodes, ... }:
    let
      worker = lib.getExe nodes.machine.services.hivemind-worker.package;
      sample = "${nodes.machine.services.hivemind-worker.package}/${pkgs.python3.sitePackages}/hivemind/samples/hello";
    in
    ''
      import json

      machine.wait_for_unit("hivemind-devpool.service")
      machine.wait_for_file("/var/lib/hivemind-devpool/pool-password")

      with subtest("starts, and is active only once READY=1 arrived"):
          machine.succeed("systemctl start hivemind-worker")
          machine.wait_for_unit("hivemind-worker.service")
          machine.wait_until_succeeds(
              "systemctl status hivemind-worker | grep -q 'Status: \"registered'", timeout=60)

      with subtest("the task image is in the service user's rootless storage"):
          machine.succeed(
              "runuser -u hivemind -- env XDG_RUNTIME_DIR=/run/hivemind-podman "
              "podman image exists ${nodes.machine.services.hivemind-worker.settings.executor.podman.image}")

      with subtest("a task runs and its output is journaled under its TASK_ID"):
          out = machine.succeed("${worker} submit ${sample} --pool ${pool} --timeout 300")
          last = out.strip().splitlines()[-1]
          assert ": COMPLETED" in last, out
          task_id = last.split()[1].rstrip(":")
          machine.wait_until_succeeds(
              f"journalctl TASK_ID={task_id} HIVEMIND_OUTPUT=stdout | grep -q 'step 5 of 5'", timeout=30)

      with subtest("structured records in the journal"):
          records = [json.loads(line) for line in machine.succeed(
              "journalctl -u hivemind-worker -o json EVENT=worker.ready").splitlines()]
          assert records and records[-1]["NODE_ID"] == "vm-node", records
          password = machine.succeed("cat /var/lib/hivemind-devpool/pool-password").strip()
          machine.fail(f"journalctl -u hivemind-worker | grep -qF {password}")

      with subtest("SIGHUP reloads"):
          machine.succeed("systemctl reload hivemind-worker")
          machine.wait_until_succeeds("journalctl -u hivemind-worker EVENT=config.reloaded | grep -q reloaded")

      with subtest("hardening as the unit files say"):
          machine.succeed("systemctl show hivemind-worker -p ProtectSystem | grep -q strict")
          machine.succeed("systemctl show hivemind-worker -p NoNewPrivileges | grep -q yes")
          machine.succeed("systemctl show hivemind-podman -p NoNewPrivileges | grep -q no")
          machine.succeed("systemctl is-active hivemind-podman")
          score = machine.succeed("systemd-analyze security hivemind-worker | tail -1")
          assert float(score.split(":")[1].split()[0]) <= 3.0, score

      with subtest("a worker restart leaves the Podman service (and its containers) alone"):
          podman_pid = machine.succeed("systemctl show -p MainPID --value hivemind-podman").strip()
          machine.succeed("systemctl restart hivemind-worker")
          assert machine.succeed("systemctl show -p MainPID --value hivemind-podman").strip() == podman_pid
          machine.wait_until_succeeds(
              "systemctl status hivemind-worker | grep -q 'Status: \"registered'", timeout=60)

      with subtest("stops cleanly"):
          machine.succeed("systemctl stop hivemind-worker")
          machine.succeed("systemctl show hivemind-worker -p Result | grep -q success")
    '';
}
