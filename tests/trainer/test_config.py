"""TrainConfig: defaults < TOML file < command-line flags; impossible values name the field and what it accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from hardneg.cli import build_parser
from hardneg.miner.errors import ValidationError
from hardneg.trainer.cli import _given
from hardneg.trainer.config import TrainConfig


def from_cli(argv: list[str]) -> TrainConfig:
    """Parse ``hardneg train ARGV`` with the real parser and build the config the command would use."""
    args = build_parser().parse_args(["train", *argv])
    return TrainConfig.from_sources(getattr(args, "config", None), _given(args))


def test_cli_overrides_toml_overrides_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('epochs = 7\nlr = 0.01\nloss = "contrastive"\nrefresh-every = 3\nglobal_batches = "tuples"\n'
                 'positive_aware = 0.9\n')  # the triplet miner's guard: global mining on mined tuples
    c = from_cli(["--config", str(f), "--epochs", "5", "--margin", "0.4"])
    assert c.epochs == 5  # flag beats file
    assert c.lr == 0.01 and c.loss == "contrastive" and c.refresh_every == 3  # file
    assert c.recipe.name == "mined-tuples" and c.recipe.miner.positive_aware == 0.9  # the file's flat keys
    assert c.margin == 0.4  # flag
    assert c.batch_size == TrainConfig().batch_size and c.data == "digits"  # defaults


def test_a_train_table_and_plain_defaults(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('[train]\nmining = "in-batch"\nstrategy = "batch-hard"\n')
    c = from_cli(["--config", str(f)])
    assert c.recipe.name == "in-batch" and c.recipe.strategy == "batch-hard"
    assert from_cli([]) == TrainConfig()
    assert TrainConfig().recipe.name == "class-batches"


@pytest.mark.parametrize("toml, message", [
    ("epochs = 0", "epochs must be an integer >= 1, got 0"),
    ("epochs = 2.5", "epochs must be an integer, got 2.5"),
    ("lr = -0.1", "lr must be a number > 0"),
    ('margin = "big"', "margin must be a number, got 'big'"),
    ('protocol = "random-split"', "protocol must be one of heldout-classes, heldout-samples, got 'random-split'"),
    ('global_batches = "tuples"\nstrategy = "batch-hard"', "strategy 'batch-hard'; accepted: hardest, semihard, "
                                                          "window, distance-weighted"),
    ('mining = "random"\nstrategy = "hardest"', "'strategy' in .*bad.toml or on the command line is an option of recipe 'mined-tuples' and "
                                               "'in-batch', not of the chosen recipe 'random-tuples'"),
    ('recipe = "in-batch"\n[in-batch]\nstrategy = "hardest"', "strategy must be one of batch-hard, semihard with "
                                                              "recipe 'in-batch', got 'hardest'"),
    ('recipe = "in-batch"\nmining = "random"', "mining 'random' in .*bad.toml or on the command line choose recipe 'random-tuples', but "
                                              "recipe 'in-batch' is set too"),
    ('recipe = "hard"', "recipe must be one of class-batches, mined-tuples, in-batch, random-tuples, simclr"),
    ('recipe = "mined-tuples"\n[mined-tuples.miner]\nmargin = 0.3', "unknown option 'margin' in mined-tuples.miner"),
    ("eval_sample_fraction = 1.0", "eval_sample_fraction must lie strictly between 0 and 1"),
    ('global_batches = "tuples"\npositive_aware = 1.5', r"positive_aware must lie in \(0, 1\]"),
    ("warmup_epochs = 3\nepochs = 3", r"warmup_epochs \(3\) must be below epochs \(3\)"),
    ("learning_rate = 0.1", "unknown option 'learning_rate' in .*bad.toml or on the command line; accepted with recipe 'class-batches': "
                            ".*lr"),
    ("epochs = ", "is not valid TOML"),
])
def test_impossible_values_name_the_field(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ValidationError, match=message):
        from_cli(["--config", str(f)])


def test_flags_are_validated_too() -> None:
    with pytest.raises(ValidationError, match="batch_size must be an integer >= 1, got 0"):
        from_cli(["--batch-size", "0"])
    with pytest.raises(ValidationError, match="does not exist"):
        from_cli(["--config", "/nonexistent/run.toml"])


def test_refresh_schedule() -> None:
    c = TrainConfig(warmup_epochs=1, refresh_every=2, epochs=7)
    assert [e for e in range(1, 8) if c.is_refresh_epoch(e)] == [2, 4, 6]
    c = TrainConfig(warmup_epochs=0, refresh_every=3, epochs=7)
    assert [e for e in range(1, 8) if c.is_refresh_epoch(e)] == [1, 4, 7]


def test_round_trip_through_a_dict() -> None:
    c = TrainConfig.from_dict({"epochs": 4, "global_batches": "tuples", "near_duplicate": 0.01, "model": None})
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert c.to_dict()["recipe"] == "mined-tuples"
    assert c.to_dict()["mined-tuples"]["miner"]["near_duplicate"] == 0.01
    assert "margin" not in c.to_dict()["mined-tuples"]["miner"]  # the common margin is the miner's


def test_a_section_per_recipe_equals_the_flat_spelling(tmp_path: Path) -> None:
    f = tmp_path / "run.toml"
    f.write_text('epochs = 6\nrecipe = "mined-tuples"\n[mined-tuples]\nwarmup = "random"\ninbatch_mix = 0.5\n'
                 '[mined-tuples.miner]\nstrategy = "window"\nwindow-skip = 2\n')
    nested = from_cli(["--config", str(f)])
    flat = from_cli(["--epochs", "6", "--mining", "global", "--global-batches", "tuples", "--warmup", "random",
                     "--inbatch-mix", "0.5", "--strategy", "window", "--window-skip", "2"])
    assert nested == flat
    assert (nested.recipe.warmup, nested.recipe.miner.strategy, nested.recipe.miner.window_skip) == ("random",
                                                                                                     "window", 2)
    # an old selector flag overrides the file's one by one: --mining global keeps its global_batches
    old = tmp_path / "old.toml"
    old.write_text('mining = "global"\nglobal_batches = "tuples"\nstrategy = "hardest"\n')
    assert from_cli(["--config", str(old), "--mining", "global"]).recipe.miner.strategy == "hardest"
    # a flag beats the section; a recipe chosen by flag replaces the file's
    assert from_cli(["--config", str(f), "--window-skip", "5"]).recipe.miner.window_skip == 5
    with pytest.raises(ValidationError, match=r"a \[mined-tuples\] section in .*run.toml or on the command line "
                                              "sets recipe 'mined-tuples', not the chosen recipe 'random-tuples'"):
        from_cli(["--config", str(f), "--recipe", "random-tuples"])
    ssl = from_cli(["--mode", "self-supervised", "--ssl-skip", "16", "--aug-flip", "0.5", "--temperature", "0.2"])
    assert ssl.recipe.name == "simclr" and (ssl.recipe.skip, ssl.recipe.augment.flip) == (16, 0.5)
    assert ssl == from_cli(["--recipe", "simclr", "--ssl-skip", "16", "--aug-flip", "0.5", "--temperature", "0.2"])


def test_the_first_releases_stored_configs_are_read() -> None:
    """A checkpoint's flat config holds every option, also those its mode ignored: they are dropped."""
    flat = {"data": "digits", "epochs": 3, "mode": "supervised", "mining": "global", "global_batches": "classes",
            "strategy": None, "per_anchor": 2, "positive_aware": None, "inbatch_mix": 0.0, "temperature": 0.5,
            "ssl_skip": 128, "aug_flip": 0.0, "batching": "pk", "per_class": 6, "warmup": "in-batch"}
    cfg = TrainConfig.from_stored(flat)
    assert cfg.recipe.name == "class-batches" and cfg.recipe.per_class == 6 and cfg.epochs == 3
    tuples = TrainConfig.from_stored({**flat, "global_batches": "tuples", "strategy": "hardest"})
    assert tuples.recipe.miner.strategy == "hardest" and tuples.recipe.miner.per_anchor == 2
    assert TrainConfig.from_stored({**flat, "mode": "self-supervised", "ssl_skip": 16}).recipe.skip == 16
    assert TrainConfig.from_stored({**flat, "mining": "in-batch"}).recipe.strategy == "semihard"  # None: default
    assert TrainConfig.from_stored(cfg.to_dict()) == cfg


def test_changes_name_what_differs() -> None:
    cfg = TrainConfig.from_dict({"global_batches": "tuples"})
    new, changed = cfg.with_changes({"epochs": 20, "per_anchor": 3, "lr": cfg.lr})
    assert changed == ["epochs", "mined-tuples.miner.per_anchor"] and new.recipe.miner.per_anchor == 3
    assert cfg.with_changes({"mining": "in-batch"})[1] == ["recipe"]
    assert cfg.with_changes(cfg.replace(epochs=5).to_dict())[1] == ["epochs"]


def test_the_torch_free_name_lists_match_the_registries() -> None:
    """config and settings list names without importing torch; the registries hold the classes."""
    from hardneg.trainer import config, losses
    from hardneg.trainer.inbatch import MINERS
    from hardneg.trainer.recipes import RECIPES, recipe_class
    from hardneg.trainer.recipes.settings import INBATCH_STRATEGIES, SETTINGS

    assert tuple(losses.LOSSES) == config.LOSSES
    assert tuple(MINERS) == INBATCH_STRATEGIES
    assert list(RECIPES) == list(SETTINGS)
    assert all(recipe_class(name).name == name for name in RECIPES)
