""" "auto" staleness: how many training steps a root cycle's work needs, from measurements."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections import deque

__all__ = ["FITTED", "StalenessFit"]

FITTED = "fitted_staleness"
"""The param-group key of an ``"auto"`` staleness once it is fitted (absent before)."""


class StalenessFit:
    """Fits ``"auto"`` staleness: the smallest s (1 ≤ s ≤ frequency) such that a root cycle's
    measured wall time, times ``MARGIN``, fits into s training steps (the median interval
    between ``step()`` calls: forward, backward and the step itself)."""

    MARGIN = 2.0

    def __init__(self) -> None:
        self._clock: deque[float] = deque(maxlen=65)
        self.first_tick: float | None = None
        self.cycle_seconds: float | None = None
        """Wall time of the latest root cycle that was waited for (with the given workers)."""
        self.grown_at = -1

    def tick(self) -> None:
        now = time.perf_counter()
        self._clock.append(now)
        if self.first_tick is None:
            self.first_tick = now

    def step_seconds(self) -> float | None:
        times = list(self._clock)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        return statistics.median(gaps) if gaps else None

    def steps_for(self, seconds: float) -> int | None:
        """Training steps that ``seconds`` of root work needs, with the margin."""
        period = self.step_seconds()
        if period is None or period <= 0:
            return None
        return max(1, math.ceil(self.MARGIN * seconds / period))
