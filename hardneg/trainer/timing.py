"""Per-phase clocks of an epoch: wall-clock and CPU seconds of each phase, nested phases charged exclusively.

The loop and the recipes mark phases (``with timer.phase("forward"):``); a phase entered inside another stops
the outer one's clock until it ends, so the phases of an epoch add up to the time spent in them. The record of
an epoch holds ``<phase>_s`` (wall) and ``<phase>_cpu_s`` (this process's CPU) for every phase that ran.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# The phases, in the order an epoch meets them: a refresh (embed the training set, build the snapshot's index,
# export the model, publish, and the recipe's refresh: mining or composing), then training (the epoch's batches,
# and per step: gathering the batch's data, the forward pass and loss, in-batch mining, backward, the optimiser
# step), then evaluation.
REFRESH_PHASES = ("embed", "index", "export", "publish", "mine")
TRAIN_PHASES = ("batches", "data", "forward", "inbatch_mine", "backward", "step")
PHASES = (*REFRESH_PHASES, *TRAIN_PHASES, "eval")


class PhaseTimer:
    """Accumulates wall and CPU seconds per phase until :meth:`take` hands them over and starts afresh."""

    def __init__(self) -> None:
        self._wall: dict[str, float] = {}
        self._cpu: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = (0.0, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the time spent inside the block to ``name`` (and not to the phase around it)."""
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def _charge(self) -> None:
        now = (time.perf_counter(), time.process_time())
        if self._stack:
            top = self._stack[-1]
            self._wall[top] = self._wall.get(top, 0.0) + now[0] - self._mark[0]
            self._cpu[top] = self._cpu.get(top, 0.0) + now[1] - self._mark[1]
        self._mark = now

    def total(self, phases: tuple[str, ...]) -> tuple[float, float]:
        """Wall and CPU seconds of ``phases`` so far."""
        return (sum(self._wall.get(p, 0.0) for p in phases), sum(self._cpu.get(p, 0.0) for p in phases))

    def take(self) -> dict[str, float]:
        """``{phase_s, phase_cpu_s}`` of every phase that ran since the last call, rounded; then reset."""
        out: dict[str, float] = {}
        for name in PHASES:
            if name in self._wall:
                out[f"{name}_s"] = round(self._wall[name], 4)
                out[f"{name}_cpu_s"] = round(self._cpu[name], 4)
        self._wall, self._cpu = {}, {}
        return out


NO_TIMER = PhaseTimer()  # for code run outside a loop (tests, benchmarks): its clocks are never read
