"""A FAISS index together with the ids and labels of what it holds, searched with filters.

Row ``i`` of the FAISS index holds ``ids[i]`` with label ``labels[i]``. Rows are
stored sorted by (label, id), so every class is one contiguous run of rows:
"every label but the anchor's" is then at most two row ranges, which lets exact
filtered search stay on FAISS's BLAS path (``faiss.knn`` over row slices)
instead of the much slower per-vector ID-selector path.

Every search takes its own parameters (``SearchParams``); the shared FAISS
object is never mutated after it is built or loaded, so concurrent searches
from several threads are safe.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

from hardneg.miner.distances import Distance, get_distance
from hardneg.miner.errors import NotFoundError, ValidationError

# Exact filtered search over at most this many contiguous row runs goes through
# faiss.knn on slices (BLAS); more fragmented filters use an ID selector.
_MAX_RANGES = 16

INDEX_KINDS = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class IndexSpec:
    """How an index is built and searched by default.

    ``kind`` is ``flat``, ``ivf``, ``hnsw`` or ``factory`` (any FAISS factory string).
    """

    kind: str
    factory: str
    nprobe: int | None = None  # IVF: lists visited per query
    ef_search: int | None = None  # HNSW: candidate list size during search
    ef_construction: int | None = None  # HNSW: candidate list size during build

    @classmethod
    def resolve(cls, name: str, n: int) -> IndexSpec:
        """Turn a user's choice (``flat``, ``ivf``, ``hnsw`` or a factory string) into a spec for ``n`` vectors."""
        if not isinstance(name, str) or not name.strip():
            raise ValidationError(f"index must be one of {', '.join(INDEX_KINDS)} or a FAISS factory string, got {name!r}")
        name = name.strip()
        if name == "flat":
            return cls("flat", "Flat")
        if name == "ivf":
            nlist, nprobe = ivf_lists(n)
            return cls("ivf", f"IVF{nlist},Flat", nprobe=nprobe)
        if name == "hnsw":
            return cls("hnsw", "HNSW32", ef_search=128, ef_construction=80)
        return cls("factory", name)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "factory": self.factory, "nprobe": self.nprobe, "ef_search": self.ef_search,
                "ef_construction": self.ef_construction}

    @classmethod
    def from_dict(cls, d: dict) -> IndexSpec:
        return cls(kind=d["kind"], factory=d["factory"], nprobe=d.get("nprobe"), ef_search=d.get("ef_search"),
                   ef_construction=d.get("ef_construction"))


