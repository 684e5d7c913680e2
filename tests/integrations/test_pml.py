"""The pytorch-metric-learning adapter inside a real PML ``TripletMarginLoss`` training loop.

Each step's mined negatives must be the brute-force nearest stored items of another label to each
anchor's current (normalised) embedding, and PML's loss must equal the triplet loss computed by hand
over the adapter's triplets (PML's default: Euclidean distance between unit vectors, mean over the
triplets with a non-zero loss).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hardneg.integrations.pml import SnapshotMiner
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex
from hardneg.miner.store import SnapshotStore

losses = pytest.importorskip("pytorch_metric_learning.losses")

K = 3
MARGIN = 0.2


def hand_loss(emb: torch.Tensor, ref: torch.Tensor, a, p, n) -> float:
    e = torch.nn.functional.normalize(emb.detach().double(), dim=1)
    r = torch.nn.functional.normalize(ref.detach().double(), dim=1)
    d_ap = (e[a] - r[p]).norm(dim=1)
    d_an = (e[a] - r[n]).norm(dim=1)
    loss = torch.relu(d_ap - d_an + MARGIN)
    nonzero = loss > 0
    return float(loss[nonzero].mean()) if nonzero.any() else 0.0


@pytest.fixture()
def setup(tmp_path, clusters):
    data = clusters(240, 6, 4, seed=71, spread=1.0)
    torch.manual_seed(71)
    model = torch.nn.Linear(6, 5)
    with torch.no_grad():
        stored = model(torch.from_numpy(data.vectors)).numpy()
    store = SnapshotStore(tmp_path / "store")
    store.publish(VectorIndex.build(stored, data.labels, data.ids, metric="cosine"))
    return data, model, store


def test_snapshot_miner_in_a_triplet_margin_loss_loop(setup) -> None:
    data, model, store = setup
    miner = SnapshotMiner(store, num_negatives=K)
    loss_fn = losses.TripletMarginLoss(margin=MARGIN)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stored = miner.index.vectors_of(data.ids)  # unit vectors (cosine snapshot)
    label_of = dict(zip(data.ids.tolist(), data.labels.tolist()))
    rng = np.random.default_rng(72)
    w0 = model.weight.detach().clone()
    for step in range(4):
        # A P x K batch: 3 classes x 4 items.
        rows = np.concatenate([rng.choice(np.flatnonzero(data.labels == c), 4, replace=False)
                               for c in rng.choice(4, 3, replace=False)])
        x, y = torch.from_numpy(data.vectors[rows]), torch.from_numpy(data.labels[rows])
        emb = model(x)
        mined = miner(emb, y)
        a, p, n = mined.indices_tuple
        b = len(rows)
        # Brute force: the K nearest stored items of another label to each normalised embedding.
        e = torch.nn.functional.normalize(emb.detach().double(), dim=1).numpy()
        for i in range(b):
            d2 = ((stored.astype(np.float64) - e[i]) ** 2).sum(1)
            d2[data.labels == int(y[i])] = np.inf
            want = data.ids[np.argsort(d2, kind="stable")[:K]]
            assert mined.negative_ids[i].tolist() == want.tolist()
            np.testing.assert_allclose(mined.negative_distances[i].numpy(), np.sort(d2)[:K], rtol=1e-4, atol=1e-6)
        # Triplets: every in-batch positive with every mined negative; negatives index past the batch.
        assert len(a) == sum(int((y == y[i]).sum() - 1) * K for i in range(b))
        assert bool((y[a] == mined.ref_labels[p]).all()) and bool((p < b).all()) and bool((p != a).all())
        assert bool((n >= b).all()) and bool((y[a] != mined.ref_labels[n]).all())
        assert [label_of[int(i)] for i in mined.negative_ids.flatten()] == mined.ref_labels[b:].tolist()
        loss = loss_fn(emb, y, mined.indices_tuple, mined.ref_emb, mined.ref_labels)
        assert float(loss.detach()) == pytest.approx(hand_loss(emb, mined.ref_emb, a, p, n), rel=1e-5, abs=1e-7)
        opt.zero_grad()
        loss.backward()
        assert mined.ref_emb.grad_fn is not None  # the batch part carries gradient
        opt.step()
    assert not torch.equal(model.weight, w0)


def test_refuses_what_needs_a_positive_and_bad_shapes(setup) -> None:
    _, _, store = setup
    with pytest.raises(ValidationError, match="negatives only"):
        SnapshotMiner(store, strategy="semihard")
    with pytest.raises(ValidationError, match="source must be"):
        SnapshotMiner(42)
    miner = SnapshotMiner(store.root)
    with pytest.raises(ValidationError, match=r"\(B, D\)"):
        miner(torch.zeros(4, 5), torch.zeros(3, dtype=torch.long))
