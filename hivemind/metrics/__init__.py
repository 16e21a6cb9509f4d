"""Machine metrics (native Go library or psutil), GPU detection and the CPU score.

`open_metrics()` picks the backend; both return the same `Snapshot` dataclasses.
"""

from hivemind.metrics.model import (
    CgroupStats,
    MetricsError,
    MetricsSource,
    MetricsUnavailable,
    Snapshot,
    TreeUsage,
)
from hivemind.metrics.native import open_metrics

__all__ = ["CgroupStats", "MetricsError", "MetricsSource", "MetricsUnavailable", "Snapshot",
           "TreeUsage", "open_metrics"]