def ivf_lists(n: int) -> tuple[int, int]:
    """The ``ivf`` kind's ``(nlist, nprobe)`` for ``n`` vectors: ``nlist = sqrt(n)`` (at most ``n / 39``: k-means
    wants >= 39 training points per list) and ``nprobe = max(8, ceil(nlist ** 0.6))`` (at most ``nlist``).

    Chosen for mining, where the work is the scan of the probed lists: fewer, larger lists keep each list's
    matrix product large and make k-means 16x cheaper than FAISS's ``4 sqrt(n)`` rule of thumb. An anchor
    scans a share ``nlist ** -0.4 = n ** -0.2`` of the items: 1/10 at 100k (32 of 316 lists), 1/16 at 1M
    (64 of 1,000), 1/25 at 10M. A fixed share of 1/16 reached a hardest-negative recall of 0.968 at 1M but
    0.926 at 100k on clustered data, where the anchor's own class (~1,000 items) fills more of the nearest
    lists; the rule gives 0.968 at both (docs/benchmarks.md, "Scale"). Mining searches deeper than the
    hardest negative probe more lists (:func:`hardneg.miner.mining.search.mining_nprobe`). Serving searches
    use ``nprobe`` as it is.
    """
    nlist = max(1, min(round(math.sqrt(n)), n // 39))
    return nlist, max(1, min(nlist, max(8, math.ceil(nlist ** 0.6))))


@dataclass(frozen=True)
class SearchParams:
    """Per-call search parameters; ``None`` means the index's default from its spec."""

    nprobe: int | None = None
    ef_search: int | None = None

    def __post_init__(self) -> None:
        for name in ("nprobe", "ef_search"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, np.integer)) or v < 1):
                raise ValidationError(f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Hits:
    """The neighbours of one query, nearest first: ``ids``, ``labels``, ``distances`` (k',) each."""

    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    rows: np.ndarray


@dataclass(frozen=True)
class SearchResult:
    """Neighbours of a batch of ``n`` queries in compressed-row form (no padding).

    Query ``i`` owns entries ``offsets[i]:offsets[i+1]`` of ``ids``, ``labels``,
    ``distances`` (squared Euclidean, ascending) and ``rows`` (index rows).
    A query with fewer than ``k`` admissible items simply has fewer entries.
    """

    offsets: np.ndarray  # (n + 1,) int64
    ids: np.ndarray  # (total,) int64
    labels: np.ndarray  # (total,) int64
    distances: np.ndarray  # (total,) float32
    rows: np.ndarray  # (total,) int64

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> Hits:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Hits(self.ids[a:b], self.labels[a:b], self.distances[a:b], self.rows[a:b])

    def __iter__(self) -> Iterator[Hits]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Number of neighbours found for each query, (n,)."""
        return np.diff(self.offsets)

    @classmethod
    def from_padded(cls, rows: np.ndarray, dist: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> SearchResult:
        """Build from padded (n, k) ``rows`` (-1 = no result) and ``dist``, dropping the padding."""
        valid = rows >= 0
        offsets = np.zeros(rows.shape[0] + 1, dtype=np.int64)
        np.cumsum(valid.sum(1), out=offsets[1:])
        r = rows[valid].astype(np.int64)
        return cls(offsets, ids[r], labels[r], dist[valid].astype(np.float32), r)


@dataclass
class VectorIndex:
    """A FAISS index plus the ``ids`` (n,) and ``labels`` (n,) of its rows.

    Build one with :meth:`build`; the store loads one from a snapshot.
    """

    index: faiss.Index
    ids: np.ndarray  # (n,) int64, row i holds ids[i]
    labels: np.ndarray  # (n,) int64, sorted ascending
    distance: Distance
    spec: IndexSpec
    _id_order: np.ndarray = field(init=False, repr=False)
    _class_values: np.ndarray = field(init=False, repr=False)
    _class_bounds: np.ndarray = field(init=False, repr=False)
    _xb: np.ndarray | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = self.index.ntotal
        if self.ids.shape != (n,) or self.labels.shape != (n,):
            raise ValidationError(f"index holds {n} vectors but ids has shape {self.ids.shape} and labels {self.labels.shape}")
        if n > 1 and np.any(np.diff(self.labels) < 0):
            raise ValidationError("index rows must be sorted by label; build indexes with VectorIndex.build")
        self._id_order = np.argsort(self.ids, kind="stable")
        if n > 1 and np.any(np.diff(self.ids[self._id_order]) == 0):
            raise ValidationError("ids must be unique")
        values, starts = np.unique(self.labels, return_index=True)
        self._class_values = values
        self._class_bounds = np.append(starts, n).astype(np.int64)
        self._xb = None
        if isinstance(self.index, faiss.IndexFlat):
            # A zero-copy view of the stored vectors, for exact search over row slices.
            self._xb = faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            ivf.make_direct_map()  # needed by reconstruct(); done once, before any search

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        ids: np.ndarray | None = None,
        *,
        metric: str = "cosine",
        index: str = "flat",
        seed: int = 0,
    ) -> VectorIndex:
        """Index ``vectors`` (n, d) with ``labels`` (n,) and optional unique ``ids`` (n,) (default ``0..n-1``)."""
        distance = get_distance(metric)
        vectors = check_vectors(vectors, "vectors")
        n, d = vectors.shape
        labels = check_int_array(labels, "labels", n)
        ids = np.arange(n, dtype=np.int64) if ids is None else check_int_array(ids, "ids", n)
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != n:
            raise ValidationError(f"ids must be unique; duplicated: {uniq[counts > 1][:10].tolist()}")
        spec = IndexSpec.resolve(index, n)
        order = np.lexsort((ids, labels))
        xb = distance.prepare(vectors[order])
        try:
            fidx = faiss.index_factory(d, spec.factory, distance.faiss_metric)
        except RuntimeError as e:
            raise ValidationError(f"FAISS cannot build index {spec.factory!r} for dimension {d}: {_faiss_reason(e)}; "
                                  f"use flat, ivf, hnsw or a valid FAISS factory string") from None
        if spec.ef_construction is not None and isinstance(fidx, faiss.IndexHNSW):
            fidx.hnsw.efConstruction = spec.ef_construction
        ivf = faiss.try_extract_index_ivf(fidx)
        if ivf is not None:
            ivf.cp.seed = seed
        if not fidx.is_trained:
            try:
                fidx.train(xb)
            except RuntimeError as e:
                raise ValidationError(f"FAISS cannot train {spec.factory!r} on {n} vectors: {_faiss_reason(e)}") from None
        fidx.add(xb)
        return cls(fidx, ids[order], labels[order], distance, spec)

    # ------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    @property
    def metric(self) -> str:
        return self.distance.name

    @property
    def exact(self) -> bool:
        """True when search is exhaustive (flat), so filtered results are exact."""
        return self._xb is not None

    @property
    def classes(self) -> np.ndarray:
        """The distinct labels, ascending."""
        return self._class_values

    def class_rows(self, label: int) -> tuple[int, int]:
        """The half-open row range ``[lo, hi)`` holding ``label`` (empty range when absent)."""
        j = np.searchsorted(self._class_values, label)
        if j < len(self._class_values) and self._class_values[j] == label:
            return int(self._class_bounds[j]), int(self._class_bounds[j + 1])
        return 0, 0

    def class_sizes_of(self, labels: np.ndarray) -> np.ndarray:
        """Number of stored items sharing each of ``labels`` (m,): (m,) int64."""
        j = np.clip(np.searchsorted(self._class_values, labels), 0, len(self._class_values) - 1)
        sizes = np.diff(self._class_bounds)[j]
        return np.where(self._class_values[j] == labels, sizes, 0)

    # --------------------------------------------------------------- lookup
    def rows_of(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Rows holding ``ids`` (m,); raises :class:`NotFoundError` naming the unknown ones."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        sorted_ids = self.ids[self._id_order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(self.count - 1, 0))
        found = (sorted_ids[pos] == ids) if self.count else np.zeros(len(ids), bool)
        if not np.all(found):
            missing = ids[~found][:10].tolist()
            raise NotFoundError(f"unknown id(s) {missing}; the snapshot holds {self.count} items")
        return self._id_order[pos]

    def vectors_of(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Stored (prepared) vectors of ``ids``: (m, d) float32."""
        rows = self.rows_of(ids)
        if self._xb is not None:
            return self._xb[rows].copy()
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for j, r in enumerate(rows):
            out[j] = self.index.reconstruct(int(r))
        return out

    # --------------------------------------------------------------- search
    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        query_labels: np.ndarray | Sequence[int] | None = None,
        different_label: bool = False,
        label_in: Iterable[int] | None = None,
        label_not_in: Iterable[int] | None = None,
        exclude_ids: Iterable[int] | None = None,
        exclude_self: np.ndarray | Sequence[int] | None = None,
        params: SearchParams | None = None,
    ) -> SearchResult:
        """The ``k`` nearest admissible items of each query, nearest first.

        Args:
            queries: (n, d) raw query vectors (normalised here for cosine).
            k: neighbours per query, >= 1.
            query_labels: (n,) labels of the queries; required with ``different_label``.
            different_label: keep only items whose label differs from the query's (hard-negative mode).
            label_in: keep only items with one of these labels.
            label_not_in: drop items with any of these labels.
            exclude_ids: drop these item ids for every query.
            exclude_self: (n,) one id per query to drop for that query alone (a query by stored id).
            params: per-call search parameters for approximate indexes. Under a filter these are widened by
                what the filtered-out items could fill (they may be exactly the nearest ones), and a filter that
                admits few items is answered exactly (every IVF list, or HNSW's flat storage, behind the filter).

        Returns:
            A :class:`SearchResult`; a query has fewer than ``k`` hits only when fewer items pass the filters
            (or, on approximate indexes, when the widened search still finds fewer).
        """
        q = self.distance.prepare(check_vectors(queries, "queries", dim=self.dim))
        n = q.shape[0]
        k = check_k(k)
        if different_label:
            if query_labels is None:
                raise ValidationError("different_label needs the labels of the queries (query_labels)")
            qlab = check_int_array(query_labels, "query_labels", n)
        self_rows = None
        if exclude_self is not None:
            self_rows = self._rows_or_missing(check_int_array(exclude_self, "exclude_self", n))
        allowed = self._filter_mask(label_in, label_not_in, exclude_ids)
        extra = 1 if self_rows is not None else 0
        kk = min(k + extra, self.count)
        rows = np.full((n, kk), -1, dtype=np.int64)
        dist = np.full((n, kk), np.inf, dtype=np.float32)
        if different_label:
            # One search per distinct query label, each blocking that label's row range: grouped by one sort,
            # and without a per-label mask of every row unless other filters need one (O(m log m + n), not
            # O(labels x (m + n)): a request may hold as many labels as queries, a mining pass every class).
            order = np.argsort(qlab, kind="stable")
            labels_sorted = qlab[order]
            cuts = np.flatnonzero(np.diff(labels_sorted)) + 1
            for sel in np.split(order, cuts):
                lo, hi = self.class_rows(int(qlab[sel[0]]))
                rows[sel], dist[sel] = self._search_masked(q[sel], kk, allowed, params, blocked=(lo, hi))
        else:
            rows[:], dist[:] = self._search_masked(q, kk, allowed, params)
        if self_rows is not None:
            hit_self = rows == self_rows[:, None]
            rows[hit_self] = -1
            rows, dist = _compact(rows, dist, k)
        elif kk > k:  # pragma: no cover - kk <= k without exclusions
            rows, dist = rows[:, :k], dist[:, :k]
        return SearchResult.from_padded(rows, self.distance.to_distance(dist), self.ids, self.labels)

    def _rows_or_missing(self, ids: np.ndarray) -> np.ndarray:
        sorted_ids = self.ids[self._id_order]
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(self.count - 1, 0))
        return np.where(sorted_ids[pos] == ids, self._id_order[pos], -2)

    def _filter_mask(self, label_in, label_not_in, exclude_ids) -> np.ndarray | None:
        if label_in is None and label_not_in is None and exclude_ids is None:
            return None
        mask = np.ones(self.count, dtype=bool)
        if label_in is not None:
            mask &= np.isin(self.labels, _int_list(label_in, "label_in"))
        if label_not_in is not None:
            mask &= ~np.isin(self.labels, _int_list(label_not_in, "label_not_in"))
        if exclude_ids is not None:
            ex_rows = self._rows_or_missing(_int_list(exclude_ids, "exclude_ids"))
            mask[ex_rows[ex_rows >= 0]] = False
        return mask

    def _search_masked(self, q: np.ndarray, k: int, mask: np.ndarray | None, params: SearchParams | None,
                       blocked: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, np.ndarray]:
        """Search (m, d) prepared queries among rows where ``mask`` holds (every row when None) outside the row
        range ``blocked`` = [lo, hi); padded (m, k) rows and raw scores."""
        m = q.shape[0]
        lo, hi = blocked
        if hi > lo and mask is not None:
            mask = mask.copy()
            mask[lo:hi] = False
            lo = hi = 0
        filtered = mask is not None or hi > lo
        n_allowed = (self.count if mask is None else int(mask.sum())) - (hi - lo)
        if filtered and n_allowed == 0:
            return np.full((m, k), -1, np.int64), np.full((m, k), np.inf, np.float32)
        if self._xb is not None and filtered:
            runs = _true_runs(mask) if mask is not None else [r for r in ((0, lo), (hi, self.count)) if r[1] > r[0]]
            if len(runs) <= _MAX_RANGES:
                return self._search_ranges(q, k, runs)
        bits = None if mask is None else np.packbits(mask, bitorder="little")  # must outlive the selector
        outside = faiss.IDSelectorRange(lo, hi) if hi > lo else None  # likewise
        if bits is not None:
            sel = faiss.IDSelectorBitmap(mask.size, faiss.swig_ptr(bits))
        else:
            sel = faiss.IDSelectorNot(outside) if outside is not None else None
        base = params or SearchParams()
        nprobe = base.nprobe or self.spec.nprobe
        ef = base.ef_search or self.spec.ef_search
        target = self.index
        if filtered and not self.exact:
            target, nprobe, ef = self._widen_for_blocked(nprobe, ef, k, n_allowed)
        exact = self.exact or target is not self.index
        while True:
            sp = self._faiss_params(target, sel, nprobe, ef, k)
            scores, rows = target.search(q, k, params=sp) if sp is not None else target.search(q, k)
            want = min(k, n_allowed)
            short = (rows >= 0).sum(1) < want
            if exact or not short.any():
                return rows.astype(np.int64), scores
            # Approximate index: widen the search rather than silently return fewer.
            widened = self._widen(nprobe, ef)
            if widened is None:
                return rows.astype(np.int64), scores
            nprobe, ef = widened

    def _widen_for_blocked(self, nprobe: int | None, ef: int | None, k: int,
                           n_allowed: int) -> tuple[faiss.Index, int | None, int | None]:
        """Which FAISS index to search, with what nprobe and efSearch, when only ``n_allowed`` items pass a filter.

        The blocked items can be exactly the nearest ones (different_label blocks the query's own class), and
        they still fill IVF's probed lists and HNSW's candidate list: widen both by what the blocked items can
        fill. Capped at every list, IVF is exhaustive and its selector skips blocked items before any distance;
        when HNSW would compute more distances than there are admissible items, its flat storage is scanned.
        """
        blocked = self.count - n_allowed
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            return self.index, min(ivf.nlist, (nprobe or 1) + math.ceil(blocked * ivf.nlist / self.count)), ef
        if isinstance(self.index, faiss.IndexHNSW):
            ef = min(self.count, max(ef or 16, k) + blocked)
            storage = faiss.downcast_index(self.index.storage)
            # Each candidate HNSW expands costs up to M (upper levels) to 2M (level 0) distances.
            if isinstance(storage, faiss.IndexFlat) and n_allowed <= ef * self.index.hnsw.nb_neighbors(1):
                return storage, nprobe, ef
        return self.index, nprobe, ef

    def _widen(self, nprobe: int | None, ef: int | None) -> tuple[int | None, int | None] | None:
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None:
            cur = nprobe or 1
            return (min(cur * 4, ivf.nlist), ef) if cur < ivf.nlist else None
        if isinstance(self.index, faiss.IndexHNSW):
            cur = ef or int(self.index.hnsw.efSearch)
            return (nprobe, cur * 4) if cur < self.count else None
        return None

    def _faiss_params(self, index: faiss.Index, sel, nprobe: int | None, ef: int | None, k: int):
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            inner = faiss.SearchParametersIVF(sel=sel, nprobe=int(nprobe or 1))
        elif isinstance(index, faiss.IndexHNSW):
            inner = faiss.SearchParametersHNSW(sel=sel, efSearch=int(max(ef or 16, k)))
        elif sel is not None:
            inner = faiss.SearchParameters(sel=sel)
        else:
            return None
        if isinstance(index, faiss.IndexPreTransform):
            return faiss.SearchParametersPreTransform(index_params=inner)
        return inner

    def _search_ranges(self, q: np.ndarray, k: int, runs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Exact search restricted to row ranges, on FAISS's BLAS path; merged top-k."""
        assert self._xb is not None
        parts_s, parts_r = [], []
        for lo, hi in runs:
            kr = min(k, hi - lo)
            s, r = faiss.knn(q, self._xb[lo:hi], kr, metric=self.distance.faiss_metric)
            parts_s.append(s)
            parts_r.append(np.where(r >= 0, r + lo, -1))
        scores = np.concatenate(parts_s, axis=1)
        rows = np.concatenate(parts_r, axis=1)
        key = -scores if self.distance.higher_is_closer else scores
        key = np.where(rows >= 0, key, np.inf)
        if rows.shape[1] > k:
            part = np.argpartition(key, k - 1, axis=1)[:, :k]
            key = np.take_along_axis(key, part, 1)
            rows = np.take_along_axis(rows, part, 1)
            scores = np.take_along_axis(scores, part, 1)
        order = np.argsort(key, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, 1)
        scores = np.take_along_axis(scores, order, 1)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=np.nan)
        return rows, scores


