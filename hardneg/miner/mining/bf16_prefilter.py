"""A bfloat16 corpus product with a proven error bound: which entries of a score block can reach a threshold.

On CPUs with bfloat16 dot-product instructions (AVX512-BF16, AMX) a bfloat16 matrix product with float32
accumulation runs 3-4x faster than numpy's float32 one (oneDNN through torch; 4.8 against 18.4 ms for a
(1024, 128) x (128, 8192) block on one core of the machine behind docs/benchmarks.md). Its scores are not the
float32 ones, but they are never off by more than a bound known per query and corpus block. With
``q = q̂ + δq`` and ``x = x̂ + δx`` (``q̂``, ``x̂`` rounded to bfloat16):

    |q·x - q̂·x̂| <= ||q̂||·||δx|| + ||δq||·||x||            (Cauchy-Schwarz, twice)

(for l2, whose score ``q·x - ||x||²/2`` is the product with one more column, plus that column's rounding)

plus the float32 accumulation of the ``d`` exact bfloat16 products (at most ``d·2⁻²⁴·||q̂||·||x̂||``), and the
rounding of the product's result to bfloat16, which is monotone and so is absorbed by comparing it with the
threshold rounded down to bfloat16. So every entry whose exact score is at or above a query's threshold ``t``
has a bfloat16 score at or above ``round_down(t - bound)``: the comparison selects a superset of the entries
that matter, which the caller rescores exactly. The output is the float32 search's, only cheaper.

The comparison runs on the bfloat16 bits read as int16 (an int16 order that matches the value order for
non-negative values), so no block is ever converted to float32.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from hardneg.miner.mining.topk import sparse_nonzero

if TYPE_CHECKING:
    import torch

Prefilter = Literal["auto", "bf16", "off"]
PREFILTERS: tuple[str, ...] = ("auto", "bf16", "off")

# "auto" uses the bfloat16 product from this many multiply-adds of a scan (about 0.15 s of float32 product on
# one core): below it, rounding the corpus costs more than the product saves.
AUTO_MIN_MACS = 2**33
# ... and, when torch is not imported yet, only from this many (about 1.2 s of float32 product), since
# importing it costs about 1.5 CPU s.
AUTO_IMPORT_MACS = 2**36
# "auto" uses it only where a calibration product runs at least this much faster than numpy's float32 one
# (CPUs without bfloat16 instructions emulate it, several times slower than float32).
AUTO_MIN_SPEEDUP = 1.5
# Relative slack on the accumulation bound, on top of the worst case (float32's unit roundoff is 2⁻²⁴).
_ACCUMULATION = 2.0 * 2.0**-24


def wanted(mode: Prefilter, b: int, n: int, d: int) -> bool:
    """Whether a scan of ``b`` queries over ``n`` rows of dimension ``d`` should use the bfloat16 product."""
    if mode not in PREFILTERS:
        raise ValueError(f"prefilter must be one of {', '.join(PREFILTERS)}, got {mode!r}")
    if mode != "auto":
        return mode == "bf16"
    macs = b * n * d
    if macs < AUTO_MIN_MACS or ("torch" not in sys.modules and macs < AUTO_IMPORT_MACS):
        return False
    return bf16_speedup() >= AUTO_MIN_SPEEDUP


@functools.cache
def bf16_speedup() -> float:
    """How many times faster torch's bfloat16 product runs than numpy's float32 one on this CPU, one thread each
    (measured once per process, about 20 ms; 0 when torch cannot be imported)."""
    try:
        import torch
    except ImportError:
        return 0.0
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 128), dtype=np.float32)
    x = rng.standard_normal((2048, 128), dtype=np.float32)
    out = np.empty((256, 2048), np.float32)
    ta, tx = torch.from_numpy(a).bfloat16(), torch.from_numpy(x).bfloat16()
    tout = torch.empty((256, 2048), dtype=torch.bfloat16)

    def best(fn) -> float:
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    with threadpool_limits(limits=1, user_api="blas"), torch_threads(1):
        f32 = best(lambda: np.matmul(a, x.T, out=out))
        b16 = best(lambda: torch.mm(ta, tx.T, out=tout))
    return f32 / max(b16, 1e-9)


class torch_threads:
    """Set torch's intra-op threads (a process-wide setting) to ``n`` for a ``with`` block, and put the number
    back when the last of the blocks that overlap in time (scans of concurrent requests) ends."""

    _lock = threading.Lock()
    _depth = 0
    _saved = 0

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        import torch

        with torch_threads._lock:
            if torch_threads._depth == 0:
                torch_threads._saved = torch.get_num_threads()
                torch.set_num_threads(self.n)
            torch_threads._depth += 1

    def __exit__(self, *exc: object) -> None:
        import torch

        with torch_threads._lock:
            torch_threads._depth -= 1
            if torch_threads._depth == 0:
                torch.set_num_threads(torch_threads._saved)


@dataclass
class Bf16Corpus:
    """The corpus in bfloat16, blockwise, with what the error bound needs of each block.

    ``x`` (n, d') is the corpus, extended for l2 by a column of half squared norms (the score is then
    ``[q, -1]·[x, ||x||²/2]``), and zero-padded to a multiple of 16 columns.
    """

    x: torch.Tensor  # (n, d') bfloat16
    err: np.ndarray  # (blocks,) max ||x - x̂|| per block over the d vector columns (float64)
    norm: np.ndarray  # (blocks,) max ||x|| per block, same columns
    column_err: np.ndarray  # (blocks,) max |h - ĥ| of the half squared norm column per block (0 without one)
    rounded_norm: np.ndarray  # (blocks,) max ||x̂|| per block over all d' columns
    block: int
    dim: int  # d, the vector columns
    extended: bool

    @classmethod
    def build(cls, x: np.ndarray, half_norm: np.ndarray | None, block: int) -> Bf16Corpus:
        """``x`` (n, d) float32 prepared corpus; ``half_norm`` (n,) ``||x||²/2`` for l2, else None."""
        import torch

        n, d = x.shape
        full = _extend(x, None if half_norm is None else half_norm.astype(np.float32))
        with warnings.catch_warnings():  # a read-only snapshot array: only read, into a new tensor
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            xb = torch.from_numpy(full).bfloat16()
        stats = np.empty((n, 4))  # per row: ||δx||², ||x||², |δh|, ||x̂||²
        for s in range(0, n, 65536):
            exact = full[s:s + 65536]
            low = xb[s:s + 65536].float().numpy()
            delta = exact - low  # exact in float32: x̂ keeps x's leading bits
            stats[s:s + 65536, 0] = np.einsum("ij,ij->i", delta[:, :d], delta[:, :d])
            stats[s:s + 65536, 1] = np.einsum("ij,ij->i", exact[:, :d], exact[:, :d])
            stats[s:s + 65536, 2] = np.abs(delta[:, d:]).sum(1)
            stats[s:s + 65536, 3] = np.einsum("ij,ij->i", low, low)
        # Per block maxima; the float32 sums of squares are raised by far more than their rounding (d·2⁻²⁴).
        top = np.maximum.reduceat(stats, np.arange(0, n, block), axis=0) * (1.0 + 1e-4)
        err, norm, rounded = np.sqrt(top[:, 0]), np.sqrt(top[:, 1]), np.sqrt(top[:, 3])
        return cls(xb, err, norm, top[:, 2], rounded, block, d, half_norm is not None)

    def queries(self, q: np.ndarray) -> Bf16Queries:
        """``q`` (b, d) float32 prepared queries, rounded the same way."""
        import torch

        full = _extend(q, np.full(len(q), -1.0, np.float32) if self.extended else None)
        qb = torch.from_numpy(full).bfloat16()
        exact = full.astype(np.float64)
        low = qb.float().numpy().astype(np.float64)
        d = self.dim
        return Bf16Queries(qb, np.sqrt(((exact[:, :d] - low[:, :d]) ** 2).sum(1)),
                           np.sqrt((low[:, :d] ** 2).sum(1)), np.sqrt((low ** 2).sum(1)), full.shape[1])

    def product(self, qs: Bf16Queries, s: int, e: int, out: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The bfloat16 scores of the queries against corpus rows ``s..e`` (a block), as (b, e - s) int16 bits in
        ``out`` (a (b, >= e - s) bfloat16 buffer), and how far each query's exact scores can be from them before
        the product's own rounding to bfloat16: (b,) float64."""
        import torch

        j = s // self.block
        # The extra column's query coordinate is -1, exact in bfloat16: its rounding error is the column's own.
        bound = (qs.rounded_norm * self.err[j] + qs.err * self.norm[j] + self.column_err[j]
                 + _ACCUMULATION * qs.dim * qs.rounded_full_norm * self.rounded_norm[j])
        product = out[:, :e - s]
        torch.mm(qs.x, self.x[s:e].T, out=product)
        return product.view(torch.int16).numpy(), bound

    @staticmethod
    def seed(bits: np.ndarray, bound: np.ndarray, k: int) -> np.ndarray:
        """A lower bound (b,) float64 on each query's ``k``-th best exact score in a block of :meth:`product` (``w``
        > ``k`` columns)."""
        at = bits.shape[1] - k
        # The int16 order is the value order among positive values, which come after every negative one: where
        # the k-th best is positive it is right; elsewhere the row's values are ordered by their keys.
        kth = np.partition(bits, at, axis=1)[:, at].astype(np.int32)
        low = np.flatnonzero(kth <= 0)
        if len(low):
            key = np.partition(_keys(bits[low]), at, axis=1)[:, at]
            kth[low] = np.where(key >= 0, key, -32769 - key)  # back to bits
        value = _values(kth.astype(np.int16))
        return value - bound - _step(value)

    @staticmethod
    def candidates(bits: np.ndarray, bound: np.ndarray,
                   thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every (query, column) of a block of :meth:`product` whose exact score can be at or above the query's
        threshold (``thresholds`` (b,) float64), sorted by query, and maybe a few more.

        Returns:
            ``r``, ``c`` (h,) int64: query and column; ``approx`` (h,) float32: the bfloat16 score; ``err`` (h,)
            float64: how far the exact score can be from it (the bound plus one bfloat16 step of the score).
        """
        key = _round_down_bits(thresholds - bound)
        # After the first blocks most queries have no candidate in a block: find the rows that do from each row's
        # largest entry (for a positive threshold, the int16 order is the value order above zero), and compare
        # only those rows entry by entry.
        positive = key > 0
        rows = np.flatnonzero(~positive | (bits.max(1) >= np.where(positive, key, 0)))
        if 2 * len(rows) > len(bits):  # most rows (a deep margin): compare them all rather than copy them out
            rows = np.arange(len(bits))
        sub = bits if len(rows) == len(bits) else bits[rows]
        lo = np.maximum(key[rows], 0).astype(np.int16)[:, None]
        mask = np.greater_equal(sub, lo)
        if not positive[rows].all():
            # A non-positive threshold: every non-negative score passes, and a negative one (sign bit set, so a
            # negative int16 that grows with the magnitude) passes when its magnitude is at most the threshold's
            # (for a positive threshold, -32768 lets only -0.0 through: a candidate too many does no harm).
            hi = np.where(key[rows] <= 0, -32769 - key[rows], -32768).astype(np.int16)[:, None]
            mask |= sub <= hi
        r, c = sparse_nonzero(mask)
        approx = _values(sub[r, c])
        return rows[r], c, approx, bound[rows[r]] + _step(approx)


@dataclass
class Bf16Queries:
    x: torch.Tensor  # (b, d') bfloat16
    err: np.ndarray  # (b,) ||q - q̂|| over the d vector columns
    rounded_norm: np.ndarray  # (b,) ||q̂||, same columns
    rounded_full_norm: np.ndarray  # (b,) ||q̂|| over all d' columns
    dim: int  # d


def _extend(x: np.ndarray, column: np.ndarray | None) -> np.ndarray:
    """``x`` (n, d) with ``column`` (n,) appended when given, zero-padded to a multiple of 16 columns (``x``
    itself when there is nothing to add)."""
    d = x.shape[1] + (column is not None)
    if d % 16 == 0 and column is None:
        return np.ascontiguousarray(x, np.float32)
    full = np.zeros((len(x), -(-d // 16) * 16), np.float32)
    full[:, :x.shape[1]] = x
    if column is not None:
        full[:, x.shape[1]] = column
    return full


def _keys(bits: np.ndarray) -> np.ndarray:
    """int32 keys of bfloat16 ``bits`` (int16) in the order of their values (-0.0 just below +0.0); a key ``>= 0``
    is its own bits, and ``-32769 - key`` turns a negative one back into bits."""
    wide = bits.astype(np.int32)
    return np.where(wide >= 0, wide, -32769 - wide)


def _values(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 ``bits`` (int16)."""
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _step(value: np.ndarray) -> np.ndarray:
    """float64: one bfloat16 step at each bfloat16 ``value``, the most its rounding moved it (2⁻⁸ at zero; never
    below 2⁻¹³³, the spacing of bfloat16's subnormals)."""
    return np.maximum(np.ldexp(1.0, np.frexp(value)[1] - 8), 2.0**-133)


def round_down_f32(t: np.ndarray) -> np.ndarray:
    """float64 ``t`` as the float32 at or below it."""
    t32 = t.astype(np.float32)
    return np.where(t32 > t, np.nextafter(t32, np.float32(-np.inf)), t32)


def _round_down_bits(t: np.ndarray) -> np.ndarray:
    """The bfloat16 at or below each ``t`` (float64), as an int32 key ordered like the values: the int16 bits for
    a positive value, ``-32769 - bits`` for a negative one or zero (both zeros are -1, negative values lower)."""
    bits = round_down_f32(t).view(np.uint32)
    high = (bits >> 16).astype(np.int64)
    # Dropping the low 16 bits rounds towards zero: down for a positive value, up for a negative one, whose
    # magnitude then goes one step up instead.
    negative = (bits >> 31).astype(bool)
    high = np.where(negative & ((bits & 0xFFFF) != 0), high + 1, high)
    as_int16 = np.where(high >= 0x8000, high - 0x10000, high).astype(np.int16)
    # +0.0 takes -0.0's key, so that a threshold of zero lets both zeros through.
    return np.where(as_int16 == 0, -1, _keys(as_int16))
