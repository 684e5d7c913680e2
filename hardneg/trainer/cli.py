"""``hardneg train`` and ``hardneg eval``.

Flags default to "not given" (argparse.SUPPRESS), so the config's precedence is exact: the dataclass's
defaults, then ``--config FILE``, then only the flags actually typed. Torch is imported inside the
commands so that other ``hardneg`` subcommands start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hardneg.miner.index import INDEX_KINDS
from hardneg.miner.mining.config import POSITIVES, STRATEGIES
from hardneg.trainer.config import (
    DEVICES, GLOBAL_BATCHES, LOSSES, MINING_MODES, MODES, PROTOCOLS, REFRESH_MODES, SHARD_INDEX, TrainConfig,
)
from hardneg.trainer.recipes.settings import BATCHINGS, INBATCH_STRATEGIES, SETTINGS, SSL_NEGATIVES, WARMUPS

if TYPE_CHECKING:  # torch is imported inside the commands, for a fast start of the others
    from hardneg.trainer.distributed import DistContext
    from hardneg.trainer.loop import RunSummary

_REPORTED = (("precision_at_1", "P@1"), ("recall_at_1", "Recall@1"), ("recall_at_5", "Recall@5"),
             ("recall_at_10", "Recall@10"), ("r_precision", "R-Precision"), ("map_at_r", "MAP@R"))


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "train", argument_default=argparse.SUPPRESS,
        help="train an embedding model with periodic snapshots and hard-negative mining",
        description="Train an embedding model. With no flags: the built-in digits, global mining with class "
                    "batches (recipe class-batches), well under a minute on a laptop CPU. Every option can also "
                    "come from --config FILE (TOML: common options at the top level, recipe = NAME and a [NAME] "
                    "section for its settings); flags given here override the file. Options without a flag "
                    "(weight_decay, semihard_fallback, warmup_strategy, eval_class_fraction, eval_sample_fraction, "
                    "image_size, image_mode, keep_snapshots, ...) are set in that file.")
    _data_args(t)
    t.add_argument("--model", metavar="MODULE:ATTR", help="your own nn.Module factory (called with input_shape "
                   "and embedding_dim if it accepts them); default: a small CNN for images, an MLP for vectors")
    t.add_argument("--loss", choices=LOSSES)
    _recipe_args(t)
    _mining_args(t)
    _selfsup_args(t)
    _run_args(t)
    _quality_args(t)
    t.set_defaults(func=cmd_train)
    _eval_parser(sub)


def _recipe_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--recipe", choices=tuple(SETTINGS), help="what each epoch trains on: class-batches (default: "
                   "batches of confusable classes from each snapshot), mined-tuples (the miner's triplets from each "
                   "snapshot), in-batch, random-tuples, simclr (self-supervised)")
    t.add_argument("--mining", choices=MINING_MODES, help="the first release's choice, still accepted: global "
                   "(recipe class-batches, or mined-tuples with --global-batches tuples), in-batch (recipe "
                   "in-batch), random (recipe random-tuples)")
    t.add_argument("--global-batches", choices=GLOBAL_BATCHES,
                   help="with --mining global: classes (recipe class-batches) or tuples (recipe mined-tuples)")
    t.add_argument("--warmup", choices=WARMUPS, help="what trains before the first snapshot")
    t.add_argument("--warmup-epochs", type=int)
    t.add_argument("--refresh-every", type=int, metavar="N", help="epochs between snapshots (and mining)")
    t.add_argument("--publish-every", type=int, metavar="N", help="publish every N-th refresh's snapshot to the "
                   "store (default 1: every one; the first and the final model's always); the others only refresh "
                   "the recipe, class-batches from --centroid-sample items per class")
    t.add_argument("--refresh-every-steps", type=int, metavar="N", help="optimizer steps between snapshots instead "
                   "of --refresh-every (give one of the two)")
    t.add_argument("--refresh", choices=REFRESH_MODES, help="sync (default): training waits for each refresh, "
                   "bit-for-bit reproducible; async: a worker process embeds, publishes and mines while training "
                   "goes on, and the new tuples take over at the next step boundary (not reproducible)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batching", choices=BATCHINGS,
                   help="item batches of in-batch mining and warm-up: random, or pk (P classes x K items)")
    t.add_argument("--per-class", type=int, metavar="K", help="pk and class batches: items of each class per batch")
    t.add_argument("--centroid-sample", type=int, metavar="M", help="class-batches: items per class a refresh that "
                   "publishes nothing (--publish-every) embeds for the class centroids (default 16)")
    t.add_argument("--inbatch-strategy", choices=INBATCH_STRATEGIES,
                   help="class-batches and mined-tuples: the in-batch miner of class batches and of mixed batches")
    t.add_argument("--seed-hardness", type=float, metavar="A",
                   help="class-batches: draw seed classes with probability proportional to (mean squared distance "
                        "to their batch's classes) ** -A, so confusable classes seed more batches (0: uniformly)")
    t.add_argument("--inbatch-mix", type=float, metavar="WEIGHT",
                   help="mined-tuples: add WEIGHT x the in-batch loss over each batch of mined triplets' items")


def _mining_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--strategy", choices=sorted(set(STRATEGIES + INBATCH_STRATEGIES)),
                   help=f"mined-tuples: {'|'.join(STRATEGIES)}; in-batch: {'|'.join(INBATCH_STRATEGIES)} "
                        "(default semihard for both)")
    t.add_argument("--per-anchor", type=int, help="mined triplets per anchor")
    t.add_argument("--positive", choices=POSITIVES)
    t.add_argument("--positive-aware", type=float, metavar="FRACTION",
                   help="drop negatives more similar than FRACTION x the positive's similarity")
    t.add_argument("--near-duplicate", type=float, metavar="D2", help="drop negatives within d² D2 of the anchor")
    t.add_argument("--window-skip", type=int, help="window strategy: nearest negatives skipped")
    t.add_argument("--window-width", type=int, help="window strategy: negatives sampled from after the skip")
    t.add_argument("--candidates", type=int, help="nearest wrong-label neighbours searched per anchor")


def _run_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--margin", type=float, help="margin m in squared-distance units")
    t.add_argument("--embedding-dim", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--index", choices=INDEX_KINDS, help="the snapshot's FAISS index")
    t.add_argument("--store", help="snapshot store folder (default ./store)")
    t.add_argument("--shard-index", nargs="?", const="on", choices=SHARD_INDEX,
                   help="under torchrun: each rank embeds and indexes its block of the training items only and mining "
                        "searches every rank's shard, so a rank holds about N / world_size embeddings; rank 0 streams "
                        "one complete snapshot to the store. auto (default): from 1,000,000 items, with --index flat "
                        "and a recipe that can (class-batches, mined-tuples, in-batch, random-tuples)")
    t.add_argument("--run-dir", help="run folder (default runs/<timestamp>)")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", choices=DEVICES)
    t.add_argument("--threads", type=int, metavar="N", help="torch and FAISS threads (default: every core; 1 is "
                   "faster on a machine whose cores are busy with other work)")
    t.add_argument("--eval-every", type=int, metavar="N", help="evaluate retrieval every N epochs and after the "
                   "last (default 1); the other epochs' metrics.jsonl lines hold empty metrics")
    t.add_argument("--eval-sample", type=int, metavar="M", help="evaluate M seeded queries, each ranked against "
                   "every evaluation item, with 95%% confidence intervals in metrics.jsonl (default: every query)")
    t.add_argument("--config", type=Path, metavar="FILE", help="TOML file of options")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt "
                   "(only --epochs and --device may change)")
    t.add_argument("--resume-if-exists", action="store_true",
                   help="with --run-dir: continue the run there if it has a last.pt, else start it (for a trainer "
                        "that a supervisor restarts with the same command; the options must match that run's, "
                        "except --epochs and --device)")


def _quality_args(t: argparse.ArgumentParser) -> None:
    t.add_argument("--exclude-suspects", type=float, metavar="FRACTION",
                   help="class-batches and mined-tuples: at each refresh, leave the top FRACTION of the snapshot's "
                        "label-noise suspects (hardneg audit labels) out of the batches and the mined tuples")
    t.add_argument("--refresh-on-drift", type=float, metavar="THRESHOLD",
                   help="refresh early, before the next epoch, when the mean class-centroid shift (d²) of a probe "
                        "sample of training items since the last snapshot passes THRESHOLD")
    t.add_argument("--drift-probe", type=int, metavar="N", help="training items in the drift probe (default 1000)")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="retrieval metrics of a training checkpoint",
                       description="Print P@1, Recall@K, R-Precision and MAP@R of a checkpoint's model on the "
                                   "evaluation split of its run's data, or of --data.")
    e.add_argument("--checkpoint", required=True, type=Path, help="a last.pt or best.pt")
    _data_args(e, suppress=True)
    e.add_argument("--split", choices=("eval", "train"), default="eval")
    e.add_argument("--device", choices=DEVICES, default=argparse.SUPPRESS)
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    e.set_defaults(func=cmd_eval)


def _data_args(p: argparse.ArgumentParser, suppress: bool = False) -> None:
    kw: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--data", metavar="SOURCE", help="digits (default), npz:PATH, folder:PATH or module:attr", **kw)
    p.add_argument("--eval-data", metavar="SOURCE", help="a separate evaluation set (then all of --data trains)",
                   **kw)
    p.add_argument("--protocol", choices=PROTOCOLS, help="how --data is split when --eval-data is not given", **kw)


def _selfsup_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe simclr (self-supervised)", "SimCLR: two augmented views of an image are a positive "
                             "pair, the batch's other images are negatives, and no training label is read. The "
                             "augmentation strengths (aug_crop_min_scale, aug_crop_max_ratio, aug_brightness, "
                             "aug_contrast, aug_noise) are set in --config FILE.")
    g.add_argument("--mode", choices=MODES, help="the first release's choice, still accepted: self-supervised is "
                   "recipe simclr (augmented views of images, NT-Xent loss)")
    g.add_argument("--temperature", type=float, help="NT-Xent temperature (default 0.5)")
    g.add_argument("--ssl-negatives", choices=SSL_NEGATIVES, help="mined (default): each refresh's snapshot gives "
                   "every image its nearest other images, and batches are composed so that they meet; in-batch: "
                   "random batches (plain SimCLR)")
    g.add_argument("--ssl-per-anchor", type=int, metavar="N", help="mined negatives that join each seed image")
    g.add_argument("--ssl-candidates", type=int, metavar="N", help="neighbours per image the negatives come from")
    g.add_argument("--ssl-skip", type=int, metavar="N", help="nearest neighbours never used as negatives")
    g.add_argument("--ssl-max-similarity", type=float, metavar="COS",
                   help="drop candidate negatives with cosine similarity above COS")
    g.add_argument("--ssl-near-duplicate", type=float, metavar="D2",
                   help="drop candidate negatives within d² D2 of the image")
    g.add_argument("--aug-flip", type=float, metavar="P", help="horizontal-flip probability (default 0)")


_NOT_CONFIG = ("func", "command", "verbose", "config", "resume", "resume_if_exists", "checkpoint", "split",
               "json")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The config values typed on the command line."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}


def cmd_train(args: argparse.Namespace) -> int:
    given = _given(args)
    resume = getattr(args, "resume", None)
    if resume is not None and getattr(args, "config", None) is not None:
        from hardneg.miner.errors import ValidationError

        raise ValidationError("--config cannot be combined with --resume; the run's own config is used")
    if getattr(args, "resume_if_exists", False):
        resume, given = _existing_run(args, given)
    cfg = None if resume is not None else TrainConfig.from_sources(getattr(args, "config", None), given)
    device = cfg.device if cfg is not None else given.get("device") or _run_device(resume)
    _deterministic(device)
    from hardneg.trainer.distributed import process_group

    # Under torchrun: one process group for the run (gloo on CPU, NCCL on CUDA), torn down also on errors.
    with process_group(device) as dist:
        if not dist.is_main:  # progress and results are rank 0's to report
            logging.getLogger("hardneg").setLevel(logging.WARNING)
        if dist.enabled:
            # DDP's reducer flags a 1-input-channel conv weight, whose gradient strides differ from the weight's
            # only along its size-1 dimension (the same memory layout): nothing to act on.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        summary, epochs = _train(dist, resume, given, cfg)
    if dist.is_main:
        _report(summary, epochs)
    return 0


def _report(summary: RunSummary, epochs: int) -> None:
    print(f"\nfinished {epochs} epochs; newest snapshot {summary.snapshot} in {summary.store}")
    print(f"{'metric':<12} {'untrained':>9} {'final':>9} {'best':>9}")
    for key, label in _REPORTED:
        if key in summary.final:
            print(f"{label:<12} {summary.untrained[key]:>9.4f} {summary.final[key]:>9.4f} {summary.best[key]:>9.4f}")
    print(f"best MAP@R at epoch {summary.best_epoch}")
    print(f"run folder: {summary.run_dir}  (metrics.jsonl, last.pt, best.pt)")
    print(f"snapshot store: {summary.store}")
    print(f"plot: {summary.plot}")


def _train(dist: DistContext, resume: Path | None, given: dict[str, Any],
           cfg: TrainConfig | None) -> tuple[RunSummary, int]:
    """Build and run the trainer; returns the summary and the epochs trained.

    The trainer, and with it the DDP wrapper that holds the process group, is released when this returns,
    still inside :func:`~hardneg.trainer.distributed.process_group` (which needs that for a clean teardown).
    """
    from hardneg.trainer.loop import Trainer

    trainer = Trainer.resume(resume, given, dist) if resume is not None else Trainer.create(cfg, dist)
    if dist.is_main:
        print(f"run folder: {trainer.run_dir}")
        print(f"snapshot store: {trainer.cfg.store}")
    return trainer.run(), trainer.cfg.epochs


def _run_device(run_dir: Path) -> str:
    """The device the run in ``run_dir`` trains on, from its ``last.pt``."""
    from hardneg.trainer.checkpoint import LAST, load_checkpoint

    return load_checkpoint(Path(run_dir) / LAST)["config"]["device"]


def _existing_run(args: argparse.Namespace, given: dict[str, Any]) -> tuple[Path | None, dict[str, Any]]:
    """``--resume-if-exists``: the run folder to continue and the config it must agree with, or ``(None, given)``
    to start a new run there.

    The whole config (defaults, ``--config`` file and flags) is compared with the run's own, so a restarted
    command whose file or flags changed anything but ``epochs`` or ``device`` is refused, not silently ignored.
    """
    from hardneg.miner.errors import ValidationError
    from hardneg.trainer.checkpoint import LAST

    if getattr(args, "resume", None) is not None:
        raise ValidationError("--resume-if-exists cannot be combined with --resume; give the run folder as --run-dir")
    cfg = TrainConfig.from_sources(getattr(args, "config", None), given)
    if not cfg.run_dir:
        raise ValidationError("--resume-if-exists needs --run-dir (or run_dir in --config): the folder whose run "
                              "to continue or start")
    run_dir = Path(cfg.run_dir)
    if not (run_dir / LAST).exists():
        return None, given
    # Trainer.create stores run_dir as str(Path(...)): compare in that form ("runs/a/" is "runs/a")
    return run_dir, cfg.replace(run_dir=str(run_dir)).to_dict()


def cmd_eval(args: argparse.Namespace) -> int:
    _deterministic(getattr(args, "device", "cpu"))
    from hardneg.trainer.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, _given(args), split=args.split)
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, label in _REPORTED:
            if key in metrics:
                print(f"{label:<12} {metrics[key]:.4f}")
    return 0


def _deterministic(device: str) -> None:
    """Make this process's torch ops reproducible (the CLI owns the process; the library sets no globals)."""
    if device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
