"""Request and response models of ``POST /mine`` (kept apart from the search schemas).

Types are strict: ``"5"`` or ``true`` is not an integer, ``1`` is not a boolean (422). Ids must fit in int64,
as stored ids do. Limits that depend on settings are checked by the handler (400).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hardneg.api.schemas import INT64_MAX, Int64, NestedFloats
from hardneg.miner.mining.config import MiningConfig

_D = MiningConfig()


class MineRequest(BaseModel):
    """Anchors (exactly one of ``vectors``, ``ids``, ``inputs``), what makes a negative, and how to pick them.

    * ``positives`` (one list of stored ids per anchor): query mode, a negative is any stored item that is
      none of the anchor's positives (nor the anchor itself, for ``ids``);
    * ``labels`` (one per ``vectors`` / ``inputs`` anchor): a negative is a stored item of another label;
    * neither, with ``ids``: label mode on stored items, each with a same-label positive (``positive``).
    """

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"vectors": [[0.1, 0.2, 0.3, 0.4]], "positives": [[17, 42]], "strategy": "window", "num_negatives": 3,
         "range_min": 2, "range_max": 20, "relative_margin": 0.05},
        {"ids": [17, 42], "strategy": "semihard", "num_negatives": 2, "margin": 0.2},
        {"vectors": [[0.1, 0.2, 0.3, 0.4]], "labels": [3], "num_negatives": 5, "include_vectors": True},
    ]})

    vectors: list[list[float]] | None = Field(None, description="anchor embeddings, `dim` finite numbers each")
    ids: list[Int64] | None = Field(None, description="stored items as anchors (never their own negative)")
    inputs: list[NestedFloats] | None = Field(None, description="raw model inputs, embedded by the snapshot's model")
    positives: list[list[Int64]] | None = Field(None, description="stored ids of each anchor's positives")
    labels: list[Int64] | None = Field(None, description="labels of the `vectors` or `inputs` anchors")
    strategy: Literal["hardest", "semihard", "window", "distance-weighted"] = Field(
        "hardest", description="how negatives are picked; `window` uses range_min, range_max and sampling")
    num_negatives: int = Field(_D.per_anchor, ge=1, description="negatives per anchor")
    range_min: int = Field(0, ge=0, description="window: admissible neighbours to skip")
    range_max: int | None = Field(None, ge=1, description="window: pick among ranks [range_min, range_max) "
                                                          "(default range_min + num_negatives)")
    sampling: Literal["top", "random"] = Field("top", description="window: the nearest, or uniformly at random")
    margin: float = Field(_D.margin, ge=0, description="semihard: the triplet margin in d²")
    positive: Literal["random", "hardest"] = Field(_D.positive, description="label mode on ids: which positive")
    semihard_fallback: Literal["hardest", "skip"] = Field(_D.semihard_fallback)
    absolute_margin: float | None = Field(None, description="drop negatives scoring above s_p - this")
    relative_margin: float | None = Field(None, description="drop negatives scoring above s_p - |s_p| x this")
    max_score: float | None = Field(None, description="drop negatives scoring above this")
    positive_aware: float | None = Field(None, description="drop negatives with s_n > this x s_p (cosine)")
    near_duplicate: float | None = Field(None, description="drop negatives nearer than this d²")
    candidates: int = Field(_D.candidates, ge=1, le=4096,
                            description="neighbours fetched per anchor before the guards (doubled as needed)")
    exclude_suspects: float | None = Field(None, gt=0, lt=1, description=(
        "label mode on ids: never use the top fraction of the snapshot's label-noise suspects (GET /audit/labels) "
        "as negatives; counted in stats.suspects_excluded"))
    seed: int = Field(0, ge=0, le=INT64_MAX)
    include_vectors: bool = Field(False, description="add each negative's stored vector (as searched)")
    snapshot: str | None = Field(None, description="mine this snapshot instead of the one being served")
    nprobe: int | None = Field(None, ge=1, le=65536)
    ef_search: int | None = Field(None, ge=1, le=65536)


class MinedNegative(BaseModel):
    id: int
    label: int
    distance: float = Field(description="squared Euclidean distance to the anchor")
    score: float = Field(description="similarity: the cosine on cosine snapshots, -d² on l2 ones")
    vector: list[float] | None = None


class MinedAnchor(BaseModel):
    """One anchor's negatives, nearest first, and (label mode on ids) the positive it was mined with."""

    positive: int | None = None
    negatives: list[MinedNegative]


class MineResponse(BaseModel):
    snapshot: str
    results: list[MinedAnchor]
    stats: dict = Field(description="the mining statistics (counts, guard drops, distance summaries)")