# ----------------------------------------------------------------- helpers
def stored_vectors(index: VectorIndex, copy: bool = True) -> np.ndarray:
    """The prepared vectors of every row of ``index``: (n, d) float32 (lossy for compressed indexes).

    With ``copy=False`` a flat index's vectors come as a read-only view of its storage (no 0.5 GB copy at 1M
    items), valid only while ``index`` lives: for use within one call that holds the index.
    """
    if index.count == 0:
        return np.empty((0, index.dim), np.float32)
    if not copy and index._xb is not None:
        view = index._xb.view()
        view.flags.writeable = False
        return view
    try:
        return index.index.reconstruct_n(0, index.count)
    except RuntimeError as e:
        raise ValidationError(f"this {index.spec.factory!r} index cannot return its stored vectors "
                              f"({_faiss_reason(e)}); mining and audits need flat, ivf, hnsw or another FAISS index "
                              "that supports reconstruct") from None


def check_vectors(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Validate a (n, d) finite numeric array; return it as float32."""
    x = np.asarray(x)
    if x.ndim == 1 and dim is not None and x.shape[0] == dim:
        x = x[None, :]
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValidationError(f"{name} must be a non-empty 2-D array (n, d), got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValidationError(f"{name} must be numeric, got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValidationError(f"{name} have dimension {x.shape[1]} but the index has dimension {dim}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(1))[:10].tolist()
        raise ValidationError(f"{name} contain NaN or inf (rows {bad}); only finite values are accepted")
    return x


def check_int_array(a, name: str, n: int | None = None) -> np.ndarray:
    """Validate a 1-D array of integers (integral floats are refused); return int64."""
    a = np.asarray(a)
    if a.ndim != 1:
        raise ValidationError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValidationError(f"{name} must be integers, got dtype {a.dtype}")
    if n is not None and a.shape[0] != n:
        raise ValidationError(f"{name} has {a.shape[0]} entries but there are {n} vectors; they must match")
    return a.astype(np.int64, copy=False)


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValidationError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _int_list(values, name: str) -> np.ndarray:
    a = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
    if a.size == 0:
        return a.astype(np.int64)
    return check_int_array(a.reshape(-1), name)


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open ranges of consecutive True entries."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), ends.tolist()))


def _compact(rows: np.ndarray, dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Move valid entries (rows >= 0) left, keeping order, and cut to k columns."""
    order = np.argsort(rows < 0, axis=1, kind="stable")
    return np.take_along_axis(rows, order, 1)[:, :k], np.take_along_axis(dist, order, 1)[:, :k]


def _faiss_reason(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    reason = next((line for line in msg if "Error" in line or "error" in line), msg[-1] if msg else repr(e))
    return re.sub(r"\s+", " ", reason)[:300]
