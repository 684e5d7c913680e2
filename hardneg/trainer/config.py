"""The trainer's configuration: one typed dataclass, filled from a TOML file and CLI flags.

Precedence, lowest first: the defaults below, then ``--config FILE`` (TOML, flat keys named like the
fields; dashes and underscores both accepted), then the flags given on the command line. The result is
validated as a whole (:meth:`TrainConfig.validate`) before any data is loaded, and saved in every
checkpoint and snapshot manifest (:meth:`TrainConfig.to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from hardneg.miner.errors import ValidationError
from hardneg.trainer.augment import AugmentConfig

PROTOCOLS = ("heldout-classes", "heldout-samples")
LOSSES = ("triplet", "contrastive")
MINING_MODES = ("global", "in-batch", "random")
GLOBAL_STRATEGIES = ("hardest", "semihard", "window", "distance-weighted")
INBATCH_STRATEGIES = ("batch-hard", "semihard")
BATCHINGS = ("random", "pk")
GLOBAL_BATCHES = ("tuples", "classes")
WARMUPS = ("random", "in-batch")
POSITIVES = ("random", "hardest")
FALLBACKS = ("hardest", "skip")
INDEX_KINDS = ("flat", "ivf", "hnsw")
DEVICES = ("cpu", "cuda")
IMAGE_MODES = ("L", "RGB")
MODES = ("supervised", "self-supervised")
SSL_NEGATIVES = ("mined", "in-batch")

# The strategy each mining mode uses when --strategy is not given.
DEFAULT_STRATEGY = {"global": "semihard", "in-batch": "semihard", "random": None}


@dataclass
class TrainConfig:
    """Everything that determines a training run (and so everything a resumed run must agree on)."""

    # ---- data
    data: str = "digits"  # digits | npz:PATH | folder:PATH | module:attr
    eval_data: str | None = None  # a separate evaluation set; when given, the whole of `data` trains
    protocol: str = "heldout-samples"  # digits: 5 seen classes are too few to transfer; heldout-classes lowers MAP@R
    eval_class_fraction: float = 0.5  # heldout-classes: the last half of the classes (CUB/SOP split halves)
    eval_sample_fraction: float = 0.25  # heldout-samples: share of each class held out (stratified)
    image_size: int = 32  # folder: images are resized to image_size x image_size
    image_mode: str = "L"  # folder: Pillow mode, "L" grayscale or "RGB"
    # ---- model
    model: str | None = None  # module:attr of a user's nn.Module factory; None: CNN for images, MLP for vectors
    embedding_dim: int = 64  # plenty for 10 digit classes; FAISS search cost grows with it
    hidden_dim: int = 128  # width of the MLP's hidden layers and the CNN's last layer
    # ---- loss and optimisation
    loss: str = "triplet"
    margin: float = 0.2  # in d² units; embeddings are unit vectors, so d² lies in [0, 4]
    epochs: int = 12  # the untrained-to-trained gain on digits is clear by then and the run stays under a minute
    batch_size: int = 128  # triplets/pairs per step (items per step for in-batch mining)
    lr: float = 1e-3  # Adam's usual default; small CNN, no schedule needed
    weight_decay: float = 0.0
    # ---- mining
    mining: str = "global"  # global (snapshot + miner) | in-batch | random
    strategy: str | None = None  # None: semihard for both; hardest collapses early (FaceNet; here MAP@R 0.68 vs 0.93)
    warmup: str = "in-batch"  # before the first snapshot: in-batch mining learns ~3x more per second than random tuples
    warmup_strategy: str = "semihard"  # the in-batch miner when warmup is "in-batch"
    warmup_epochs: int = 1  # a snapshot of an untrained model mines little more than noise
    refresh_every: int = 4  # epochs between snapshots; 1 costs +45% time for no gain, 8 scores the same as 4
    per_anchor: int = 1
    positive: str = "random"
    semihard_fallback: str = "hardest"  # anchors with no semi-hard negative still train
    window_skip: int = 0
    window_width: int = 32
    dw_cutoff: float = 0.5  # distance-weighted sampling (Wu et al. 2017), in Euclidean units
    dw_nonzero_loss_cutoff: float = 1.4
    positive_aware: float | None = None  # NV-Retriever TopK-PercPos: drop negatives with sim > this x positive's
    near_duplicate: float | None = None  # drop negatives within this d² of the anchor
    candidates: int = 64  # nearest wrong-label neighbours searched per anchor
    global_batches: str = "classes"  # global: confusable-class batches (MAP@R per second: see docs/benchmarks.md)
    batching: str = "pk"  # in-batch mining's batches: pk (P classes x K items) | random (few positives per anchor)
    per_class: int = 4  # pk and class batches: K items of each class (Hermans et al. 2017's K)
    inbatch_strategy: str = "semihard"  # global: in-batch miner of class batches (batch-hard there: unstable)
    inbatch_mix: float = 0.0  # global tuples: weight of in-batch terms over each batch's items, added to its loss
    index: str = "flat"  # exact search: the training set is small and snapshots are rebuilt often
    # ---- run
    seed: int = 0
    device: str = "cpu"  # CPU keeps runs bit-for-bit reproducible
    store: str = "store"
    run_dir: str | None = None  # None: runs/<timestamp>
    keep_snapshots: int = 5
    eval_batch_size: int = 1024  # embedding only, no graph: large batches are cheap
    # ---- self-supervised mode (hardneg.trainer.selfsup): two augmented views are a positive; labels unread
    mode: str = "supervised"  # supervised | self-supervised
    temperature: float = 0.5  # NT-Xent; on digits 0.1 and 0.2 peak early, then fall (docs/benchmarks.md)
    ssl_negatives: str = "mined"  # mined: batches composed from each refresh's snapshot | in-batch: plain SimCLR
    ssl_per_anchor: int = 1  # mined negatives that join each seed image in its batch
    ssl_candidates: int = 64  # nearest neighbours per image (after the skip) a seed's negatives come from
    ssl_skip: int = 128  # never-used nearest: ~one digit class; same-digit share of the mined 18%, 86% at skip 16
    ssl_max_similarity: float | None = None  # drop candidates whose cosine similarity is above this
    ssl_near_duplicate: float | None = None  # drop candidates within this d² of the image
    aug_crop_min_scale: float = AugmentConfig.crop_min_scale  # smallest crop, as a fraction of the image's area
    aug_crop_max_ratio: float = AugmentConfig.crop_max_ratio  # crop aspect ratios in [1/r, r]
    aug_flip: float = AugmentConfig.flip  # horizontal-flip probability; flips lowered MAP@R on digits
    aug_brightness: float = AugmentConfig.brightness  # additive shift in [-b, b]
    aug_contrast: float = AugmentConfig.contrast  # contrast factor in [1 - c, 1 + c]
    aug_noise: float = AugmentConfig.noise  # Gaussian noise's standard deviation

    # ------------------------------------------------------------ building
    @classmethod
    def from_sources(cls, toml_path: str | os.PathLike | None = None,
                     overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """Defaults, then the TOML file at ``toml_path``, then ``overrides`` (CLI flags given); validated."""
        values: dict[str, Any] = {}
        if toml_path is not None:
            values.update(read_toml(toml_path))
        values.update(_normalise_keys(overrides or {}, "on the command line"))
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping of field names to values (checked by type), then validate."""
        values = _normalise_keys(values, "in the config")
        hints = get_type_hints(cls)
        kwargs = {name: _coerce(name, value, hints[name]) for name, value in values.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for manifests, checkpoints and metrics)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` applied."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    # ----------------------------------------------------------- validation
    @property
    def resolved_strategy(self) -> str | None:
        """The strategy actually used: ``strategy`` or the mining mode's default."""
        return self.strategy if self.strategy is not None else DEFAULT_STRATEGY[self.mining]

    def validate(self) -> None:
        """Raise :class:`ValidationError` naming the first impossible field and what it accepts."""
        _choice("protocol", self.protocol, PROTOCOLS)
        _choice("loss", self.loss, LOSSES)
        _choice("mining", self.mining, MINING_MODES)
        _choice("warmup", self.warmup, WARMUPS)
        _choice("warmup_strategy", self.warmup_strategy, INBATCH_STRATEGIES)
        _choice("positive", self.positive, POSITIVES)
        _choice("semihard_fallback", self.semihard_fallback, FALLBACKS)
        _choice("index", self.index, INDEX_KINDS)
        _choice("batching", self.batching, BATCHINGS)
        _choice("global_batches", self.global_batches, GLOBAL_BATCHES)
        _choice("inbatch_strategy", self.inbatch_strategy, INBATCH_STRATEGIES)
        _choice("device", self.device, DEVICES)
        _choice("image_mode", self.image_mode, IMAGE_MODES)
        self._validate_selfsup()
        if self.strategy is not None:
            if self.mining == "random":
                raise ValidationError(f"strategy {self.strategy!r} has no meaning with mining 'random'; "
                                      f"leave strategy unset or use mining 'global' or 'in-batch'")
            accepted = GLOBAL_STRATEGIES if self.mining == "global" else INBATCH_STRATEGIES
            _choice("strategy", self.strategy, accepted, f" with mining {self.mining!r}")
        for name in ("epochs", "batch_size", "embedding_dim", "hidden_dim", "refresh_every", "per_anchor",
                     "window_width", "candidates", "keep_snapshots", "eval_batch_size", "image_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("warmup_epochs", "window_skip", "seed"):
            _at_least(name, getattr(self, name), 0)
        if self.warmup_epochs >= self.epochs and self.mining == "global" and self.mode == "supervised":
            raise ValidationError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}) with "
                                  f"mining 'global', or no epoch would train on mined triplets")
        _positive("lr", self.lr)
        _positive("margin", self.margin)
        _positive("dw_cutoff", self.dw_cutoff)
        _positive("dw_nonzero_loss_cutoff", self.dw_nonzero_loss_cutoff)
        if self.weight_decay < 0:
            raise ValidationError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("eval_class_fraction", "eval_sample_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ValidationError(f"{name} must lie strictly between 0 and 1, got {v}")
        if self.positive_aware is not None and not 0.0 < self.positive_aware <= 1.0:
            raise ValidationError(f"positive_aware must lie in (0, 1] (a fraction of the positive's similarity), "
                                  f"got {self.positive_aware}")
        if self.near_duplicate is not None and self.near_duplicate < 0:
            raise ValidationError(f"near_duplicate must be a d² threshold >= 0, got {self.near_duplicate}")
        for name in ("data", "store"):
            if not getattr(self, name):
                raise ValidationError(f"{name} must not be empty")
        self._validate_batching()

    def _validate_batching(self) -> None:
        _at_least("per_class", self.per_class, 2)
        if self.mode != "supervised":
            return  # labels are not read: no class batches, no triplet miner
        class_batches = self.batching == "pk" or (self.mining == "global" and self.global_batches == "classes")
        if class_batches and self.batch_size < 2 * self.per_class:
            raise ValidationError(f"batch_size ({self.batch_size}) must hold at least 2 classes of per_class "
                                  f"({self.per_class}) items for class batches (batching 'pk' or global_batches "
                                  f"'classes'); accepted: batch_size >= {2 * self.per_class}")
        if not (math.isfinite(self.inbatch_mix) and self.inbatch_mix >= 0):
            raise ValidationError(f"inbatch_mix must be a finite number >= 0, got {self.inbatch_mix}")
        if self.inbatch_mix > 0 and (self.mining != "global" or self.global_batches != "tuples"):
            raise ValidationError("inbatch_mix adds in-batch terms to batches of mined tuples, so it needs mining "
                                  "'global' with global_batches 'tuples' (class batches are all in-batch already); "
                                  "set inbatch_mix = 0 otherwise")
        if self.mining == "global" and self.global_batches == "classes":
            given = [n for n in ("strategy", "positive_aware", "near_duplicate") if getattr(self, n) is not None]
            if given:
                raise ValidationError(f"{', '.join(given)} configure the triplet miner, which global_batches "
                                      f"'classes' does not run; set global_batches = 'tuples' (--global-batches "
                                      f"tuples) to train on mined triplets, or leave {', '.join(given)} unset")

    def _validate_selfsup(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("ssl_negatives", self.ssl_negatives, SSL_NEGATIVES)
        _positive("temperature", self.temperature)
        _at_least("ssl_per_anchor", self.ssl_per_anchor, 1)
        if self.mode == "self-supervised" and self.batch_size < max(2, self.ssl_per_anchor + 1):
            raise ValidationError(f"batch_size ({self.batch_size}) must hold a seed image and its ssl_per_anchor "
                                  f"({self.ssl_per_anchor}) negatives in self-supervised mode; accepted: "
                                  f"batch_size >= {max(2, self.ssl_per_anchor + 1)}")
        # the strengths and the mining guards are checked where they are used
        from hardneg.trainer.selfsup import SelfSupervised  # imports this module, so imported when first needed

        SelfSupervised(self)

    # ----------------------------------------------------------- schedule
    def is_refresh_epoch(self, epoch: int) -> bool:
        """True when a snapshot is published (and, for global mining, mined) before training ``epoch`` (1-based).

        The first refresh comes right after the warm-up; then one every ``refresh_every`` epochs.
        """
        k = epoch - 1 - self.warmup_epochs
        return k >= 0 and k % self.refresh_every == 0


# ------------------------------------------------------------------ helpers
def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat TOML config file; a ``[train]`` table is also accepted."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise ValidationError("--config needs Python 3.11 or newer (tomllib)") from None
    p = Path(path)
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ValidationError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ValidationError(f"config file {p} is not valid TOML: {e}") from None
    if set(doc) == {"train"} and isinstance(doc["train"], dict):
        doc = doc["train"]
    return _normalise_keys(doc, f"in {p}")


def _normalise_keys(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ValidationError(f"unknown option {key!r} {where}; accepted: {', '.join(sorted(names))}")
        out[name] = value
    return out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's annotation (int, float, str, or one of them | None)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if value is None:
        if args:  # X | None
            return None
        raise ValidationError(f"{name} must not be empty")
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(f"{name} must be a number, got {value!r}")
        return float(value)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(f"{name} must be an integer, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {value!r}")
    return value


def _choice(name: str, value: Any, accepted: tuple, context: str = "") -> None:
    if value not in accepted:
        raise ValidationError(f"{name} must be one of {', '.join(accepted)}{context}, got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValidationError(f"{name} must be an integer >= {low}, got {value}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValidationError(f"{name} must be a number > 0, got {value}")
