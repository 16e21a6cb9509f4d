"""Exponential backoff with full jitter, with an injectable random source for tests."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0,
                 rand: Callable[[], float] = random.random) -> None:
        self._initial = initial
        self._maximum = maximum
        self._factor = factor
        self._rand = rand
        self._attempt = 0

    def next_delay(self) -> float:
        """Delay before the next try: uniform in [cap/2, cap], cap growing exponentially."""
        cap = min(self._maximum, self._initial * (self._factor ** self._attempt))
        self._attempt += 1
        return cap / 2 + self._rand() * cap / 2

    def reset(self) -> None:
        self._attempt = 0

    @property
    def attempts(self) -> int:
        return self._attempt
