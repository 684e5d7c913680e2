"""Scale tests' support: many small classes, a child process's peak resident memory, and bounds on it.

A test runs the command in a subprocess and reads the kernel's own peak (``ru_maxrss`` from ``wait4`` for a
command that exits, ``VmHWM`` for a server still running). A watchdog kills the child when its resident size
passes a hard ceiling, so code that asks for gigabytes fails the test instead of swapping the machine.

The bound a test asserts is ``interpreter + budget``: the peak of a child that only imports what the command
imports (Python, torch, FAISS, ...; measured, not assumed), plus a budget computed from N items, C classes and
d dimensions: a fixed number of copies of the O(N·d + C·d + C·P) arrays the work is allowed to hold.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIB = 1 << 20


def many_small_classes(n_classes: int, dim: int, seed: int, label_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n_classes`` Gaussian classes of 2 or 3 items each (a product catalogue's shape), rows shuffled:
    x (n, dim) float32 around unit-variance centres with noise 0.3, y (n,) int64 labels from ``label_offset``."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 4, size=n_classes)
    y = np.repeat(np.arange(n_classes), sizes)
    x = rng.normal(size=(n_classes, dim)).astype(np.float32)[y]
    x += 0.3 * rng.normal(size=x.shape).astype(np.float32)
    perm = rng.permutation(len(y))
    return x[perm], (y[perm] + label_offset).astype(np.int64)


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    peak_mib: float
    output: str
    killed_at_mib: float | None  # the resident size at which the watchdog killed it, if it did


def resident_mib(pid: int, field: str = "VmRSS") -> float | None:
    """``field`` (VmRSS, VmHWM) of process ``pid`` from /proc, in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def run_child(cmd: list[str], ceiling_mib: float, timeout: float = 300.0, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> ChildRun:
    """Run ``cmd`` to completion; its peak resident memory from ``wait4``. Killed above ``ceiling_mib`` or ``timeout``."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"hardneg-child-{os.getpid()}-{time.monotonic_ns()}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        killed: list[float] = []
        done = threading.Event()

        def watch() -> None:
            deadline = time.monotonic() + timeout
            while not done.wait(0.02):
                rss = resident_mib(proc.pid)
                if rss is not None and rss > ceiling_mib or time.monotonic() > deadline:
                    killed.append(rss or 0.0)
                    proc.kill()
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it; keep Popen from waiting again
    output = log.read_text()
    log.unlink()
    return ChildRun(proc.returncode, usage.ru_maxrss / 1024, output, killed[0] if killed else None)


def interpreter_mib(*modules: str) -> float:
    """Peak resident memory of a Python that imports ``modules`` and exits: what any such command starts from."""
    code = "; ".join(f"import {m}" for m in modules) or "pass"
    run = run_child([sys.executable, "-c", code], ceiling_mib=4096, timeout=120)
    assert run.returncode == 0, run.output
    return run.peak_mib


def budget_mib(n: int, c: int, d: int, p: int, copies: int = 8) -> float:
    """``copies`` of an item table (n x d float32 + an int64 per item) and a class table (c x d float32 + c x p
    int64), in MiB: what O(N·d + C·d + C·P) work may hold at once, with room for the copies a pipeline makes."""
    return copies * (n * (4 * d + 8) + c * (4 * d + 8 * p)) / MIB


def assert_peak_within(run: ChildRun, base_mib: float, allowed_mib: float, what: str) -> None:
    """The run succeeded and peaked within ``base_mib + allowed_mib``."""
    limit = base_mib + allowed_mib
    assert run.killed_at_mib is None, (f"{what}: killed by the watchdog at {run.killed_at_mib:.0f} MiB resident "
                                       f"(bound {limit:.0f} MiB)\n{run.output[-3000:]}")
    assert run.returncode == 0, f"{what}: exit code {run.returncode}\n{run.output[-3000:]}"
    assert run.peak_mib <= limit, (f"{what}: peak resident {run.peak_mib:.0f} MiB > {limit:.0f} MiB "
                                   f"(interpreter {base_mib:.0f} + budget {allowed_mib:.0f})")
