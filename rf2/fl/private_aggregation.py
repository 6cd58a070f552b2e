"""``privacy=dp``: the round's aggregation as client-level DP-FedAvg.

Per round: clip every usable reply's update to C (``rf2.privacy.clipping``) -> the
weighted mean of the clipped replies (uniform weights by default; the same arithmetic as
the plain path, so z = 0 and C = inf give FedAvg's aggregate exactly) -> Gaussian noise
on every element of that mean -> the strategy steps on it (one merged reply, through
``rf2.strategies.merge.aggregate_precomputed``: FedAvg takes it, a server optimizer
steps on the noised pseudo-gradient; the noise comes before the optimizer, so its
output is post-processing) -> adaptive clipping moves C -> the release is recorded at
the round's sampling rate (selected clients / eligible users) and epsilon logged.

Why not Flower's ``DifferentialPrivacyServerSide*Clipping`` wrappers: see
docs/privacy.md (they noise the wrapped strategy's *output*, i.e. after a server
optimizer; they pair arrays by position with full-model replies, not row-sparse ones;
their noise comes from NumPy's global generator, so a resumed run would differ; and
their accountant supports no sampling amplification).

Noise is drawn from a generator seeded by (run seed, round): a resumed run adds the same
noise. The ledger and the adaptive C are saved in checkpoints (:meth:`state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy

from rf2.fl.params import record_to_numpy
from rf2.fl.records import number_in
from rf2.fl.screening import UsableReply
from rf2.optim import sparse
from rf2.privacy.accounting import PrivacyLedger
from rf2.privacy.clipping import AdaptiveClip, add_noise, clip_reply, noise_std
from rf2.privacy.plan import PrivacyPlan
from rf2.strategies.merge import aggregate_precomputed

_NOISE_STREAM = 0xD1FF  # keeps DP noise apart from every other seeded stream


def dense_weighted_mean(clients: Sequence[dict[str, np.ndarray]], weights: Sequence[float]
                        ) -> dict[str, np.ndarray]:
    """Σ_k (w_k / Σw) x_k with Flower's FedAvg arithmetic (factors as Python floats, each
    array in its own dtype), so an unclipped, unnoised round equals Flower's mean bit for bit."""
    total = sum(weights)
    out: dict[str, np.ndarray] = {}
    for arrays, w in zip(clients, weights, strict=True):
        factor = w / total
        for key, value in arrays.items():
            if key not in out:
                out[key] = np.asarray(value) * factor
            else:
                out[key] += np.asarray(value) * factor
    return out


class PrivateAggregator:
    def __init__(self, plan: PrivacyPlan, strategy: Strategy, seed: int) -> None:
        self.plan = plan
        self.strategy = strategy
        self.seed = seed
        self.ledger = PrivacyLedger(plan.delta, plan.accountant)
        self.clip = (AdaptiveClip(plan.clip_norm, plan.target_quantile, plan.clip_lr,
                                  plan.count_std)
                     if plan.adaptive and plan.clip_norm is not None else None)
        self.clip_norm = plan.clip_norm  # C of the next round

    def aggregate(self, rnd: int, g: dict[str, np.ndarray], usable: list[UsableReply],
                  num_selected: int) -> tuple[Any, Any, dict[str, float]]:
        """(new global arrays or None, the strategy's metrics, the ``dp/...`` row keys)."""
        plan = self.plan
        if any(getattr(r, "partial", None) is not None for r in usable):
            # Clipping bounds each user's contribution: a reply that sums several users'
            # updates (partial aggregation inside a message) cannot be clipped per user.
            raise RuntimeError("privacy=dp needs each client's own update; a message replied "
                               "a partial sum (partial aggregation must be off under DP)")
        rng = np.random.default_rng([self.seed, rnd, _NOISE_STREAM])
        clip_norm = self.clip_norm
        clipped = [clip_reply(r.arrays, g, clip_norm) for r in usable]
        replies = [r.message for r in usable]
        weights = ([1.0] * len(usable) if plan.uniform
                   else [float(number_in(m.content, "metrics", "num-examples")) for m in replies])
        std = noise_std(plan.update_noise_multiplier, clip_norm, weights)

        def noised_mean() -> dict[str, np.ndarray]:
            arrays = [c.arrays for c in clipped]
            if any(sparse.is_sparse(a) for a in arrays):
                mean = sparse.weighted_mean(g, [sparse.decode(a) for a in arrays], weights)
            else:
                mean = dense_weighted_mean(arrays, weights)
            return add_noise(mean, std, rng)

        def per_client() -> list[dict[str, np.ndarray]]:
            raise AssertionError("privacy=dp runs only strategies that take a mean")

        arrays, metrics = aggregate_precomputed(self.strategy, rnd, replies, noised_mean,
                                                per_client)
        norms = [c.norm for c in clipped]
        row = {
            "dp/clip_norm": float("inf") if clip_norm is None else float(clip_norm),
            "dp/noise_std": std,
            "dp/clipped_fraction": float(np.mean([c.factor < 1.0 for c in clipped])),
            "dp/update_norm_median": float(np.median(norms)),
        }
        if self.clip is not None:
            row["dp/unclipped_fraction_noised"] = self.clip.update(norms, rng)
            self.clip_norm = self.clip.clip_norm
        rate = min(1.0, num_selected / plan.population)
        self.ledger.record(rate, plan.noise_multiplier)
        row["dp/sampling_rate"] = rate
        return (None if arrays is None else record_to_numpy(arrays)), metrics, row

    def row(self) -> dict[str, float]:
        """Keys logged every round (also rounds without a release)."""
        return {"dp/epsilon": self.ledger.epsilon(), "dp/delta": self.plan.delta,
                "dp/noise_multiplier": self.plan.noise_multiplier,
                "dp/releases": float(self.ledger.releases)}

    def state_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger.state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger = PrivacyLedger.from_state(state["ledger"])
        self.clip_norm = state["clip_norm"]
        if self.clip is not None and self.clip_norm is not None:
            self.clip.clip_norm = float(self.clip_norm)
