"""Every query form and filter of /neighbors returns what brute-force numpy returns on the same snapshot.

Each case runs twice: in-process (TestClient) and over real HTTP against a uvicorn process.
"""

from __future__ import annotations

import numpy as np
import pytest

from api_support import ApiStore, Published, embed

from hardneg.api.schemas import NeighborsResponse

NEAREST3 = "nearest3"  # placeholder: the 3 stored ids nearest to query 0, so that excluding them changes the answer

CASES = [
    ("model-1", "vectors", {}),
    ("model-1", "stored_vectors", {}),  # a query equal to a stored vector finds that item at d² = 0
    ("model-1", "vectors", {"different_label": True}),
    ("model-1", "vectors", {"label_in": [0, 2], "exclude_ids": NEAREST3}),
    ("model-1", "vectors", {"label_not_in": [1], "different_label": True}),
    ("model-1", "vectors", {"label_in": [3], "k": 50}),  # k above the class size: the whole class, no padding
    ("model-1", "vectors", {"label_in": []}),  # nothing admissible: empty lists
    ("model-1", "ids", {}),
    ("model-1", "ids", {"different_label": True, "exclude_ids": NEAREST3}),
    ("model-1", "inputs", {}),
    ("model-1", "inputs", {"different_label": True, "label_not_in": [4]}),
    ("cos-1", "vectors", {"different_label": True, "label_not_in": [-2]}),
    ("cos-1", "ids", {"label_in": [-1, 0], "k": 12}),
    ("hnsw-1", "vectors", {"ef_search": 256}),
    ("hnsw-1", "ids", {"different_label": True, "ef_search": 256}),
]


def admissible(p: Published, qlabels: np.ndarray | None, opts: dict, self_ids: np.ndarray | None) -> np.ndarray:
    """(nq, n) bool: which stored items may answer each query under ``opts``, computed independently."""
    nq = len(qlabels) if qlabels is not None else len(self_ids)
    mask = np.ones((nq, len(p.ids)), dtype=bool)
    if opts.get("different_label"):
        mask &= p.labels[None, :] != np.asarray(qlabels)[:, None]
    if "label_in" in opts:
        mask &= np.isin(p.labels, opts["label_in"])[None, :]
    if "label_not_in" in opts:
        mask &= ~np.isin(p.labels, opts["label_not_in"])[None, :]
    if "exclude_ids" in opts:
        mask &= ~np.isin(p.ids, opts["exclude_ids"])[None, :]
    if self_ids is not None:
        mask &= p.ids[None, :] != np.asarray(self_ids)[:, None]
    return mask


def make_queries(p: Published, form: str, seed: int) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray | None]:
    """(request fields, query vectors (nq, d) for the reference, query labels (nq,), self ids or None)."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(p.ids), size=6, replace=False)
    if form == "ids":
        return {"ids": p.ids[rows].tolist()}, p.vectors[rows], p.labels[rows], p.ids[rows]
    if form == "stored_vectors":
        return {"vectors": p.vectors[rows].tolist()}, p.vectors[rows], p.labels[rows], None
    if form == "inputs":
        raw = p.extra["inputs"][rows] + 0.3 * rng.normal(size=p.extra["inputs"][rows].shape).astype(np.float32)
        return {"inputs": raw.tolist()}, embed(p.model, raw), p.labels[rows], None
    q, qlab = p.near(6, seed)
    return {"vectors": q.tolist()}, q, qlab, None


def as_hits(body: dict) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(np.array([h["id"] for h in r], dtype=np.int64), np.array([h["label"] for h in r], dtype=np.int64),
             np.array([h["distance"] for h in r], dtype=np.float64)) for r in body["results"]]


CASE_IDS = [f"{n}-{f}-{'-'.join(o) or 'plain'}" for n, f, o in CASES]


@pytest.mark.parametrize(("name", "form", "options"), CASES, ids=CASE_IDS)
def test_neighbors_match_brute_force(client, api_store: ApiStore, knn_reference, name, form, options) -> None:
    reference_distances, assert_knn_matches = knn_reference
    p = api_store.snapshots[name]
    fields, queries, qlabels, self_ids = make_queries(p, form, seed=len(name) * 31 + len(form))
    opts = dict(options)
    if opts.get("exclude_ids") == NEAREST3:
        first_self = None if self_ids is None else self_ids[:1]
        d0 = reference_distances(p.vectors, queries[:1], p.metric, admissible(p, qlabels[:1], {}, first_self))
        opts["exclude_ids"] = p.ids[np.argsort(d0[0])[:3]].tolist()
    body = {**fields, **opts}
    if opts.get("different_label") and form != "ids":
        body["labels"] = qlabels.tolist()
    if name != api_store.latest.name:
        body["snapshot"] = name  # pinning an older snapshot still in the store
    r = client.post("/neighbors", json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    NeighborsResponse.model_validate(got)  # the documented response model, field for field
    assert got["snapshot"] == name
    d2 = reference_distances(p.vectors, queries, p.metric, admissible(p, qlabels, opts, self_ids))
    assert_knn_matches(as_hits(got), d2, p.ids, p.labels, opts.get("k", 10))


def test_get_neighbors_of_one_item(client, api_store: ApiStore, knn_reference) -> None:
    reference_distances, assert_knn_matches = knn_reference
    p = api_store.latest
    item, label = int(p.ids[5]), int(p.labels[5])
    other = [int(v) for v in np.unique(p.labels) if v != label][:1]
    d_all = reference_distances(p.vectors, p.vectors[5:6], p.metric)[0]
    nearest_other = p.ids[np.argsort(np.where(p.labels != label, d_all, np.inf))[:2]].tolist()
    params = [("k", 6), ("different_label", "true"), ("label_not_in", other[0]),
              *[("exclude_ids", v) for v in nearest_other]]
    r = client.get(f"/neighbors/{item}", params=params)
    assert r.status_code == 200, r.text
    opts = {"different_label": True, "label_not_in": other, "exclude_ids": nearest_other}
    mask = admissible(p, np.array([label]), opts, np.array([item]))
    assert_knn_matches(as_hits(r.json()), reference_distances(p.vectors, p.vectors[5:6], p.metric, mask),
                       p.ids, p.labels, 6)


def test_distances_are_squared_euclidean_for_cosine(client, api_store: ApiStore) -> None:
    """On a cosine snapshot the reported distance is d² = 2 - 2·cos of the raw vectors, not cos itself."""
    p = api_store.snapshots["cos-1"]
    q = p.vectors[:1] * 3.0  # scaling does not change the direction
    r = client.post("/neighbors", json={"vectors": q.tolist(), "k": 3, "snapshot": "cos-1"})
    assert r.status_code == 200, r.text
    hit = r.json()["results"][0]
    cols = [int(np.flatnonzero(p.ids == h["id"])[0]) for h in hit]
    x = p.vectors[cols].astype(np.float64)
    cos = (x @ q[0]) / (np.linalg.norm(x, axis=1) * np.linalg.norm(q[0]))
    np.testing.assert_allclose([h["distance"] for h in hit], 2 - 2 * cos, atol=1e-5)
    assert hit[0]["id"] == int(p.ids[0]) and hit[0]["distance"] == pytest.approx(0.0, abs=1e-5)
