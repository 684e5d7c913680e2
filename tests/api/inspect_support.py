"""A small store of real pictures for the data-inspection routes and the page: scikit-learn's digits.

Two snapshots of 300 digits with their 8x8 images as thumbnails: ``pixels-a`` (the raw pixels as cosine
vectors) and then ``pixels-b`` (LATEST; the same items with Gaussian noise added, 6 labels flipped and one
image copied onto another item of another label), so the audits and the drift have something to find.
``pixels-b`` carries a model (``model.pt2``, input (1, 8, 8) in [0, 1], the pixels times 16, as digits'
raw values are), so images can be searched by content. The store is signed with ``STORE_KEY``, so a server
given that key loads the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

import torch
from api_support import STORE_KEY

from hardneg.miner.index import VectorIndex
from hardneg.miner.model_io import export_model
from hardneg.miner.store import MODEL_FILE, SnapshotStore

N_ITEMS = 300
FLIPPED = np.array([3, 50, 99, 150, 201, 250])  # positions whose label is flipped in pixels-b
INPUT_SHAPE = (1, 8, 8)
COPY_FROM, COPY_TO = 10, 11  # pixels-b: item 11 gets item 10's image (and keeps its own, different label)


@dataclass(frozen=True)
class InspectStore:
    root: Path
    ids: np.ndarray  # (n,) int64
    thumbs: np.ndarray  # (n, 8, 8) uint8, thumbs[i] shows ids[i]
    indexes: dict[str, VectorIndex]  # by snapshot name


def build_inspect_store(root: Path) -> InspectStore:
    digits = load_digits()
    x = digits.data[:N_ITEMS].astype(np.float32) + 0.01  # + 0.01: no all-zero vector under cosine
    labels = digits.target[:N_ITEMS].astype(np.int64)
    ids = np.arange(N_ITEMS, dtype=np.int64) * 3 + 100  # ids that are not row numbers
    thumbs = (digits.images[:N_ITEMS] * (255 / 16)).round().astype(np.uint8)
    store = SnapshotStore(root, key=STORE_KEY)
    a = VectorIndex.build(x, labels, ids)
    store.publish(a, name="pixels-a", thumbs=thumbs, thumb_ids=ids)
    rng = np.random.default_rng(17)
    xb = x + rng.normal(scale=1.5, size=x.shape).astype(np.float32)
    lb = labels.copy()
    lb[FLIPPED] = (lb[FLIPPED] + 3) % 10
    xb[COPY_TO] = xb[COPY_FROM]
    thumbs_b = thumbs.copy()
    thumbs_b[COPY_TO] = thumbs[COPY_FROM]
    assert lb[COPY_TO] != lb[COPY_FROM]
    b = VectorIndex.build(xb, lb, ids)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(16 * torch.eye(64))
    pt2 = root.parent / "pixels-model.pt2"
    assert export_model(model, INPUT_SHAPE, pt2)
    store.publish(b, name="pixels-b", thumbs=thumbs_b, thumb_ids=ids, model={"input_shape": list(INPUT_SHAPE)},
                  extra_files={MODEL_FILE: pt2})
    return InspectStore(root, ids, thumbs_b, {"pixels-a": a, "pixels-b": b})
