"""Task drivers. Everything outside this package talks to them through `base.Executor` only."""
