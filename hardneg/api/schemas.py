"""Request and response models of the hardneg HTTP API.

Limits that depend on settings (``k`` up to ``HARDNEG_MAX_K``, batch sizes, vector
dimension) are checked by the handlers, which answer 400 with a message saying what
is accepted; the models only check the JSON's shape (422).

JSON bodies are validated strictly: ``"k": "5"``, ``"k": true`` or ``true`` inside a vector are 422,
not silently converted (an integer is still a valid float). Query strings are text, so the options of
``GET /neighbors/{item_id}`` are converted from it as usual. Ids and labels must fit in int64, the type
they are stored as.
"""

from __future__ import annotations

from typing import Annotated, Union  # noqa: F401 - Union is named in the NestedFloats alias below

from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypeAliasType

# A raw model input: a number or a nested list of them, e.g. one (1, 8, 8) image.
NestedFloats = TypeAliasType("NestedFloats", "Union[float, list[NestedFloats]]")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Ids and labels are stored as int64: a larger value could never match, and NumPy cannot even compare it.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]


class SearchOptions(BaseModel):
    """Options shared by ``POST /neighbors`` (JSON body) and ``GET /neighbors/{item_id}`` (query string)."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, description="neighbours per query, from 1 to HARDNEG_MAX_K")
    different_label: bool = Field(
        False, description="hard-negative mode: keep only neighbours whose label differs from the query's")
    label_in: list[Int64] | None = Field(None, description="keep only neighbours with one of these labels")
    label_not_in: list[Int64] | None = Field(None, description="drop neighbours with any of these labels")
    exclude_ids: list[Int64] | None = Field(None, description="drop these item ids from every result")
    snapshot: str | None = Field(
        None, description="search this snapshot (still in the store) instead of the one being served")
    nprobe: int | None = Field(None, ge=1, le=65536, description="IVF indexes: inverted lists to visit")
    ef_search: int | None = Field(None, ge=1, le=65536, description="HNSW indexes: candidate list size")


class NeighborsRequest(SearchOptions):
    """A batch of queries, given by exactly one of ``vectors``, ``ids`` or ``inputs``."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"vectors": [[0.1, 0.2, 0.3, 0.4]], "k": 5},
        {"ids": [17, 42], "k": 10, "different_label": True},
        {"vectors": [[0.1, 0.2, 0.3, 0.4]], "labels": [3], "different_label": True, "label_not_in": [7]},
    ]})

    vectors: list[list[float]] | None = Field(
        None, description="query embeddings, one list of `dim` finite numbers per query")
    ids: list[Int64] | None = Field(
        None, description="ids of stored items to use as queries; an item is never returned as its own neighbour")
    inputs: list[NestedFloats] | None = Field(
        None, description="raw model inputs, each of shape manifest.model.input_shape, embedded by the "
                          "snapshot's own model.pt2")
    labels: list[Int64] | None = Field(
        None, description="labels of the `vectors` or `inputs` queries (needed by different_label); "
                          "queries by `ids` use the stored labels")


class Neighbor(BaseModel):
    """One neighbour: its id, its label and its squared Euclidean distance ``d²`` to the query."""

    id: int
    label: int
    distance: float = Field(description="squared Euclidean distance; for cosine snapshots d² = 2 - 2·cos")


class NeighborsResponse(BaseModel):
    """The snapshot searched, then for each query its neighbours, nearest first."""

    snapshot: str
    results: list[list[Neighbor]]


class SnapshotFile(BaseModel):
    model_config = ConfigDict(extra="allow")

    sha256: str
    size: int


class SnapshotManifest(BaseModel):
    """The ``manifest.json`` of the snapshot being served (fields added by later format versions pass through)."""

    model_config = ConfigDict(extra="allow")

    format_version: int
    name: str
    created_at: str
    dim: int
    metric: str
    count: int
    num_classes: int | None = None
    index: dict
    model: dict | None = None
    meta: dict = Field(default_factory=dict)
    files: dict[str, SnapshotFile]


class HealthResponse(BaseModel):
    status: str = Field(description="always `ok` while the process answers")


class ReadyResponse(BaseModel):
    status: str = Field(description="`ready` once a snapshot is loaded")
    snapshot: str = Field(description="name of the snapshot being served")


class ErrorResponse(BaseModel):
    """Every error except 422 has this body; ``detail`` says what was wrong and what is accepted."""

    detail: str
