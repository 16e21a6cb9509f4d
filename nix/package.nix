# The worker as a Python application. The gRPC bindings are generated during the build by
# setup.py (scripts/gen_proto.py), from proto/, with the grpcio-tools of this nixpkgs.
{ lib
, python3Packages
, util-linux
, native ? null
}:

let
  root = ../.;
in
python3Packages.buildPythonApplication {
  pname = "hivemind-worker";
  version = "0.1.0";
  pyproject = true;

  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions (import ./package-files.nix);
  };

  build-system = with python3Packages; [ setuptools wheel grpcio-tools ];

  dependencies = import ./python-deps.nix python3Packages;

  # nixpkgs moves these independently of PyPI; the code needs only their stable APIs.
  pythonRelaxDeps = [ "grpcio" "protobuf" ];

  # The Go metrics library, the sandbox init and the mount helper sit where hivemind looks for installed copies
  # (hivemind.metrics.native, hivemind.executors.namespaces, hivemind.executors.ns_mount).
  postInstall = lib.optionalString (native != null) ''
    mkdir -p $out/${python3Packages.python.sitePackages}/hivemind/_native
    ln -s ${native}/lib/libhivemindmetrics.so \
      $out/${python3Packages.python.sitePackages}/hivemind/_native/libhivemindmetrics.so
    ln -s ${native}/bin/hm-sandbox-init \
      $out/${python3Packages.python.sitePackages}/hivemind/_native/hm-sandbox-init
    ln -s ${native}/bin/hm-ns-mount \
      $out/${python3Packages.python.sitePackages}/hivemind/_native/hm-ns-mount
  '';

  # util-linux: the venv executor's tests run tasks through prlimit and setpriv.
  nativeCheckInputs = [ python3Packages.pytestCheckHook util-linux ]
    ++ import ./test-deps.nix python3Packages;

  # The sandbox has no Podman, no systemd and no network: those tests run in the VM test. One
  # word per mark: the hook (nixpkgs >= 25.05) joins them into `-m "not podman and not ..."`
  # itself; a marker expression in pytestFlagsArray is split into words by its eval.
  disabledTestMarks = [ "podman" "system" "slow" ];
  disabledTestPaths = [ "tests/system" ];
  # The build runs unprivileged, so the venv executor runs tasks as the build user itself: keeping
  # a task away from the worker's own secret files needs a root worker (the task-user switch).
  # The full suite runs it as root.
  disabledTests = [ "test_known_secrets_reach_no_log_status_error_or_result" ];

  pythonImportsCheck = [ "hivemind" "hivemind._proto.nodepool_pb2_grpc" ];

  meta = {
    description = "Compute node of a HiveMind node pool";
    license = lib.licenses.asl20;
    mainProgram = "hivemind-worker";
    platforms = lib.platforms.linux;
  };
}
