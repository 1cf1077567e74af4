""" "auto" staleness fitted from measurements, and the statistics ``root_stats()`` reports."""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

__all__ = ["FITTED", "StalenessFit", "Stats"]

FITTED = "fitted_staleness"
"""The param-group key of an ``"auto"`` staleness once it is fitted (absent before)."""


class StalenessFit:
    """Fits ``"auto"`` staleness: the smallest s ≥ 1 such that ``MARGIN`` times a root cycle's
    wall time fits into s training steps (the median interval between ``step()`` calls)."""

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
        gaps = [b - a for a, b in itertools.pairwise(self._clock)]
        return statistics.median(gaps) if gaps else None

    def steps_for(self, seconds: float) -> int | None:
        """Training steps that ``seconds`` of root work needs, with the margin."""
        period = self.step_seconds()
        if period is None or period <= 0:
            return None
        return max(1, math.ceil(self.MARGIN * seconds / period))


@dataclass
class Stats:
    roots_computed: int = 0
    roots_solved: int = 0
    """Roots this process solved itself (with ``partition_roots``, about 1/world of them)."""
    root_failures: int = 0
    root_retries: int = 0
    """float32 roots solved again in float64 by this process."""
    stalls: int = 0
    stall_seconds: float = 0.0
    first_root_seconds: float = 0.0
    root_seconds: float = 0.0
    staleness_total: int = 0
    staleness_count: int = 0
    staleness_max: int = 0
    staleness_increases: int = 0
    last_error: dict[tuple[int, int], float] = field(default_factory=dict)
    """(parameter index, factor index) → the solver's residual of its last root."""
