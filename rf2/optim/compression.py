"""Unbiased compression of a client's model update (RF²'s per-tier pruning/quantization).

Applied to the *update* Δ = w_local − w_global, never to the weights: an update is small
and zero-centred, so a coarse grid loses little, while weights would lose their scale.

Both operators are unbiased, E[C(Δ)] = Δ, so the FedAvg mean of compressed updates is an
unbiased estimate of the uncompressed mean; compression only adds variance. That
variance lands on the tiers that are compressed (RF²: the low tier), which is exactly
the fairness cost this simulator measures.

* Random sparsification: keep each element with probability 1 − p and scale it by
  1 / (1 − p). (RF²'s code zeroes without rescaling, which shrinks low-tier updates by
  (1 − p) on average; we rescale so pruning trades variance, not bias.)
* Stochastic quantization to b bits (QSGD-style, as in RF²'s code): 2^b evenly spaced
  levels spanning [min Δ, max Δ] of the tensor, each value rounded up or down at random
  with the probability that keeps its mean. Min/max (two floats per tensor) gives a
  tighter grid than ±max|Δ|, hence less variance, at 4 extra bytes.

:func:`compressed_bytes` counts what would really cross the network, so the traffic
saving shows in the clock and in the per-tier byte counters:

* dense float32: 4 bytes per element;
* sparse: the kept positions, as a bitmap (1 bit per element) or as int32 indices,
  whichever is smaller, plus the kept values;
* quantized: ``bits`` per value plus 8 bytes per tensor (float32 minimum and step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

FLOAT_BYTES = 4  # float32 values on the wire
INDEX_BYTES = 4  # int32 positions of kept elements
QUANT_HEADER_BYTES = 2 * FLOAT_BYTES  # per quantized tensor: minimum and step


def _active_rate(prune_rate: float | None) -> float:
    rate = 0.0 if prune_rate is None else float(prune_rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"prune_rate must be in [0, 1), got {prune_rate}")
    return rate


def _active_bits(bits: int | None) -> int | None:
    """None when values travel as plain float32 (no bits given, or >= 32 bits)."""
    if bits is None or bits >= 32:
        return None
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return int(bits)


def quantize(x: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding onto 2^bits levels spanning [min x, max x]: E[q(x)] = x."""
    b = _active_bits(bits)
    if b is None or x.size == 0:
        return np.array(x, copy=True)
    values = np.asarray(x, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi == lo:  # a constant tensor is exact on any grid
        return np.array(x, copy=True)
    intervals = 2**b - 1
    step = (hi - lo) / intervals
    scaled = (values - lo) / step  # in [0, intervals]
    floor = np.floor(scaled)
    level = floor + (rng.random(x.shape) < (scaled - floor))  # round up w.p. the remainder
    level = np.clip(level, 0, intervals)
    return (lo + level * step).astype(x.dtype, copy=False)


def compressed_bytes(
    shape: tuple[int, ...],
    prune_rate: float | None = None,
    bits: int | None = None,
    nnz: int | None = None,
) -> int:
    """Bytes on the wire for one tensor of ``shape``.

    ``nnz`` is the number of kept elements after sparsification; when None, its
    expectation ceil((1 − p) n) is used (what the clock needs before training).
    """
    n = math.prod(shape)
    rate = _active_rate(prune_rate)
    b = _active_bits(bits)
    if rate > 0.0:
        kept = math.ceil(round((1.0 - rate) * n, 9)) if nnz is None else int(nnz)
        positions = min(math.ceil(n / 8), kept * INDEX_BYTES)  # bitmap or int32 indices
    else:
        kept, positions = n, 0
    if b is None:
        values = kept * FLOAT_BYTES
    else:
        values = math.ceil(kept * b / 8) + (QUANT_HEADER_BYTES if kept else 0)
    return int(positions + values)


def update_bytes(
    shapes: Mapping[str, tuple[int, ...]],
    prune_rate: float | None = None,
    bits: int | None = None,
) -> int:
    """Expected wire size of a whole update (e.g. a tier's upload size for the clock)."""
    return sum(compressed_bytes(tuple(s), prune_rate, bits) for s in shapes.values())


def compress_update(
    delta: Mapping[str, np.ndarray],
    prune_rate: float | None,
    bits: int | None,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], int]:
    """Compress then decompress an update; return (unbiased Δ̂, bytes on the wire).

    Sparsification runs first, then only the kept values are quantized (the grid spans
    the kept values, already scaled by 1/(1 − p)). Tensors are processed in key order,
    so the result is a pure function of ``delta`` and the generator's state.
    """
    rate = _active_rate(prune_rate)
    b = _active_bits(bits)
    out: dict[str, np.ndarray] = {}
    total = 0
    for name, x in delta.items():
        flat = np.asarray(x).reshape(-1)  # (n,)
        if rate > 0.0:
            keep = rng.random(flat.shape) >= rate  # (n,)
            values = flat[keep] / (1.0 - rate)  # (nnz,)
        else:
            keep = None
            values = flat
        if b is not None:
            values = quantize(values, b, rng)
        if keep is None:
            restored = np.array(values, dtype=flat.dtype, copy=True)
        else:
            restored = np.zeros_like(flat)
            restored[keep] = values
        out[name] = restored.reshape(np.shape(x))
        nnz = int(values.size)
        total += compressed_bytes(tuple(np.shape(x)), rate, b, nnz=nnz)
    return out, total
