"""``hardneg train`` and ``hardneg eval`` end to end, as real processes, on the built-in digits.

Small runs (3 epochs, a refresh every epoch) shared by several tests through module-scoped fixtures.
References: the untrained model's metrics (epoch 0), an uninterrupted run with the same seed (for
determinism and resume), and the training split embedded again from the snapshot's model.pt2.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import subprocess
import struct
import sys
import termios
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from hardneg.miner.errors import ValidationError
from hardneg.miner.metrics import retrieval_metrics
from hardneg.miner.model_io import load_model
from hardneg.miner.store import SnapshotStore
from hardneg.trainer.config import TrainConfig
from hardneg.trainer.data import load_splits
from hardneg.trainer.evaluate import evaluate_checkpoint
from hardneg.trainer.models import build_model_from_spec

pytestmark = pytest.mark.slow

SMALL = ["--epochs", "3", "--refresh-every", "1", "--seed", "7"]
# One OpenMP thread per training process: the test machine's cores are shared with other processes, and
# oversubscribed OpenMP barriers make a 15 ms step take 500 ms. Results are deterministic at any thread count.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
METRIC_KEYS = {"precision_at_1", "recall_at_1", "recall_at_5", "recall_at_10", "r_precision", "map_at_r"}


def hardneg(*args: str, cwd: Path, script: str | None = None) -> subprocess.CompletedProcess:
    """Run ``hardneg ARGS`` (or ``script`` with ARGS as its argv) in ``cwd``; output captured."""
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "hardneg.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, env=ENV)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def results(run_dir: Path) -> list[tuple]:
    """What must be reproducible: per epoch, the step count, loss, metrics and training counts."""
    return [(r["epoch"], r["step"], r["loss"], r["metrics"], r["train"]) for r in history(run_dir)]


@dataclass
class Run:
    run_dir: Path
    store: Path
    stdout: str
    stderr: str
    seen_snapshots_while_training: set[str]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_cli")


@pytest.fixture(scope="module")
def global_run(work: Path) -> Run:
    """The default mode (global mining), watched while it runs: which snapshots exist before it finishes."""
    cmd = [sys.executable, "-m", "hardneg.cli", "train", *SMALL, "--run-dir", "a", "--store", "store_a"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen: set[str] = set()
    metrics = work / "a" / "metrics.jsonl"
    while proc.poll() is None:
        lines = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if lines < 4:  # training not finished: epochs 0..3 not all evaluated yet
            seen.update(SnapshotStore(work / "store_a").names())
        time.sleep(0.05)
    out, err = proc.communicate()
    ok(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return Run(work / "a", work / "store_a", out, err, seen)


def test_global_run_publishes_a_snapshot_per_refresh_while_training(global_run: Run) -> None:
    store = SnapshotStore(global_run.store)
    names = store.names()
    # warm-up epoch 1, refreshes before epochs 2 and 3 (models of epochs 1, 2), then the final model (epoch 3)
    assert len(names) == 3
    manifests = [store.verify(n) for n in names]
    assert [m["meta"]["epoch"] for m in manifests] == [1, 2, 3]
    assert [m["meta"]["reason"] for m in manifests] == ["refresh", "refresh", "final"]
    hist = history(global_run.run_dir)
    for m in manifests:
        assert m["meta"]["config"] == TrainConfig.from_dict(m["meta"]["config"]).to_dict()
        assert m["meta"]["config"]["epochs"] == 3 and m["meta"]["config"]["recipe"] == "class-batches"
        assert m["meta"]["metrics"] == hist[m["meta"]["epoch"]]["metrics"]  # the latest eval at publish time
        assert m["model"]["input_shape"] == [1, 8, 8] and m["model"]["embedding_dim"] == 64
        assert m["model"]["class"] == "hardneg.trainer.models.EmbeddingCNN"
        assert m["count"] == 1347 and "model.pt2" in m["files"]
    assert [r["snapshot"] for r in hist] == [None, None, names[0], names[1]]
    assert set(names[:2]) <= global_run.seen_snapshots_while_training
    assert store.latest_name() == names[-1]


def test_global_run_learns_and_writes_metrics_and_plot(global_run: Run) -> None:
    hist = history(global_run.run_dir)
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3]
    assert hist[0]["loss"] is None and hist[0]["step"] == 0
    steps = [r["step"] for r in hist]
    assert steps == sorted(steps) and steps[1] == 11  # ceil(1347 / 128) batches per epoch
    for r in hist:
        assert set(r["metrics"]) >= METRIC_KEYS and all(0.0 <= r["metrics"][k] <= 1.0 for k in METRIC_KEYS)
    for r in hist[1:]:  # each step a batch of the 10 classes x 12 items (P x K, K grown to fill 128)
        assert r["loss"] > 0 and r["train"]["steps"] == 11 and r["train"]["tuples"] > 0
    for r in hist[2:]:  # class batches composed from a snapshot: their statistics are recorded
        assert (r["mining"]["classes"], r["mining"]["classes_per_batch"]) == (10, 10)
        assert r["mining"]["neighbour_centroid_d2"] > 0
    assert hist[-1]["metrics"]["map_at_r"] > hist[0]["metrics"]["map_at_r"] + 0.1
    with Image.open(global_run.run_dir / "plot.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1] > 100
    assert f"plot: {Path('a') / 'plot.png'}" in global_run.stdout
    assert "snapshot store: store_a" in global_run.stdout and "MAP@R" in global_run.stdout


def test_progress_bars_on_a_terminal_plain_log_lines_otherwise(global_run: Run, work: Path) -> None:
    assert "it/s" not in global_run.stderr and "epoch 3/3: loss" in global_run.stderr  # piped: log lines only
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal with a size, as tqdm needs one to draw
        fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.chdir(work)
        os.execve(sys.executable, [sys.executable, "-m", "hardneg.cli", "train", "--epochs", "1", "--mining",
                                   "random", "--run-dir", "tty", "--store", "store_tty"], ENV)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-2000:]
    assert re.search(r"epoch 1/1: +\d+%\|.*\| \d+/11 ", out.decode(errors="replace"))  # 11 batches: a tqdm bar


def test_snapshot_model_embeds_like_the_index(global_run: Run) -> None:
    snap = SnapshotStore(global_run.store).open()
    cfg = TrainConfig.from_dict(snap.manifest["meta"]["config"])
    train = load_splits(cfg).train
    exported = load_model(snap.model_path, snap.manifest["model"]["input_shape"])
    ids = np.arange(len(train))
    np.testing.assert_allclose(exported.embed(train.x), snap.index.vectors_of(ids), atol=1e-5)
    # ...and the final snapshot holds the final checkpoint's model.
    ckpt = torch.load(global_run.run_dir / "last.pt", weights_only=True)
    model = build_model_from_spec(ckpt["model_spec"])
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(torch.from_numpy(train.x[:50])).numpy(),
                                   snap.index.vectors_of(ids[:50]), atol=1e-5)


def test_same_seed_same_results(global_run: Run, work: Path) -> None:
    ok(hardneg("train", *SMALL, "--run-dir", "a2", "--store", "store_a2", cwd=work))
    assert results(work / "a2") == results(global_run.run_dir)


def test_eval_prints_the_checkpoint_metrics(global_run: Run, work: Path) -> None:
    proc = ok(hardneg("eval", "--checkpoint", str(global_run.run_dir / "best.pt"), "--json", cwd=work))
    metrics = json.loads(proc.stdout)
    best = max(history(global_run.run_dir), key=lambda r: r["metrics"]["map_at_r"])
    assert {k: metrics[k] for k in METRIC_KEYS} == {k: best["metrics"][k] for k in METRIC_KEYS}


def test_eval_on_other_data(global_run: Run, work: Path) -> None:
    """``evaluate_checkpoint`` with --data: the protocol's eval split of that data, embedded by the checkpoint."""
    digits = load_digits()
    np.savez(work / "odd.npz", x=(digits.images[1::2] * 16).astype(np.uint8), y=digits.target[1::2])  # 0..255
    changes = {"data": f"npz:{work / 'odd.npz'}", "protocol": "heldout-classes"}
    got = evaluate_checkpoint(global_run.run_dir / "last.pt", changes)
    ckpt = torch.load(global_run.run_dir / "last.pt", weights_only=True)
    model = build_model_from_spec(ckpt["model_spec"])
    model.load_state_dict(ckpt["model"])
    keep = digits.target[1::2] >= 5  # heldout-classes: the last half of the classes
    # scaled, given its channel axis, then split, as the data module does: the same strides reach the same conv
    # kernels (a size-1 axis's stride picks torch's memory format), so float rounding cannot flip kNN near-ties
    x = ((digits.images[1::2] * 16).astype(np.uint8).astype(np.float32) / 255.0)[:, None][np.flatnonzero(keep)]
    with torch.no_grad():
        emb = model.eval()(torch.from_numpy(x)).numpy()
    want = retrieval_metrics(emb, digits.target[1::2][keep])
    assert got == pytest.approx({k: float(v) for k, v in want.items()}, abs=1e-6)
    np.savez(work / "vec.npz", x=np.zeros((40, 5)), y=np.repeat([0, 1, 2, 3], 10))
    with pytest.raises(ValidationError, match=r"embeds items of shape \(1, 8, 8\)"):
        evaluate_checkpoint(global_run.run_dir / "last.pt", {"data": f"npz:{work / 'vec.npz'}"})
    with pytest.raises(ValidationError, match="eval cannot change lr"):
        evaluate_checkpoint(global_run.run_dir / "last.pt", {"lr": 0.1})


