# libhivemindmetrics.so: the Go metrics library loaded by hivemind.metrics.native (ctypes);
# hm-sandbox-init, the venv tasks' namespace init (hivemind.executors.namespaces), and hm-ns-mount,
# the disk quota's mount helper in rootless Podman's namespace (hivemind.executors.ns_mount).
# Standard library only, so no vendoring; built like native/Makefile does.
{ lib
, stdenv
, go
}:

stdenv.mkDerivation {
  pname = "hivemind-metrics";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./go.mod
      ./hivemind_metrics.h
      (lib.fileset.fileFilter (file: file.hasExt "go") ./.)
      (lib.fileset.maybeMissing ./check_header.sh)
    ];
  };

  nativeBuildInputs = [ go ];

  env = {
    CGO_ENABLED = "1";
    GOFLAGS = "-trimpath -mod=mod";
    GOPROXY = "off";
  };

  buildPhase = ''
    runHook preBuild
    export HOME=$TMPDIR GOCACHE=$TMPDIR/go-cache
    go build -buildmode=c-shared -ldflags="-s -w" -o libhivemindmetrics.so .
    CGO_ENABLED=0 go build -ldflags="-s -w" -o hm-sandbox-init ./sandbox-init
    CGO_ENABLED=0 go build -ldflags="-s -w" -o hm-ns-mount ./ns-mount
    if [ -f check_header.sh ]; then sh check_header.sh libhivemindmetrics.h hivemind_metrics.h; fi
    runHook postBuild
  '';

  doCheck = true;
  checkPhase = ''
    runHook preCheck
    go test ./...
    runHook postCheck
  '';

  installPhase = ''
    runHook preInstall
    install -Dm0755 libhivemindmetrics.so $out/lib/libhivemindmetrics.so
    install -Dm0755 hm-sandbox-init $out/bin/hm-sandbox-init
    install -Dm0755 hm-ns-mount $out/bin/hm-ns-mount
    install -Dm0644 hivemind_metrics.h $out/include/hivemind_metrics.h
    runHook postInstall
  '';

  meta = {
    description = "Native system metrics for hivemind-worker";
    license = lib.licenses.asl20;
    platforms = lib.platforms.linux;
  };
}
