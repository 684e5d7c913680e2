"""bench/throughput.py: its data, its plain loop's P x K batches, and a tiny run whose report adds up."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("throughput", ROOT / "bench" / "throughput.py")
tb = importlib.util.module_from_spec(_spec)
sys.modules["throughput"] = tb  # the trainer imports the bench's model factory as throughput:two_layer_cnn
_spec.loader.exec_module(tb)

TINY = tb.Setup(items=256, classes=32, height=12, width=24, epochs=3, batch_size=32, refresh_every=1,
                plain_epochs=1, embedding_dim=8)


def test_generated_data_is_equal_classes_sorted_by_label() -> None:
    x, y = tb.make_data(TINY)
    assert x.shape == (256, 1, 12, 24) and x.dtype == np.float32
    np.testing.assert_array_equal(y, np.repeat(np.arange(32), 8))


def test_plain_batches_hold_p_classes_of_k_distinct_items() -> None:
    _, y = tb.make_data(TINY)
    batches = tb.plain_pk_batches(y, 32, 4, np.random.default_rng(0))
    assert len(batches) == 8  # ceil(256 / 32), as many as hardneg's epochs have
    for b in batches:
        assert len(b) == 32 and len(np.unique(b)) == 32
        classes, counts = np.unique(y[b], return_counts=True)
        assert len(classes) == 8 and (counts == 4).all()


@pytest.mark.slow
def test_tiny_run_reports_ratios_of_its_own_epochs(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    try:
        result = tb.run(TINY, tmp_path)
    finally:
        torch.set_num_threads(threads)
    json.dumps(result)  # what main() writes
    assert [len(p) for p in result["plain"]] == [1, 1, 1]
    for i, (recipe, h) in enumerate(result["hardneg"].items()):
        assert len(h["epochs"]) == TINY.epochs
        around = result["plain"][i] + result["plain"][i + 1]
        train = np.mean([e["train_cpu_s"] for e in h["epochs"]])
        refresh = np.mean([e["refresh_cpu_s"] for e in h["epochs"] if e["refresh_cpu_s"] > 0])  # one per epoch here
        plain = np.mean([p["cpu_s"] for p in around])
        assert h["vs_plain"]["ratio_cpu"] == pytest.approx((train + refresh / TINY.refresh_every) / plain)
        assert h["vs_plain_train_only"]["ratio_cpu"] == pytest.approx(train / plain)
        phases = h["phases"]
        for clock in ("", "_cpu"):  # the phases are parts of the totals, and refresh phases only in refreshes
            train = sum(phases.get(f"{p}{clock}_s", 0.0) for p in tb.TRAIN_PHASES)
            assert train + phases[f"train_other{clock}_s"] == pytest.approx(phases[f"train{clock}_s"])
            refresh = sum(phases.get(f"{p}{clock}_s", 0.0) for p in tb.REFRESH_PHASES)
            assert refresh <= phases[f"refresh{clock}_s"] + 1e-3
        assert 0.0 <= h["metrics"]["map_at_r"] <= 1.0
    assert dataclasses.asdict(TINY) == result["setup"]
