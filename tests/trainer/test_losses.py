"""The losses against numbers worked out by hand, and against a plain numpy reference on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.trainer.losses import contrastive_loss, nt_xent_loss, triplet_loss


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def test_contrastive_by_hand() -> None:
    # pair 1: d² = 0.3² + 0.4² = 0.25, similar (Y=0)         -> (1-0)·0.25           = 0.25
    # pair 2: d² = 0.3² = 0.09, dissimilar (Y=1), m = 0.5      -> max(0, 0.5 - 0.09)   = 0.41
    # pair 3: d² = 1.0, dissimilar, beyond the margin           -> max(0, 0.5 - 1.0)    = 0
    # mean = (0.25 + 0.41 + 0) / 3 = 0.22
    x1 = t([[0, 0], [1, 0], [0, 0]])
    x2 = t([[0.3, 0.4], [1, 0.3], [1, 0]])
    y = torch.tensor([0, 1, 1])
    terms = contrastive_loss(x1, x2, y, margin=0.5, reduction="none")
    np.testing.assert_allclose(terms.numpy(), [0.25, 0.41, 0.0], atol=1e-12)
    assert contrastive_loss(x1, x2, y, margin=0.5).item() == pytest.approx(0.22, abs=1e-12)


def test_triplet_by_hand() -> None:
    # triplet 1: d(a,p)² = 0.25, d(a,n)² = 0.6² + 0.8² = 1.0, m = 0.2 -> max(0, 0.25 - 1.0 + 0.2) = 0
    # triplet 2: d(a,p)² = 1.0,  d(a,n)² = 0.5² = 0.25             -> max(0, 1.0 - 0.25 + 0.2) = 0.95
    # mean = 0.475
    a = t([[0, 0], [0, 0]])
    p = t([[0.3, 0.4], [1, 0]])
    n = t([[0.6, 0.8], [0, 0.5]])
    np.testing.assert_allclose(triplet_loss(a, p, n, margin=0.2, reduction="none").numpy(), [0.0, 0.95], atol=1e-12)
    assert triplet_loss(a, p, n, margin=0.2).item() == pytest.approx(0.475, abs=1e-12)


@pytest.mark.parametrize("temperature, expected", [
    # Two items, views identical: z = [e1, e2, e1, e2]. For view e1 the logits over the other three views are
    # (e1·e2, e1·e1, e1·e2)/t = (0, 1/t, 0), the positive being the middle one, so each of the four views has
    # loss -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2·e^(-1/t)).
    (1.0, math.log(1 + 2 * math.exp(-1.0))),  # = 0.551444...
    (0.5, math.log(1 + 2 * math.exp(-2.0))),  # = 0.239543...
])
def test_nt_xent_by_hand(temperature: float, expected: float) -> None:
    z = t([[1, 0], [0, 1]])
    assert nt_xent_loss(z, z.clone(), temperature).item() == pytest.approx(expected, abs=1e-12)


def test_nt_xent_normalises_its_inputs() -> None:
    # Scaling a view does not change cosine similarities, so the hand value above still holds.
    z = t([[1, 0], [0, 1]])
    assert nt_xent_loss(3 * z, 0.5 * z, 1.0).item() == pytest.approx(math.log(1 + 2 * math.exp(-1.0)), abs=1e-12)


def _reference(x1: np.ndarray, x2: np.ndarray, x3: np.ndarray, y: np.ndarray, m: float) -> tuple[float, float]:
    """Plain loops over the seed's formulas: (contrastive of (x1, x2, y), triplet of (x1, x2, x3))."""
    con, tri = [], []
    for a, b, c, yy in zip(x1, x2, x3, y):
        d_ab = float(((a - b) ** 2).sum())
        d_ac = float(((a - c) ** 2).sum())
        con.append((1 - yy) * d_ab + yy * max(0.0, m - d_ab))
        tri.append(max(0.0, d_ab - d_ac + m))
    return float(np.mean(con)), float(np.mean(tri))


def _nt_xent_reference(z1: np.ndarray, z2: np.ndarray, temp: float) -> float:
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        denom = sum(math.exp(z[i] @ z[k] / temp) for k in others)
        losses.append(-math.log(math.exp(z[i] @ z[j] / temp) / denom))
    return float(np.mean(losses))


def test_losses_match_numpy_reference_on_random_data() -> None:
    rng = np.random.default_rng(0)
    x1, x2, x3 = (rng.normal(size=(20, 5)) * 0.4 for _ in range(3))
    y = rng.integers(0, 2, size=20)
    con, tri = _reference(x1, x2, x3, y, 0.7)
    assert contrastive_loss(t(x1), t(x2), torch.from_numpy(y), 0.7).item() == pytest.approx(con, rel=1e-12)
    assert triplet_loss(t(x1), t(x2), t(x3), 0.7).item() == pytest.approx(tri, rel=1e-12)
    assert nt_xent_loss(t(x1), t(x2), 0.3).item() == pytest.approx(_nt_xent_reference(x1, x2, 0.3), rel=1e-10)


def test_gradients_flow_only_through_active_terms() -> None:
    # A dissimilar pair beyond the margin contributes nothing, so its inputs get zero gradient.
    x1 = t([[0, 0], [0, 0]]).requires_grad_()
    x2 = t([[2, 0], [0.1, 0]]).requires_grad_()
    contrastive_loss(x1, x2, torch.tensor([1, 1]), margin=0.5).backward()
    assert x2.grad[0].abs().sum().item() == 0.0
    assert x2.grad[1].abs().sum().item() > 0.0


def test_bad_shapes_and_values_are_refused() -> None:
    with pytest.raises(ValidationError, match="same shape"):
        triplet_loss(t([[0, 0]]), t([[0, 0, 0]]), t([[0, 0]]), 0.2)
    with pytest.raises(ValidationError, match="y must have shape"):
        contrastive_loss(t([[0, 0]]), t([[0, 0]]), torch.tensor([0, 1]), 0.2)
    with pytest.raises(ValidationError, match="temperature"):
        nt_xent_loss(t([[1, 0]]), t([[1, 0]]), 0.0)
    with pytest.raises(ValidationError, match="reduction"):
        triplet_loss(t([[0, 0]]), t([[0, 0]]), t([[0, 0]]), 0.2, reduction="sum")
