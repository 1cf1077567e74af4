""" "auto" staleness fitted from measurements, and the statistics ``root_stats()`` reports."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FITTED", "StalenessFit", "Stats"]

FITTED = "fitted_staleness"
"""The param-group key of an ``"auto"`` staleness once it is fitted (absent before)."""

log = logging.getLogger("torch_shampoo")


class StalenessFit:
    """Fits ``"auto"`` staleness: the smallest s ≥ 1 such that ``MARGIN`` times a root cycle's
    wall time fits into s training steps, a step being the median interval between the
    ``step()`` calls that precondition (the graft-only steps before roots exist are cheaper);
    fitted again when the cycle or the step changed by more than ``REFIT``× since."""

    MARGIN = 2.0
    """Kept at 2: a later cycle's roots run beside training (the first cycle's are waited for
    on every core), and a stall costs more than a step of staleness (docs/design.md)."""
    REFIT = 2.0

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._every: deque[float] = deque(maxlen=64)
        """The latest intervals between ``step()`` calls."""
        self._preconditioned: deque[float] = deque(maxlen=64)
        """Those of steps that began with roots installed (not the first cycle's own step)."""
        self._last: float | None = None
        self._counting = False
        self.rooted = False
        """Roots were installed: the steps from the next one on precondition."""
        self.first_tick: float | None = None
        self.cycle_seconds: float | None = None
        """Wall time of the latest root cycle (the first's wait; a later one's send → last
        root; staggered roots: one step's share of a cycle), with the given workers."""
        self._cycle_sent = -1.0
        self.basis: dict[int, tuple[float, float]] = {}
        """Per group (``id``): the (cycle, step) seconds its staleness was fitted from."""
        self.grown_at = -1

    def tick(self) -> None:
        """At the start of every ``step()``."""
        now = self.clock()
        if self._last is not None:
            self._every.append(now - self._last)
            if self._counting:
                self._preconditioned.append(now - self._last)
        self._last, self._counting = now, self.rooted
        if self.first_tick is None:
            self.first_tick = now

    def step_seconds(self) -> float | None:
        """The median interval of preconditioned steps (of every step until there is one)."""
        gaps = self._preconditioned or self._every
        return statistics.median(gaps) if gaps else None

    def steps_for(self, seconds: float) -> int | None:
        """Preconditioned training steps that ``seconds`` of root work needs, with the margin
        (None until a preconditioned step was measured)."""
        if not self._preconditioned:
            return None
        period = statistics.median(self._preconditioned)
        if period <= 0:
            return None
        return max(1, math.ceil(self.MARGIN * seconds / period))

    def cycle_ended(self, sent_at: float, finished_at: float) -> None:
        """A later cycle's root (sent at ``sent_at``) ended at ``finished_at``: the cycle's wall
        time is the latest of its roots'."""
        if sent_at <= 0 or finished_at < sent_at:  # (loaded from a state dict: not measured)
            return
        seconds = finished_at - sent_at
        if sent_at == self._cycle_sent and self.cycle_seconds is not None:
            seconds = max(seconds, self.cycle_seconds)
        self._cycle_sent, self.cycle_seconds = sent_at, seconds

    def fit(self, key: int) -> int | None:
        """The staleness the latest cycle needs (None: nothing to fit from yet); remembered as
        group ``key``'s basis."""
        step = self.step_seconds()
        if self.cycle_seconds is None or step is None:
            return None
        steps = self.steps_for(self.cycle_seconds)
        if steps is not None:
            self.basis[key] = (self.cycle_seconds, step)
        return steps

    def drift(self, key: int) -> float | None:
        """How much the cycle per step changed since group ``key`` was fitted (> 1: roots got
        slower), when the cycle or the step changed by more than ``REFIT``×; else None."""
        step, basis = self.step_seconds(), self.basis.get(key)
        if basis is None or self.cycle_seconds is None or step is None or step <= 0:
            return None
        cycle_ratio, step_ratio = self.cycle_seconds / basis[0], step / basis[1]
        if max(cycle_ratio, 1 / cycle_ratio, step_ratio, 1 / step_ratio) <= self.REFIT:
            return None
        return cycle_ratio / step_ratio

    def auto(self, group: dict[str, Any], frequency: int) -> int:
        """``group``'s auto staleness of a later cycle: fitted once measured, fitted again on a
        drift (never below a stall's growth when roots got slower), ≤ ``frequency``; logged
        when it changes."""
        fitted, key = group.get(FITTED), id(group)
        drift = self.drift(key) if fitted is not None else None
        if fitted is not None and key not in self.basis:
            self.fit(key)  # (loaded with the state: kept, measured from now on)
        elif fitted is None or drift is not None:
            steps = self.fit(key)
            if steps is not None:
                steps = min(frequency, steps)
                if drift is not None and drift > 1:  # roots got slower: never below a growth
                    steps = max(steps, int(fitted or 0))
                if steps != fitted:
                    cycle, step = self.basis[key]
                    log.info(
                        "root_staleness='auto' %s to %d steps (a root cycle %.3g s, a "
                        "preconditioned step %.3g s); root_staleness=%d reproduces this run",
                        "re-fitted" if fitted is not None else "fitted", steps, cycle, step, steps,
                    )  # fmt: skip
                fitted = group[FITTED] = steps
        return frequency if fitted is None else int(fitted)


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
