"""Rescoring candidates with an outside scorer (a cross-encoder, say) and dropping the likely positives.

A bi-encoder's nearest non-positive documents are often unlabelled positives (RocketQA, Qu et al. 2021;
sentence-transformers' ``cross_encoder=``): a stronger scorer reads each (query, candidate) pair and drops
those it scores above ``max_score`` or above ``relative`` x the query's positive score (its lowest over the
query's positives). The scorer is any callable ``scorer(pairs) -> scores`` over a list of (query, document)
pairs, as ``CrossEncoder.predict`` is; it sees texts when texts are known, ids otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from hardneg.miner.errors import ValidationError
from hardneg.miner.mining.guards import Candidates, Guard
from hardneg.miner.plugins import resolve_attr

Scorer = Callable[[list[tuple[Any, Any]]], Sequence[float]]


def load_scorer(spec: str) -> Scorer:
    """The callable named ``module:attr`` (``attr`` may be dotted, e.g. ``rerank:model.predict``).

    Resolved by :func:`hardneg.miner.plugins.resolve_attr`: for the command line, never for anything a
    request or a stored file names.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValidationError(f"--rescore must be 'module:attr' (e.g. rerank:model.predict), got {spec!r}")
    obj = resolve_attr(spec, "--rescore")
    if not callable(obj):
        raise ValidationError(f"--rescore: {spec} is not callable")
    return obj


class RescoreGuard(Guard):
    """Drop candidates that ``scorer`` scores above ``max_score`` or above ``relative`` x the positive's score.

    Args:
        scorer: ``scorer([(query, doc), ...]) -> scores``.
        query_keys: (m,) what the scorer sees of each anchor (its text or id).
        doc_key: maps an index row to what the scorer sees of that document.
        max_score, relative: the two rules; at least one. ``relative`` needs :meth:`score_positives` first.
        batch_size: pairs per scorer call.
    """

    name: ClassVar[str] = "rescore"

    def __init__(self, scorer: Scorer, query_keys: Sequence[Any], doc_key: Callable[[int], Any], *,
                 max_score: float | None = None, relative: float | None = None, batch_size: int = 256) -> None:
        if max_score is None and relative is None:
            raise ValidationError("rescoring needs --rescore-max, --rescore-relative or both")
        if batch_size < 1:
            raise ValidationError(f"rescore batch size must be >= 1, got {batch_size}")
        self.scorer, self.query_keys, self.doc_key = scorer, list(query_keys), doc_key
        self.max_score, self.relative = max_score, relative
        self.positive_scores: np.ndarray | None = None
        self.batch_size = batch_size
        self.scored = 0  # pairs sent to the scorer

    def score_pairs(self, pairs: list[tuple[Any, Any]]) -> np.ndarray:
        """Scores (b,) float64 of ``pairs``, in batches; ValidationError when the scorer answers badly."""
        out = []
        for s in range(0, len(pairs), self.batch_size):
            chunk = pairs[s:s + self.batch_size]
            scores = np.asarray(self.scorer(chunk), dtype=np.float64).reshape(-1)
            if scores.shape != (len(chunk),) or not np.isfinite(scores).all():
                raise ValidationError(f"the rescoring callable must return {len(chunk)} finite scores for "
                                      f"{len(chunk)} pairs, got shape {scores.shape}")
            out.append(scores)
        self.scored += len(pairs)
        return np.concatenate(out) if out else np.empty(0)

    def score_positives(self, positive_keys: Sequence[Sequence[Any]]) -> None:
        """Score every (anchor, positive) pair; each anchor's reference is its lowest (NaN without a positive)."""
        pairs = [(self.query_keys[i], p) for i, ps in enumerate(positive_keys) for p in ps]
        scores = self.score_pairs(pairs)
        self.positive_scores = np.full(len(positive_keys), np.nan)
        np.fmin.at(self.positive_scores, np.repeat(np.arange(len(positive_keys)), [len(ps) for ps in positive_keys]),
                   scores)

    def drops(self, c: Candidates, alive: np.ndarray) -> np.ndarray:
        r, k = np.nonzero(alive)
        pairs = [(self.query_keys[a], self.doc_key(int(row))) for a, row in zip(c.anchors[r], c.rows[r, k])]
        scores = self.score_pairs(pairs)
        hit = np.zeros(alive.shape, bool)
        bad = np.zeros(len(r), bool)
        if self.max_score is not None:
            bad |= scores > self.max_score
        if self.relative is not None:
            if self.positive_scores is None:
                raise ValidationError("relative rescoring needs the positives' scores: call score_positives first")
            bad |= scores > self.relative * self.positive_scores[c.anchors[r]]
        hit[r[bad], k[bad]] = True
        return hit
