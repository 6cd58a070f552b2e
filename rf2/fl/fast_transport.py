"""``simulation.fast_transport``: the Flower internals rf2 leans on for speed, behind one
switch (default on), each checked by behaviour before or after a run.

Hooks (fast_transport=true), their internal assumption, and the behaviour check:

* ``params.FastArray``: ``Array`` keeps dtype/shape/stype/data in its ``__dict__`` and
  serialises via ``data``. Checked before the run (:func:`verify_fast_array`): same
  bytes, serialised form and values as a stock ``Array``.
* ``prompt_delivery`` (Ray): the engine looks up ``vce_api.add_messages_to_queue`` at
  run time and its LinkState has ``get_message_ins``. Checked before the run
  (``check_engine_hooks``) and after it: the engine must have *called* rf2's extractor
  (``verify_delivery_used``).

With ``fast_transport=false`` rf2 uses Flower's stock ``Array`` and, on Ray, Flower's
stock engine and grid (0.1 s polling) through public APIs only; the metrics are identical
(tested). With the fast transport on, a Flower outside the tested range is refused up
front with one line naming its version (off, it runs, after an import-time warning).

Not behind the switch, because no public API replaces them: the in-process backend's
grid (``rf2.fl.simulation.InProcessGrid``) sets Flower's task identity the way the engine
does (checked: ``rf2.fl.simulation.verify_task_identity``), and the strategies reuse Flower's q-FFL and
metric-averaging helpers (their import fails loudly, naming the version).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from rf2.core.config import SimulationConfig
from rf2.core.flower_version import FlowerCompatError, flwr_is_tested
from rf2.fl.params import FastArray, array_to_numpy, use_fast_arrays


def prepare(sim: SimulationConfig) -> None:
    """Pick this process's codec; with the fast transport, refuse an untested Flower and
    check :class:`FastArray` against a stock ``Array``."""
    if sim.fast_transport:
        if not flwr_is_tested():
            raise FlowerCompatError("rf2's fast transport has not been checked against it")
        verify_fast_array()
    use_fast_arrays(sim.fast_transport)


def verify_fast_array() -> None:
    """A FastArray must be indistinguishable from ``Array(ndarray)`` wherever Flower looks."""
    source = np.arange(6, dtype=np.float32).reshape(2, 3)
    stock, fast = Array(source.copy()), FastArray.wrap(source.copy())
    record = ArrayRecord()
    record["w"] = fast
    checks = {
        "dtype": stock.dtype == fast.dtype,
        "shape": tuple(stock.shape) == tuple(fast.shape),
        "stype": stock.stype == fast.stype,
        "data": bytes(stock.data) == bytes(fast.data),
        "numpy()": np.array_equal(stock.numpy(), fast.numpy()),
        # Flower's serialised form: a header naming the class, then dtype/shape/stype and
        # the ids of the data chunks (the class name is the only allowed difference).
        "deflate()": _body(stock.deflate()) == _body(fast.deflate()),
        "children": list(stock.children) == list(fast.children),
        "ArrayRecord keeps it": record["w"] is fast,
        "decoding a stock Array": np.array_equal(array_to_numpy(stock), source),
    }
    broken = [name for name, ok in checks.items() if not ok]
    if broken:
        raise FlowerCompatError(f"rf2.fl.params.FastArray differs from flwr.app.Array in "
                                f"{', '.join(broken)}")


def _body(deflated: bytes) -> bytes:
    """A deflated object without its leading class name."""
    return deflated.split(b" ", 1)[-1]
