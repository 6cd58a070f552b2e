"""A run's DP settings resolved against its population: delta, the noise multiplier
(given, or solved for ``target_epsilon``), adaptive clipping's noise split."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rf2.core.config import PrivacyConfig
from rf2.core.errors import ConfigError
from rf2.privacy.accounting import Kind, epsilon_of, solve_noise_multiplier
from rf2.privacy.clipping import split_noise_multiplier


@dataclass(frozen=True)
class PrivacyPlan:
    noise_multiplier: float  # z of the whole release (what the accountant composes)
    update_noise_multiplier: float  # z_Δ on the update (= z with fixed clipping)
    clip_norm: float | None  # C, or the initial C (adaptive); None = no clipping
    adaptive: bool
    target_quantile: float
    clip_lr: float
    count_std: float  # σ_b of the noised unclipped count (adaptive)
    delta: float
    accountant: Kind
    uniform: bool  # uniform weights (else FedAvg's num-examples weights)
    population: int  # eligible users: the sampling rate's denominator
    expected_rate: float  # expected selected / population (what target_epsilon assumes)


def plan_privacy(cfg: PrivacyConfig, population: int, expected_selected: int,
                 num_rounds: int, clients_per_round: int) -> PrivacyPlan:
    """Resolve ``cfg`` (``name: dp``); raises ConfigError for settings that cannot hold."""
    if population < 1:
        raise ConfigError("privacy.name", cfg.name, "none when no user is eligible for training")
    delta = cfg.delta if cfg.delta is not None else 1.0 / population
    rate = min(1.0, expected_selected / population)
    z = cfg.noise_multiplier
    if cfg.target_epsilon is not None:
        try:
            z = solve_noise_multiplier(cfg.target_epsilon, rate, num_rounds, delta,
                                       cfg.accountant)
        except Exception:  # noqa: BLE001 - dp-accounting found no bracket: unreachable
            z = math.inf
        reached = (epsilon_of([(rate, z, num_rounds)], delta, cfg.accountant)
                   if math.isfinite(z) else math.inf)
        if reached > cfg.target_epsilon * 1.001:
            raise ConfigError("privacy.target_epsilon", cfg.target_epsilon,
                              f"an epsilon reachable in {num_rounds} rounds at sampling rate "
                              f"{rate:.4g} and delta {delta:.3g} (got {reached:.4g})")
    count_std = (cfg.clipped_count_stddev if cfg.clipped_count_stddev is not None
                 else clients_per_round / 20)
    update_z = z
    if cfg.clipping == "adaptive":
        try:
            update_z = split_noise_multiplier(z, count_std)
        except ValueError:
            raise ConfigError("privacy.clipped_count_stddev", cfg.clipped_count_stddev,
                              f"null or a number > noise_multiplier / 2 = {z / 2:.4g} with "
                              "clipping=adaptive (the count's noise is part of the budget)"
                              ) from None
    return PrivacyPlan(
        noise_multiplier=z, update_noise_multiplier=update_z, clip_norm=cfg.clip_norm,
        adaptive=cfg.clipping == "adaptive", target_quantile=cfg.target_quantile,
        clip_lr=cfg.clip_lr, count_std=count_std if cfg.clipping == "adaptive" else 0.0,
        delta=delta, accountant=cfg.accountant, uniform=cfg.weighting == "uniform",
        population=population, expected_rate=rate)
