# The worker as a Python application. The gRPC bindings are generated during the build by
# setup.py (scripts/gen_proto.py), from proto/, with the grpcio-tools of this nixpkgs.
{ lib
, python3Packages
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
    fileset = lib.fileset.unions [
      ../pyproject.toml
      ../setup.py
      ../hivemind
      ../proto
      ../scripts/gen_proto.py
      ../tests
      ../units
      (lib.fileset.maybeMissing ../README.md)
    ];
  };

  build-system = with python3Packages; [ setuptools wheel grpcio-tools ];

  dependencies = import ./python-deps.nix python3Packages;

  # nixpkgs moves these independently of PyPI; the code needs only their stable APIs.
  pythonRelaxDeps = [ "grpcio" "protobuf" "podman" ];

  # The Go metrics library sits where hivemind.metrics.native looks for an installed copy.
  postInstall = lib.optionalString (native != null) ''
    mkdir -p $out/${python3Packages.python.sitePackages}/hivemind/_native
    ln -s ${native}/lib/libhivemindmetrics.so \
      $out/${python3Packages.python.sitePackages}/hivemind/_native/libhivemindmetrics.so
  '';

  nativeCheckInputs = [ python3Packages.pytestCheckHook ] ++ import ./test-deps.nix python3Packages;

  # The sandbox has no Podman, no systemd and no network: those tests run in the VM test.
  pytestFlagsArray = [ "-m" "not podman and not system and not slow" ];
  disabledTestPaths = [ "tests/system" ];

  pythonImportsCheck = [ "hivemind" "hivemind._proto.nodepool_pb2_grpc" ];

  meta = {
    description = "Compute node of a HiveMind node pool";
    license = lib.licenses.asl20;
    mainProgram = "hivemind-worker";
    platforms = lib.platforms.linux;
  };
}
