"""hivemind-worker: a compute node of a HiveMind node pool."""

__version__ = "0.1.0"
