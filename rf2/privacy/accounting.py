"""(epsilon, delta) of DP-FedAvg's releases with Google's ``dp-accounting``.

Each aggregation that reaches the model is one sampled Gaussian mechanism:
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with q = the round's selected clients /
the eligible population and z the noise multiplier (the noise std over the clip norm C
of one user's contribution). rf2 selects a fixed-size cohort by walking a shuffled list,
not by Poisson sampling; like pfl-research and TensorFlow Federated, the accounting
treats the round as Poisson-sampled at rate q (the usual approximation). Consecutive
rounds with the same (q, z) are composed as one self-composed event, so a run at constant
q gets exactly the number ``dp-accounting`` gives for (z, q, T, delta).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    import dp_accounting

# dp-accounting is imported where it is used: it pulls in scipy (~1.5 s on this machine),
# which a run without DP (rf2's server imports this module) never needs.

Kind = Literal["rdp", "pld"]
__all__ = ["Kind", "PrivacyLedger", "epsilon_of", "solve_noise_multiplier"]


@contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs (through absl) a warning per fractional RDP order whose series
    does not converge at small z; it leaves that order out of the minimum over orders,
    which only loosens the bound. One line per order per round would flood the console."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _accountant(kind: Kind) -> dp_accounting.PrivacyAccountant:
    from dp_accounting import pld, rdp

    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise ValueError(f"unknown accountant {kind!r}; allowed: rdp, pld")


def _event(q: float, z: float) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))


def epsilon_of(steps: Sequence[tuple[float, float, int]], delta: float, kind: Kind = "rdp"
               ) -> float:
    """epsilon at ``delta`` after ``steps``: (q, z, count) groups composed in order.
    0 with no step; inf when some z is 0 (no noise: no privacy)."""
    if not steps:
        return 0.0
    if any(z <= 0 for _, z, _ in steps):
        return math.inf
    acc = _accountant(kind)
    with _quiet():
        for q, z, count in steps:
            acc.compose(_event(q, z), int(count))
        return float(acc.get_epsilon(delta))


def solve_noise_multiplier(target_epsilon: float, q: float, steps: int, delta: float,
                           kind: Kind = "rdp") -> float:
    """The smallest z whose ``steps`` releases at rate ``q`` stay within ``target_epsilon``
    at ``delta`` (dp-accounting's ``calibrate_dp_mechanism``, tolerance 1e-4)."""
    import dp_accounting

    with _quiet():
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: _accountant(kind),
            lambda z: dp_accounting.SelfComposedDpEvent(_event(q, z), steps),
            target_epsilon, delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0), tol=1e-4))


@dataclass
class PrivacyLedger:
    """The releases of one run so far, as (q, z, count) groups; JSON-able for checkpoints.

    :meth:`epsilon` is cheap every round: with RDP, each distinct (q, z) has its RDP
    curve computed once and the total is sum(count * curve), which is exactly what
    ``RdpAccountant.compose(event, count)`` adds; with PLD, one live accountant composes
    each new release once (PLD is tighter but ~10x slower per release).
    """

    delta: float
    kind: Kind = "rdp"
    steps: list[tuple[float, float, int]] = field(default_factory=list)
    _curves: dict[tuple[float, float], object] = field(default_factory=dict, repr=False)
    _pld: dp_accounting.PrivacyAccountant | None = field(default=None, repr=False)
    _pld_releases: int = field(default=0, repr=False)

    def record(self, q: float, z: float) -> None:
        if self.steps and self.steps[-1][:2] == (q, z):
            last = self.steps[-1]
            self.steps[-1] = (last[0], last[1], last[2] + 1)
        else:
            self.steps.append((q, z, 1))

    @property
    def releases(self) -> int:
        return sum(c for _, _, c in self.steps)

    def epsilon(self) -> float:
        with _quiet():
            return self._epsilon()

    def _epsilon(self) -> float:
        if not self.steps:
            return 0.0
        if any(z <= 0 for _, z, _ in self.steps):
            return math.inf
        if self.kind == "pld":
            return self._pld_epsilon()
        from dp_accounting import rdp

        orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, dtype=np.float64)
        total = np.zeros_like(orders)
        for q, z, count in self.steps:
            curve = self._curves.get((q, z))
            if curve is None:
                acc = rdp.RdpAccountant()
                acc.compose(_event(q, z), 1)
                curve = self._curves[(q, z)] = acc.rdp
            total += count * curve  # type: ignore[operator]
        return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, total, self.delta)[0])

    def _pld_epsilon(self) -> float:
        if self._pld is None:
            self._pld, self._pld_releases = _accountant("pld"), 0
        done = 0
        for q, z, count in self.steps:  # compose only the releases not composed yet
            new = min(count, max(0, done + count - self._pld_releases))
            if new:
                self._pld.compose(_event(q, z), new)
                self._pld_releases += new
            done += count
        return float(self._pld.get_epsilon(self.delta))

    def state_dict(self) -> dict[str, object]:
        return {"delta": self.delta, "kind": self.kind, "steps": [list(s) for s in self.steps]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyLedger:  # state_dict() after a JSON trip
        steps = [(float(q), float(z), int(c)) for q, z, c in state["steps"]]
        return cls(float(state["delta"]), state["kind"], steps)
