"""Retrieval evaluation of an embedding model: during training, and of a saved checkpoint (``hardneg eval``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.trainer.checkpoint import load_checkpoint
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_splits
from hardneg.trainer.models import build_model_from_spec
from hardneg.trainer.refresh import embed_items

# Options of a checkpoint's run that `hardneg eval` may change: which data it evaluates on, and where.
EVAL_OPTIONS = ("data", "eval_data", "protocol", "device")


def evaluate(model: nn.Module, x: torch.Tensor, labels: np.ndarray, batch_size: int, sample: int | None = None,
             seed: int = 0) -> dict[str, float]:
    """Leave-one-out retrieval metrics (P@1, Recall@K, R-Precision, MAP@R) of ``x`` (n, ...) with ``labels`` (n,).

    ``x`` must be on the model's device. Metrics are computed with FAISS by the miner part
    (Musgrave et al. 2020 definitions); ``sample``: that many seeded queries, each ranked against all n items,
    with 95 % confidence intervals (:func:`hardneg.miner.metrics.retrieval_metrics`).
    """
    from hardneg.miner.metrics import retrieval_metrics

    metrics = retrieval_metrics(embed_items(model, x, batch_size), labels, metric="cosine", sample=sample, seed=seed)
    return {k: float(v) for k, v in metrics.items()}


def evaluate_checkpoint(path: str | os.PathLike, changes: Mapping[str, Any] | None = None,
                        split: str = "eval") -> dict[str, float]:
    """Metrics of the model in checkpoint ``path`` on its run's ``split`` ("eval" or "train"), or on other data.

    ``changes`` may set ``data``, ``eval_data``, ``protocol`` and ``device``.
    """
    if split not in ("eval", "train"):
        raise ValidationError(f"split must be 'eval' or 'train', got {split!r}")
    changes = dict(changes or {})
    unknown = sorted(set(changes) - set(EVAL_OPTIONS))
    if unknown:
        raise ValidationError(f"eval cannot change {', '.join(unknown)}; accepted: {', '.join(EVAL_OPTIONS)}")
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_stored(ckpt["config"]).replace(**changes)
    if "data" in changes and "eval_data" not in changes:
        cfg = cfg.replace(eval_data=None)  # new data: split it by the protocol, not the run's old eval set
    splits = load_splits(cfg)
    ds = splits.eval if split == "eval" else splits.train
    spec = ckpt["model_spec"]
    if list(ds.input_shape) != list(spec["input_shape"]):
        raise ValidationError(f"the checkpoint's model embeds items of shape {tuple(spec['input_shape'])}, but "
                              f"{ds.name} holds items of shape {ds.input_shape}")
    device = torch.device(cfg.device)
    model = build_model_from_spec(spec)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    return evaluate(model, torch.from_numpy(ds.x).to(device), ds.y, cfg.eval_batch_size)
