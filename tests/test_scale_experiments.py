"""The large-catalogue recipe and the fairness study at scale compose as documented."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from test_config import composed


def test_large_catalogue_composes_with_any_dataset_and_model() -> None:
    for dataset in ("synthetic", "movielens100k", "recbole"):
        for model in ("two_tower", "hier_index"):
            extra = [] if dataset == "synthetic" else ["dataset.path=/some/where"]
            cfg = composed(f"dataset={dataset}", f"model={model}", "+experiment=large_catalogue",
                           *extra)
            assert (cfg.dataset.name, cfg.model.name) == (dataset, model)
            assert cfg.model.loss == "sampled" and cfg.model.num_negatives == 200
            assert cfg.model.index.index_loss_weight == 0.1
            assert cfg.model.index.balance_sample == 512
            assert (cfg.strategy.server_optimizer, cfg.strategy.server_lr) == ("adam", 0.03)
            assert cfg.strategy.beta_2 == 0.999
            assert (cfg.client.lr, cfg.client.local_epochs, cfg.client.batch_size) == (1.0, 1, 0)


def test_fairness_gap_scale_is_one_pass_on_amazon_cds_with_the_recipe() -> None:
    cfg = composed("+experiment=rf2_fairness_gap_scale", "dataset.path=/data/amazon-cds")
    assert cfg.dataset.name == "recbole" and cfg.devices.profile == "rf2-3tier"
    assert cfg.num_rounds * cfg.clients_per_round >= 43_169  # every user trains once
    assert cfg.num_passes == 1 and cfg.eval.at_pass_end  # ...and no more: stop at the pass end
    assert cfg.model.name == "hier_index"  # the default model
    assert cfg.model.loss == "sampled" and cfg.strategy.server_optimizer == "adam"
    assert (cfg.eval.every, cfg.eval.max_users, cfg.eval.final_max_users) == (50, 5000, 0)
    assert cfg.simulation.backend == "inprocess"
    # a command-line override still wins over the experiment
    assert composed("+experiment=rf2_fairness_gap_scale", "dataset.path=/x",
                    "strategy.server_lr=0.1").strategy.server_lr == 0.1


def test_fairness_gap_scale_runs_its_jobs_in_parallel_with_hydras_joblib_launcher() -> None:
    with initialize_config_module(config_module="rf2.conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["+experiment=rf2_fairness_gap_scale", "dataset.path=/x"])
        plain = compose(config_name="config", return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert cfg.hydra.launcher.n_jobs == -1  # one job per core
    assert plain.hydra.launcher._target_.endswith("BasicLauncher")  # only the study's
