"""Per-tier client settings of RF²'s tier-aware optimizations, as the server applies them.

Maps each user's tier to what its client is told (its :class:`UserTask`: HeteroFL width,
prune rate, quantizer bits, whether to report touched rows) and to what the round costs on the wire (bytes
down and the expected bytes up, for the simulated clock and the traffic log).
"""

from __future__ import annotations

import numpy as np

from rf2.core.config import OptimizationConfig
from rf2.fl.user_task import UserTask
from rf2.hetero.population import Population
from rf2.optim.compression import FLOAT_BYTES, update_bytes
from rf2.optim.heterofl import Spec, extract, rules_for, slice_spec, sub_shapes


class TierSettings:
    def __init__(
        self,
        opt: OptimizationConfig,
        population: Population,
        shapes: dict[str, tuple[int, ...]],
        dim: int,
        width_rules: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        """``width_rules``: the model's HeteroFL rules (``FederatedModel.width_rules``);
        None: guessed from the shapes."""
        self.opt = opt
        self.population = population
        self.shapes = shapes
        self.per_row = opt.per_row_embedding_avg
        rules = rules_for(shapes, dim, width_rules)
        names = population.tier_names
        # Per tier index: HeteroFL slice spec (None = full model), prune rate, bits.
        self.specs: list[Spec | None] = []
        self.bytes_down = np.zeros(len(names))  # (T,)
        self.bytes_up = np.zeros(len(names))  # (T,) expected upload size
        for t, name in enumerate(names):
            width = opt.width.get(name, 1.0)
            spec = slice_spec(shapes, width, rules) if width < 1.0 else None
            self.specs.append(spec)
            tier_shapes = sub_shapes(spec) if spec is not None else shapes
            self.bytes_down[t] = FLOAT_BYTES * sum(int(np.prod(s)) for s in tier_shapes.values())
            self.bytes_up[t] = update_bytes(tier_shapes, opt.prune_rate.get(name),
                                            opt.quant_bits.get(name))

    @property
    def heterofl(self) -> bool:
        return any(spec is not None for spec in self.specs)

    @property
    def custom_aggregation(self) -> bool:
        """HeteroFL and per-row averaging need rf2's own mean (see strategies/merge.py)."""
        return self.heterofl or self.per_row

    def tier_of(self, user: int) -> int:
        return int(self.population.tier_of_user[user])

    def spec_of(self, user: int) -> Spec | None:
        return self.specs[self.tier_of(user)]

    def task_for(self, user: int) -> UserTask:
        """What this user's client is told beyond the round's recipe (its tier's width,
        compression, and whether to report touched rows)."""
        name = self.population.tier_names[self.tier_of(user)]
        prune = self.opt.prune_rate.get(name, 0.0)
        bits = self.opt.quant_bits.get(name, 32)
        return UserTask(
            user=user,
            width=float(self.opt.width.get(name, 1.0)),
            prune_rate=float(prune) if prune > 0.0 else None,
            quant_bits=int(bits) if bits < 32 else None,
            report_touched=self.per_row,
        )

    def reference_arrays(self, user: int, global_arrays: dict[str, np.ndarray]
                         ) -> dict[str, np.ndarray]:
        """What this user's reply must look like (its HeteroFL slice, or the full model)."""
        spec = self.spec_of(user)
        return global_arrays if spec is None else extract(global_arrays, spec)

    def expected_bytes(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) bytes down and expected bytes up per user, for the simulated clock."""
        tiers = self.population.tier_of_user[np.asarray(users, dtype=np.int64)]
        return self.bytes_down[tiers], self.bytes_up[tiers]
