"""Traffic accounting: per tier, who trained, on how many examples, and the bytes moved.

Counts only the usable replies (those aggregated): bytes down what the client had to
receive (``rf2.fl.download``: the rows its loss reads when replies are sparse, else the
whole model at its tier's HeteroFL width), bytes up what the client reports after
pruning / quantization (a summed user: the reply it would have sent alone).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from rf2.fl.records import number_in
from rf2.fl.screening import UsableReply
from rf2.fl.tier_settings import TierSettings


class TrafficMeter:
    def __init__(self, tiers: TierSettings, num_examples: np.ndarray) -> None:
        self.tiers = tiers
        self.num_examples = num_examples  # (num_users,) local training examples per user

    def row(self, usable: list[UsableReply], bytes_down: Mapping[int, float] | None = None
            ) -> dict[str, float]:
        """``tier/<t>/{trained,examples,examples_share,bytes_down,bytes_up}`` and the
        round's total ``bytes_down`` / ``bytes_up``. ``bytes_down``: each user's download
        this round (``rf2.fl.download``); absent users: their tier's model size."""
        names = self.tiers.population.tier_names
        out: dict[str, float] = {}
        for name in names:
            for what in ("trained", "examples", "bytes_down", "bytes_up"):
                out[f"tier/{name}/{what}"] = 0
        for r in usable:
            tier = self.tiers.tier_of(r.user)
            t = names[tier]
            out[f"tier/{t}/trained"] += 1
            out[f"tier/{t}/examples"] += int(self.num_examples[r.user])
            down = bytes_down.get(r.user) if bytes_down is not None else None
            out[f"tier/{t}/bytes_down"] += int(self.tiers.bytes_down[tier] if down is None else down)
            out[f"tier/{t}/bytes_up"] += int(number_in(r.message.content, "metrics", "bytes-up"))
        total = sum(out[f"tier/{n}/examples"] for n in names) or 1
        for name in names:
            out[f"tier/{name}/examples_share"] = out[f"tier/{name}/examples"] / total
        out["bytes_up"] = sum(out[f"tier/{n}/bytes_up"] for n in names)
        out["bytes_down"] = sum(out[f"tier/{n}/bytes_down"] for n in names)
        return out
