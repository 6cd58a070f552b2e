"""rf2's Hydra launcher plugin, installed as ``hydra_plugins.rf2_ray_launcher`` (Hydra
finds launchers only in the ``hydra_plugins`` namespace): ``hydra/launcher=rf2_ray`` runs
a sweep's jobs as Ray tasks on a cluster. The work is in :mod:`rf2.cli.ray_sweep`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class Rf2RayLauncherConf:
    _target_: str = "hydra_plugins.rf2_ray_launcher.Rf2RayLauncher"
    # The Ray cluster to run the jobs on (HEAD_IP:6379, or "auto" on a cluster node);
    # null: start Ray on this machine for the sweep.
    address: str | None = None
    # Jobs running at once (each a Ray task); 0 = all. Each job sizes its client
    # workers to the whole cluster unless simulation.ray_max_workers caps them.
    max_parallel_jobs: int = 1
    # CPUs each job's task holds (its driver mostly waits for its client actors).
    job_cpus: float = 0.0
    # With address null: Ray's temp dir (its socket paths must stay under 107 bytes).
    ray_temp_dir: str | None = None


ConfigStore.instance().store(group="hydra/launcher", name="rf2_ray", node=Rf2RayLauncherConf,
                             provider="rf2")


class Rf2RayLauncher(Launcher):
    def __init__(self, **options: Any) -> None:  # noqa: ANN401
        self.options = options
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction,
              config: DictConfig) -> None:
        self.config = config
        self.task_function = task_function
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:
        from rf2.cli.ray_sweep import launch

        return launch(self, job_overrides, initial_job_idx)
