"""The trainer's configuration: the options every run has, plus the chosen recipe's own settings.

Precedence, lowest first: the defaults below, then ``--config FILE`` (TOML), then the flags given on the
command line. A TOML file holds the common options at the top level (dashes and underscores both accepted),
``recipe = "NAME"`` and a section for that recipe (``[mined-tuples]``, with ``[mined-tuples.miner]`` for its
miner); the flat keys of the first release (``strategy``, ``ssl_skip``, ``aug_flip``, ``mining``, ``mode``,
``global_batches``) are still read and routed to the recipe that takes them, and a key the chosen recipe does
not take is refused with the name of the recipe that does. The result is validated as a whole before any
data is loaded and saved in every checkpoint and snapshot manifest (:meth:`TrainConfig.to_dict`).

Nothing here imports torch: ``hardneg`` commands that need no model start without it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_type_hints

from hardneg.miner.errors import ValidationError
from hardneg.miner.index import INDEX_KINDS
from hardneg.trainer.recipes.settings import SETTINGS, ClassBatchesSettings, RecipeSettings, at_least, choice

PROTOCOLS = ("heldout-classes", "heldout-samples")
LOSSES = ("triplet", "contrastive")  # hardneg.trainer.losses.LOSSES (a test keeps the two equal)
DEVICES = ("cpu", "cuda")
REFRESH_MODES = ("sync", "async")
IMAGE_MODES = ("L", "RGB")
# The first release chose the recipe with `mode`, `mining` and `global_batches`; they are still accepted.
LEGACY_SELECTORS = ("mode", "mining", "global_batches")
MINING_MODES = ("global", "in-batch", "random")
MODES = ("supervised", "self-supervised")
GLOBAL_BATCHES = ("tuples", "classes")
SUSPECT_RECIPES = ("class-batches", "mined-tuples")  # the recipes that take exclude_suspects (hardneg.trainer.suspects)
SHARD_INDEX = ("auto", "on", "off")
SHARDABLE_RECIPES = ("class-batches", "mined-tuples", "in-batch", "random-tuples")


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
    batch_size: int = 128  # tuples per step (items per step for batches of items)
    lr: float = 1e-3  # Adam's usual default; small CNN, no schedule needed
    weight_decay: float = 0.0
    # ---- snapshots: the loop publishes one before epoch warmup_epochs + 1, then every refresh_every epochs
    warmup_epochs: int = 1  # a snapshot of an untrained model mines little more than noise
    refresh_every: int | None = 4  # epochs between snapshots; 1 costs +45% time for no gain, 8 scores the same as 4
    refresh_every_steps: int | None = None  # steps between snapshots instead (then refresh_every is None)
    refresh: str = "sync"  # sync: training waits for each refresh (reproducible); async: a worker process refreshes
    # refreshes between snapshots published to the store (the first and the final model's always are); the others
    # only refresh the recipe (class-batches: from a sample of each class). 1: the api sees every refresh's model
    publish_every: int = 1
    index: str = "flat"  # exact search: the training set is small and snapshots are rebuilt often
    # ---- run
    seed: int = 0
    device: str = "cpu"  # CPU keeps runs bit-for-bit reproducible
    store: str = "store"
    run_dir: str | None = None  # None: runs/<timestamp>
    keep_snapshots: int = 5
    eval_batch_size: int = 1024  # items per forward pass when embedding (fewer for large items on CPU)
    eval_every: int = 1  # evaluate every N epochs (and the last); a 60,000-item evaluation costs about an epoch
    eval_sample: int | None = None  # evaluate this many seeded queries (ranked against every item); None: all
    threads: int = 0  # torch and FAISS threads; 0: their defaults (every core). 1 on a shared, busy machine
    # ---- label noise and drift (hardneg.trainer.suspects, hardneg.trainer.drift)
    exclude_suspects: float | None = None  # leave the top fraction of label-noise suspects out at each refresh
    refresh_on_drift: float | None = None  # refresh early when the probe's mean class-centroid shift (d²) passes it
    drift_probe: int = 1000  # training items embedded after each epoch to measure drift; a few ms on digits
    # under torchrun: each rank indexes its block only (hardneg.trainer.sharded_index); auto: from 1M items
    shard_index: str = "auto"
    # ---- the training recipe (hardneg.trainer.recipes) and its settings; class batches: the best MAP@R per
    # training second in bench/quality.py (docs/benchmarks.md, "Mining quality")
    recipe: RecipeSettings = field(default_factory=ClassBatchesSettings)

    # ------------------------------------------------------------ building
    @classmethod
    def from_sources(cls, toml_path: str | os.PathLike | None = None,
                     overrides: Mapping[str, Any] | None = None) -> TrainConfig:
        """Defaults, then the TOML file at ``toml_path``, then ``overrides`` (CLI flags given); validated."""
        values: dict[str, Any] = read_toml(toml_path) if toml_path is not None else {}
        flags = _normalise(overrides or {})
        # a recipe chosen on the command line replaces the file's choice; old selector flags override the
        # file's old selectors one by one (--mining global keeps the file's global_batches)
        if "recipe" in flags:
            for key in ("recipe", *LEGACY_SELECTORS):
                values.pop(key, None)
        elif any(k in flags for k in LEGACY_SELECTORS):
            values.pop("recipe", None)
        values = _merge(values, flags)
        return cls.from_dict(values, where=f"in {toml_path} or on the command line" if toml_path else
                             "on the command line")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "in the config") -> TrainConfig:
        """Build from common options, ``recipe`` (a name) and that recipe's section, or flat keys; validated."""
        common, settings = _split(_normalise(values), where)
        _one_refresh_period(common, where)
        hints = get_type_hints(cls)
        kwargs = {name: _coerce(name, value, hints[name]) for name, value in common.items()}
        cfg = cls(**kwargs, recipe=settings)
        cfg.validate()
        return cfg

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> TrainConfig:
        """The config saved in a checkpoint or manifest, also one written before recipes existed.

        The first release saved every option flat, including those its mode ignored; those are dropped here,
        as that release dropped them.
        """
        if "recipe" in values:
            return cls.from_dict(values)
        settings_cls = SETTINGS[_legacy_recipe(values, "in the stored config")]
        routed = settings_cls.flat_names()
        names = {f.name for f in fields(cls)}
        # `strategy` None meant the mode's default strategy
        kept = {k: v for k, v in values.items() if (k in names or k in routed) and not (k == "strategy" and v is None)}
        return cls.from_dict({**kept, "recipe": settings_cls.name})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (for manifests, checkpoints and metrics): common options, ``recipe`` and its section."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "recipe"}
        return {**out, "recipe": self.recipe.name, self.recipe.name: self.recipe.to_dict()}

    def with_changes(self, changes: Mapping[str, Any]) -> tuple[TrainConfig, list[str]]:
        """This config with ``changes`` applied (flags, flat keys or a whole :meth:`to_dict`), and the names of
        the options whose values differ (``recipe`` when another recipe is chosen)."""
        values = _normalise(changes)
        if "recipe" in values or any(k in values for k in LEGACY_SELECTORS):
            if _chosen_recipe(values, "in the changes") != self.recipe.name:
                return self, ["recipe"]
        new = TrainConfig.from_dict(_merge(self.to_dict(), values))
        before, after = _flatten(self.to_dict()), _flatten(new.to_dict())
        return new, sorted(k for k in after if after[k] != before.get(k))

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with common options ``changes`` applied."""
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> TrainConfig:
        self.validate()
        return self

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ValidationError` naming the first impossible option and what it accepts."""
        choice("protocol", self.protocol, PROTOCOLS)
        choice("loss", self.loss, LOSSES)
        choice("index", self.index, INDEX_KINDS)
        choice("device", self.device, DEVICES)
        choice("image_mode", self.image_mode, IMAGE_MODES)
        choice("shard_index", self.shard_index, SHARD_INDEX)
        choice("refresh", self.refresh, REFRESH_MODES)
        for name in ("epochs", "batch_size", "embedding_dim", "hidden_dim", "publish_every", "keep_snapshots",
                     "eval_batch_size", "image_size", "eval_every"):
            at_least(name, getattr(self, name), 1)
        if (self.refresh_every is None) == (self.refresh_every_steps is None):
            raise ValidationError(f"give exactly one of refresh_every (epochs) and refresh_every_steps (steps) "
                                  f"between snapshots, got refresh_every={self.refresh_every} and "
                                  f"refresh_every_steps={self.refresh_every_steps}")
        for name in ("refresh_every", "refresh_every_steps"):
            if getattr(self, name) is not None:
                at_least(name, getattr(self, name), 1)
        for name in ("warmup_epochs", "seed", "threads"):
            at_least(name, getattr(self, name), 0)
        if self.eval_sample is not None:
            at_least("eval_sample", self.eval_sample, 1)
        self._validate_numbers()
        for name in ("data", "store"):
            if not getattr(self, name):
                raise ValidationError(f"{name} must not be empty")
        self._validate_schedule()
        self._validate_quality()
        self._validate_refresh()
        self.recipe.validate(self.batch_size)
        self._validate_shard_index()

    def _validate_numbers(self) -> None:
        for name in ("lr", "margin"):
            if not getattr(self, name) > 0:
                raise ValidationError(f"{name} must be a number > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValidationError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("eval_class_fraction", "eval_sample_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValidationError(f"{name} must lie strictly between 0 and 1, got {getattr(self, name)}")

    def _validate_shard_index(self) -> None:
        reason = unshardable(self) if self.shard_index == "on" else None
        if reason:
            raise ValidationError(f"shard_index 'on': {reason}")

    def _validate_schedule(self) -> None:
        if self.recipe.needs_snapshot and self.warmup_epochs >= self.epochs:
            raise ValidationError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs}) with "
                                  f"recipe {self.recipe.name!r}, or no epoch would train on the snapshot's batches")

    def _validate_refresh(self) -> None:
        """Refuse what step-timed or asynchronous refreshes cannot honour."""
        if self.refresh != "async":
            return
        refused = {"refresh_on_drift": self.refresh_on_drift is not None, "shard_index 'on'": self.shard_index == "on"}
        given = [name for name, on in refused.items() if on]
        if given:
            raise ValidationError(f"refresh 'async' does not support {', '.join(given)}: its worker checks no drift "
                                  f"and runs in one process; use refresh 'sync' with these options, or leave them "
                                  f"out (no refresh_on_drift, shard_index 'auto' or 'off')")

    def _validate_quality(self) -> None:
        at_least("drift_probe", self.drift_probe, 2)
        if self.exclude_suspects is not None:
            if not 0.0 < self.exclude_suspects < 1.0:
                raise ValidationError(f"exclude_suspects must be a fraction in (0, 1) (the share of label-noise "
                                      f"suspects left out), got {self.exclude_suspects}")
            if self.recipe.name not in SUSPECT_RECIPES:
                raise ValidationError(f"exclude_suspects works with recipe {' or '.join(SUSPECT_RECIPES)}, not "
                                      f"{self.recipe.name!r}: only they train on what a snapshot's labels select")
        if self.refresh_on_drift is not None:
            if not (math.isfinite(self.refresh_on_drift) and self.refresh_on_drift > 0):
                raise ValidationError(f"refresh_on_drift must be a finite number > 0 (a mean centroid shift in d²; "
                                      f"unit vectors: at most 4), got {self.refresh_on_drift}")
            if not (self.recipe.needs_snapshot and self.recipe.needs_labels):
                raise ValidationError(f"refresh_on_drift needs a labelled recipe that trains on snapshots "
                                      f"(class-batches or mined-tuples), not {self.recipe.name!r}: the drift is "
                                      f"measured between class centroids")

    # ----------------------------------------------------------- schedule
    def is_refresh_epoch(self, epoch: int) -> bool:
        """True when a snapshot is published (and the recipe refreshed from it) before training ``epoch`` (1-based).

        The first refresh comes right after the warm-up; then one every ``refresh_every`` epochs. Never with
        ``refresh_every_steps``, whose refreshes fall at step boundaries (:meth:`is_refresh_step`).
        """
        if self.refresh_every is None:
            return False
        k = epoch - 1 - self.warmup_epochs
        return k >= 0 and k % self.refresh_every == 0

    def is_publish_epoch(self, epoch: int) -> bool:
        """True when the refresh before ``epoch`` publishes its snapshot to the store: the first refresh, then every
        ``publish_every``-th (the final model is published after the last epoch whatever this says). False before
        an epoch that is no refresh epoch, and always with ``refresh_every_steps`` (whose refreshes count by
        :meth:`is_publish_refresh`)."""
        if self.refresh_every is None or not self.is_refresh_epoch(epoch):
            return False
        k = epoch - 1 - self.warmup_epochs
        return (k // self.refresh_every) % self.publish_every == 0

    def is_publish_refresh(self, k: int) -> bool:
        """True when the run's refresh number ``k`` (0: the first) publishes its snapshot: every ``publish_every``-th
        from the first. Counts the refreshes by steps (``refresh_every_steps``) and those of ``refresh = "async"``
        (the ones started, not those skipped while one was in flight); sync refreshes by epochs use
        :meth:`is_publish_epoch`, which gives the same answers."""
        return k % self.publish_every == 0

    def is_refresh_step(self, epoch: int, step: int, last_due: int | None) -> bool:
        """With ``refresh_every_steps``: True when a refresh is due at the boundary before optimizer step ``step``
        (0-based, counted over the run) of ``epoch``: the first after the warm-up epochs, then every
        ``refresh_every_steps`` steps after the last one that fell due (``last_due``, None before the first)."""
        if self.refresh_every_steps is None or epoch <= self.warmup_epochs:
            return False
        return last_due is None or step - last_due >= self.refresh_every_steps

    def is_eval_epoch(self, epoch: int) -> bool:
        """True when retrieval is evaluated after ``epoch`` (0: the untrained model): every ``eval_every`` epochs,
        the first and the last."""
        return epoch % self.eval_every == 0 or epoch == self.epochs


def unshardable(cfg: TrainConfig) -> str | None:
    """Why ``cfg`` cannot refresh from a sharded index (``shard_index``), or None."""
    if cfg.index != "flat":
        return (f"index {cfg.index!r} is trained on all vectors in one process; a sharded index is flat (exact): "
                f"use index flat, or shard_index off")
    if cfg.recipe.name not in SHARDABLE_RECIPES:
        return (f"recipe {cfg.recipe.name!r} mines the whole index in one process; recipes that shard: "
                f"{', '.join(SHARDABLE_RECIPES)}")
    if cfg.exclude_suspects is not None or getattr(getattr(cfg.recipe, "miner", None), "exclude_suspects",
                                                   None) is not None:
        return "exclude_suspects audits the whole index's labels in one process; leave it unset, or shard_index off"
    if cfg.refresh_on_drift is not None:
        return ("refresh_on_drift reads the whole published snapshot on every rank; leave it unset, or shard_index "
                "off")
    return None


def _one_refresh_period(common: dict[str, Any], where: str) -> None:
    """``refresh_every_steps`` given: refresh_every (default 4 epochs) gives way; both given is refused."""
    if common.get("refresh_every_steps") is None:
        return
    if common.get("refresh_every") is not None:
        raise ValidationError(f"refresh_every ({common['refresh_every']} epochs) and refresh_every_steps "
                              f"({common['refresh_every_steps']} steps) are both set {where}; give exactly one "
                              f"(--refresh-every N or --refresh-every-steps N)")
    common["refresh_every"] = None


# ------------------------------------------------------------------ recipes
def _legacy_recipe(values: Mapping[str, Any], where: str) -> str:
    """The recipe the first release's ``mode``, ``mining`` and ``global_batches`` choose."""
    mode, mining = values.get("mode", "supervised"), values.get("mining", "global")
    choice("mode", mode, MODES)
    if mode == "self-supervised":
        return "simclr"
    choice("mining", mining, MINING_MODES)
    if mining != "global":
        return {"in-batch": "in-batch", "random": "random-tuples"}[mining]
    batches = values.get("global_batches", "classes")
    choice("global_batches", batches, GLOBAL_BATCHES)
    return "class-batches" if batches == "classes" else "mined-tuples"


def _chosen_recipe(values: dict[str, Any], where: str) -> str:
    legacy = {k: values.pop(k) for k in LEGACY_SELECTORS if k in values}
    name = values.pop("recipe", None)
    if name is None:
        return _legacy_recipe(legacy, where)
    choice("recipe", name, tuple(SETTINGS))
    if legacy and _legacy_recipe(legacy, where) != name:
        given = ", ".join(f"{k} {v!r}" for k, v in legacy.items())
        raise ValidationError(f"{given} {where} choose recipe {_legacy_recipe(legacy, where)!r}, but recipe "
                              f"{name!r} is set too; give only recipe (--recipe)")
    return name


def _split(values: dict[str, Any], where: str) -> tuple[dict[str, Any], RecipeSettings]:
    """Common options, and the chosen recipe's settings built from its section and the flat keys."""
    name = _chosen_recipe(values, where)
    settings_cls = SETTINGS[name]
    section = values.pop(name, None) or {}
    if not isinstance(section, Mapping):
        raise ValidationError(f"{name} {where} must be a table of the recipe's settings, got {section!r}")
    common_names = {f.name for f in fields(TrainConfig)} - {"recipe"}
    nested = _normalise(section)
    for key in [k for k in values if k not in common_names]:
        path = _route(key, name, where)
        _set_path(nested, path, values.pop(key))
    return values, _build_settings(settings_cls, nested, where)


def _route(key: str, recipe: str, where: str) -> tuple[str, ...]:
    """Where the flat option ``key`` goes in ``recipe``'s settings, or a ValidationError naming who takes it."""
    routes = SETTINGS[recipe].flat_names()
    if key in routes:
        return routes[key]
    if key in SETTINGS:
        raise ValidationError(f"a [{key}] section {where} sets recipe {key!r}, not the chosen recipe {recipe!r}; "
                              f"remove it or choose that recipe (recipe = {key!r}, --recipe {key})")
    takers = [n for n, s in SETTINGS.items() if key in s.flat_names() or key == n]
    if takers:
        raise ValidationError(f"{key!r} {where} is an option of recipe {' and '.join(repr(t) for t in takers)}, "
                              f"not of the chosen recipe {recipe!r}; choose that recipe (--recipe) or leave "
                              f"{key} unset")
    accepted = sorted({f.name for f in fields(TrainConfig)} | set(routes) | {"recipe"})
    raise ValidationError(f"unknown option {key!r} {where}; accepted with recipe {recipe!r}: {', '.join(accepted)}")


def _set_path(nested: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        nested = nested.setdefault(part, {})
    nested[path[-1]] = value


def _build_settings(settings_cls: type[RecipeSettings], values: Mapping[str, Any], where: str) -> RecipeSettings:
    """``settings_cls`` from its section (nested tables for its nested dataclasses), each value type-checked."""
    hints = get_type_hints(settings_cls)
    own = {f.name: f for f in fields(settings_cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in own:
            raise ValidationError(f"unknown option {key!r} of recipe {settings_cls.name!r} {where}; accepted: "
                                  f"{', '.join(sorted(own))}")
        if key in settings_cls.nested_prefix:
            kwargs[key] = _build_nested(own[key], key, value, settings_cls.name, where)
        else:
            kwargs[key] = _coerce(key, value, hints[key])
    return settings_cls(**kwargs)


def _build_nested(f: dataclasses.Field, key: str, value: Any, recipe: str, where: str) -> Any:
    default = f.default_factory()  # type: ignore[misc]
    if isinstance(value, type(default)):
        return value
    if not isinstance(value, Mapping):
        raise ValidationError(f"{recipe}.{key} {where} must be a table, got {value!r}")
    accepted = {g.name for g in fields(default)} - {"margin", "seed"}
    unknown = sorted(set(value) - accepted)
    if unknown:
        raise ValidationError(f"unknown option {unknown[0]!r} in {recipe}.{key} {where}; accepted: "
                              f"{', '.join(sorted(accepted))} (margin and seed are common options)")
    hints = get_type_hints(type(default))
    return dataclasses.replace(default, **{k: _coerce(k, v, hints[k]) for k, v in value.items()})


# ------------------------------------------------------------------ helpers
def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML config file; a ``[train]`` table holding everything is also accepted."""
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
    return _normalise(doc)


def _normalise(values: Mapping[str, Any]) -> dict[str, Any]:
    """Keys with underscores (dashes accepted), except recipe names, which keep their dashes."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        name = key if key in SETTINGS else key.replace("-", "_")
        out[name] = _normalise(value) if isinstance(value, Mapping) else value
    return out


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``over``, tables merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
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
