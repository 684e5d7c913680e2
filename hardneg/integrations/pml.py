"""A pytorch-metric-learning adapter: each anchor's negatives drawn from a whole snapshot, not only the batch.

In-batch miners see only the batch; PML's ``CrossBatchMemory`` adds the last few batches (#448, #639 ask
for more). :class:`SnapshotMiner` asks a hardneg snapshot (a local index or store, or the service through
:class:`hardneg.client.Client`) for each anchor's nearest stored items of another label, and hands them to
a PML loss as reference embeddings, the ``ref_emb`` form every PML loss accepts::

    miner = SnapshotMiner(SnapshotStore("store"), num_negatives=5)
    loss_fn = losses.TripletMarginLoss(margin=0.1)
    for x, y in loader:
        emb = model(x)
        mined = miner(emb, y)
        loss = loss_fn(emb, y, mined.indices_tuple, mined.ref_emb, mined.ref_labels)

``ref_emb`` is the batch followed by the stored negatives (constants: they carry no gradient, like
``CrossBatchMemory``'s queue), so ``indices_tuple`` pairs every anchor with each of its in-batch positives
(indices into the batch part) and each of its mined negatives (indices past it). The stored negatives'
ids come too, for trainers that would rather load and embed those items afresh. The snapshot must hold
embeddings of the same space (the model's own, published every so often) and labels of the same label
set; pytorch-metric-learning itself is not needed by this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hardneg.client import Client
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import SearchParams, VectorIndex
from hardneg.miner.mining import MiningConfig
from hardneg.miner.mining.queries import mine_queries
from hardneg.miner.store import SnapshotStore


@dataclass(frozen=True)
class SnapshotMined:
    """What :class:`SnapshotMiner` found for a batch of ``B`` anchors.

    Attributes:
        indices_tuple: ``(a, p, n)`` (t,) int64 each: ``a`` into the batch, ``p`` and ``n`` into ``ref_emb``.
        ref_emb: (B + s, D) the batch's embeddings, then the ``s`` stored negatives' (no gradient through those).
        ref_labels: (B + s,) the batch's labels, then the stored negatives'.
        negative_ids: (B, num_negatives) int64 stored ids of each anchor's negatives, nearest first, ``-1``-padded.
        negative_distances: (B, num_negatives) float64 their squared distances to the anchor (``inf`` padding).
    """

    indices_tuple: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ref_emb: torch.Tensor
    ref_labels: torch.Tensor
    negative_ids: torch.Tensor
    negative_distances: torch.Tensor


class SnapshotMiner:
    """Mine each anchor's ``num_negatives`` stored wrong-label neighbours from a snapshot.

    Args:
        source: a :class:`~hardneg.miner.index.VectorIndex`, a :class:`~hardneg.miner.store.SnapshotStore` (or its
            folder; :meth:`reload` picks up newer snapshots), or a :class:`~hardneg.client.Client` of the service.
        num_negatives: negatives per anchor.
        strategy: ``hardest`` (default), ``window`` or ``distance-weighted`` (semi-hard needs a stored positive).
        snapshot: a snapshot name instead of the newest one.
        **options: more :class:`~hardneg.miner.mining.MiningConfig` fields (``near_duplicate``, ``max_score``,
            ``window_skip``, ``seed``, ...); over the service, the ``POST /mine`` fields instead.
    """

    def __init__(self, source: VectorIndex | SnapshotStore | Client | str | Path, num_negatives: int = 5,
                 strategy: str = "hardest", snapshot: str | None = None, **options: Any) -> None:
        self.snapshot, self.options = snapshot, options
        self.client: Client | None = source if isinstance(source, Client) else None
        self.store = SnapshotStore(source) if isinstance(source, (str, Path)) else (
            source if isinstance(source, SnapshotStore) else None)
        self.index = source if isinstance(source, VectorIndex) else None
        if self.client is None and self.store is None and self.index is None:
            raise ValidationError(f"source must be a VectorIndex, a SnapshotStore, a store folder or a Client, "
                                  f"got {type(source).__name__}")
        self.num_negatives, self.strategy = num_negatives, strategy
        if self.client is None:
            self.config = MiningConfig(strategy=strategy, per_anchor=num_negatives, **options)
            if self.config.needs_positive:
                raise ValidationError("SnapshotMiner mines negatives only: semihard and margins relative to a "
                                      "positive need a stored positive; use hardest, window or distance-weighted")
        self.reload()

    def reload(self) -> None:
        """Open the newest snapshot of the store (or ``snapshot``) again; a no-op for an index or a client."""
        if self.store is not None:
            self.index = self.store.open(self.snapshot).index

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> SnapshotMined:
        """Mine for ``embeddings`` (B, D) with ``labels`` (B,); see :class:`SnapshotMined`."""
        if embeddings.ndim != 2 or labels.shape != (embeddings.shape[0],):
            raise ValidationError(f"embeddings must be (B, D) and labels (B,), got {tuple(embeddings.shape)} and "
                                  f"{tuple(labels.shape)}")
        q = embeddings.detach().to("cpu", torch.float32).numpy()
        y = labels.detach().to("cpu").numpy().astype(np.int64)
        ids, d2, vectors, stored_labels = self._negatives(q, y)
        b, k = ids.shape
        found = ids >= 0
        neg_slot = np.full((b, k), -1, np.int64)
        neg_slot[found] = b + np.arange(int(found.sum()))
        same = (y[:, None] == y[None, :]) & ~np.eye(b, dtype=bool)
        a_idx, p_idx = np.nonzero(same)  # every in-batch positive pair
        per = found.sum(1)[a_idx]
        a = np.repeat(a_idx, per)
        p = np.repeat(p_idx, per)
        n = np.concatenate([neg_slot[i][found[i]] for i in a_idx]) if len(a_idx) else np.empty(0, np.int64)
        dev = embeddings.device
        stored = torch.as_tensor(vectors, dtype=embeddings.dtype, device=dev)
        ref_emb = torch.cat([embeddings, stored]) if len(stored) else embeddings
        ref_labels = torch.cat([labels.to(dev), torch.as_tensor(stored_labels, dtype=labels.dtype, device=dev)])
        as_t = lambda x: torch.as_tensor(x, dtype=torch.long, device=dev)  # noqa: E731
        return SnapshotMined((as_t(a), as_t(p), as_t(n)), ref_emb, ref_labels, torch.as_tensor(ids),
                             torch.as_tensor(d2))

    def _negatives(self, q: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Negative ids (B, k) and d² (B, k), ``-1`` / ``inf``-padded, and the found ones' vectors (s, D) and labels (s,)."""
        if self.client is not None:
            res = self.client.mine(vectors=q, labels=y, strategy=self.strategy, num_negatives=self.num_negatives,
                                   include_vectors=True, snapshot=self.snapshot, **self.options)
            k = self.num_negatives
            ids = np.full((len(q), k), -1, np.int64)
            d2 = np.full((len(q), k), np.inf)
            flat = [n for r in res["results"] for n in r["negatives"]]
            for i, r in enumerate(res["results"]):
                ids[i, :len(r["negatives"])] = [n["id"] for n in r["negatives"]]
                d2[i, :len(r["negatives"])] = [n["distance"] for n in r["negatives"]]
            vectors = np.asarray([n["vector"] for n in flat], np.float32).reshape(len(flat), q.shape[1])
            return ids, d2, vectors, np.asarray([n["label"] for n in flat], np.int64)
        res = mine_queries(self.index, q, self.config, labels=y, params=SearchParams())
        found = res.negatives[res.negatives >= 0]
        vectors = self.index.vectors_of(found) if len(found) else np.empty((0, q.shape[1]), np.float32)
        labels = self.index.labels[self.index.rows_of(found)] if len(found) else np.empty(0, np.int64)
        return res.negatives, res.negative_d2, vectors, labels
