"""Each training recipe's own settings: small typed dataclasses that validate themselves without torch.

A :class:`~hardneg.trainer.config.TrainConfig` holds the options every run has (data, model, loss, optimiser,
snapshot schedule) and the settings of the one recipe it trains with (``cfg.recipe``). Each class below is
registered under its recipe's name in :data:`SETTINGS`; the recipe itself (the code that builds batches and
losses, and imports torch) is named in :data:`hardneg.trainer.recipes.RECIPES`.

Options arrive nested (a TOML section per recipe, ``[mined-tuples]``, and ``[mined-tuples.miner]`` for its
miner) or flat (command-line flags and the first release's flat TOML keys): :meth:`RecipeSettings.flat_names`
says which flat name sets which field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from hardneg.miner.errors import ValidationError
from hardneg.miner.mining.config import MiningConfig

INBATCH_STRATEGIES = ("batch-hard", "semihard")  # hardneg.trainer.inbatch.MINERS
BATCHINGS = ("random", "pk")
WARMUPS = ("random", "in-batch")
SSL_NEGATIVES = ("mined", "in-batch")
# MiningConfig fields that come from the common options at mining time, never from a recipe's settings.
_MINER_FROM_COMMON = ("margin", "seed")


def choice(name: str, value: Any, accepted: tuple[str, ...], context: str = "") -> None:
    """Raise a ValidationError unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValidationError(f"{name} must be one of {', '.join(accepted)}{context}, got {value!r}")


def at_least(name: str, value: int, low: int) -> None:
    """Raise a ValidationError unless the integer ``value`` is ``>= low``."""
    if value < low:
        raise ValidationError(f"{name} must be an integer >= {low}, got {value}")