KILLER = textwrap.dedent('''
    """hardneg train, SIGKILLed by itself after two optimizer steps of epoch 3."""
    import os, signal, sys
    import hardneg.trainer.loop as loop

    train_epoch, step = loop.Trainer._train_epoch, loop._step
    def killing_step(*args):
        step(*args)
        killing_step.calls += 1
        if killing_step.calls == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    killing_step.calls = 0
    def patched(self, epoch):
        if epoch == 3:
            loop._step = killing_step
        return train_epoch(self, epoch)
    loop.Trainer._train_epoch = patched
    from hardneg.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def test_resume_after_sigkill_matches_an_uninterrupted_run(global_run: Run, work: Path) -> None:
    killed = hardneg("train", *SMALL, "--run-dir", "b", "--store", "store_b", cwd=work, script=KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(work / "b" / "last.pt", weights_only=True)["epoch"] == 2
    assert len(SnapshotStore(work / "store_b").names()) == 2  # the refresh before epoch 3 had published
    proc = ok(hardneg("train", "--resume", "b", cwd=work))
    assert "resuming" in proc.stderr
    assert results(work / "b") == results(global_run.run_dir)


def test_resume_refuses_changed_options(global_run: Run, work: Path) -> None:
    proc = hardneg("train", "--resume", str(global_run.run_dir), "--lr", "0.5", cwd=work)
    assert proc.returncode == 2 and "cannot change lr when resuming" in proc.stderr


@pytest.mark.parametrize("mode, extra, tuples_per_epoch", [
    ("in-batch", ["--strategy", "batch-hard"], None),
    ("random", ["--loss", "contrastive"], 2 * 1347),  # each random triplet gives a similar and a dissimilar pair
])
def test_baseline_mining_modes_train_end_to_end(work: Path, mode: str, extra: list[str],
                                                 tuples_per_epoch: int | None) -> None:
    cwd = work / mode
    cwd.mkdir()
    proc = ok(hardneg("train", *SMALL, "--mining", mode, *extra, cwd=cwd))  # default store and run folder
    runs = list((cwd / "runs").iterdir())
    assert len(runs) == 1 and f"run folder: {Path('runs') / runs[0].name}" in proc.stdout
    hist = history(runs[0])
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3]
    assert hist[-1]["metrics"]["map_at_r"] > hist[0]["metrics"]["map_at_r"]
    assert all(r["mining"] is None for r in hist)  # no global miner in these modes
    if tuples_per_epoch is not None:
        assert all(r["train"]["tuples"] == tuples_per_epoch for r in hist[1:])
    manifests = [SnapshotStore(cwd / "store").verify(n) for n in SnapshotStore(cwd / "store").names()]
    assert [m["meta"]["epoch"] for m in manifests] == [1, 2, 3]
    recipe = {"in-batch": "in-batch", "random": "random-tuples"}[mode]  # the recipe each old --mining names
    assert all(m["meta"]["config"]["recipe"] == recipe for m in manifests)


def test_bad_data_fails_before_training(work: Path) -> None:
    np.savez(work / "bad.npz", x=np.zeros((4, 3)), y=np.array([1.5, 2, 1, 2]))
    proc = hardneg("train", "--data", "npz:bad.npz", "--run-dir", "bad", "--store", "store_bad", cwd=work)
    assert proc.returncode == 2
    assert "labels y must be integers, got dtype float64" in proc.stderr
    assert not (work / "bad").exists() and not (work / "store_bad").exists()


USER_MODEL = textwrap.dedent('''
    from torch import nn

    def mlp(input_shape, embedding_dim):
        return nn.Sequential(nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Linear(32, embedding_dim))
''')


def test_user_data_model_and_config_file(work: Path) -> None:
    """npz vectors with a separate eval npz, the user's model, contrastive loss on the miner's pairs, in-batch
    warm-up, options from a TOML file."""
    cwd = work / "user"
    cwd.mkdir()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    for name, per_class in (("train", 40), ("eval", 15)):
        y = np.repeat(np.arange(6), per_class)
        np.savez(cwd / f"{name}.npz", x=(centres[y] + 0.9 * rng.normal(size=(len(y), 16))).astype(np.float32), y=y)
    (cwd / "hn_user_model.py").write_text(USER_MODEL)
    (cwd / "run.toml").write_text('loss = "contrastive"\nwarmup = "in-batch"\nembedding_dim = 8\nbatch_size = 32\n'
                                  'epochs = 9\nglobal_batches = "tuples"\n')
    env_path = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(cwd), ENV.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "hardneg.cli", "train", "--config", "run.toml", "--data",
                           "npz:train.npz", "--eval-data", "npz:eval.npz", "--model", "hn_user_model:mlp",
                           "--epochs", "3", "--refresh-every", "1", "--run-dir", "r", "--store", "s"],
                          cwd=cwd, capture_output=True, text=True, timeout=240, env=env_path)
    ok(proc)
    hist = history(cwd / "r")
    assert [r["epoch"] for r in hist] == [0, 1, 2, 3]  # --epochs beat the file's 9
    assert [r["train"]["tuples"] for r in hist[2:]] == [480, 480]  # the miner's pairs: (a, p, 0), (a, n, 1) each
    assert hist[-1]["metrics"]["map_at_r"] > hist[0]["metrics"]["map_at_r"]
    snap = SnapshotStore(cwd / "s").open()
    assert snap.manifest["model"] == {"class": "torch.nn.modules.container.Sequential",
                                      "config": {"factory": "hn_user_model:mlp", "embedding_dim": 8},
                                      "input_shape": [16], "embedding_dim": 8}
    assert snap.manifest["meta"]["config"]["loss"] == "contrastive" and snap.index.count == 240
    x = np.load(cwd / "train.npz")["x"]
    np.testing.assert_allclose(load_model(snap.model_path, [16]).embed(x), snap.index.vectors_of(np.arange(240)),
                               atol=1e-5)
