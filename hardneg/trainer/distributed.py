"""Distributed training under ``torchrun``: the process group, this process's place in it, sharding, collectives.

PyTorch's own engine does the work: ``torchrun`` starts one process per rank and
sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (on several nodes its c10d
rendezvous does); :func:`process_group` reads them, initialises ``torch.distributed`` with gloo for CPU training
or NCCL for CUDA, and destroys the group on the way out, also after an error. The model is wrapped in
``DistributedDataParallel`` by the loop.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) no group is created and :data:`LOCAL`'s collectives are the
identity, so a single-process run executes exactly the code it ran before distributed training existed.

Sharding, the same for every rank count:

* :func:`shard_range`: a contiguous block of ``range(n)`` per rank (each rank embeds its block; gathering the
  blocks in rank order gives back ``0..n-1`` in order);
* :func:`shard_strided`: every ``world``-th element from ``rank`` (each rank mines its share of the anchors);
* :func:`shard_batches`: each global batch of an epoch, split the same way. The batches come from the same
  seeded per-epoch permutation (or batch sampler) as in a single process, so ``batch_size`` stays the number
  of tuples per optimizer step, whatever the rank count (DistributedSampler's split, applied per batch).

Data move as raw bytes in tensors, never as pickled objects: arrays travel with a small int64 header (dtype and
shape), records as JSON.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from hardneg.miner.errors import ValidationError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Arrays the collectives carry; the header stores the dtype's position in this tuple.
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int64), np.dtype(np.int32),
           np.dtype(np.uint8), np.dtype(np.bool_))
_MAX_NDIM = 4
_HEADER = 2 + _MAX_NDIM  # dtype code, ndim, shape padded with zeros


class RankFailedError(RuntimeError):
    """Rank 0 failed in a step the other ranks were waiting for; the message is rank 0's error."""


# -------------------------------------------------------------- sharding
def _check_shard(rank: int, world: int) -> None:
    if world < 1 or not 0 <= rank < world:
        raise ValidationError(f"rank must lie in [0, world_size) with world_size >= 1, got rank {rank} of {world}")


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block ``[lo, hi)`` of ``range(n)``; the blocks of ranks 0..world-1 tile it in
    order and differ in size by at most one."""
    _check_shard(rank, world)
    return n * rank // world, n * (rank + 1) // world


def shard_strided(items: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Every ``world``-th element of ``items`` (n,) starting at ``rank``: the shares of all ranks partition it."""
    _check_shard(rank, world)
    return items[rank::world]


