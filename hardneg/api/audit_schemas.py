"""Response models of the data-inspection routes: snapshot history, items, audits and drift."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
    p_given: float = Field(description="share of the k nearest other items that carry the given label")
    suggested: int = Field(description="the neighbours' most frequent label")
    p_suggested: float = Field(description="its share of the k neighbours")


class LabelAuditResponse(BaseModel):
    """The most suspicious items first (lowest ``p_given``; ties: lowest distance-weighted share)."""

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
