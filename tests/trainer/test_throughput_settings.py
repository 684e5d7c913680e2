"""Settings that bound what an epoch costs: embedding chunk size, evaluation every N epochs, thread counts.

References: embeddings of the whole batch in one forward pass; the same run evaluated after every epoch.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from test_parts import blobs  # 6 Gaussian classes in 10-d as an npz data source

from hardneg.miner.errors import ValidationError
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.loop import RunSummary, Trainer
from hardneg.trainer.models import EmbeddingCNN
from hardneg.trainer.refresh import EMBED_CHUNK_BYTES, embed_chunk, embed_items
from hardneg.trainer.runtime import set_threads


def test_large_images_are_embedded_in_small_chunks_with_the_one_pass_result() -> None:
    torch.manual_seed(0)
    model = EmbeddingCNN(1, 16, 32).train()
    x = torch.rand(45, 1, 28, 112)
    chunk = embed_chunk(x, 1024)
    assert chunk == EMBED_CHUNK_BYTES // (28 * 112 * 4) and chunk < len(x)  # several chunks
    got = embed_items(model, x, 1024)
    assert model.training  # embed_items restored the mode it found
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_small_items_keep_the_batch_size() -> None:
    assert embed_chunk(torch.zeros(5000, 1, 8, 8), 1024) == 1024  # digits: 256 B an item
    assert embed_chunk(torch.zeros(5000, 1, 28, 112), 8) == 8  # never more than batch_size
    assert embed_chunk(torch.zeros(3, 1, 4096, 4096), 1024) == 1  # at least one item


def run(tmp_path: Path, name: str, **changes: object) -> tuple[list[dict], RunSummary]:
    cfg = TrainConfig.from_dict({
        "data": blobs(tmp_path / "train.npz", 10, 1), "eval_data": blobs(tmp_path / "eval.npz", 4, 2),
        "recipe": "class-batches", "batch_size": 16, "per_class": 4, "epochs": 4, "refresh_every": 2,
        "embedding_dim": 8, "hidden_dim": 16, "store": str(tmp_path / f"store_{name}"),
        "run_dir": str(tmp_path / name), **changes})
    trainer = Trainer.create(cfg)
    summary = trainer.run()
    return trainer.state.history, summary


def test_evaluating_every_n_epochs_skips_the_others_and_changes_nothing_else(tmp_path: Path) -> None:
    every, every_summary = run(tmp_path, "every")
    sparse, summary = run(tmp_path, "sparse", eval_every=3)
    assert [bool(r["metrics"]) for r in sparse] == [True, False, False, True, True]  # 0, 3, and the last (4)
    for e, s in zip(every, sparse):
        assert (s["epoch"], s["step"], s["loss"], s["train"], s["mining"]) == \
            (e["epoch"], e["step"], e["loss"], e["train"], e["mining"])
        if s["metrics"]:
            assert s["metrics"] == e["metrics"]
        else:
            assert "eval_s" not in s["timing"]
    assert summary.final == every_summary.final and summary.untrained == every_summary.untrained
    best = max((r for r in every if r["epoch"] in (0, 3, 4)), key=lambda r: r["metrics"]["map_at_r"])
    assert (summary.best_epoch, summary.best) == (best["epoch"], best["metrics"])
    best_pt = torch.load(tmp_path / "sparse" / "best.pt", weights_only=True)
    assert best_pt["epoch"] == best["epoch"]


def test_a_sampled_evaluation_is_retrieval_metrics_of_the_sample(tmp_path: Path) -> None:
    from hardneg.miner.metrics import retrieval_metrics

    cfg = TrainConfig.from_dict({
        "data": blobs(tmp_path / "train.npz", 10, 1), "eval_data": blobs(tmp_path / "eval.npz", 8, 2),
        "recipe": "in-batch", "batch_size": 16, "per_class": 4, "epochs": 1, "embedding_dim": 8, "hidden_dim": 16,
        "eval_sample": 20, "seed": 5, "store": str(tmp_path / "store"), "run_dir": str(tmp_path / "run")})
    trainer = Trainer.create(cfg)
    trainer.run()
    got = trainer.state.history[-1]["metrics"]
    want = retrieval_metrics(embed_items(trainer.model, trainer.x_eval, 1024), trainer.splits.eval.y,
                             metric="cosine", sample=20, seed=5)
    assert got == pytest.approx(want, rel=0, abs=0)
    assert (got["num_queries"], got["num_candidates"]) == (20, 48) and "map_at_r_ci95" in got


def test_threads_set_torch_and_faiss() -> None:
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        set_threads(1)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])


@pytest.mark.parametrize(("values", "message"), [
    ({"eval_every": 0}, "eval_every must be an integer >= 1"),
    ({"threads": -1}, "threads must be an integer >= 0"),
    ({"eval_sample": 0}, "eval_sample must be an integer >= 1"),
])
def test_impossible_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.from_dict(values)


_FAULTS = """
import resource, sys, torch
from hardneg.trainer.runtime import keep_freed_memory
kept = keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # a step's activations: four buffers of 12 MiB alive together, written, then freed
    buffers = [torch.empty(3 << 20).fill_(1.0) for _ in range(4)]
    del buffers
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    if kept != "True":
        pytest.skip("not glibc: the allocator has no mallopt thresholds to set")
    pages = (48 << 20) // 4096  # of one step's buffers
    # 20 steps fault in the first step's pages and then reuse them (glibc's adaptive defaults give them back to the
    # system on most steps, though not on every run: 2-20 steps' worth measured, so they are no reference here)
    assert int(faults) <= 2 * pages
