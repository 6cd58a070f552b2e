"""``dataset._target_`` and ``population._target_``: a loader and a tiering from outside rf2.

The plug-ins live in a module written to a temporary directory on ``sys.path``, as a
user's ``mylab/data.py`` would: a loader of a small click log whose users have their
own ids (5, 15, 25, ...), and a tiering that deals users to tiers by position.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import plugin_module, read_rows, small_run

from rf2.cli.support import run_job
from rf2.core.config import DatasetConfig, PopulationConfig
from rf2.core.errors import ConfigError
from rf2.data import load_dataset
from rf2.hetero.devices import load_profile
from rf2.hetero.population import assign_tiers

PLUGIN = '''
import numpy as np
from rf2.data import Interactions


def clicks(cfg, seed, users=40, items=30, per_user=6):
    """Every user clicks ``per_user`` distinct items in time order; ids 5, 15, 25, ..."""
    rng = np.random.default_rng(seed)
    user = np.repeat(np.arange(users), per_user)
    item = np.concatenate([rng.choice(items, per_user, replace=False) for _ in range(users)])
    timestamp = np.tile(np.arange(per_user), users)
    return Interactions(user=user, item=item, timestamp=timestamp, num_users=users,
                        num_items=items, user_ids=np.arange(users) * 10 + 5)


def dealt(dataset, profile, seed, offset=0):
    """Tier names dealt by position (the profile's order), shifted by ``offset``."""
    names = profile.tier_names
    return [names[(u + offset) % len(names)] for u in range(dataset.num_users)]


def not_interactions(cfg, seed):
    return [1, 2, 3]


def bad_ids(cfg, seed):
    return Interactions(user=np.array([0, 3]), item=np.array([1, 1]),
                        timestamp=np.array([0, 1]), num_users=2, num_items=4)


def one_tier(dataset, profile, seed):
    return [0]


def unknown_tier(dataset, profile, seed):
    return ["gold"] * dataset.num_users
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The plug-in's module name, importable for this test only (PYTHONPATH too: Ray)."""
    name = plugin_module(tmp_path, monkeypatch, "mylab_data", PLUGIN)
    yield name
    sys.modules.pop(name, None)


def test_loader_target_is_split_like_any_dataset(plugin: str) -> None:
    cfg = DatasetConfig(_target_=f"{plugin}.clicks", kwargs={"users": 12, "per_user": 5})
    ds = load_dataset(cfg, seed=3)
    assert (ds.num_users, ds.num_items, ds.name) == (12, 30, f"{plugin}.clicks")
    assert ds.train_counts.tolist() == [4] * 12 and ds.test_counts.tolist() == [1] * 12
    assert ds.raw_user_ids().tolist() == [5 + 10 * u for u in range(12)]
    again = load_dataset(cfg, seed=3)
    assert np.array_equal(ds.train_items, again.train_items)  # the seed reaches the loader


def test_tiering_target_gives_names_or_indices(plugin: str) -> None:
    ds = load_dataset(DatasetConfig(_target_=f"{plugin}.clicks"), seed=1)
    profile = load_profile("rf2-3tier")
    pop = assign_tiers(ds, profile, PopulationConfig(_target_=f"{plugin}.dealt",
                                                     kwargs={"offset": 1}), seed=1)
    assert pop.tier_of_user[:4].tolist() == [1, 2, 0, 1]
    assert np.bincount(pop.tier_of_user).tolist() == [13, 14, 13]
    assert pop.compute_ms_per_example.shape == (40,)  # devices drawn per tier as usual


@pytest.mark.parametrize(("field", "target", "says"), [
    ("dataset", "nowhere_module.load", "cannot be imported"),
    ("dataset", "{p}.not_interactions", "it returned a list"),
    ("dataset", "{p}.bad_ids", "user ids outside [0, num_users=2)"),
    ("population", "{p}.one_tier", "returned shape (1,) for 40 users"),
    ("population", "{p}.unknown_tier", "it returned ['gold']"),
    ("population", "{p}.missing", "cannot be imported"),
])
def test_bad_targets_are_one_config_error(plugin: str, field: str, target: str,
                                          says: str) -> None:
    target = target.format(p=plugin)
    with pytest.raises(ConfigError) as info:
        if field == "dataset":
            load_dataset(DatasetConfig(_target_=target), seed=0)
        else:
            ds = load_dataset(DatasetConfig(_target_=f"{plugin}.clicks"), seed=0)
            assign_tiers(ds, load_profile("rf2-3tier"), PopulationConfig(_target_=target), 0)
    assert info.value.field == f"{field}._target_" and says in str(info.value)
    assert "\n" not in str(info.value)


def _plugin_run(plugin: str, **extra: object) -> dict:
    return small_run(**{"dataset": {"_target_": f"{plugin}.clicks", "kwargs": {"users": 60}},
                        "devices.profile": "rf2-3tier",
                        "population._target_": f"{plugin}.dealt", "num_rounds": 2,
                        "clients_per_round": 10, **extra})


def test_plugins_run_federated_and_central(plugin: str, tmp_path: Path) -> None:
    run = run_job(_plugin_run(plugin), tmp_path / "fed")
    lines = (run / "tiers.csv").read_text().splitlines()
    assert lines[1:4] == ["5,low", "15,mid", "25,high"]  # the loader's ids, the tiering's tiers
    rows = read_rows(run)
    assert rows[-1]["round"] == 2 and "recall@20" in rows[-1]
    central = run_job(_plugin_run(plugin, mode="central", **{"central.epochs": 1}),
                      tmp_path / "central")
    assert read_rows(central)[-1]["recall@20"] >= 0


@pytest.mark.slow  # starts Ray: workers import the plug-in through PYTHONPATH
def test_plugins_run_on_ray_like_in_process(plugin: str, tmp_path: Path) -> None:
    import shutil
    import tempfile

    from conftest import without_timing

    local = run_job(_plugin_run(plugin), tmp_path / "local")
    ray_tmp = tempfile.mkdtemp(prefix="rf2ray")  # short: Ray's socket paths are limited
    try:
        ray = run_job(_plugin_run(plugin, **{"simulation.backend": "ray",
                                             "simulation.ray_temp_dir": ray_tmp}),
                      tmp_path / "onray")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert without_timing(read_rows(ray)) == without_timing(read_rows(local))
