"""Peak memory and time of the trainer's first snapshot refresh with many classes.

Global mining's users have many classes with few items each (face identities, product catalogues). This runs
the default ``--mining global`` trainer (in-batch P x K warm-up, then class batches composed from the
snapshot) on C seeded Gaussian classes of ``--per-class`` items of ``--dim``-dimensional vectors (through the
MLP), and measures the first refresh (embed the training set, publish a snapshot, find each class's
confusable classes, composition statistics): wall-clock and CPU seconds, and the process's peak resident
memory during it (VmHWM, reset just before through ``/proc/self/clear_refs``). The warm-up epoch's peak is
printed beside it (the P x K sampler). A refresh that dies is reported with its error (e.g. the allocation
numpy refused). Run: ``.venv/bin/python bench/many_classes.py --classes 1000 10000``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) since start or the last :func:`reset_peak`, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def many_class_data(classes: int, per_class: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``classes`` Gaussian classes of ``per_class`` items each: x (classes·per_class, dim) float32, y (…,) int64."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    y = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    x = centres[y] + 0.5 * rng.normal(size=(len(y), dim)).astype(np.float32)
    return x, y


def run(classes: int, per_class: int, dim: int, workdir: Path) -> dict:
    """Warm-up epoch then first refresh of a default global-mining run on ``classes`` classes; their figures."""
    from hardneg.trainer.config import TrainConfig
    from hardneg.trainer.loop import Trainer

    x, y = many_class_data(classes, per_class, dim, seed=0)
    ex, ey = many_class_data(200, 3, dim, seed=1)
    np.savez(workdir / "train.npz", x=x, y=y)
    np.savez(workdir / "eval.npz", x=ex, y=ey)
    cfg = TrainConfig.from_dict({"data": f"npz:{workdir / 'train.npz'}", "eval_data": f"npz:{workdir / 'eval.npz'}",
                                 "epochs": 2, "store": str(workdir / "store"), "run_dir": str(workdir / "run")})
    trainer = Trainer.create(cfg)
    trainer._finish_epoch(None, None, time.monotonic())  # epoch 0 (the untrained model), as Trainer.run does
    out: dict = {"code": str(Path(__import__("hardneg").__file__).parent.parent), "classes": classes, "items": len(y), "input_dim": dim, "embedding_dim": cfg.embedding_dim,
                 "rss_before_mib": round(peak_rss_mib(), 1)}
    reset_peak()
    t0 = time.perf_counter()
    trainer._train_epoch(1)
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    out["warmup_peak_mib"] = round(peak_rss_mib(), 1)
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        trainer._refresh(2)
    except (MemoryError, ValueError) as e:
        out["refresh_error"] = f"{type(e).__name__}: {e}"
    out["refresh_s"] = round(time.perf_counter() - t0, 2)
    out["refresh_cpu_s"] = round(time.process_time() - c0, 2)
    out["refresh_peak_mib"] = round(peak_rss_mib(), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[1000, 10000])
    p.add_argument("--per-class", type=int, default=6)
    p.add_argument("--dim", type=int, default=32)
    args = p.parse_args()
    print(f"load average: {os.getloadavg()}")
    for c in args.classes:
        with tempfile.TemporaryDirectory(prefix="hardneg-many-") as tmp:
            print(json.dumps(run(c, args.per_class, args.dim, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
