# Python packages the test suite needs beyond the worker's own dependencies.
ps: with ps; [
  pytest
  pytest-timeout
  hypothesis
  cryptography
  grpcio-tools
  mypy
  types-pyyaml
  types-psutil
  matplotlib
  prometheus-client
  podman
]
