# The worker's runtime Python dependencies (pyproject.toml's [project] dependencies).
ps: with ps; [
  grpcio
  protobuf
  psutil
  systemd-python
  pyyaml
  falcon
  waitress
]
