"""Embedding models: a small CNN for images, an MLP for vectors, or a user's ``module:attr`` factory.

Every model maps a batch (B, *input_shape) to L2-normalised embeddings (B, embedding_dim), so squared
distances lie in [0, 4] and a cosine snapshot index holds them unchanged. ``forward`` is a fixed chain of
layers (no data-dependent control flow) so that ``torch.export`` can save it as the snapshot's ``model.pt2``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hardneg.miner.errors import ValidationError
from hardneg.miner.plugins import resolve_attr
from hardneg.trainer.config import TrainConfig


class EmbeddingCNN(nn.Module):
    """Three 3x3 conv layers, one 2x max-pool, an adaptive 4x4 average pool and a 2-layer head.

    Input (B, C, H, W) with H, W >= 2; output (B, embedding_dim), unit norm. Sized for small images
    (8x8 digits up to ~64x64); the adaptive pool keeps the head's size independent of H and W.
    """

    def __init__(self, in_channels: int = 1, embedding_dim: int = 64, hidden_dim: int = 128, width: int = 16) -> None:
        super().__init__()
        self.config = {"in_channels": in_channels, "embedding_dim": embedding_dim, "hidden_dim": hidden_dim,
                       "width": width}
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.features(x)), dim=1)


class EmbeddingMLP(nn.Module):
    """Two hidden ReLU layers. Input (B, in_dim); output (B, embedding_dim), unit norm."""

    def __init__(self, in_dim: int, embedding_dim: int = 64, hidden_dim: int = 128) -> None:
        super().__init__()
        self.config = {"in_dim": in_dim, "embedding_dim": embedding_dim, "hidden_dim": hidden_dim}
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, embedding_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=1)


class Normalized(nn.Module):
    """Wraps a user's model so that its outputs (B, D) are L2-normalised like the built-in ones."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.inner(x).flatten(1), dim=1)


_BUILTIN = {f"{__name__}.{cls.__name__}": cls for cls in (EmbeddingCNN, EmbeddingMLP)}


def build_model(cfg: TrainConfig, input_shape: Sequence[int]) -> tuple[nn.Module, dict[str, Any]]:
    """The model for items of ``input_shape`` ((C, H, W) -> CNN, (D,) -> MLP, or ``cfg.model``) and its spec.

    The spec is the snapshot manifest's ``model`` entry: ``{"class", "config", "input_shape", "embedding_dim"}``.
    """
    shape = [int(s) for s in input_shape]
    if cfg.model is not None:
        return _build_user_model(cfg.model, shape, cfg.embedding_dim)
    if len(shape) == 3:
        model: nn.Module = EmbeddingCNN(shape[0], cfg.embedding_dim, cfg.hidden_dim)
    elif len(shape) == 1:
        model = EmbeddingMLP(shape[0], cfg.embedding_dim, cfg.hidden_dim)
    else:
        raise ValidationError(f"items of shape {tuple(shape)} have no built-in model; accepted: (D,) vectors or "
                              f"(C, H, W) images, or give your own with --model module:attr")
    return model, _spec(type(model), model.config, shape, cfg.embedding_dim)


def build_model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild an (untrained) model from a spec written by :func:`build_model`, to load a state dict into."""
    cls = _BUILTIN.get(spec["class"])
    if cls is not None:
        return cls(**spec["config"])
    model, _ = _build_user_model(spec["config"]["factory"], spec["input_shape"], spec["config"]["embedding_dim"])
    return model


def _build_user_model(factory_spec: str, shape: list[int], embedding_dim: int) -> tuple[nn.Module, dict[str, Any]]:
    factory = resolve_attr(factory_spec, "model")
    if not callable(factory):
        raise ValidationError(f"model {factory_spec!r} must be a callable returning a torch.nn.Module")
    inner = call_with_accepted(factory, input_shape=tuple(shape), embedding_dim=embedding_dim)
    if not isinstance(inner, nn.Module):
        raise ValidationError(f"model {factory_spec!r} returned {type(inner).__name__}, not a torch.nn.Module")
    model = Normalized(inner)
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros((2, *shape)))
    except Exception as e:  # any failure of the user's forward on the data's shape
        raise ValidationError(f"model {factory_spec!r} cannot embed items of shape {tuple(shape)}: {e}") from None
    model.train()
    dim = int(out.shape[1])
    cls = type(inner)
    return model, _spec(cls, {"factory": factory_spec, "embedding_dim": dim}, shape, dim,
                        name=f"{cls.__module__}.{cls.__qualname__}")


def _spec(cls: type, config: dict, shape: list[int], dim: int, name: str | None = None) -> dict[str, Any]:
    return {"class": name or f"{cls.__module__}.{cls.__name__}", "config": dict(config), "input_shape": list(shape),
            "embedding_dim": int(dim)}


def call_with_accepted(factory: Any, **kwargs: Any) -> Any:
    """Call ``factory`` with those of ``kwargs`` its signature accepts (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})
