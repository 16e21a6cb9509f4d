"""Sample tasks shipped with the worker (used by `hivemind-worker dev --demo` and the tests)."""

from pathlib import Path

SAMPLES = Path(__file__).resolve().parent


def sample(name: str) -> Path:
    return SAMPLES / name
