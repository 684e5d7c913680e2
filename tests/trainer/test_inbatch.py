"""In-batch miners against brute-force Python loops over every anchor, positive and negative."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.trainer.inbatch import BatchHardMiner, SemiHardMiner, make_inbatch_miner


def batch(seed: int, n: int = 24, d: int = 6, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Random unit embeddings (n, d), labels (n,) with a singleton class, and the float64 d² matrix (n, n)."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(n, d))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    labels = rng.integers(0, classes, size=n)
    labels[0] = 99  # an anchor with no positive: never mined
    d2 = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    return torch.from_numpy(e).float(), torch.from_numpy(labels), d2


def brute_batch_hard(labels: np.ndarray, d2: np.ndarray) -> set[tuple[int, int, int]]:
    out = set()
    for a in range(len(labels)):
        pos = [j for j in range(len(labels)) if j != a and labels[j] == labels[a]]
        neg = [j for j in range(len(labels)) if labels[j] != labels[a]]
        if pos and neg:
            out.add((a, max(pos, key=lambda j: d2[a, j]), min(neg, key=lambda j: d2[a, j])))
    return out


def brute_semihard(labels: np.ndarray, d2: np.ndarray, margin: float) -> set[tuple[int, int, int]]:
    out = set()
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            semi = [j for j in range(n) if labels[j] != labels[a] and d2[a, p] < d2[a, j] < d2[a, p] + margin]
            if semi:
                out.add((a, p, min(semi, key=lambda j: d2[a, j])))
    return out


def as_set(triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> set[tuple[int, int, int]]:
    a, p, n = (x.tolist() for x in triplets)
    assert len(a) == len(set(zip(a, p, n))), "a triplet was returned twice"
    return set(zip(a, p, n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_brute_force(seed: int) -> None:
    e, labels, d2 = batch(seed)
    got = as_set(BatchHardMiner()(e, labels))
    assert got == brute_batch_hard(labels.numpy(), d2)
    assert all(a != 0 for a, _, _ in got)


@pytest.mark.parametrize("seed, margin", [(0, 0.2), (1, 0.5), (2, 1.0)])
def test_semihard_matches_brute_force(seed: int, margin: float) -> None:
    e, labels, d2 = batch(seed)
    want = brute_semihard(labels.numpy(), d2, margin)
    assert len(want) > 0, "the example must contain semi-hard triplets"
    assert as_set(SemiHardMiner(margin)(e, labels)) == want


def test_miners_keep_gradients_off_and_index_the_batch() -> None:
    e, labels, _ = batch(3)
    e.requires_grad_()
    a, p, n = make_inbatch_miner("batch-hard", 0.2)(e, labels)
    assert not a.requires_grad and a.dtype == torch.int64
    # The loss on the mined indices has gradients through the embeddings.
    ((e[a] - e[p]).pow(2).sum() - (e[a] - e[n]).pow(2).sum()).backward()
    assert e.grad is not None and e.grad.abs().sum() > 0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValidationError, match="batch-hard, semihard"):
        make_inbatch_miner("hardest", 0.2)
    with pytest.raises(ValidationError, match="margin"):
        SemiHardMiner(0.0)
    with pytest.raises(ValidationError, match=r"embeddings \(B, D\) and labels \(B,\)"):
        BatchHardMiner()(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))
