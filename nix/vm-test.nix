# A NixOS VM with the module, a development pool faked inside the VM (no upstream server), the
# task image loaded into the worker's rootless Podman storage, and one task run end to end.
{ self }:
{ lib, pkgs, ... }:

let
  pool = "127.0.0.2:50051";
  # A task whose requirements.txt names a wheel it carries: the VM has no index to fetch from,
  # and the preparation container sees the workspace at /workspace. six is pure Python.
  sixWheel = pkgs.python3Packages.six.dist;
  requirementsTask = pkgs.runCommand "hivemind-requirements-task" { } ''
    mkdir -p $out/wheels
    cp ${sixWheel}/*.whl $out/wheels/
    (cd $out/wheels && echo "/workspace/wheels/$(ls)") > $out/requirements.txt
    printf 'import six\nprint("six", six.__version__, "from", six.__file__)\n' > $out/run.py
  '';
  longTask = pkgs.writeTextDir "run.py" ''
    import time
    print("long task started", flush=True)
    time.sleep(3600)
  '';
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
        shutdown.drain_timeout_s = 10;
      };
    };
    systemd.services.hivemind-worker.wantedBy = lib.mkForce [ ];
    # The watchdog check's hang hook; Environment= merges with the module's entries.
    systemd.services.hivemind-worker.serviceConfig.Environment = [ "HIVEMIND_DEBUG_HANG_SIGNAL=1" ];
    systemd.services.hivemind-worker.serviceConfig.RestartSec = lib.mkForce 1;
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
          # The sample sits in the read-only store: the result goes elsewhere.
          out = machine.succeed("${worker} submit ${sample} --pool ${pool} --timeout 300 --out /tmp/hello.result.zip")
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

      with subtest("without --out, a read-only input directory is one clear error"):
          rc, out = machine.execute("${worker} submit ${sample} --pool ${pool} --timeout 300 2>&1 >/dev/null")
          assert rc == 1 and "pass --out PATH" in out and len(out.strip().splitlines()) == 1, out

      with subtest("a task with requirements.txt"):
          out = machine.succeed("${worker} submit ${requirementsTask} --pool ${pool} --timeout 600 --out /tmp/req.zip")
          assert ": COMPLETED" in out.strip().splitlines()[-1] and "six " in out, out

      with subtest("SIGHUP reloads"):
          machine.succeed("systemctl reload hivemind-worker")
          machine.wait_until_succeeds("journalctl -u hivemind-worker EVENT=config.reloaded | grep -q reloaded")

      with subtest("an invalid config fails the reload and the old one keeps running"):
          pid = machine.succeed("systemctl show -p MainPID --value hivemind-worker").strip()
          machine.succeed("cp /etc/hivemind/worker.yaml /tmp/worker.yaml.good")
          machine.succeed("echo 'bogus_key: 1' >> /etc/hivemind/worker.yaml")
          machine.fail("systemctl reload hivemind-worker")
          assert machine.succeed("systemctl show -p MainPID --value hivemind-worker").strip() == pid
          machine.succeed("systemctl is-active hivemind-worker")
          machine.succeed("journalctl -u hivemind-worker | grep -q 'bogus_key: unknown key'")
          machine.succeed("cp /tmp/worker.yaml.good /etc/hivemind/worker.yaml")
          machine.succeed("systemctl reload hivemind-worker")

      with subtest("hardening as the unit files say"):
          machine.succeed("systemctl show hivemind-worker -p ProtectSystem | grep -q strict")
          machine.succeed("systemctl show hivemind-worker -p NoNewPrivileges | grep -q yes")
          machine.succeed("systemctl show hivemind-podman -p NoNewPrivileges | grep -q no")
          machine.succeed("systemctl is-active hivemind-podman")
          score = machine.succeed("systemd-analyze security hivemind-worker | tail -1")
          assert float(score.split(":")[1].split()[0]) <= 3.0, score

      with subtest("the Podman API socket belongs to the service user, mode 0600"):
          assert machine.succeed("stat -c '%U %a' /run/hivemind-podman/podman.sock").split() == ["hivemind", "600"]

      with subtest("a Podman crash leaves the worker running, and the next task starts Podman again"):
          worker_pid = machine.succeed("systemctl show -p MainPID --value hivemind-worker").strip()
          machine.succeed("systemctl kill --kill-who=main --signal=SIGKILL hivemind-podman")
          machine.succeed("systemctl is-active hivemind-podman.socket")
          out = machine.succeed("${worker} submit ${sample} --pool ${pool} --timeout 300 --out /tmp/again.zip")
          assert ": COMPLETED" in out.strip().splitlines()[-1], out
          assert machine.succeed("systemctl show -p MainPID --value hivemind-worker").strip() == worker_pid
          assert machine.succeed("systemctl show -p NRestarts --value hivemind-worker").strip() == "0"

      with subtest("the watchdog (shipped WatchdogSec) restarts a hung worker"):
          before = int(machine.succeed("systemctl show -p NRestarts --value hivemind-worker"))
          machine.succeed("systemctl kill --kill-who=main --signal=SIGUSR2 hivemind-worker")
          machine.wait_until_succeeds(
              f"test $(systemctl show -p NRestarts --value hivemind-worker) -gt {before}", timeout=180)
          machine.succeed("journalctl -u hivemind-worker | grep -q 'Watchdog timeout'")
          machine.wait_until_succeeds(
              "systemctl status hivemind-worker | grep -q 'Status: \"registered'", timeout=60)

      with subtest("a worker restart leaves the Podman service (and its containers) alone"):
          podman_pid = machine.succeed("systemctl show -p MainPID --value hivemind-podman").strip()
          machine.succeed("systemctl restart hivemind-worker")
          assert machine.succeed("systemctl show -p MainPID --value hivemind-podman").strip() == podman_pid
          machine.wait_until_succeeds(
              "systemctl status hivemind-worker | grep -q 'Status: \"registered'", timeout=60)

      with subtest("stop with a running task drains, then ends it, inside the stop timeout"):
          machine.succeed("systemd-run --unit=long-submit ${worker} submit ${longTask} --pool ${pool} "
                          "--timeout 600 --out /tmp/long.zip")
          machine.wait_until_succeeds(
              "systemctl show -p StatusText --value hivemind-worker | grep -q '1 task(s) running'", timeout=300)
          machine.succeed("systemctl stop hivemind-worker")
          machine.succeed("systemctl show hivemind-worker -p Result | grep -q success")
          machine.succeed("journalctl -u hivemind-worker EVENT=worker.drain_timeout | grep -q .")
          machine.fail("journalctl -u hivemind-worker | grep -q 'State .stop-sigterm. timed out'")
          machine.succeed("systemctl start hivemind-worker")

      with subtest("stops cleanly"):
          machine.succeed("systemctl stop hivemind-worker")
          machine.succeed("systemctl show hivemind-worker -p Result | grep -q success")
    '';
}
