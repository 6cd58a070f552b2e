"""The typed per-user task and its one wire codec (rf2.fl.user_task)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord

from rf2.fl.user_task import (
    MalformedTask,
    RoundRecipe,
    UserTask,
    read_recipe,
    read_task,
    recipe_record,
    task_record,
)

RECIPE = RoundRecipe(server_round=4, lr=0.5, local_epochs=2, batch_size=16, seed=9,
                     num_rounds=10, proximal_mu=0.01, round_timeout_s=60.0,
                     client_timeout_s=5.0, partial_sums=True)


@pytest.mark.parametrize("task", [
    UserTask(user=0),
    UserTask(user=7, width=0.5, prune_rate=0.9, quant_bits=8, report_touched=True),
    UserTask(user=3, fault="hang", hang_s=2.5),
    UserTask(user=3, fault="nan"),
])
def test_a_task_survives_its_record(task: UserTask) -> None:
    assert read_task(task_record(task)) == task


def test_a_recipe_survives_its_record_and_no_deadline_stays_none() -> None:
    assert read_recipe(recipe_record(RECIPE)) == RECIPE
    plain = RoundRecipe(server_round=1, lr=1.0, local_epochs=1, batch_size=0)
    assert read_recipe(recipe_record(plain)) == plain
    assert plain.round_timeout_s is None and plain.proximal_mu == 0.0


def test_a_task_record_carries_only_overrides() -> None:
    assert dict(task_record(UserTask(user=5))) == {"partition-id": 5}
    assert not UserTask(user=5).replies_alone
    assert UserTask(user=5, quant_bits=8).replies_alone
    assert UserTask(user=5, fault="raise").replies_alone


def test_the_strategys_keys_reach_the_recipe_and_unknown_shared_keys_are_ignored() -> None:
    record = recipe_record(RoundRecipe(server_round=1, lr=1.0, local_epochs=1, batch_size=0))
    # Flower's FedProx writes its mu into the shared config; a plug-in strategy may add keys.
    record["proximal-mu"] = 0.1
    record["my-strategy-note"] = "kept out"
    assert read_recipe(record).proximal_mu == 0.1


@pytest.mark.parametrize(("record", "names"), [
    ({"partition-id": 1, "width": "half"}, "width='half'"),
    ({"partition-id": 1, "quant-bits": 8.0}, "quant-bits=8.0"),
    ({"partition-id": 1, "inject-fault": "melt"}, "fault='melt'"),
    ({"partition-id": 1, "width": 1.5}, "width=1.5"),
    ({"partition-id": 1, "widht": 0.5}, "widht"),
    ({"width": 0.5}, "partition-id"),
    ({"partition-id": True}, "partition-id=True"),
])
def test_a_malformed_task_record_is_one_clear_error(record: dict, names: str) -> None:
    with pytest.raises(MalformedTask, match="malformed user task") as info:
        read_task(ConfigRecord(record))
    assert names in str(info.value) and "allowed:" in str(info.value)


def test_a_recipe_without_a_required_key_names_it() -> None:
    record = recipe_record(RECIPE)
    del record["local-epochs"]
    with pytest.raises(MalformedTask, match="local-epochs"):
        read_recipe(record)


@pytest.mark.parametrize(("build", "field"), [
    (lambda: UserTask(user=-1), "user"),
    (lambda: UserTask(user=1, prune_rate=1.0), "prune_rate"),
    (lambda: UserTask(user=1, quant_bits=0), "quant_bits"),
    (lambda: UserTask(user=1, fault="hang", hang_s=0.0), "hang_s"),
    (lambda: RoundRecipe(server_round=1, lr=0.0, local_epochs=1, batch_size=0), "lr"),
    (lambda: RoundRecipe(server_round=1, lr=1.0, local_epochs=1, batch_size=0,
                         client_timeout_s=0.0), "client_timeout_s"),
])
def test_a_task_is_validated_where_it_is_built(build, field: str) -> None:  # noqa: ANN001
    with pytest.raises(MalformedTask) as info:
        build()
    assert info.value.key == field
