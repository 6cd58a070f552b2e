"""The large-catalogue recipe and the fairness study at scale compose as documented."""

from __future__ import annotations

from conftest import composed
from hydra import compose, initialize_config_module

from rf2.strategies import instantiate_strategy


def test_large_catalogue_composes_with_any_dataset_and_model() -> None:
    for dataset in ("synthetic", "movielens100k", "recbole"):
        for model in ("two_tower", "hier_index"):
            extra = [] if dataset == "synthetic" else ["dataset.path=/some/where"]
            cfg = composed(f"dataset={dataset}", f"model={model}", "+experiment=large_catalogue",
                           *extra)
            assert (cfg.dataset.name, cfg.model.name) == (dataset, model)  # not pinned by it
            # What it changes: sampled negatives on any catalogue (auto would keep the
            # full softmax below 5,000 items) and a server Adam step (FedAdam).
            assert cfg.model.loss_kind(num_items=100) == "sampled"
            assert type(instantiate_strategy(cfg.strategy, cfg.client)).__name__ == "FedAdam"


def test_fairness_gap_scale_is_one_pass_and_the_command_line_wins() -> None:
    cfg = composed("+experiment=rf2_fairness_gap_scale", "dataset.path=/data/amazon-cds")
    assert cfg.num_rounds * cfg.clients_per_round >= 43_169  # every amazon-cds user can train
    assert cfg.num_passes == 1 and cfg.eval.at_pass_end  # ...once: stop at the pass end
    lr = cfg.strategy.server_lr
    assert composed("+experiment=rf2_fairness_gap_scale", "dataset.path=/x",
                    f"strategy.server_lr={lr * 2}").strategy.server_lr == lr * 2


def test_fairness_gap_scale_runs_its_jobs_in_parallel_with_hydras_joblib_launcher() -> None:
    with initialize_config_module(config_module="rf2.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["+experiment=rf2_fairness_gap_scale", "dataset.path=/x"])
        plain = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == -1  # one job per core
    assert plain.hydra.launcher._target_.endswith("BasicLauncher")  # only the study's
