"""Ray on this machine for one simulation, with only the processes a simulation uses.

``ray.init()`` without a cluster starts, next to GCS and the raylet (and the raylet's
dashboard and runtime-env agents, which it needs), three Python processes rf2 never
uses: the autoscaler's monitor, the log monitor (it forwards worker output to the
driver, which rf2 turns off) and the dashboard's API server (started even with
``include_dashboard=False``). Measured here (2 cores, under load): ~280 MB of RSS
together, and each costs a Python start and ``import ray`` on the cores that the driver
and the client workers need at the same moment (``benchmarks/ray_startup.py``).

:func:`start_lean` starts the head node the way ``ray.cluster_utils.Cluster`` does
(``ray._private.node.Node``) without them, and the driver then joins it with
``ray.init(address=...)``. These are Ray internals: when they do not look as expected,
:func:`start_lean` returns None and the caller uses plain ``ray.init``. Joining a
cluster (``simulation.ray_address``) never goes through here.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class LeanHead:
    """The head node this process started; :meth:`stop` ends its processes."""

    node: Any  # ray._private.node.Node

    @property
    def address(self) -> str:
        return str(self.node.gcs_address)

    def stop(self) -> None:
        try:
            self.node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        except Exception as ex:  # noqa: BLE001 - the run is over; say it, do not fail it
            log.warning("rf2: stopping Ray's processes: %s", ex)


def start_lean(num_cpus: int, temp_dir: str | None) -> LeanHead | None:
    """Start a one-node Ray without monitor, log monitor and API server (or None)."""
    try:
        from ray._private.node import Node
        from ray._private.parameter import RayParams
    except ImportError:
        return None

    class _Node(Node):
        def start_api_server(self, **kwargs: Any) -> None:  # noqa: ANN401, ARG002
            # No dashboard, job or state API: rf2 reads everything it needs from GCS.
            self._webui_url = None

    try:
        params = RayParams(num_cpus=num_cpus, include_dashboard=False,
                           include_log_monitor=False,  # type: ignore[arg-type]  # Ray: typed str, read as bool
                           no_monitor=True,
                           temp_dir=os.path.abspath(temp_dir) if temp_dir else None)
        # Ray's exit hooks set a SIGTERM handler, which only the main thread may do; rf2
        # starts Ray from a helper thread (rf2.fl.interrupt.start_noting_stops) and stops
        # the head itself (LeanHead.stop; its processes also die with that thread).
        main = threading.current_thread() is threading.main_thread()
        node = _Node(params, head=True, shutdown_at_exit=main, spawn_reaper=True)
    except (TypeError, AttributeError) as ex:  # Ray's internals changed: use ray.init
        log.debug("lean Ray start unavailable (%s); using ray.init", ex)
        return None
    return LeanHead(node)
