"""bench/pml_baselines.py: PML's cross-batch memory computes hardneg's triplet loss against its memory
(checked against a brute-force loop over the memory)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_metric_learning")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import pml_baselines as pb  # noqa: E402

MARGIN = 0.2


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_terms(emb: np.ndarray, y: np.ndarray, mem: np.ndarray, mem_y: np.ndarray, own: np.ndarray,
                kind: str) -> list[float]:
    """Triplet terms of anchors ``emb`` against ``mem`` (row ``own[i]`` is anchor i's own copy), mined by ``kind``."""
    terms = []
    for i in range(len(emb)):
        d2 = ((mem.astype(np.float64) - emb[i]) ** 2).sum(1)
        pos = [j for j in range(len(mem)) if mem_y[j] == y[i] and j != own[i]]
        neg = [j for j in range(len(mem)) if mem_y[j] != y[i]]
        if not pos or not neg:
            continue
        if kind == "batch-hard":
            p, n = max(pos, key=lambda j: d2[j]), min(neg, key=lambda j: d2[j])
            terms.append(max(0.0, d2[p] - d2[n] + MARGIN))
        else:  # every semi-hard triplet: 0 < d²(a,n) - d²(a,p) <= margin
            terms += [MARGIN - (d2[n] - d2[p]) for p in pos for n in neg if 0 < d2[n] - d2[p] <= MARGIN]
    return terms


@pytest.mark.parametrize("kind", ["batch-hard", "semihard"])
def test_memory_loss_is_the_triplet_loss_against_the_memory(kind: str) -> None:
    rng = np.random.default_rng(0)
    memory = pb.cross_batch_memory(kind, MARGIN, embedding_dim=4, memory_size=12)
    seen_x, seen_y = [], []
    for step in range(4):  # 8 a step into a memory of 12: it wraps around on the second step
        x, y = unit(rng, 8, 4), rng.integers(0, 3, size=8)
        emb = torch.from_numpy(x).requires_grad_()
        out = memory(emb, torch.from_numpy(y))["loss"]
        seen_x.append(x)
        seen_y.append(y)
        mem, mem_y = np.concatenate(seen_x)[-12:], np.concatenate(seen_y)[-12:]  # the 12 newest, batch included
        own = np.arange(len(mem) - 8, len(mem))
        want = brute_terms(x, y, mem, mem_y, own, kind)
        got = out["losses"]
        got = [] if not torch.is_tensor(got) or got.ndim == 0 else got.detach().double().numpy().tolist()
        np.testing.assert_allclose(sorted(got), sorted(want), atol=1e-5)
        # the terms' gradient reaches the anchors only
        if want:
            out["losses"].mean().backward()
            assert emb.grad is not None and torch.isfinite(emb.grad).all()


def test_the_recipe_refuses_a_memory_smaller_than_a_batch() -> None:
    from hardneg.trainer.config import TrainConfig
    from hardneg.trainer.losses import TripletLoss
    from hardneg.trainer.recipes.base import RecipeContext, TrainData

    cfg = TrainConfig.from_dict({"mining": "in-batch", "batch_size": 16, "per_class": 4})
    y = np.repeat(np.arange(8), 4)
    data = TrainData(torch.zeros(32, 3), torch.from_numpy(y), y)
    with pytest.raises(ValueError, match=r"memory_size \(8\) must hold at least one batch \(16\)"):
        pb.CrossBatchMemoryRecipe(RecipeContext(cfg, data, TripletLoss(MARGIN)), "batch-hard", memory_size=8)
