"""How every rf2 strategy samples: not at all (rf2 selects clients itself).

rf2 selects clients seeded and by partition id (``rf2.fl.selection``) and shows the
strategy exactly those nodes (``rf2.fl.round_grid``), because Flower's own sampling is not
reproducible (flower issue 3328). So a strategy takes every node it is shown, never
waits for a minimum, and skips Flower's client-side evaluation (rf2 evaluates on the
server, over all users).
"""

from __future__ import annotations

from typing import Any

SAMPLING: dict[str, Any] = {
    "fraction_train": 1.0,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 0,
    "min_evaluate_nodes": 0,
    "min_available_nodes": 0,
}
