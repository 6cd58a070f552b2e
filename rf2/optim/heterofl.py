"""HeteroFL sub-models (Diao et al., ICLR 2021), as RF² applies them to low-end tiers.

A client at width r trains a narrower copy of the global model: every "width" axis of a
parameter keeps its first ceil(r·d) entries (nested top-left slices). For an MLP that is
HeteroFL's rule: a hidden layer keeps ceil(r·d_out) output rows and the previous layer's
kept columns, the first layer keeps all its inputs, the output layer all its outputs.
Which axes of which parameter are width axes is data (``Rules``: param name -> axes), so
a model declares it (``FederatedModel.width_rules``) instead of this module guessing
from names; a model that declares none gets :func:`default_rules`.

For rf2's two-tower the width is the embedding dimension D: a client at width r is the
same ``TwoTower`` built with dim = ceil(r·D), holding the first ceil(r·D) columns of
every embedding table (scores use the first ceil(r·D) dimensions). RF² narrows only
DLRM's MLP layers; a two-tower has no hidden MLP, so narrowing D is the only way to give
low tiers a cheaper model.

Aggregation (RF²'s variant of HeteroFL's): the server adds each client's slice, weighted
by its number of examples, into zeros, divides every element by the total weight of the
clients that covered it, and leaves elements nobody covered at their old value.
HeteroFL's "scaler" (dividing activations by r during training) is not applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

Shapes = Mapping[str, tuple[int, ...]]
Rules = Mapping[str, tuple[int, ...]]  # param name -> axes that shrink with the width
Spec = dict[str, tuple[slice, ...]]  # param name -> the client's top-left slice


def kept(d: int, width: float) -> int:
    """ceil(width · d), at least 1; rounded first so that e.g. 0.3 · 10 keeps 3, not 4."""
    return max(1, math.ceil(round(width * d, 9)))


def default_rules(shapes: Shapes, dim: int) -> dict[str, tuple[int, ...]]:
    """Width axes for a model that declares none.

    A 2-D parameter whose last axis has length ``dim`` narrows along it (an embedding
    table); a square dim x dim weight is a hidden layer and narrows along both axes, and
    so does the 1-D bias next to it (``<prefix>.bias`` beside ``<prefix>.weight``).
    Everything else keeps its full shape.
    """
    rules: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if len(shape) == 2 and shape[-1] == dim:
            rules[name] = (0, 1) if shape[0] == dim else (1,)
        elif len(shape) == 1 and shape[0] == dim and name.endswith(".bias"):
            weight = shapes.get(name[: -len("bias")] + "weight")
            rules[name] = (0,) if weight is not None and tuple(weight) == (dim, dim) else ()
        else:
            rules[name] = ()
    return rules


def rules_for(shapes: Shapes, dim: int, declared: Rules | None = None
              ) -> dict[str, tuple[int, ...]]:
    """The model's declared rules (``FederatedModel.width_rules``; a parameter it does
    not name keeps its full shape), else :func:`default_rules`."""
    if declared is None:
        return default_rules(shapes, dim)
    return {name: tuple(declared.get(name, ())) for name in shapes}


def slice_spec(shapes: Shapes, width: float, rules: Rules) -> Spec:
    """The top-left slice each parameter keeps at ``width`` (params absent from rules keep
    their full shape). Width 1 gives full slices."""
    if not 0.0 < width <= 1.0:
        raise ValueError(f"width must be in (0, 1], got {width}")
    spec: Spec = {}
    for name, shape in shapes.items():
        axes = set(rules.get(name, ()))
        spec[name] = tuple(
            slice(0, kept(d, width) if axis in axes else d) for axis, d in enumerate(shape)
        )
    return spec


def sub_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Shapes of the sliced parameters (slices start at 0)."""
    return {name: tuple(int(s.stop) for s in sl) for name, sl in spec.items()}


def extract(arrays: Mapping[str, np.ndarray], spec: Spec) -> dict[str, np.ndarray]:
    """The client's sub-model: a contiguous copy of each parameter's slice."""
    return {name: np.ascontiguousarray(arrays[name][spec[name]]) for name in arrays}


def _check(client: Mapping[str, np.ndarray], spec: Spec) -> None:
    expected = sub_shapes(spec)
    for name, shape in expected.items():
        got = tuple(np.shape(client[name]))
        if got != shape:
            raise ValueError(f"client array {name!r} has shape {got}, its slice is {shape}")


def pad(
    global_arrays: Mapping[str, np.ndarray], client: Mapping[str, np.ndarray], spec: Spec
) -> dict[str, np.ndarray]:
    """Full-shape arrays: the global weights with the client's slice written in.

    This is "the client left everything outside its slice untouched" (a zero update
    there); used where a rule needs one full array per client (q-FFL).
    """
    _check(client, spec)
    out: dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        full = np.array(g, copy=True)
        full[spec[name]] = client[name]
        out[name] = full
    return out


def aggregate_heterofl(
    global_arrays: Mapping[str, np.ndarray],
    client_arrays: Sequence[Mapping[str, np.ndarray]],
    specs: Sequence[Spec],
    weights: Sequence[float],
) -> dict[str, np.ndarray]:
    """Per element: weighted mean over the clients whose slice covers it; else the old value."""
    if not len(client_arrays) == len(specs) == len(weights):
        raise ValueError("client_arrays, specs and weights must have the same length")
    for client, spec in zip(client_arrays, specs, strict=True):
        _check(client, spec)
    out: dict[str, np.ndarray] = {}
    for name, g in global_arrays.items():
        total = np.zeros(g.shape, dtype=np.float64)  # sum_k w_k x_k on covered elements
        cover = np.zeros(g.shape, dtype=np.float64)  # sum_k w_k over covering clients
        for client, spec, w in zip(client_arrays, specs, weights, strict=True):
            total[spec[name]] += float(w) * np.asarray(client[name], dtype=np.float64)
            cover[spec[name]] += float(w)
        mean = np.divide(total, cover, out=np.zeros_like(total), where=cover > 0)
        out[name] = np.where(cover > 0, mean, g).astype(g.dtype, copy=False)
    return out


def full_spec(arrays: Mapping[str, np.ndarray]) -> Spec:
    """The spec of a full-width client (every element covered)."""
    return {name: tuple(slice(0, int(d)) for d in np.shape(a)) for name, a in arrays.items()}