@dataclass
class RecipeSettings:
    """Base class. ``name`` is the recipe's registry name; ``needs_snapshot``: its batches after the warm-up
    come from a refresh's snapshot; ``needs_labels``: it reads training labels."""

    name: ClassVar[str] = ""
    needs_snapshot: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = True
    # nested dataclass fields and the prefix their fields take as flat names (miner: none, augment: aug_)
    nested_prefix: ClassVar[dict[str, str]] = {}
    # flat names of this recipe's own fields where they differ from the field's name (simclr: ssl_*)
    aliases: ClassVar[dict[str, str]] = {}

    def validate(self, batch_size: int) -> None:
        """Check the settings against the common ``batch_size``; fields are checked in ``__post_init__``."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in self.nested_prefix:
            out[key] = {k: v for k, v in out[key].items() if k not in _MINER_FROM_COMMON}
        return out

    @classmethod
    def flat_names(cls) -> dict[str, tuple[str, ...]]:
        """Flat option name -> the path of the field it sets, e.g. ``"strategy" -> ("miner", "strategy")``."""
        out: dict[str, tuple[str, ...]] = {}
        by_field = {v: k for k, v in cls.aliases.items()}
        for f in fields(cls):
            if f.name in cls.nested_prefix:
                nested = f.default_factory()  # type: ignore[misc]
                for g in fields(nested):
                    if g.name not in _MINER_FROM_COMMON:
                        out[cls.nested_prefix[f.name] + g.name] = (f.name, g.name)
            else:
                out[by_field.get(f.name, f.name)] = (f.name,)
        return out


@dataclass
class ItemBatchSettings(RecipeSettings):
    """Batches of items mined in-batch: shuffled (``random``) or P classes x K items (``pk``)."""

    batching: str = "pk"  # pk: every anchor has K - 1 positives in its batch (Hermans et al. 2017)
    per_class: int = 4  # K items of each class in pk and class batches (Hermans et al. 2017's K)

    def __post_init__(self) -> None:
        choice("batching", self.batching, BATCHINGS)
        at_least("per_class", self.per_class, 2)

    def validate(self, batch_size: int) -> None:
        if self.uses_class_batches and batch_size < 2 * self.per_class:
            raise ValidationError(f"batch_size ({batch_size}) must hold at least 2 classes of per_class "
                                  f"({self.per_class}) items for class batches (batching 'pk' or recipe "
                                  f"'class-batches'); accepted: batch_size >= {2 * self.per_class}")

    @property
    def uses_class_batches(self) -> bool:
        return self.batching == "pk"


@dataclass
class WarmupSettings(ItemBatchSettings):
    """What trains before the first snapshot: in-batch mining over item batches, or random tuples."""

    warmup: str = "in-batch"  # in-batch mining learns ~3x more per second than random tuples
    warmup_strategy: str = "semihard"  # the in-batch miner of the warm-up

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("warmup", self.warmup, WARMUPS)
        choice("warmup_strategy", self.warmup_strategy, INBATCH_STRATEGIES)


@dataclass
class ClassBatchesSettings(WarmupSettings):
    """Global mining at the class level: each batch a class and its nearest classes in the latest snapshot."""

    name: ClassVar[str] = "class-batches"
    needs_snapshot: ClassVar[bool] = True
    inbatch_strategy: str = "semihard"  # the in-batch miner inside class batches (batch-hard there: unstable)
    # seed classes drawn with probability ∝ (mean d² to their batch neighbours) ** -seed_hardness (0: uniformly)
    seed_hardness: float = 0.0
    # items per class embedded by a refresh that publishes no snapshot (publish_every > 1); None: every item.
    # 16 of 60 items per class found 93% of the class table's neighbours (4: 85%, 32: 96%) at a quarter of the
    # embedding cost (docs/benchmarks.md, "Training throughput")
    centroid_sample: int | None = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("inbatch_strategy", self.inbatch_strategy, INBATCH_STRATEGIES)
        if not (math.isfinite(self.seed_hardness) and self.seed_hardness >= 0):
            raise ValidationError(f"seed_hardness must be a finite number >= 0 (0: seed classes drawn uniformly), "
                                  f"got {self.seed_hardness}")
        if self.centroid_sample is not None:
            at_least("centroid_sample", self.centroid_sample, 2)  # a centroid needs 2 items, as with every item

    @property
    def uses_class_batches(self) -> bool:
        return True


def _default_miner() -> MiningConfig:
    return MiningConfig(strategy="semihard")  # hardest collapses early (FaceNet; here MAP@R 0.68 vs 0.93)


@dataclass
class MinedTuplesSettings(WarmupSettings):
    """Global mining of tuples: the miner's triplets (pairs for the contrastive loss) from each snapshot."""

    name: ClassVar[str] = "mined-tuples"
    needs_snapshot: ClassVar[bool] = True
    nested_prefix: ClassVar[dict[str, str]] = {"miner": ""}
    miner: MiningConfig = field(default_factory=_default_miner)  # margin and seed come from the common options
    inbatch_mix: float = 0.0  # weight of in-batch terms over each batch's items, added to its loss
    inbatch_strategy: str = "semihard"  # the in-batch miner of inbatch_mix

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("inbatch_strategy", self.inbatch_strategy, INBATCH_STRATEGIES)
        if not (math.isfinite(self.inbatch_mix) and self.inbatch_mix >= 0):
            raise ValidationError(f"inbatch_mix must be a finite number >= 0, got {self.inbatch_mix}")
        if self.miner.positive_aware is not None and not 0.0 < self.miner.positive_aware <= 1.0:
            raise ValidationError(f"positive_aware must lie in (0, 1] (a fraction of the positive's similarity), "
                                  f"got {self.miner.positive_aware}")


@dataclass
class InBatchSettings(ItemBatchSettings):
    """In-batch mining: a miner chooses triplets among each batch's items."""

    name: ClassVar[str] = "in-batch"
    strategy: str = "semihard"

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("strategy", self.strategy, INBATCH_STRATEGIES, " with recipe 'in-batch'")


@dataclass
class RandomTuplesSettings(RecipeSettings):
    """Random triplets (pairs for the contrastive loss): the baseline without mining."""

    name: ClassVar[str] = "random-tuples"


