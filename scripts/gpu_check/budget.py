# Copyright (c) MambaClinix bundle contributors. Licensed under the Apache License, Version 2.0.
"""The check's global time budget."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Budget"]


class Budget:
    """A wall-clock allowance shared by all sections: each section, and each timed call inside one, asks it
    whether the time it needs is left, so that a run stops near the budget and records what it skipped.

    Args:
        seconds: the allowance (> 0).
        clock: a monotonic clock in seconds (tests pass a fake one).
        start: the ``clock`` time the allowance counts from (default: now), e.g. the process start, so that the
            imports count too.

    Raises:
        ValueError: ``seconds`` is not positive.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, start: float | None = None) -> None:
        if not seconds > 0:
            raise ValueError(f"the time budget must be positive seconds, got {seconds}; e.g. --budget-s 150.")
        self.seconds = float(seconds)
        self._clock = clock
        self._start = clock() if start is None else float(start)

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return self._clock() - self._start

    def remaining(self) -> float:
        """Seconds left (negative once overdrawn)."""
        return self.seconds - self.elapsed()

    def allows(self, seconds: float) -> bool:
        """Whether ``seconds`` more still fit in the budget."""
        return self.remaining() >= seconds

    def spent_reason(self, needed: float | None = None) -> str:
        """Why something does not run: the budget, what is left and, when given, what it would need."""
        text = f"time budget of {self.seconds:.0f} s: {max(self.remaining(), 0.0):.0f} s left"
        return text + (f", about {needed:.0f} s needed" if needed is not None else "")
