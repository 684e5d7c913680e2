"""Random triplets (the warm-up and the random baseline) and the triplet -> pair conversion."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from hardneg.miner.errors import ValidationError
from hardneg.trainer import tuples as tp

LABELS = np.array([3, 1, 3, 7, 1, 3, 9, 1])  # class 9 is a singleton: it cannot be an anchor


def test_random_triplets_are_valid_and_cover_each_eligible_anchor_once() -> None:
    t = tp.random_triplets(LABELS, np.random.default_rng(0))
    eligible = [i for i in range(len(LABELS)) if (LABELS == LABELS[i]).sum() >= 2]
    assert sorted(t.first.tolist()) == eligible
    for a, p, n in zip(t.first, t.second, t.third):
        assert p != a and LABELS[p] == LABELS[a]
        assert LABELS[n] != LABELS[a]


def test_random_triplets_draw_every_admissible_choice_uniformly() -> None:
    # Brute force: for each anchor, the admissible positives and negatives; the draws must hit all of them,
    # about equally often (each count within 25% of the uniform expectation over 6000 draws).
    pos_counts: dict[int, Counter] = {i: Counter() for i in range(len(LABELS))}
    neg_counts: dict[int, Counter] = {i: Counter() for i in range(len(LABELS))}
    draws = 6000
    rng = np.random.default_rng(1)
    for _ in range(draws):
        t = tp.random_triplets(LABELS, rng)
        for a, p, n in zip(t.first, t.second, t.third):
            pos_counts[a][p] += 1
            neg_counts[a][n] += 1
    for a in np.flatnonzero(np.isin(LABELS, [1, 3])):
        want_pos = {j for j in range(len(LABELS)) if j != a and LABELS[j] == LABELS[a]}
        want_neg = {j for j in range(len(LABELS)) if LABELS[j] != LABELS[a]}
        assert set(pos_counts[a]) == want_pos and set(neg_counts[a]) == want_neg
        for counts, support in ((pos_counts[a], want_pos), (neg_counts[a], want_neg)):
            expected = draws / len(support)
            assert all(abs(c - expected) < 0.25 * expected for c in counts.values())


def test_random_triplets_are_seeded() -> None:
    a = tp.random_triplets(LABELS, np.random.default_rng(5))
    b = tp.random_triplets(LABELS, np.random.default_rng(5))
    c = tp.random_triplets(LABELS, np.random.default_rng(6))
    assert all(np.array_equal(x, y) for x, y in zip((a.first, a.second, a.third), (b.first, b.second, b.third)))
    assert not np.array_equal(np.stack([a.second, a.third]), np.stack([c.second, c.third]))


def test_triplets_to_pairs_by_hand() -> None:
    pairs = tp.triplets_to_pairs(tp.triplets([0, 5], [1, 6], [2, 7]))
    assert pairs.kind == "pair"
    assert pairs.first.tolist() == [0, 0, 5, 5]
    assert pairs.second.tolist() == [1, 2, 6, 7]
    assert pairs.third.tolist() == [0, 1, 0, 1]  # the seed's convention: 0 similar, 1 dissimilar
    assert tp.for_kind(tp.triplets([0], [1], [2]), "triplet").kind == "triplet"
    with pytest.raises(ValidationError, match="triplet loss needs triplets"):
        tp.for_kind(pairs, "triplet")


def test_tuple_state_survives_a_weights_only_round_trip() -> None:
    t = tp.pairs([4, 4, 9], [5, 8, 1], [0, 1, 0])
    buf = io.BytesIO()
    torch.save(t.to_state(), buf)
    buf.seek(0)
    back = tp.TupleSet.from_state(torch.load(buf, weights_only=True))
    assert back.kind == "pair"
    assert [x.tolist() for x in (back.first, back.second, back.third)] == [[4, 4, 9], [5, 8, 1], [0, 1, 0]]
