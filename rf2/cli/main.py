"""The ``rf2`` command (also ``python -m rf2``): a Hydra app over ``rf2.conf``.

    rf2                                   # synthetic data, FedAvg + Adagrad, Ray
    rf2 dataset=movielens100k dataset.path=/data/ml-100k num_rounds=100
    rf2 -m strategy=fedavg,fedprox,qffl seed=1,2,3   # a sweep (Hydra multirun)
    rf2 resume=outputs/2026-11-28/12-00-00-000000   # continue a run folder

Bad input prints one line naming the field, the value and what is allowed, and exits
with status 2 (``debug=true`` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rf2.core.errors import UserInputError
from rf2.fl.interrupt import RunInterrupted
from rf2.runs.run_folder import RunFolder, RunFolderError

log = logging.getLogger("rf2")


def run_from_hydra(cfg: DictConfig) -> Path | None:
    from rf2.cli.support import remove_unused_run_dir, run_job
    from rf2.runs.console import console_copied_to, run_summary

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    debug = bool(data.get("debug", False))
    resume = data.get("resume")
    # The console goes to the run's rf2.log: the resumed folder's when resuming (but not
    # a finished one's: resuming it changes nothing there, its log included).
    resumable = resume and (Path(resume) / "config.yaml").is_file()
    folder = Path(resume) if resumable else run_dir  # the run this command writes
    target = run_dir if (folder / "DONE").exists() else folder
    with console_copied_to(target):
        try:
            overrides = list(HydraConfig.get().overrides.task)
            written = run_job(data, run_dir, overrides)  # type: ignore[arg-type]
            for line in run_summary(RunFolder(written)):
                print(line, flush=True)
            return written
        except RunFolderError as ex:
            # Full disk, read-only folder: earlier rounds stay intact (appends are whole
            # lines, checkpoints are renamed into place) and `resume=` can continue later.
            if debug:
                traceback.print_exc()
            print(f"rf2: {ex}", file=sys.stderr, flush=True)
            sys.exit(1)
        except UserInputError as ex:
            remove_unused_run_dir(run_dir)
            if debug:
                traceback.print_exc()
            print(f"rf2: {ex}", file=sys.stderr, flush=True)
            sys.exit(ex.exit_code)
        except (RunInterrupted, KeyboardInterrupt):
            if debug:
                traceback.print_exc()
            rows = RunFolder(folder).read_metrics() if folder.is_dir() else []
            if rows:
                print(f"rf2: interrupted after round {int(rows[-1]['round'])}; resume with: "
                      f"rf2 resume={folder}", file=sys.stderr, flush=True)
            else:
                remove_unused_run_dir(run_dir)
                print("rf2: interrupted before round 0; nothing to resume", file=sys.stderr,
                      flush=True)
            # Everything is on disk (rows and checkpoints are fsynced, the lock released):
            # leave now rather than wait seconds for library exit hooks (Flower's
            # telemetry, Ray) that could make a Ctrl-C feel ignored.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


_hydra_main = hydra.main(version_base="1.3", config_path="pkg://rf2.conf", config_name="config")(
    run_from_hydra
)


def _fail(ex: UserInputError, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"rf2: {ex}", file=sys.stderr, flush=True)
    sys.exit(ex.exit_code)


def main() -> None:
    try:
        _main()
    except KeyboardInterrupt:  # before the run started (composing, checking, importing)
        print("rf2: interrupted before round 0; nothing to resume", file=sys.stderr, flush=True)
        sys.exit(130)
    except BrokenPipeError:
        # `rf2 --help | head -1`: the reader left. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and say it once on stderr.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        print("rf2: output closed early (broken pipe)", file=sys.stderr, flush=True)
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports it


def _main() -> None:
    from rf2.cli.support import precheck_overrides, preflight_output_dir

    sys.argv[1:] = precheck_overrides(sys.argv[1:])
    argv = sys.argv[1:]
    if not any(a in ("--help", "-h", "--cfg", "-c", "--info", "--hydra-help") for a in argv):
        preflight_output_dir(argv)
        debug = any(a.lstrip("+") in ("debug=true", "debug=True") for a in argv)
        try:
            from rf2.cli.precheck import check_command

            check_command(argv)
        except UserInputError as ex:
            _fail(ex, debug)
    _hydra_main()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
