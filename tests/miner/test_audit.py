"""Label-noise audit and near-duplicate groups, checked against brute force over the same stored vectors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hardneg.miner.audit import audit_labels, find_duplicates
from hardneg.miner.distances import get_distance
from hardneg.miner.errors import ValidationError
from hardneg.miner.index import VectorIndex, stored_vectors


def brute_audit(index: VectorIndex, k: int) -> dict[int, tuple[float, float, int, float]]:
    """Per id: (p_given, p_centroid, suggested label, its share), from the full d² matrix and class means."""
    x = stored_vectors(index).astype(np.float64)
    d2 = index.distance.pairwise(x, x)
    np.fill_diagonal(d2, np.inf)
    classes = np.unique(index.labels)
    means = {c: x[index.labels == c].mean(0) for c in classes}
    out = {}
    for r in range(index.count):
        near = np.argsort(d2[r], kind="stable")[:k]
        nl = index.labels[near]
        counts = Counter(nl.tolist())
        top = max(counts.values())
        suggested = next(lab for lab in nl.tolist() if counts[lab] == top)  # ties: the nearest
        mine = (index.labels == index.labels[r]) & (np.arange(index.count) != r)
        own = ((x[r] - x[mine].mean(0)) ** 2).sum()
        other = min(((x[r] - means[c]) ** 2).sum() for c in classes if c != index.labels[r])
        out[int(index.ids[r])] = ((nl == index.labels[r]).mean(), other / (other + own), suggested, top / k)
    return out


@pytest.mark.parametrize("metric,kind", [("cosine", "flat"), ("l2", "flat"), ("l2", "ivf")])
def test_label_audit_matches_brute_force(clusters, metric, kind):
    data = clusters(400, 8, 4, seed=3, spread=0.9)
    index = VectorIndex.build(data.vectors, data.labels, data.ids, metric=metric, index=kind)
    k = 7
    audit = audit_labels(index, k)
    want = brute_audit(index, k)
    assert sorted(audit.ids.tolist()) == sorted(want)
    for i, id_ in enumerate(audit.ids.tolist()):
        p, pc, sug, ps = want[id_]
        assert audit.p_given[i] == pytest.approx(p)
        assert audit.p_centroid[i] == pytest.approx(pc, abs=1e-4)
        assert audit.quality[i] == pytest.approx((p + pc) / 2, abs=1e-4)
        assert audit.suggested[i] == sug, f"id {id_}"
        assert audit.p_suggested[i] == pytest.approx(ps)
    assert np.all(np.diff(audit.quality) >= 0)  # most suspicious first
    assert (audit.p_given < 1).any() and (audit.p_given == 1).any()  # the data exercises both ends
    assert (audit.p_centroid < 0.5).any() and (audit.p_centroid > 0.5).any()


def test_flipped_labels_rank_first(clusters):
    data = clusters(500, 16, 5, seed=4, spread=0.3)  # well separated: only the flipped items disagree
    labels = data.labels.copy()
    flipped = np.random.default_rng(0).choice(500, size=10, replace=False)
    labels[flipped] = (labels[flipped] + 1) % 5
    index = VectorIndex.build(data.vectors, labels, data.ids)
    audit = audit_labels(index)
    assert set(audit.ids[:10].tolist()) == set(data.ids[flipped].tolist())
    true_label = dict(zip(data.ids.tolist(), data.labels.tolist()))
    assert [int(s) for s in audit.suggested[:10]] == [true_label[int(i)] for i in audit.ids[:10]]
    assert set(audit.top(0.02).tolist()) == set(data.ids[flipped].tolist())
    assert audit.top(0.0).tolist() == [] and len(audit.top(0.021)) == 11 and len(audit.top(1.0)) == 500


def test_exact_copies_are_not_their_own_neighbours():
    x = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 points, 4 copies each, all at distance 0
    labels = np.repeat([0, 1, 2], 4)
    labels[0] = 1  # one copy of point 0 carries another label
    audit = audit_labels(VectorIndex.build(x, labels, metric="l2"), k=3)
    got = dict(zip(audit.ids.tolist(), audit.p_given.tolist()))
    assert got[0] == 0.0  # its 3 copies all say 0
    assert got[1] == pytest.approx(2 / 3)  # two copies say 0, item 0 says 1
    assert got[4] == 1.0 and got[8] == 1.0
    centroid = dict(zip(audit.ids.tolist(), audit.p_centroid.tolist()))
    assert centroid[8] == 1.0  # on its class mean, away from the others: d²_own = 0
    assert audit.ids[0] == 0  # the copy under the wrong label is the first suspect


def test_singleton_classes_and_a_single_class():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0]], np.float32)
    audit = audit_labels(VectorIndex.build(x, np.array([0, 0, 0, 1]), metric="l2"), k=2)
    centroid = dict(zip(audit.ids.tolist(), audit.p_centroid.tolist()))
    assert centroid[3] == 0.0 and audit.ids[0] == 3  # alone in its class: no support for its label
    one = audit_labels(VectorIndex.build(x, np.zeros(4, np.int64), metric="l2"), k=2)
    assert one.p_centroid.tolist() == [1.0] * 4 and one.quality.tolist() == [1.0] * 4  # nothing to confuse


@pytest.mark.parametrize("k", [0, -1, 10, 2.5, True])
def test_label_audit_refuses_bad_k(clusters, k):
    data = clusters(10, 4, 2, seed=1)
    with pytest.raises(ValidationError, match="k must"):
        audit_labels(VectorIndex.build(data.vectors, data.labels), k)


def test_top_refuses_a_fraction_outside_0_1(clusters):
    data = clusters(20, 4, 2, seed=1)
    audit = audit_labels(VectorIndex.build(data.vectors, data.labels), 3)
    with pytest.raises(ValidationError, match="between 0 and 1"):
        audit.top(1.5)


def brute_groups(index: VectorIndex, threshold: float) -> list[tuple[list[int], list[int]]]:
    """Connected components (size >= 2) of the graph of pairs with d² <= threshold: (ids, labels) each."""
    x = stored_vectors(index)
    d2 = index.distance.pairwise(x, x)
    adj = d2 <= threshold
    np.fill_diagonal(adj, False)
    seen, groups = set(), []
    for start in range(index.count):
        if start in seen or not adj[start].any():
            continue
        stack, comp = [start], set()
        while stack:
            r = stack.pop()
            if r not in comp:
                comp.add(r)
                stack.extend(np.flatnonzero(adj[r]).tolist())
        seen |= comp
        rows = sorted(comp)
        groups.append((sorted(index.ids[rows].tolist()), sorted(set(index.labels[rows].tolist()))))
    return sorted(groups)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_duplicate_groups_match_brute_force(clusters, metric):
    data = clusters(300, 6, 3, seed=8, spread=0.5)
    rng = np.random.default_rng(8)
    x, labels = data.vectors.copy(), data.labels.copy()
    # Plant near-copies: chains (so grouping must be transitive), same-label and cross-label ones.
    src = rng.choice(300, size=40, replace=False)
    for j, (a, b) in enumerate(zip(src[::2], src[1::2])):
        x[b] = x[a] + 1e-3 * rng.normal(size=6)
        labels[b] = labels[a] if j % 2 else (labels[a] + 1) % 3
    index = VectorIndex.build(x, labels, data.ids, metric=metric)
    threshold = 1e-4 if metric == "cosine" else 1e-3
    dup = find_duplicates(index, threshold)
    got = sorted((g.tolist(), lab.tolist()) for g, lab in zip(dup.groups, dup.group_labels))
    assert got == brute_groups(index, threshold)
    assert len(got) >= 15
    label_of = dict(zip(index.ids.tolist(), index.labels.tolist()))
    assert all(il.tolist() == [label_of[i] for i in g.tolist()] for g, il in zip(dup.groups, dup.id_labels))
    assert all(len(dup.group_labels[i]) == 1 for i in dup.same_label)
    assert all(len(dup.group_labels[i]) > 1 for i in dup.conflicts)
    assert len(dup.same_label) + len(dup.conflicts) == len(dup.groups) and dup.same_label and dup.conflicts
    assert [len(g) for g in dup.groups] == sorted((len(g) for g in dup.groups), reverse=True)


def test_duplicates_threshold_is_inclusive():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], np.float32)
    index = VectorIndex.build(x, np.array([0, 1, 1]), metric="l2")
    assert [g.tolist() for g in find_duplicates(index, 1.0).groups] == [[0, 1]]  # d² = 1 exactly
    assert find_duplicates(index, 0.99).groups == []
    assert [g.tolist() for g in find_duplicates(index, 4.0).groups] == [[0, 1, 2]]  # 0-1-2 through 1


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), float("inf"), 4.0, True])
def test_duplicates_refuse_bad_thresholds(clusters, threshold):
    data = clusters(20, 4, 2, seed=1)
    with pytest.raises(ValidationError, match="threshold"):
        find_duplicates(VectorIndex.build(data.vectors, data.labels), threshold)


@pytest.mark.parametrize("max_pairs", [0, -1, 2.5, True])
def test_duplicates_refuse_a_bad_pair_cap(clusters, max_pairs):
    data = clusters(20, 4, 2, seed=1)
    with pytest.raises(ValidationError, match="max_pairs must be a positive integer"):
        find_duplicates(VectorIndex.build(data.vectors, data.labels), 0.1, max_pairs=max_pairs)


def test_duplicates_refuse_a_threshold_linking_too_many_pairs(clusters):
    data = clusters(100, 4, 2, seed=1)
    with pytest.raises(ValidationError, match="more than 50 pairs"):
        find_duplicates(VectorIndex.build(data.vectors, data.labels), 3.9, max_pairs=50)


def test_cosine_threshold_is_the_reported_d2():
    # The cosine range-search radius must translate d² = 2 - 2cos exactly: unit vectors with cos 0.75, d² 0.5.
    x = np.array([[1.0, 0.0], [0.75, np.sqrt(1 - 0.75 ** 2)]], np.float32)
    d2 = float(get_distance("cosine").pairwise(x, x)[0, 1])
    assert d2 == pytest.approx(0.5, abs=1e-6)
    index = VectorIndex.build(x, np.array([0, 1]))
    assert len(find_duplicates(index, d2 + 1e-5).groups) == 1
    assert find_duplicates(index, d2 - 1e-5).groups == []
