"""``exclude_suspects``: the top label-noise suspects are never mined as negatives, and the drops are counted."""

from __future__ import annotations

import numpy as np
import pytest

from hardneg.miner.audit import audit_labels
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, stored_vectors
from hardneg.miner.mining import MiningConfig, mine


@pytest.fixture(scope="module")
def noisy(clusters) -> VectorIndex:
    data = clusters(300, 8, 5, seed=31, spread=0.6)
    labels = data.labels.copy()
    flipped = np.random.default_rng(31).choice(300, size=15, replace=False)
    labels[flipped] = (labels[flipped] + 2) % 5
    return VectorIndex.build(data.vectors, labels, data.ids)


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_hardest_negatives_skip_the_suspects(noisy, fraction):
    cfg = MiningConfig(strategy="hardest", positive="hardest", exclude_suspects=fraction, candidates=16)
    result = mine(noisy, cfg)
    suspects = set(audit_labels(noisy).top(fraction).tolist())
    assert 0 < len(suspects) <= int(np.ceil(fraction * noisy.count))
    # Brute force: each anchor's nearest wrong-label item that is not a suspect.
    x = stored_vectors(noisy)
    d2 = noisy.distance.pairwise(x, x)
    banned = np.isin(noisy.ids, list(suspects))
    wrong = noisy.labels[:, None] != noisy.labels[None, :]
    allowed = np.where(wrong & ~banned[None, :], d2, np.inf)
    want = {int(noisy.ids[r]): int(noisy.ids[allowed[r].argmin()]) for r in range(noisy.count)}
    got = dict(zip(result.anchor.tolist(), result.negative.tolist()))
    assert got == want
    # Dropped candidates: suspects among each anchor's 16 nearest wrong-label items (one search round).
    first16 = np.sort(np.where(wrong, d2, np.inf), axis=1)[:, :16]
    order = np.argsort(np.where(wrong, d2, np.inf), axis=1, kind="stable")[:, :16]
    assert np.isfinite(first16).all()
    assert result.stats.search_rounds == 1
    assert result.stats.guard_dropped == {"exclude_suspects": int(banned[order].sum())}
    assert result.stats.suspects_excluded == len(suspects)
    plain = mine(noisy, MiningConfig(strategy="hardest", positive="hardest"))
    assert set(plain.negative.tolist()) & suspects  # without the option, suspects are mined


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, float("nan"), True])
def test_exclude_suspects_must_be_a_fraction(fraction):
    with pytest.raises(ValidationError, match="exclude_suspects"):
        MiningConfig(exclude_suspects=fraction)


def test_query_mode_refuses_exclude_suspects(noisy):
    from hardneg.miner.mining.queries import mine_queries

    config = MiningConfig(strategy="window", window_width=4, exclude_suspects=0.1)
    with pytest.raises(ValidationError, match="exclude_suspects is for label mode"):
        mine_queries(noisy, stored_vectors(noisy)[:3], config, labels=noisy.labels[:3])