@dataclass(frozen=True)
class AugmentConfig:
    """Strengths of the augmentations (:mod:`hardneg.trainer.augment`); each at its neutral value is the identity.

    Defaults for 8 x 8 digits: a crop keeps at least half of the image, enough to tell the digit (not tuned);
    no flips, which lowered MAP@R on digits from 0.745 to 0.580 (docs/benchmarks.md, "Self-supervised").
    """

    crop_min_scale: float = 0.5  # smallest crop area, as a fraction of the image (SimCLR: 0.08 on ImageNet)
    crop_max_ratio: float = 4 / 3  # aspect ratios drawn log-uniformly in [1/r, r] (SimCLR's 3/4..4/3)
    flip: float = 0.0  # probability of a horizontal flip
    brightness: float = 0.2  # additive shift drawn uniformly in [-b, b] (pixel values lie in [0, 1])
    contrast: float = 0.2  # contrast factor drawn uniformly in [1 - c, 1 + c]
    noise: float = 0.05  # standard deviation of the additive Gaussian noise

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValidationError(f"aug_crop_min_scale must lie in (0, 1] (a fraction of the image's area), "
                                  f"got {self.crop_min_scale}")
        if not (math.isfinite(self.crop_max_ratio) and self.crop_max_ratio >= 1.0):
            raise ValidationError(f"aug_crop_max_ratio must be a finite number >= 1 (1: square crops only), "
                                  f"got {self.crop_max_ratio}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValidationError(f"aug_flip must be a probability in [0, 1], got {self.flip}")
        for name in ("brightness", "noise"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ValidationError(f"aug_{name} must be a finite number >= 0 (0: off), got {v}")
        if not 0.0 <= self.contrast < 1.0:
            raise ValidationError(f"aug_contrast must lie in [0, 1) (factors 1 - c .. 1 + c stay positive), "
                                  f"got {self.contrast}")


@dataclass
class SimCLRSettings(RecipeSettings):
    """Self-supervised SimCLR (:mod:`hardneg.trainer.selfsup`): two augmented views of an image are a positive,
    NT-Xent over the batch; with ``negatives = "mined"`` batches are composed from each snapshot's neighbours."""

    name: ClassVar[str] = "simclr"
    needs_labels: ClassVar[bool] = False
    nested_prefix: ClassVar[dict[str, str]] = {"augment": "aug_"}
    aliases: ClassVar[dict[str, str]] = {"ssl_negatives": "negatives", "ssl_per_anchor": "per_anchor",
                                         "ssl_candidates": "candidates", "ssl_skip": "skip",
                                         "ssl_max_similarity": "max_similarity",
                                         "ssl_near_duplicate": "near_duplicate"}
    temperature: float = 0.5  # NT-Xent; on digits 0.1 and 0.2 peak early, then fall (docs/benchmarks.md)
    negatives: str = "mined"  # mined: batches composed from each refresh's snapshot | in-batch: plain SimCLR
    per_anchor: int = 1  # mined negatives that join each seed image in its batch
    candidates: int = 64  # nearest neighbours per image (after the skip) a seed's negatives come from
    skip: int = 128  # never-used nearest: ~one digit class; same-digit share of the mined 18%, 86% at skip 16
    max_similarity: float | None = None  # drop candidates whose cosine similarity is above this
    near_duplicate: float | None = None  # drop candidates within this d² of the image
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValidationError(f"temperature must be a number > 0, got {self.temperature}")
        choice("ssl_negatives", self.negatives, SSL_NEGATIVES)
        at_least("ssl_per_anchor", self.per_anchor, 1)
        at_least("ssl_candidates", self.candidates, 1)
        at_least("ssl_skip", self.skip, 0)
        if self.max_similarity is not None and not -1.0 < self.max_similarity <= 1.0:
            raise ValidationError(f"ssl_max_similarity must be a cosine similarity in (-1, 1], got "
                                  f"{self.max_similarity}")
        if self.near_duplicate is not None and not 0.0 <= self.near_duplicate < 4.0:
            raise ValidationError(f"ssl_near_duplicate must be a d² threshold in [0, 4) (unit vectors: d² <= 4), "
                                  f"got {self.near_duplicate}")

    def validate(self, batch_size: int) -> None:
        if batch_size < max(2, self.per_anchor + 1):
            raise ValidationError(f"batch_size ({batch_size}) must hold a seed image and its ssl_per_anchor "
                                  f"({self.per_anchor}) negatives in recipe 'simclr'; accepted: "
                                  f"batch_size >= {max(2, self.per_anchor + 1)}")


SETTINGS: dict[str, type[RecipeSettings]] = {s.name: s for s in (
    ClassBatchesSettings, MinedTuplesSettings, InBatchSettings, RandomTuplesSettings, SimCLRSettings)}
