"""What the ``rf2`` command does around a run: pre-checks, resume, logging, clean-up."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from rf2.core.config import RunConfig, load_run_config
from rf2.core.errors import ConfigError, UserInputError
from rf2.core.plugins import recorded_config, without_unused
from rf2.core.typed import to_dict
from rf2.runs.lock import LOCK, RunLock
from rf2.runs.run_folder import CONFIG, RunExists, RunFolder

GROUPS = ("dataset", "model", "strategy", "devices", "population", "optimization",
          "simulation", "privacy", "experiment", "arm")


def group_options(group: str) -> list[str]:
    root = resources.files("rf2.conf") / group
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _fail(error: ConfigError) -> None:
    print(f"rf2: {error}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


def _check_key(path: list[str], value: str) -> bool:
    """Is ``path`` a RunConfig field? Returns True when it points inside a mapping field
    (e.g. ``optimization.prune_rate.low``), which Hydra only accepts as ``++key=value``.
    """
    node: Any = to_dict(RunConfig())
    for depth, part in enumerate(path):
        if isinstance(node, dict) and part in node:
            node = node[part]
            continue
        parent = ".".join(path[:depth]) or "the config"
        if isinstance(node, dict) and depth > 0 and not node:
            return True  # a free-form mapping such as prune_rate: {tier: rate}
        known = ", ".join(node) if isinstance(node, dict) else "none (not a mapping)"
        _fail(ConfigError(".".join(path), value, f"known keys of {parent}: {known}"))
    return False


def precheck_overrides(argv: list[str]) -> list[str]:
    """Check command-line overrides before Hydra sees them; return them ready for Hydra.

    An unknown group choice (``strategy=fedsgd``) or unknown key (``client.momentum=1``)
    gets rf2's one-line error and exit status 2 (Hydra's own is multi-line, status 1).
    Keys inside mapping fields are passed on as ``++key=value`` (add or override).
    """
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.startswith("~"):
            out.append(arg)
            continue
        key, _, value = arg.lstrip("+").partition("=")
        if arg.startswith("+") and key not in GROUPS:
            out.append(arg)  # Hydra's own append syntax for a new key
            continue
        if key in GROUPS:
            allowed = group_options(key)
            sweep = "," in value and "(" not in value
            for choice in ([v.strip() for v in value.split(",")] if sweep else [value]):
                if choice and choice not in allowed:
                    _fail(ConfigError(key, choice, ", ".join(allowed)))
        elif not key.startswith(("hydra.", "hydra/")) and key != "hydra":
            if _check_key(key.split("."), value):
                arg = "++" + arg
        out.append(arg)
    return out


def override_value(argv: list[str], key: str) -> str | None:
    """The value the command line gives ``key``, as Hydra reads it (``key=``, ``+key=``,
    ``++key=``, quoted or not); None when absent or unreadable (reported later)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    value = None
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.lstrip("+~").split("=", 1)[0] != key:
            continue
        try:
            override = parser.parse_overrides([arg])[0]
        except HydraException:
            continue
        if not override.is_delete():
            value = str(override.value())
    return value


def preflight_output_dir(argv: list[str]) -> None:
    """Fail with one line (exit 2) if the run's output directory cannot be written.

    Hydra creates the directory before rf2 runs and reports a failure with a traceback;
    this probes the nearest existing parent of the (static prefix of the) directory.
    """
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    target = override_value(argv, key) or ("multirun" if multirun else "outputs")
    static = Path(target.split("${", 1)[0] or ".").absolute()
    probe = static
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise NotADirectoryError(f"{probe} is not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as ex:
        reason = ex.strerror or str(ex)
        print(f"rf2: cannot write the output directory {static}: {reason}", file=sys.stderr,
              flush=True)
        sys.exit(2)


def quiet_frameworks(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove Hydra's fresh output dir when nothing of a run was written into it, and
    the date folder above it (``outputs/<date>/``) when that is left empty."""
    if not run_dir.exists() or RunFolder(run_dir).holds_run or (run_dir / LOCK).exists():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name not in (".hydra",) and p.suffix != ".log"]
    if leftovers:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    cwd = Path.cwd().resolve()
    parent = run_dir.resolve().parent
    for _ in range(2):  # <date>/ then outputs/ (or multirun/), never above the cwd
        if parent == cwd or cwd not in parent.parents:
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent


def run_job(data: dict[str, Any], run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Validate ``data`` (a composed config), then run it (or resume) into ``run_dir``.

    The run folder is locked (``rf2.runs.lock``) from before the data loads until the
    run ends: a second writer gets RunFolderBusy (exit status 2).
    """
    cfg = load_run_config(data)  # before the heavy imports: config errors come back fast
    if cfg.tensorboard:
        # An environment pre-check, not a config rule: the core layer stays dependency-free.
        from rf2.runs.tensorboard_log import check_available

        check_available()
    from rf2.cli.central import execute_central
    from rf2.cli.runner import check_profile, execute, prepare

    quiet_frameworks(cfg.debug)
    check_profile(cfg)
    if cfg.resume:
        return _resume(cfg, data, run_dir, overrides or [])
    folder = RunFolder(run_dir)
    if folder.holds_run:
        raise RunExists(f"{run_dir} already holds a run; pass resume={run_dir} to continue it "
                        "or choose another output directory")
    try:
        with RunLock(run_dir):
            prep = prepare(cfg)
            run = execute_central if prep.cfg.mode == "central" else execute
            return run(prep, folder)
    except UserInputError:
        remove_unused_run_dir(run_dir)  # the lock made the folder; bad input leaves none
        raise


def _resume(cfg: RunConfig, data: dict[str, Any], run_dir: Path, overrides: list[str]) -> Path:
    from rf2.cli.central import execute_central
    from rf2.cli.resume import resumed_config
    from rf2.cli.runner import execute, prepare

    folder = RunFolder(cfg.resume or "")
    if not (folder.path / "config.yaml").exists():
        raise ConfigError("resume", cfg.resume, "a run folder (containing config.yaml)")
    saved = without_unused(folder.read_config())  # a record from before plug-in records
    merged = resumed_config(saved, data, overrides, str(folder.path))
    merged["resume"] = None
    new_cfg = load_run_config(merged)
    rows = folder.read_metrics()
    last = int(rows[-1]["round"]) if rows else -1
    if new_cfg.num_rounds < last:
        raise ConfigError("num_rounds", new_cfg.num_rounds,
                          f"an integer >= {last} (the rounds {folder.path} already holds)")
    with RunLock(folder.path):
        longer = (new_cfg.num_rounds > max(last, int(saved.get("num_rounds", 0)))
                  or new_cfg.num_passes != int(saved.get("num_passes", 0)))
        if folder.done and not longer:
            remove_unused_run_dir(run_dir)
            print(f"rf2: {folder.path} is finished ({last} rounds, DONE); nothing to do "
                  f"(num_rounds=N with N > {last} extends it)", flush=True)
            return folder.path
        prep = prepare(new_cfg)
        remove_unused_run_dir(run_dir)
        if merged != {**saved, "resume": None}:
            folder.write_text(CONFIG, yaml.safe_dump(recorded_config(new_cfg), sort_keys=False))
        folder.undo_done()
        run = execute_central if prep.cfg.mode == "central" else execute
        return run(prep, folder, resuming=True)


__all__ = ["UserInputError", "precheck_overrides", "run_job", "remove_unused_run_dir"]
