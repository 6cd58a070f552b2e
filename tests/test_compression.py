"""Update compression: unbiased (seeded means), on its grid, and the bytes it saves."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rf2.optim.compression import (
    compress_update,
    compressed_bytes,
    quantize,
    update_bytes,
)

X = np.array([0.8, -0.3, 0.05, 0.0, -1.2, 0.4, 2.0, -0.01], dtype=np.float32)  # (8,)
N = 20_000  # independent copies of X: each column's mean estimates E[C(x)]


def copies() -> np.ndarray:
    return np.tile(X, (N, 1))  # (N, 8)


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_quantize_is_unbiased_and_on_the_grid(bits: int) -> None:
    out = quantize(copies(), bits, np.random.default_rng(1))
    step = (X.max() - X.min()) / (2**bits - 1)
    levels = np.unique(np.round((out - X.min()) / step, 3))
    assert len(levels) <= 2**bits and np.allclose(levels, np.round(levels))
    assert out.min() >= X.min() - 1e-6 and out.max() <= X.max() + 1e-6
    # per element variance <= step²/4
    np.testing.assert_allclose(out.mean(axis=0), X, atol=5 * step / 2 / math.sqrt(N) + 1e-6)


@pytest.mark.parametrize(("rate", "bits"), [(0.5, None), (None, 4), (0.7, 2)])
def test_compress_update_is_unbiased(rate: float | None, bits: int | None) -> None:
    delta = {"w": copies(), "b": np.tile(X[:3], (N, 1))}
    out, _ = compress_update(delta, rate, bits, np.random.default_rng(2))
    for k, x in delta.items():
        assert out[k].shape == x.shape and out[k].dtype == x.dtype
        spread = (out[k] - x).std(axis=0).max()
        np.testing.assert_allclose(out[k].mean(axis=0), x[0], atol=5 * spread / math.sqrt(N))


def test_bytes_cut_as_configured() -> None:
    shape = (1000, 64)  # an item table: 64,000 float32 = 256,000 bytes
    dense = compressed_bytes(shape)
    assert dense == 256_000
    assert compressed_bytes(shape, bits=8) == 64_000 + 8  # ~1/4: 8 bits + min and step
    assert compressed_bytes(shape, bits=16) == 128_000 + 8
    # prune 0.9: positions as a bitmap (8,000 B) + 6,400 float32 values (25,600 B)
    assert compressed_bytes(shape, prune_rate=0.9) == 8_000 + 25_600
    assert compressed_bytes(shape, prune_rate=0.9, bits=8) == 8_000 + 6_400 + 8
    # very sparse: int32 indices are cheaper than a bitmap
    assert compressed_bytes(shape, prune_rate=0.99) == 640 * 4 + 640 * 4
    assert compressed_bytes(shape, bits=32) == compressed_bytes(shape, bits=None) == dense
    shapes = {"a": shape, "b": (1000,)}
    assert update_bytes(shapes, bits=8) == 64_008 + 1_008


def test_reported_bytes_follow_the_actual_kept_count() -> None:
    delta = {"w": np.ones((1000, 64), np.float32)}
    out, nbytes = compress_update(delta, 0.99, None, np.random.default_rng(3))
    nnz = int((out["w"] != 0).sum())
    assert nbytes == compressed_bytes((1000, 64), 0.99, None, nnz=nnz)
    assert nbytes == pytest.approx(compressed_bytes((1000, 64), 0.99), rel=0.1)


def test_seeded_and_no_op_when_off() -> None:
    delta = {"w": np.random.default_rng(4).normal(size=(30, 5)).astype(np.float32)}
    a, na = compress_update(delta, 0.5, 4, np.random.default_rng(9))
    b, nb = compress_update(delta, 0.5, 4, np.random.default_rng(9))
    np.testing.assert_array_equal(a["w"], b["w"])
    assert na == nb
    same, n = compress_update(delta, None, None, np.random.default_rng(9))
    np.testing.assert_array_equal(same["w"], delta["w"])
    assert n == delta["w"].nbytes


def test_bad_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="prune_rate"):
        compressed_bytes((3,), prune_rate=1.0)
    with pytest.raises(ValueError, match="bits"):
        quantize(X, 0, np.random.default_rng(0))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
    rate=st.sampled_from([None, 0.0, 0.3, 0.9]),
    bits=st.sampled_from([None, 1, 3, 8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_round_trips(shape: tuple[int, ...], rate: float | None,
                               bits: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    out, nbytes = compress_update({"x": x, "zero": np.zeros(shape, np.float32)}, rate, bits, rng)
    assert out["x"].shape == x.shape and out["x"].dtype == x.dtype
    assert not out["zero"].any()  # a zero update stays zero
    if x.size:
        scale = 1 / (1 - rate) if rate else 1.0
        assert np.abs(out["x"]).max() <= np.abs(x).max() * scale + 1e-5
    assert 0 <= nbytes <= 2 * x.nbytes + 16
