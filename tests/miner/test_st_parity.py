"""Query mode against sentence-transformers' own ``mine_hard_negatives`` on the same embeddings.

sentence-transformers sees the vectors through a stand-in model whose ``encode_*`` look the texts up (no
model is downloaded or run). In exact mode, with the options both have, both must write the same rows.
Skipped when sentence-transformers is absent (CI installs it with the dev extra).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hardneg.miner.formats import build_rows
from hardneg.miner.index import VectorIndex
from hardneg.miner.mining import MiningConfig
from hardneg.miner.mining.queries import PositiveSets, mine_queries

st_util = pytest.importorskip("sentence_transformers.util")
datasets = pytest.importorskip("datasets")


class Lookup:
    """The SentenceTransformer surface ``mine_hard_negatives`` uses, answering from fixed vectors."""

    def __init__(self, queries: np.ndarray, docs: np.ndarray) -> None:
        self.queries, self.docs = queries, docs
        self.device = torch.device("cpu")
        self.model_card_data = SimpleNamespace(base_model="lookup")

    def get_embedding_dimension(self) -> int:
        return self.docs.shape[1]

    def encode_query(self, texts, **_):
        return self.queries[[int(t[1:]) for t in texts]]

    def encode_document(self, texts, **_):
        return self.docs[[int(t[1:]) for t in texts]]

    def similarity(self, a, b):
        return torch.as_tensor(a) @ torch.as_tensor(b).T

    def similarity_pairwise(self, a, b):
        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(-1)


class Texts(dict):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def __getitem__(self, i: int) -> str:
        return f"{self.prefix}{i}"


@pytest.mark.parametrize("fmt", ["triplet", "n-tuple", "labeled-pair", "labeled-list"])
@pytest.mark.parametrize("opts", [{"range_min": 0, "range_max": 4},
                                  {"range_min": 2, "range_max": 6, "relative_margin": 0.05},
                                  {"range_min": 1, "range_max": 5, "absolute_margin": 0.02}])
def test_same_rows_as_sentence_transformers(clusters, fmt: str, opts: dict) -> None:
    data = clusters(600, 8, 6, seed=81)
    docs = data.vectors / np.linalg.norm(data.vectors, axis=1, keepdims=True)
    q, qlab = data.near(30, seed=82)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    rng = np.random.default_rng(83)
    positives = [rng.choice(np.flatnonzero(data.labels == lab), rng.integers(1, 3), replace=False).tolist()
                 for lab in qlab]
    pairs = [(f"q{i}", f"d{p}") for i, ps in enumerate(positives) for p in ps]
    ds = datasets.Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    # "top" sampling: range_max only bounds how deep sentence-transformers looks, so under a margin it gets a
    # deep one (it ranks only what it fetched); hardneg widens its own search.
    st_max = opts["range_max"] if len(opts) == 2 else 400
    st = st_util.mine_hard_negatives(ds, Lookup(q, docs), corpus=[f"d{j}" for j in range(len(docs))],
                                     num_negatives=opts["range_max"] - opts["range_min"], output_format=fmt,
                                     sampling_strategy="top", verbose=False, use_faiss=True,
                                     **{**opts, "range_max": st_max})
    index = VectorIndex.build(docs, data.labels, np.arange(len(docs)), metric="cosine")
    cfg = MiningConfig(strategy="window", per_anchor=opts["range_max"] - opts["range_min"],
                       window_skip=opts["range_min"], window_width=opts["range_max"] - opts["range_min"],
                       window_sampling="top", relative_margin=opts.get("relative_margin"),
                       absolute_margin=opts.get("absolute_margin"))
    res = mine_queries(index, q, cfg, positives=PositiveSets.from_lists(positives))
    ours = build_rows(res, fmt, Texts("q"), Texts("d"))
    assert list(ours) == st.column_names
    assert st.num_rows > 0
    if fmt == "labeled-pair":  # sentence-transformers writes these per query, in its own query order
        key = lambda r: (r[0], -r[2], r[1])  # noqa: E731
        assert sorted(zip(*ours.values()), key=key) == sorted(zip(*(st[c] for c in st.column_names)), key=key)
    else:
        assert st.to_dict() == ours
