"""Run benchmark trainings in worker processes: shared by bench/quality.py and bench/selfsup.py."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

S = TypeVar("S")
R = TypeVar("R")

log = logging.getLogger("bench")


def worker_init() -> None:
    """One thread per worker: workers share the cores, and oversubscribed OpenMP slows all of them."""
    os.environ["OMP_NUM_THREADS"] = "1"
    logging.basicConfig(level=logging.WARNING)
    from hardneg.trainer import loop

    # The trainer redraws plot.png after every epoch; a benchmark does not need it and it would be a
    # fifth of the run time (it is outside the measured clock either way).
    loop.plot_history = lambda history, path: None


def run_in_pool(run_one: Callable[[S], R], specs: Sequence[S], workers: int,
                describe: Callable[[S, R], str]) -> list[R]:
    """``run_one`` over ``specs`` in ``workers`` spawned processes, in order, logging ``describe(spec, record)``."""
    done: list[R] = []
    started = time.monotonic()
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=worker_init) as pool:
        for spec, rec in zip(specs, pool.map(run_one, specs)):
            done.append(rec)
            log.info("[%3d/%d %6.0fs] %s", len(done), len(specs), time.monotonic() - started, describe(spec, rec))
    return done
