"""DP-FedAvg's array maths: clip each client's update, noise the aggregate, adapt C.

A client's update is Δ_k = x_k − w_t over every parameter. Clipping scales it to L2 norm
at most C: Δ_k ← Δ_k · min(1, C / ||Δ_k||). A row-sparse reply (``rf2.optim.sparse``)
holds Δ_k only on its rows (zero elsewhere), so its norm is taken over those rows and
the whole parameters; clipping rescales the same rows. An update that is not clipped is
left bit-for-bit as it came (so C = ∞ changes nothing).

The server adds N(0, σ²) to every element of the (dense) weighted mean of the clipped
updates, σ = z · C · max_k(w_k / Σ w): with uniform weights, z C / m for m clients
(McMahan et al. 2018). Every element gets noise, also rows no client touched: rows left
exact would reveal which items the round's users clicked.

Adaptive clipping (Andrew et al. 2021): C follows the γ-quantile of update norms,
C ← C · exp(−η (b̄ − γ)), b̄ = (#{k: ||Δ_k|| ≤ C} + N(0, σ_b²)) / m. Releasing the noised
count costs privacy too; the update noise uses z_Δ = (z⁻² − (2 σ_b)⁻²)^(−1/2), so the pair
together is as private as one Gaussian release with multiplier z (their Theorem 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from rf2.optim import sparse

Arrays = Mapping[str, np.ndarray]

__all__ = ["AdaptiveClip", "ClippedReply", "add_noise", "clip_reply", "noise_std",
           "split_noise_multiplier", "update_norm"]


def update_norm(arrays: Arrays, global_arrays: Arrays) -> float:
    """||x_k − w_t||₂ over every parameter of a reply (dense or row-sparse), in float64."""
    total = 0.0
    if sparse.is_sparse(arrays):
        upd = sparse.decode(arrays)
        for name, rows in upd.rows.items():
            d = upd.values[name].astype(np.float64) - np.asarray(global_arrays[name])[rows]
            total += float(np.sum(d * d))
        dense: Mapping[str, np.ndarray] = upd.dense
    else:
        dense = arrays
    for name, value in dense.items():
        d = np.asarray(value, dtype=np.float64) - np.asarray(global_arrays[name], dtype=np.float64)
        total += float(np.sum(d * d))
    return math.sqrt(total)


@dataclass(frozen=True)
class ClippedReply:
    arrays: dict[str, np.ndarray]  # the reply with its update clipped (same format)
    norm: float  # ||Δ_k|| before clipping
    factor: float  # the scale applied to Δ_k (1.0: left as it came)


def clip_reply(arrays: Arrays, global_arrays: Arrays, clip_norm: float | None) -> ClippedReply:
    """The reply with Δ_k scaled to norm <= ``clip_norm`` (None = C = ∞: no clipping).

    Clipped values are w_t + factor · Δ_k in float64, stored in the reply's dtype."""
    norm = update_norm(arrays, global_arrays)
    if clip_norm is None or norm <= clip_norm:
        return ClippedReply(dict(arrays), norm, 1.0)
    factor = clip_norm / norm

    def scaled(value: np.ndarray, base: np.ndarray) -> np.ndarray:
        base64 = np.asarray(base, dtype=np.float64)
        out = base64 + factor * (np.asarray(value, dtype=np.float64) - base64)
        return out.astype(np.asarray(value).dtype)

    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key.endswith(sparse.ROWS):
            out[key] = value
        elif key.endswith(sparse.VALUES):
            name = key[: -len(sparse.VALUES)]
            out[key] = scaled(value, np.asarray(global_arrays[name])[arrays[name + sparse.ROWS]])
        else:
            out[key] = scaled(value, global_arrays[key])
    return ClippedReply(out, norm, factor)


def noise_std(noise_multiplier: float, clip_norm: float | None, weights: Sequence[float]
              ) -> float:
    """σ of the noise on the weighted mean: z · C · the largest normalised weight (one
    client's largest possible share of the mean). 0 when z = 0."""
    if noise_multiplier == 0:
        return 0.0
    if clip_norm is None:
        raise ValueError("noise needs a finite clip norm")
    w = np.asarray(weights, dtype=np.float64)
    return float(noise_multiplier * clip_norm * w.max() / w.sum())


def add_noise(mean: Arrays, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``mean`` + N(0, std²) on every element, in each array's dtype (std 0: unchanged)."""
    if std == 0:
        return dict(mean)
    out = {}
    for name in sorted(mean):  # a fixed order: the same noise for the same seed
        value = np.asarray(mean[name])
        out[name] = (value + rng.normal(0.0, std, size=value.shape)).astype(value.dtype)
    return {name: out[name] for name in mean}


def split_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """z_Δ for the update when the clipped count is released with std σ_b (Andrew et al.):
    (z⁻² − (2 σ_b)⁻²)^(−1/2). Needs z < 2 σ_b."""
    if noise_multiplier == 0:
        return 0.0
    if noise_multiplier >= 2 * count_std:
        raise ValueError(f"noise multiplier {noise_multiplier} needs a clipped-count std "
                         f"above {noise_multiplier / 2}, got {count_std}")
    return float((noise_multiplier ** -2 - (2 * count_std) ** -2) ** -0.5)


@dataclass
class AdaptiveClip:
    """Andrew et al.'s geometric update of C towards the γ-quantile of update norms."""

    clip_norm: float  # C for the next round
    target_quantile: float  # γ
    learning_rate: float  # η_C
    count_std: float  # σ_b of the noised unclipped count (0: exact count)

    def update(self, norms: Sequence[float], rng: np.random.Generator) -> float:
        """Step C from this round's norms (clipped against the current C); returns b̄."""
        norms_arr = np.asarray(norms, dtype=np.float64)
        unclipped = float(np.sum(norms_arr <= self.clip_norm))
        noisy = unclipped + (rng.normal(0.0, self.count_std) if self.count_std > 0 else 0.0)
        fraction = noisy / max(norms_arr.size, 1)
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return fraction
