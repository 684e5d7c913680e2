"""bench/quality.py: the composed-digit tasks (against the digit images they are made of), and a quick run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # quality.py imports bench/pool.py as a sibling
_spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
qb = importlib.util.module_from_spec(_spec)
sys.modules["quality"] = qb
_spec.loader.exec_module(qb)

SMALL = qb.TaskSizes(train_per_class_samples=3, eval_per_class_samples=2, train_per_class_classes=4,
                     eval_per_class_classes=2, digits=3)


def _sources(x: np.ndarray, images: np.ndarray) -> np.ndarray:
    """(n, digits) index of the digit image each 8 x 8 block of ``x`` (n, 1, 8, 8·digits) equals (-1: none)."""
    where = {im.tobytes(): i for i, im in enumerate(images)}
    assert len(where) == len(images)  # no two digit images are equal, so a block names its source
    blocks = x[:, 0].reshape(len(x), 8, -1, 8).transpose(0, 2, 1, 3)  # (n, digits, 8, 8)
    return np.array([[where.get(np.ascontiguousarray(b).tobytes(), -1) for b in row] for row in blocks])


def test_composed_items_write_their_class_from_their_own_side(tmp_path: Path) -> None:
    files = qb.make_digit_task(tmp_path, SMALL, seed=3)
    images, digit, train_pool, eval_pool = qb.split_digit_images(SMALL.eval_image_fraction, 3)
    assert not set(train_pool) & set(eval_pool)
    expected = {"heldout-classes": ((500, 4), (500, 2)), "heldout-samples": ((1000, 3), (1000, 2))}
    seen_classes = {}
    for protocol, paths in files.items():
        for side, (path, pool) in enumerate(zip(paths, (train_pool, eval_pool))):
            data = np.load(path)
            x, y = data["x"], data["y"]
            classes, counts = np.unique(y, return_counts=True)
            assert (len(classes), counts.min(), counts.max()) == (expected[protocol][side][0],
                                                                  *[expected[protocol][side][1]] * 2)
            src = _sources(x, images)
            assert (src >= 0).all() and np.isin(src, pool).all()  # every block an image of this side
            written = digit[src] @ np.array([100, 10, 1])
            np.testing.assert_array_equal(written, y)  # the blocks write the label, leftmost digit first
            for c in classes:  # compositions within a class are distinct
                rows = src[y == c]
                assert len(np.unique(rows, axis=0)) == len(rows)
            seen_classes[protocol, side] = set(classes.tolist())
    # held-out classes: disjoint halves of all 1000; held-out samples: every class on both sides
    assert not seen_classes["heldout-classes", 0] & seen_classes["heldout-classes", 1]
    assert seen_classes["heldout-classes", 0] | seen_classes["heldout-classes", 1] == set(range(1000))
    assert seen_classes["heldout-samples", 0] == seen_classes["heldout-samples", 1] == set(range(1000))


def test_the_task_is_seeded(tmp_path: Path) -> None:
    a = qb.make_digit_task(tmp_path / "a", SMALL, seed=1)
    b = qb.make_digit_task(tmp_path / "b", SMALL, seed=1)
    c = qb.make_digit_task(tmp_path / "c", SMALL, seed=2)
    path = "heldout-classes"
    assert np.array_equal(np.load(a[path][0])["x"], np.load(b[path][0])["x"])
    assert not np.array_equal(np.load(a[path][0])["y"], np.load(c[path][0])["y"])


@pytest.mark.slow
def test_quick_run_tables_are_the_runs_interpolated(tmp_path: Path) -> None:
    """A cut-down --quick run (one seed per method would leave no spread: two) writes tables whose cells are the
    runs' metrics at the budgets, recomputed here with np.interp from the recorded curves."""
    methods = ["global", "in-batch semihard", "global seed-hardness 1"]
    if importlib.util.find_spec("pytorch_metric_learning") is not None:
        methods.append("pml XBM 1024 BatchHardMiner")
    threads = torch.get_num_threads()
    try:
        assert qb.main(["--quick", "--seeds", "2", "--epochs", "2", "--inbatch-epochs", "3", "--workers", "1",
                        "--protocols", "heldout-samples", "--methods", ",".join(methods), "--out",
                        str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = json.loads((tmp_path / "quality-quick.json").read_text())
    s = out["summary"]["heldout-samples"]
    runs = out["runs"]
    assert {r["method"] for r in runs} == set(methods) and len(runs) == 2 * len(methods)
    shortest = min(r["seconds"][-1] for r in runs)
    assert s["budgets"][-1] == pytest.approx(shortest, abs=0.01) and s["budgets"][-1] <= shortest
    for row in s["rows"]:
        mine = [r for r in runs if r["method"] == row["method"]]
        for b in s["budgets"]:
            vals = [np.interp(b, r["seconds"], r["metrics"]["map_at_r"]) for r in mine]
            cell = row[f"map_at_r@{b}s"]
            assert cell["mean"] == pytest.approx(np.mean(vals)) and cell["std"] == pytest.approx(np.std(vals, ddof=1))
        epoch = s["compare_epoch"]
        vals = [r["metrics"]["r_precision"][r["epochs"].index(epoch)] for r in mine]
        assert row[f"r_precision@epoch{epoch}"]["mean"] == pytest.approx(np.mean(vals))
    assert (tmp_path / "quality-quick.md").read_text().count("| heldout-samples |") == 3 * len(methods)


def test_gap_rows_by_hand() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import quality_gap as qg

    def row(method: str, group: str, mean: float, std: float) -> dict:
        return {"method": method, "group": group, "seeds": 3, "map_at_r@4.5s": {"mean": mean, "std": std}}

    summary = {"heldout-samples": {"budgets": [1.0, 4.5], "rows": [
        row("global", "global", 0.80, 0.03), row("in-batch semihard", "in-batch", 0.70, 0.04),
        row("pml XBM 1024 BatchHardMiner", "external", 0.75, 0.01), row("random", "random", 0.90, 0.0),
        row("global refresh 8", "lever", 0.82, 0.02)]}}
    (r,) = qg.gap_rows(summary, "triples")
    assert (r["classes"], r["baseline"], r["lever"]) == (1000, "pml XBM 1024 BatchHardMiner", "global refresh 8")
    assert r["gap"] == pytest.approx(0.05) and r["gap_err"] == pytest.approx((0.03 ** 2 + 0.01 ** 2) ** 0.5)
    assert r["spread"] == pytest.approx(0.03) and r["lever_gap"] == pytest.approx(0.07)
    assert "| 1,000 | heldout-samples | 4.5 | 0.800 ± 0.030 | pml XBM 1024 BatchHardMiner |" in qg.markdown([r])