def shard_batches(batches: Iterable[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """Rank ``rank``'s share of each global batch (indices (b,) -> (about b / world,)).

    Every rank gets one share per global batch, so all ranks take the same number of optimizer steps (DDP
    all-reduces gradients in each step); a share is empty when a batch has fewer items than ranks.
    """
    _check_shard(rank, world)
    return [batch[rank::world] for batch in batches]


# ---------------------------------------------------------------- context
@dataclass(frozen=True)
class DistContext:
    """This process's place in a run: ``rank`` of ``world_size`` processes, ``local_rank`` on its node.

    ``backend`` is "gloo" or "nccl" when a process group is initialised, None for a single process (then
    every collective below is the identity and nothing is communicated).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder, publishes snapshots and reports progress."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where the collectives' tensors live: NCCL moves CUDA tensors only, gloo CPU ones."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def device_for(self, device: str) -> torch.device:
        """The torch device of training on ``device`` ("cpu" or "cuda"): each rank its own GPU, by local rank."""
        if device == "cuda" and self.enabled:
            return torch.device("cuda", self.local_rank)
        return torch.device(device)

    # ------------------------------------------------------------ sharding
    def block(self, n: int) -> tuple[int, int]:
        """This rank's contiguous block of ``range(n)`` (:func:`shard_range`)."""
        return shard_range(n, self.rank, self.world_size)

    def strided(self, items: np.ndarray) -> np.ndarray:
        """This rank's share of ``items`` (:func:`shard_strided`)."""
        return shard_strided(items, self.rank, self.world_size)

    def batches(self, batches: Iterable[np.ndarray]) -> Iterable[np.ndarray]:
        """This rank's share of each global batch (:func:`shard_batches`); the batches themselves alone."""
        return shard_batches(batches, self.rank, self.world_size) if self.enabled else batches

    # --------------------------------------------------------- collectives
    def total(self, count: int) -> int:
        """The sum of ``count`` over all ranks."""
        if not self.enabled:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(t)
        return int(t.item())

    def sums(self, values: Sequence[float]) -> list[float]:
        """The element-wise sums of ``values`` over all ranks, in float64."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and give every rank its JSON-able result; the others wait for it.

        When ``fn`` raises, rank 0 re-raises its error and every other rank raises one with the same message
        (a :class:`ValidationError` stays one, so the CLI reports it alike), instead of waiting forever.
        """
        if not self.enabled:
            return fn()
        error: Exception | None = None
        message: dict[str, Any] = {}
        if self.is_main:
            try:
                message = {"ok": True, "value": fn()}
            except Exception as e:  # re-raised below, after the other ranks have been told
                error = e
                message = {"ok": False, "validation": isinstance(e, ValidationError),
                           "error": f"{type(e).__name__}: {e}" if not isinstance(e, ValidationError) else str(e)}
        payload = self.broadcast_arrays([np.frombuffer(json.dumps(message).encode(), np.uint8)]
                                        if self.is_main else None)[0]
        if error is not None:
            raise error
        message = json.loads(payload.tobytes().decode())
        if not message["ok"]:
            if message["validation"]:
                raise ValidationError(message["error"])
            raise RankFailedError(f"rank 0 failed: {message['error']}")
        return message["value"]

    def broadcast_arrays(self, arrays: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        """Rank 0's ``arrays`` on every rank (the others pass None)."""
        if not self.enabled:
            assert arrays is not None
            return list(arrays)
        dev = self.comm_device
        count = torch.tensor([len(arrays) if self.is_main else 0], dtype=torch.int64, device=dev)
        dist.broadcast(count, 0)
        headers = (torch.from_numpy(np.stack([_header(a) for a in arrays])) if self.is_main
                   else torch.zeros((int(count.item()), _HEADER), dtype=torch.int64)).to(dev)
        dist.broadcast(headers, 0)
        heads = headers.cpu().numpy()
        size = int(sum(_nbytes(h) for h in heads))
        payload = (torch.from_numpy(_concat_bytes(arrays)) if self.is_main
                   else torch.empty(size, dtype=torch.uint8)).to(dev)
        if size:
            dist.broadcast(payload, 0)
        return _split_bytes(payload.cpu().numpy(), heads)

    def gather_arrays(self, arrays: Sequence[np.ndarray]) -> list[list[np.ndarray]] | None:
        """Every rank's ``arrays`` on rank 0: for each array, its parts by rank; None on the other ranks.

        The ranks must pass the same number of arrays; shapes and dtypes may differ.
        """
        return self._collect(arrays, to_all=False)

    def all_gather_arrays(self, arrays: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        """Every rank's ``arrays`` on every rank: for each array, its parts by rank."""
        out = self._collect(arrays, to_all=True)
        assert out is not None
        return out

    def all_gather_json(self, value: Any) -> list[Any]:
        """Every rank's JSON-able ``value``, by rank, on every rank."""
        blob = np.frombuffer(json.dumps(value).encode(), np.uint8)
        return [json.loads(part.tobytes().decode()) for part in self.all_gather_arrays([blob])[0]]

    def exchange_arrays(self, by_rank: Sequence[Sequence[np.ndarray]]) -> list[list[np.ndarray]]:
        """All-to-all: ``by_rank[r]`` (the same number of arrays for every ``r``) goes to rank ``r``; returns, for
        each array, the parts the ranks sent to this one, by rank. One gather per rank (gloo has no all-to-all)."""
        got: list[list[np.ndarray]] | None = None
        for dst in range(self.world_size):
            parts = self._collect(by_rank[dst], to_all=False, dst=dst)
            if dst == self.rank:
                got = parts
        assert got is not None
        return got

    def all_reduce_array(self, a: np.ndarray) -> np.ndarray:
        """The element-wise sum of ``a`` (float64 or int64, any shape) over all ranks."""
        if not self.enabled:
            return a.copy()
        t = torch.from_numpy(np.array(a, order="C")).to(self.comm_device)  # a copy: all_reduce works in place
        dist.all_reduce(t)
        return t.cpu().numpy()

    def _collect(self, arrays: Sequence[np.ndarray], to_all: bool, dst: int = 0) -> list[list[np.ndarray]] | None:
        if not self.enabled:
            return [[a] for a in arrays]
        dev, k = self.comm_device, len(arrays)
        header = torch.from_numpy(np.stack([_header(a) for a in arrays]).reshape(k, _HEADER)).to(dev)
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        dist.all_gather(headers, header)  # every rank learns every payload size, to pad to the largest
        heads = [h.cpu().numpy() for h in headers]
        sizes = [int(sum(_nbytes(row) for row in h)) for h in heads]
        width = max(sizes)
        mine = np.zeros(width, np.uint8)
        mine[:sizes[self.rank]] = _concat_bytes(arrays)
        local = torch.from_numpy(mine).to(dev)
        if to_all:
            parts = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(parts, local)
        else:
            parts = [torch.empty_like(local) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(local, parts, dst=dst)
            if parts is None:
                return None
        by_rank = [_split_bytes(p.cpu().numpy()[:s], h) for p, s, h in zip(parts, sizes, heads)]
        return [[by_rank[r][i] for r in range(self.world_size)] for i in range(k)]


LOCAL = DistContext()  # a single process: no group, collectives are the identity


# ----------------------------------------------------------- byte framing
def _header(a: np.ndarray) -> np.ndarray:
    """(_HEADER,) int64: dtype code, ndim, shape (zero-padded)."""
    a = np.asarray(a)
    if a.dtype not in _DTYPES or a.ndim > _MAX_NDIM:
        raise ValidationError(f"cannot send an array of dtype {a.dtype} with {a.ndim} dimensions; accepted: "
                              f"{', '.join(str(d) for d in _DTYPES)} with at most {_MAX_NDIM} dimensions")
    h = np.zeros(_HEADER, np.int64)
    h[0], h[1] = _DTYPES.index(a.dtype), a.ndim
    h[2:2 + a.ndim] = a.shape
    return h


def _nbytes(h: np.ndarray) -> int:
    return int(np.prod(h[2:2 + int(h[1])])) * _DTYPES[int(h[0])].itemsize


def _concat_bytes(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """The raw bytes of ``arrays`` (C order), one after another: (total,) uint8."""
    parts = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    return np.concatenate(parts) if parts else np.empty(0, np.uint8)


def _split_bytes(blob: np.ndarray, heads: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`_concat_bytes` given the arrays' headers (k, _HEADER): k owned arrays."""
    out, at = [], 0
    for h in heads:
        n = _nbytes(h)
        shape = tuple(int(s) for s in h[2:2 + int(h[1])])
        out.append(blob[at:at + n].copy().view(_DTYPES[int(h[0])]).reshape(shape))
        at += n
    return out


# ---------------------------------------------------------- process group
def context_from_env(device: str, environ: Mapping[str, str] | None = None) -> DistContext:
    """This process's :class:`DistContext` from torchrun's variables (no group is created here).

    ``WORLD_SIZE`` unset or 1: a single process. Otherwise ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` must be set (torchrun sets them all); the backend is NCCL for ``device`` "cuda", gloo for "cpu".
    """
    env = os.environ if environ is None else environ
    world = _env_int(env, "WORLD_SIZE", default=1)
    if world < 1:
        raise ValidationError(f"WORLD_SIZE must be an integer >= 1, got {world}")
    if world == 1:
        return LOCAL
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise ValidationError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not; start distributed "
                              f"training with torchrun (e.g. torchrun --nproc-per-node {world} -m hardneg.cli "
                              f"train ...), which sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
    rank, local_rank = _env_int(env, "RANK"), _env_int(env, "LOCAL_RANK")
    if not 0 <= rank < world or local_rank < 0:
        raise ValidationError(f"RANK must lie in [0, {world}) and LOCAL_RANK be >= 0, got RANK={rank}, "
                              f"LOCAL_RANK={local_rank}")
    return DistContext(rank, world, local_rank, _backend(device, local_rank))


def _backend(device: str, local_rank: int) -> str:
    """NCCL for ``device`` "cuda" (each local rank needs its GPU), gloo for "cpu"; refused when not built in."""
    if device == "cuda":
        if not dist.is_nccl_available():
            raise ValidationError("device 'cuda' trains with the NCCL backend, which this torch build lacks; "
                                  "use --device cpu (gloo) or a CUDA build of torch")
        if local_rank >= torch.cuda.device_count():
            raise ValidationError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                  f"start at most that many processes per node (--nproc-per-node)")
        return "nccl"
    if not dist.is_gloo_available():
        raise ValidationError("device 'cpu' trains with the gloo backend, which this torch build lacks")
    return "gloo"


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise ValidationError(f"{name} is not set; torchrun sets it")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValidationError(f"{name} must be an integer, got {raw!r}") from None


@contextmanager
def process_group(device: str, environ: Mapping[str, str] | None = None) -> Iterator[DistContext]:
    """Initialise torch.distributed for this torchrun process (a no-op for a single process); yield its context.

    The group is destroyed when the block exits, normally or by an error, so that a failing rank leaves
    cleanly and torchrun can stop the others. Whatever holds the group (a DistributedDataParallel wrapper:
    its reducer does) must be released inside the block: a group destroyed last by such a holder joins gloo's
    worker threads while holding the GIL, and a worker still freeing a finished collective's tensors waits
    for the GIL, so the process never exits. On the way out, a normal exit first waits at a barrier (every
    rank's collectives finished and released, the GIL free meanwhile); an error clears the failed frames'
    locals, which would otherwise keep such holders alive past the group.
    """
    ctx = context_from_env(device, environ)
    if not ctx.enabled:
        yield ctx
        return
    if ctx.backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)  # before init: NCCL binds each rank to its own GPU
    dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=ctx.world_size)
    if ctx.is_main:
        log.info("training on %d processes, backend %s", ctx.world_size, ctx.backend)
    try:
        yield ctx
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    else:
        dist.barrier()
    finally:
        gc.collect()  # reference cycles that still hold the group (DDP's hooks make some)
        dist.destroy_process_group()


def check_world(ctx: DistContext, n_items: int, batch_size: int) -> None:
    """Refuse a world that cannot share the work: more ranks than training items or than a batch's tuples."""
    if ctx.world_size > n_items:
        raise ValidationError(f"{ctx.world_size} processes but only {n_items} training items: every rank needs "
                              f"items to embed; start at most {n_items} processes")
    if ctx.world_size > batch_size:
        raise ValidationError(f"batch_size ({batch_size}) is the number of tuples per optimizer step, split over "
                              f"the {ctx.world_size} processes; it must be at least {ctx.world_size}")
