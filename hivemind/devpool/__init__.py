"""An embedded development node pool (the pool side of the protocol) and the `submit` client."""

from hivemind.devpool.server import DevPool
from hivemind.devpool.state import COMPLETED, FAILED, QUEUED, RUNNING, PoolTimings

# The account `hivemind-worker dev` creates on its loopback-only pool, used by `submit` by default.
DEV_USERNAME = "dev"
DEV_PASSWORD = "dev"  # noqa: S105 - a fixed, documented credential of a loopback-only dev pool

__all__ = ["COMPLETED", "DEV_PASSWORD", "DEV_USERNAME", "FAILED", "QUEUED", "RUNNING", "DevPool",
           "PoolTimings"]
