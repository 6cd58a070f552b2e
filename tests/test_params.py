"""Model parameters <-> Flower records: rf2's fast path must match Flower's format."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import ray.cloudpickle
import torch
from flwr.app import Array, ArrayRecord

from rf2.fl.params import (
    FastArray,
    array_to_numpy,
    load_numpy_into,
    numpy_to_array,
    numpy_to_record,
    record_to_numpy,
    state_to_numpy,
)

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(2.5, dtype=np.float64),  # 0-d
    np.zeros((0, 5), dtype=np.float32),
    np.arange(10, dtype=np.int64),
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),  # made C-ordered
]


@pytest.mark.parametrize("value", CASES, ids=lambda v: f"{v.dtype}{v.shape}")
def test_fast_array_has_flowers_metadata_and_bytes(value: np.ndarray) -> None:
    fast, flower = numpy_to_array(value.copy()), Array(np.require(value, requirements="C"))
    assert (fast.dtype, fast.shape, fast.stype) == (flower.dtype, flower.shape, flower.stype)
    assert fast.data == flower.data  # built lazily, byte for byte np.save's
    np.testing.assert_array_equal(Array.numpy(fast), value)  # Flower's own decoder reads it
    np.testing.assert_array_equal(array_to_numpy(flower), value)  # ours reads Flower's


def test_fast_array_serves_its_array_without_serialising() -> None:
    value = np.arange(6, dtype=np.float32)
    fast = numpy_to_array(value)
    assert "data" not in fast.__dict__
    assert array_to_numpy(fast) is value and not value.flags.writeable
    copy = fast.numpy()  # Array.numpy() contract: a fresh, writable array
    copy[0] = 99.0
    assert copy.flags.writeable and value[0] == 0.0
    assert "data" not in fast.__dict__


@pytest.mark.parametrize("dumps", [pickle.dumps, ray.cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_fast_array_pickles_as_ray_ships_it(dumps) -> None:  # noqa: ANN001
    record = numpy_to_record({"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.float64)})
    back = pickle.loads(dumps(record))
    assert isinstance(back["a"], FastArray)
    out = record_to_numpy(back)
    np.testing.assert_array_equal(out["a"], np.arange(4, dtype=np.float32))
    assert back["b"].data == Array(np.ones((2, 2), np.float64)).data


def test_state_roundtrip_through_a_record_restores_the_model() -> None:
    torch.manual_seed(0)
    src, dst = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    load_numpy_into(dst, record_to_numpy(numpy_to_record(state_to_numpy(src))))
    for key, tensor in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], tensor)
    with pytest.raises(KeyError, match="missing"):
        load_numpy_into(dst, {"weight": np.zeros((2, 3), np.float32)})


def test_an_aggregated_flower_record_decodes_with_the_fast_reader() -> None:
    record = ArrayRecord({"w": Array(np.full((2, 2), 3.0, np.float32))})
    np.testing.assert_array_equal(record_to_numpy(record)["w"], np.full((2, 2), 3.0, np.float32))
