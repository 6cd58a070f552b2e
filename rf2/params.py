"""Model parameters <-> Flower ArrayRecord, keeping a fixed, named key order."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Trainable global state (state_dict without non-persistent buffers) as numpy."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def load_numpy_into(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
    model.load_state_dict(state, strict=True)


def num_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
