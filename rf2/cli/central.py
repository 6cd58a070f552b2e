"""``rf2 mode=central``: train the same model on pooled data, into the same run folder.

Same inputs as a federated run (dataset, model, tiers from the population, so per-tier
metrics are comparable), same files (``config.yaml``, ``population.json``,
``data.json``, ``metrics.jsonl``, checkpoints, ``model.pt``, ``DONE``) and the same
metric keys per row, so ``rf2.analysis.results.load`` puts federated and central runs
in one DataFrame (config column ``mode``). Row ``round`` is the evaluation number:
0 before training (with the popularity baseline, as in federated runs), then
``central.evals_per_epoch`` rows per epoch; each row also has ``epoch`` (fractional),
``step``, ``num_examples`` (this row's) and ``examples_seen`` (cumulative).

Central training sees every user's examples: the tier-aware optimizations
(``optimization=``) and the round policies do not apply.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rf2.core.plugins import recorded_config
from rf2.eval.evaluation import Evaluator
from rf2.fl.progress import ProgressPrinter
from rf2.hetero.population import population_summary
from rf2.model.central import CentralTrainer, pooled_examples, pooled_users
from rf2.runs.run_folder import RunFolder

if TYPE_CHECKING:
    from rf2.cli.runner import PreparedRun


def execute_central(prep: PreparedRun, folder: RunFolder, resuming: bool = False) -> Path:
    """Train centrally and write the run folder; with ``resuming``, continue its checkpoint."""
    from rf2.cli.runner import data_summary, finish_run, restart_from_round_0

    cfg = prep.cfg
    hist, tgt = pooled_examples(prep.dataset)
    trainer = CentralTrainer(prep.model, hist, tgt, cfg.central, cfg.seed,
                             users=pooled_users(prep.dataset))
    evaluator = Evaluator.from_config(prep.dataset, cfg.eval, cfg.seed,
                                      prep.population.tier_of_user, prep.population.tier_names)
    points = trainer.eval_steps()  # points[r - 1] = step after which row r is written
    checkpoint = folder.latest_checkpoint() if resuming else None
    done_rounds, wall_offset = 0, 0.0
    if checkpoint is not None:
        done_rounds, arrays, meta = checkpoint.round, checkpoint.arrays, checkpoint.state
        trainer.load_state(arrays, meta)
        wall_offset = float(meta.get("wall_offset_s", 0.0))
        folder.truncate_to_round(done_rounds)
    else:
        if resuming:
            restart_from_round_0(folder)
        else:
            folder.create(recorded_config(cfg))
        folder.write_json("population.json", population_summary(prep.dataset, prep.population))
        folder.write_json("data.json", data_summary(cfg, prep.dataset))
    tensorboard = None
    if cfg.tensorboard:
        from rf2.runs.tensorboard_log import TensorBoardLogger

        tensorboard = TensorBoardLogger(folder.path)
    progress = ProgressPrinter(enabled=cfg.progress, total_rounds=len(points))
    started = time.perf_counter() - wall_offset

    def finish(row: dict[str, Any], round_started: float) -> None:
        now = time.perf_counter()
        row["wall_time_s"] = now - started
        row["round_wall_s"] = now - round_started
        folder.append_metrics(row)
        if tensorboard is not None:
            tensorboard.log_row(row)
        progress.round_done(int(row["round"]), row.get("recall@20"), row["wall_time_s"], 0)

    if not folder.read_metrics():
        t0 = time.perf_counter()
        row: dict[str, Any] = {"round": 0, "epoch": 0.0, "step": 0, "num_examples": 0,
                               "examples_seen": 0, **evaluator.evaluate_model(prep.model)}
        row.update(evaluator.evaluate_popularity())
        row["eval_wall_s"] = time.perf_counter() - t0
        finish(row, t0)
    for rnd, step in enumerate(points, start=1):
        if rnd <= done_rounds:
            continue
        t0 = time.perf_counter()
        loss, examples = trainer.train_until(step)
        t_eval = time.perf_counter()
        row = {"round": rnd, "epoch": step / trainer.steps_per_epoch, "step": step,
               "num_examples": examples, "examples_seen": trainer.examples_seen(step), "train/loss": loss,
               **(evaluator.final() if rnd == len(points) else evaluator).evaluate_model(
                   prep.model)}
        row["eval_wall_s"] = time.perf_counter() - t_eval
        finish(row, t0)
        if (cfg.checkpoint_every and rnd % cfg.checkpoint_every == 0) or rnd == len(points):
            arrays, meta = trainer.state()
            meta["wall_offset_s"] = time.perf_counter() - started
            folder.save_checkpoint(rnd, arrays, meta)
    if tensorboard is not None:
        tensorboard.close()
    return finish_run(prep, folder, evaluator)
