"""Client faults: injecting them (for tests and drills) and screening replies for them.

A reply is excluded from aggregation when its client raised, returned NaN/Inf, or
returned arrays whose names or shapes differ from the global model's. Each exclusion is
counted per round under ``fault/<reason>``.
"""

from __future__ import annotations

import time

import numpy as np

FAULT_REASONS = ("client_error", "non_finite", "wrong_shape", "timeout")


class InjectedClientError(RuntimeError):
    """Raised on purpose by a client told to fail."""


def apply_injected_fault(kind: str | None, hang_s: float, arrays: dict[str, np.ndarray]
                         ) -> dict[str, np.ndarray]:
    """Corrupt this client's reply as the server's injected fault ``kind`` says (None:
    none; ``hang``: sleep ``hang_s`` seconds first)."""
    if not kind:
        return arrays
    if kind == "raise":
        raise InjectedClientError("injected client fault")
    if kind == "hang":
        time.sleep(hang_s)
        return arrays
    # The first non-empty array (a sparse reply may hold no rows of some table).
    first = next((k for k, v in arrays.items() if np.size(v)), next(iter(arrays)))
    out = dict(arrays)
    if kind == "nan":
        bad = out[first].astype(np.float32, copy=True)
        bad.reshape(-1)[0] = np.nan
        out[first] = bad
    elif kind == "shape":
        out[first] = np.zeros(tuple(s + 1 for s in out[first].shape), dtype=out[first].dtype)
    return out


def screen_reply(
    arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> str | None:
    """Return the fault reason for a client's arrays, or None if they are usable."""
    if set(arrays) != set(reference):
        return "wrong_shape"
    for key, ref in reference.items():
        if arrays[key].shape != ref.shape:
            return "wrong_shape"
    for value in arrays.values():
        if not np.isfinite(value).all():
            return "non_finite"
    return None
