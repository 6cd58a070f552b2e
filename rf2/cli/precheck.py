"""Check every job of a command before Hydra creates anything.

Hydra creates the output folder (``outputs/<date>/<time>/.hydra``) before the task
runs, and a multirun validates one job at a time as it launches it: ``-m
client.lr=0.1,0`` ran job 0 before job 1 failed. This pre-pass composes each job's
config with Hydra's own APIs (the basic sweeper's ``split_arguments`` over the
command line and the config's ``hydra.sweeper.params``, then ``compose``), validates
it, loads its device profile, and checks that a fixed output folder is not held by
another run, all before Hydra starts. A rejected input leaves no folder behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, OverrideParseException
from omegaconf import OmegaConf

from rf2.cli.support import override_value
from rf2.core.config import RunConfig, load_run_config
from rf2.core.errors import ConfigError, UserInputError
from rf2.runs.lock import check_not_busy
from rf2.runs.run_folder import RunExists, RunFolder

MAX_JOBS_CHECKED = 2000  # a larger sweep is checked by Hydra job by job, as before


class OverrideError(UserInputError):
    """A command-line override Hydra cannot parse or compose."""


def _parse_hint(arg: str, ex: Exception) -> str:
    key, _, value = arg.partition("=")
    reason = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
    if any(c.isspace() for c in value) or not value.isascii():
        quoted = value.replace("'", "\\'")
        return (f"cannot read the override {arg!r}: a value with spaces or non-ASCII "
                f"characters must be quoted for Hydra: \"{key}='{quoted}'\" ({reason})")
    return f"cannot read the override {arg!r}: {reason}"


def _split(argv: list[str]) -> tuple[list[str], bool]:
    """The overrides (flags dropped) and whether this is a multirun."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    return overrides, multirun


def job_overrides(overrides: list[str], multirun: bool) -> list[list[str]]:
    """Each job's override list, as Hydra's basic sweeper will launch them."""
    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_overrides([arg])
        except OverrideParseException as ex:
            raise OverrideError(_parse_hint(arg, ex)) from None
    # hydra.* keys and hydra/* groups (hydra/launcher=joblib) configure Hydra, not a job.
    task = [a for a in overrides if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    if not multirun:
        return [task]
    parsed = parser.parse_overrides(task)
    fixed = [str(a) for a, p in zip(task, parsed, strict=True) if not p.is_sweep_override()]
    base = compose(config_name="config", overrides=fixed, return_hydra_config=True)
    node = base.hydra.sweeper.get("params")
    params = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    assert isinstance(params, dict)
    sweep = [f"{k}={v}" for k, v in cast(dict[str, Any], params).items()] + task  # str keys
    return [list(job) for job in BasicSweeper.split_arguments(parser.parse_overrides(sweep),
                                                              None)[0]]


def compose_job(job: list[str]) -> dict[str, Any]:
    cfg = compose(config_name="config", overrides=job)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


def check_job(data: dict[str, Any]) -> RunConfig:
    """Everything about one job that needs no data: values, profile, resume folder."""
    from rf2.cli.runner import check_profile, resolved_data_path

    cfg = load_run_config(data)
    check_profile(cfg)
    if cfg.dataset.path:
        resolved_data_path(cfg.dataset.path)  # a symlink loop: one line, before any folder
    if cfg.resume:
        folder = RunFolder(cfg.resume)
        if not (folder.path / "config.yaml").is_file():
            raise ConfigError("resume", cfg.resume, "a run folder (containing config.yaml)")
        check_not_busy(folder.path)
    return cfg


def _static(argv: list[str], key: str) -> Path | None:
    value = override_value(argv, key)
    return None if value is None or "${" in value else Path(value)


def fixed_sweep_dir(argv: list[str]) -> Path | None:
    """The ``hydra.sweep.dir`` of a multirun when it is fixed on the command line (the
    default one holds the time to the microsecond: no two sweeps share it)."""
    _, multirun = _split(argv)
    return _static(argv, "hydra.sweep.dir") if multirun else None


def check_output_dirs(argv: list[str], configs: list[RunConfig], multirun: bool) -> None:
    """A fixed ``hydra.run.dir`` / ``hydra.sweep.dir`` must not hold another run."""
    if multirun:
        root = _static(argv, "hydra.sweep.dir")
        if root is None:
            return
        check_not_busy(root, "sweep folder")  # another sweep runs there
        if any(a.lstrip("+").startswith("hydra.sweep.subdir=") for a in argv):
            return
        dirs = [(root / str(i), c) for i, c in enumerate(configs)]
    else:
        run_dir = _static(argv, "hydra.run.dir")
        dirs = [(run_dir, configs[0])] if run_dir is not None else []
    for path, cfg in dirs:
        if cfg.resume:
            continue
        check_not_busy(path)
        folder = RunFolder(path)
        if folder.holds_run:
            raise RunExists(f"{path} already holds a run; pass resume={path} to continue it "
                            "or choose another output directory")


def check_command(argv: list[str]) -> None:
    """Raise UserInputError for the first bad job of this command line."""
    overrides, multirun = _split(argv)
    try:
        with initialize_config_module(config_module="rf2.conf", version_base="1.3"):
            jobs = job_overrides(overrides, multirun)
            if len(jobs) > MAX_JOBS_CHECKED:
                jobs = jobs[:1]
            configs = []
            for i, job in enumerate(jobs):
                try:
                    configs.append(check_job(compose_job(job)))
                except UserInputError as ex:
                    if len(jobs) > 1:
                        ex.args = (f"{ex} (sweep job {i}: {' '.join(job)})",)
                    raise
    except (HydraException, ValueError) as ex:
        if isinstance(ex, OverrideParseException):
            raise OverrideError(str(ex).strip().splitlines()[0]) from None
        message = str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__
        raise OverrideError(f"cannot compose the config: {message}") from None
    check_output_dirs(argv, configs, multirun)
