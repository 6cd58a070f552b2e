"""Model parameters <-> Flower ArrayRecord, keeping a fixed, named key order.

Two codecs, chosen by ``simulation.fast_transport`` (:func:`use_fast_arrays`, set per
process by the launcher and by each client worker):

* fast (default): :class:`FastArray`, an ``Array`` that keeps its ndarray and builds the
  ``.npy`` bytes only if read; decoding reads the payload without ``np.load``. It writes
  ``Array``'s ``__dict__`` directly, so ``rf2.fl.fast_transport`` checks it against a
  stock ``Array`` before a run.
* stock: ``flwr.app.Array(ndarray)`` and ``Array.numpy()``, public API only.

Both give the same arrays bit for bit (tested), hence the same ``metrics.jsonl``.
"""

from __future__ import annotations

import io
import math
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_FAST = [True]  # this process's codec (a list: set in place by use_fast_arrays)


def use_fast_arrays(enabled: bool) -> None:
    """Pick this process's codec: :class:`FastArray` (True) or stock ``Array`` (False)."""
    _FAST[0] = bool(enabled)


def fast_arrays_enabled() -> bool:
    return _FAST[0]


def _user_state(model: torch.nn.Module) -> set[str]:
    names = getattr(model, "user_state_names", None)
    return set(names()) if callable(names) else set()


def state_to_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The federated state as numpy: state_dict without non-persistent buffers and
    without per-user state (``FederatedModel.user_state_names``: never sent)."""
    own = _user_state(model)
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()
            if k not in own}


@lru_cache(maxsize=256)
def _npy_header(dtype_str: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of this dtype/shape."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype_str)),
                 "fortran_order": False, "shape": shape}
    )
    return buffer.getvalue()


class FastArray(Array):
    """A Flower ``Array`` that keeps the numpy array it was made from.

    ``data`` (the ``.npy`` bytes Flower's format defines) is built only when something
    reads it: Flower's object store or a transport that needs bytes. In-process, a
    client's reply and the server's global model are never serialised at all, and
    ``numpy()`` / :func:`array_to_numpy` hand back the array itself; over Ray the array
    pickles as an ndarray (out-of-band buffers), not as a bytes copy. Same dtype, shape,
    stype and bytes as ``Array(ndarray)`` (tested).
    """

    @classmethod
    def wrap(cls, value: np.ndarray) -> FastArray:
        value = np.require(value, requirements="C")
        value.flags.writeable = False  # shared by reference from here on
        array = cls.__new__(cls)
        # Straight into __dict__: Array's __setattr__ would drop caches we do not have.
        array.__dict__.update(dtype=str(value.dtype), shape=tuple(int(d) for d in value.shape),
                              stype="numpy.ndarray", _source=value)
        return array

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - only ever bytes here
        # Called only for attributes not in __dict__: build ``data`` on first use.
        source = self.__dict__.get("_source")
        if name != "data" or source is None:
            raise AttributeError(name)
        data = _npy_header(source.dtype.str, tuple(source.shape)) + source.tobytes()
        self.__dict__["data"] = data
        return data

    def numpy(self) -> np.ndarray:
        # A writable copy, as np.load returns.
        return np.array(self.__dict__["_source"], copy=True)


def numpy_to_array(value: np.ndarray) -> Array:
    """``Array(value)``; fast: without ``np.save``, the bytes made only if ever needed.

    ``value`` must not be modified afterwards (fast: it is marked read-only).
    """
    if not _FAST[0]:
        return Array(np.ascontiguousarray(value))
    return FastArray.wrap(value)


def numpy_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    # Item by item: ArrayRecord(dict) would rebuild every value as a plain Array.
    record = ArrayRecord()
    for key, value in arrays.items():
        record[key] = numpy_to_array(value)
    return record


def array_to_numpy(array: Array) -> np.ndarray:
    """Read-only view of an Array's data without ``np.load``'s header parsing.

    Flower stores an Array as ``.npy`` bytes; ``Array.numpy()`` re-parses the header
    with ``ast.literal_eval`` on every call (~0.4 ms, as much as a client's training
    step here). The payload of a C-ordered array is the last ``nbytes`` of the data, so
    dtype and shape from the Array's own metadata suffice. Stock codec: ``Array.numpy()``.
    """
    if not _FAST[0]:
        return array.numpy()
    source = array.__dict__.get("_source")
    if source is not None:
        return source
    data = array.data
    dtype = np.dtype(array.dtype)
    nbytes = math.prod(array.shape) * dtype.itemsize
    head = bytes(data[: min(len(data) - nbytes, 256)])
    if array.stype != "numpy.ndarray" or b"'fortran_order': False" not in head:
        return Array.numpy(array)
    return np.frombuffer(data, dtype=dtype, offset=len(data) - nbytes).reshape(array.shape)


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: array_to_numpy(a) for k, a in record.items()}


def load_numpy_into(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the model's state in place (names and shapes must match;
    per-user state may be absent and is then left as it is).

    One copy per tensor, straight from the (possibly read-only) buffer: the hot path of
    every client call.
    """
    state = model.state_dict()
    own = _user_state(model)
    if own:
        state = {k: v for k, v in state.items() if k not in own or k in arrays}
    if set(state) != set(arrays):
        missing, extra = sorted(set(state) - set(arrays)), sorted(set(arrays) - set(state))
        raise KeyError(f"state mismatch: missing {missing}, unexpected {extra}")
    with torch.no_grad(), warnings.catch_warnings():
        # torch warns on read-only buffers; we only read from them.
        warnings.simplefilter("ignore", UserWarning)
        for key, tensor in state.items():
            source = torch.from_numpy(np.asarray(arrays[key]))
            if source.shape != tensor.shape:
                raise ValueError(f"{key}: shape {tuple(source.shape)} != {tuple(tensor.shape)}")
            tensor.copy_(source)


def num_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))
