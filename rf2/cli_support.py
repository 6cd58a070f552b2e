"""What the ``rf2`` command does around a run: pre-checks, resume, logging, clean-up."""

from __future__ import annotations

import logging
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from rf2.config import load_run_config
from rf2.errors import ConfigError, UserInputError
from rf2.run_folder import METRICS, RunFolder

GROUPS = ("dataset", "model", "strategy", "devices", "population", "optimization",
          "simulation", "experiment")


def group_options(group: str) -> list[str]:
    root = resources.files("rf2.conf") / group
    if not root.is_dir():
        return []
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def precheck_overrides(argv: list[str]) -> None:
    """Reject an unknown group choice (e.g. ``strategy=fedsgd``) with one line, exit 2.

    Hydra would also reject it, but with a multi-line message and exit status 1.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        if key not in GROUPS:
            continue
        allowed = group_options(key)
        choices = [v.strip() for v in value.split(",")] if "," in value and "(" not in value else [value]
        for choice in choices:
            if choice and choice not in allowed:
                error = ConfigError(key, choice, ", ".join(allowed))
                print(f"rf2: {error}", file=sys.stderr, flush=True)
                sys.exit(error.exit_code)


def quiet_frameworks(debug: bool) -> None:
    level = logging.DEBUG if debug else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("ray").setLevel(level)


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove Hydra's fresh output dir when nothing of a run was written into it."""
    if not run_dir.exists() or (run_dir / METRICS).exists():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name not in (".hydra",) and p.suffix != ".log"]
    if not leftovers:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_job(data: dict[str, Any], run_dir: Path, overrides: list[str] | None = None) -> Path:
    """Validate ``data`` (a composed config), then run it (or resume) into ``run_dir``."""
    from rf2.runner import execute, prepare

    cfg = load_run_config(data)
    quiet_frameworks(cfg.debug)
    if cfg.resume:
        folder = RunFolder(cfg.resume)
        if not (folder.path / "config.yaml").exists():
            raise ConfigError("resume", cfg.resume, "a run folder (containing config.yaml)")
        saved = folder.read_config()
        saved["resume"] = None
        if any(o.startswith("num_rounds=") for o in (overrides or [])):
            saved["num_rounds"] = cfg.num_rounds
        prep = prepare(load_run_config(saved))
        remove_unused_run_dir(run_dir)
        return execute(prep, folder, resuming=True)
    prep = prepare(cfg)
    return execute(prep, RunFolder(run_dir))


__all__ = ["UserInputError", "precheck_overrides", "run_job", "remove_unused_run_dir"]
