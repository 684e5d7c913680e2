"""Response models of the data-inspection routes: snapshot history, items, audits and drift."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from hardneg.miner.audit import DEFAULT_K
from hardneg.miner.drift import DEFAULT_SAMPLE


class SnapshotEntry(BaseModel):
    """One snapshot of the store, as ``hardneg index list`` shows it; ``error`` says why it cannot be read."""

    name: str
    created_at: str | None
    count: int | None
    dim: int | None
    metric: str | None
    index: str | None
    latest: bool = Field(description="LATEST names it")
    served: bool = Field(description="this process serves it now")
    error: str | None


class SnapshotHistory(BaseModel):
    """The store's snapshots, newest first."""

    served: str
    snapshots: list[SnapshotEntry]


class ItemResponse(BaseModel):
    """One stored item: its label, and whether ``GET /items/{id}/thumb.png`` has a picture of it."""

    snapshot: str
    id: int
    label: int
    thumb: bool


class LabelSuspect(BaseModel):
    rank: int = Field(description="0 is the most suspicious")
    id: int
    label: int = Field(description="the given label")
    quality: float = Field(description="(p_given + p_centroid) / 2; the ranking, lowest first")
    p_given: float = Field(description="share of the k nearest other items that carry the given label")
    p_centroid: float = Field(description="d²_other / (d²_other + d²_own) to the class means (own: without the item)")
    suggested: int = Field(description="the neighbours' most frequent label")
    p_suggested: float = Field(description="its share of the k neighbours")


class LabelAuditResponse(BaseModel):
    """The most suspicious items first (lowest ``quality``)."""

    snapshot: str
    k: int
    count: int = Field(description="items audited")
    disagreeing: int = Field(description="items with at least one neighbour of another label")
    suspects: list[LabelSuspect]


class DuplicateGroup(BaseModel):
    ids: list[int] = Field(description="ascending")
    id_labels: list[int] = Field(description="the label of each id")
    labels: list[int] = Field(description="the distinct labels in the group")


class DuplicatesResponse(BaseModel):
    """Groups of items linked by pairs within ``d² <= threshold``, largest first, split by label agreement."""

    snapshot: str
    threshold: float
    pairs: int
    same_label_groups: int = Field(description="all groups with one label (redundant copies)")
    different_label_groups: int = Field(description="all groups with several labels (conflicts)")
    same_label: list[DuplicateGroup] = Field(description="the first `limit` of them")
    different_label: list[DuplicateGroup] = Field(description="the first `limit` of them")


class DriftResponse(BaseModel):
    """Drift between two snapshots over the ids both hold (``hardneg.miner.drift``)."""

    from_: str = Field(alias="from")
    to: str
    common: int
    only_from: int
    only_to: int
    k: int
    anchors: int
    overlap_mean: float
    overlap_per_class: dict[int, float]
    centroid_shift: dict[int, float]
    centroid_shift_mean: float
    hardest_negative_changed: float | None


# ---- query parameters (unknown ones are refused with 422, so a misspelt option is never silently ignored)
MAX_LIST = 1000  # suspects or groups in one answer
MAX_AUDIT_K = 100  # voting or compared neighbours: memory and time grow with n·k
MAX_SAMPLE = 10_000  # drift anchors: each costs one row of distances to every common item


class SnapshotQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    snapshot: str | None = Field(None, max_length=128,
                                 description="look at this snapshot (still in the store) instead of the served one")


class LabelAuditQuery(SnapshotQuery):
    limit: int = Field(50, ge=1, le=MAX_LIST, description="suspects to return")
    k: int = Field(DEFAULT_K, ge=1, le=MAX_AUDIT_K, description="voting neighbours per item")


class DuplicatesQuery(SnapshotQuery):
    threshold: float = Field(1e-3, ge=0, allow_inf_nan=False,
                             description="d² at or below which two items are near-duplicates (below 4 on cosine "
                                         "snapshots)")
    limit: int = Field(50, ge=1, le=MAX_LIST, description="groups of each kind to return")


class DriftQuery(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: str = Field(alias="from", max_length=128, description="the older snapshot")
    to: str | None = Field(None, max_length=128, description="the newer snapshot (default: the served one)")
    k: int = Field(10, ge=1, le=MAX_AUDIT_K, description="neighbours compared per anchor")
    sample: int = Field(DEFAULT_SAMPLE, ge=1, le=MAX_SAMPLE, description="anchors drawn from the common items")
    seed: int = Field(0, ge=0, le=2**32 - 1)
