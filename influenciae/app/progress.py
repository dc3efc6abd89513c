"""Step messages and timings of the application's jobs (the demo and the console commands)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

__all__ = ["StepLogger", "timed"]


class StepLogger:
    """Prints ``[name   12.3s] message`` on stderr, the seconds since it was made; silent when not ``enabled``.

    Args:
        name: What runs (``"demo"``, ``"top-k"``...), at the start of every line.
        enabled: Whether to print.
    """

    def __init__(self, name: str, *, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        """Print ``message`` with the elapsed time (if enabled)."""
        if self.enabled:
            print(f"[{self.name} {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the ``with`` block takes (also when it raises) to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
