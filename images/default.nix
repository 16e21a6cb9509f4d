# The task image, the Nix way: the same contents as images/packages (Python 3 with pip, requests,
# numpy, pandas, matplotlib and munkres; `python` as python3; /usr/bin/env; CA certificates; a
# non-root uid 1000 user; /workspace as the working directory). tests/test_nix.py compares the
# two lists. pip is what the Podman executor's requirements step runs.
# A streamLayeredImage is a script that writes the image tarball: `$(nix build .#task-image
# --print-out-paths) | podman load`. Its tag is the derivation's hash, so an image ID names
# exactly one input set.
{ lib
, dockerTools
, python3
, bashInteractive
, coreutils
, cacert
}:

let
  python = python3.withPackages (ps: with ps; [ pip requests numpy pandas matplotlib munkres ]);
in
dockerTools.streamLayeredImage {
  name = "localhost/hivemind-task";
  contents = [ python bashInteractive coreutils cacert ];

  fakeRootCommands = ''
    mkdir -p etc workspace tmp usr/bin
    # python-is-python3 and /usr/bin/env, as in the Debian image (`#!/usr/bin/env python3`).
    [ -e bin/python ] || ln -s ${python}/bin/python3 bin/python
    ln -s ${coreutils}/bin/env usr/bin/env
    echo 'root:x:0:0:root:/root:/bin/sh' > etc/passwd
    echo 'task:x:1000:1000:task:/tmp:/bin/sh' >> etc/passwd
    echo 'root:x:0:' > etc/group
    echo 'task:x:1000:' >> etc/group
    chown 1000:1000 workspace
    chmod 1777 tmp
  '';
  enableFakechroot = false;

  config = {
    User = "1000:1000";
    WorkingDir = "/workspace";
    Cmd = [ "python3" ];
    Env = [
      "LANG=C.UTF-8"
      "PYTHONDONTWRITEBYTECODE=1"
      "PYTHONUNBUFFERED=1"
      "MPLBACKEND=Agg"
      "HOME=/tmp"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "PATH=/bin"
    ];
  };
}
