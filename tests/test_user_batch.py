"""Several users per Flower message: the wire format, and that batching changes no number."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import read_rows, small_run, without_timing
from flwr.app import Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from rf2.cli.support import run_job
from rf2.core.config import SimulationConfig, load_run_config
from rf2.core.errors import ConfigError
from rf2.fl.params import numpy_to_record
from rf2.fl.simulation import users_per_message
from rf2.fl.user_batch import batch_instruction, pack_results, unpack_reply, user_tasks
from rf2.fl.user_task import RoundRecipe, UserTask, recipe_record


@pytest.fixture
def instruction() -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    content = RecordDict({"arrays": numpy_to_record({"w": np.arange(6, dtype=np.float32)}),
                          "config": recipe_record(RoundRecipe(server_round=3, lr=0.5,
                                                              local_epochs=1, batch_size=0))})
    return Message(content, 11, "train")


def _as_reply(msg: Message, content: RecordDict) -> Message:
    msg.metadata.__dict__["_message_id"] = "m1"  # as the SuperLink would assign
    return Message(content=content, reply_to=msg)


def test_each_user_gets_the_shared_config_plus_its_own(instruction: Message) -> None:
    batch = batch_instruction(instruction, [4, 9, 2], {9: UserTask(user=9, width=0.5)})
    recipe, tasks = user_tasks(batch)
    assert [t.user for t in tasks] == [4, 9, 2]
    assert recipe.lr == 0.5 and recipe.server_round == 3
    assert tasks[1].width == 0.5 and tasks[0].width == 1.0
    assert batch.metadata.dst_node_id == 11 and batch.metadata.group_id == "3"
    # The shared arrays are not copied per user.
    assert batch.content["arrays"] is instruction.content["arrays"]


def test_a_user_that_raised_fails_alone(instruction: Message) -> None:
    ok = {"arrays": numpy_to_record({"w": np.ones(6, np.float32)}),
          "metrics": MetricRecord({"num-examples": 3})}
    reply = _as_reply(instruction, pack_results([ok, ValueError("bad user"), ok]))
    out = unpack_reply(reply, 3)
    assert [m.has_error() for m in out] == [False, True, False]
    assert "bad user" in out[1].error.reason
    assert out[0].content["metrics"]["num-examples"] == 3
    assert set(out[2].content.keys()) == {"arrays", "metrics"}
    # Every per-user reply still answers the batch's instruction.
    assert {m.metadata.reply_to_message_id for m in out} == {"m1"}


def test_a_failed_batch_fails_all_its_users(instruction: Message) -> None:
    instruction.metadata.__dict__["_message_id"] = "m1"
    failed = Message(Error(code=2, reason="actor died"), reply_to=instruction)
    out = unpack_reply(failed, 4)
    assert len(out) == 4 and all(m.has_error() and m.error.reason == "actor died" for m in out)


def test_a_reply_missing_a_users_records_is_an_error_not_a_crash(instruction: Message) -> None:
    reply = _as_reply(instruction, RecordDict({"metrics/0": MetricRecord({"num-examples": 1})}))
    (only,) = unpack_reply(reply, 1)
    assert only.has_error() and "user 0" in only.error.reason


def test_auto_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # Per-user path: batches sized from the workers.
    ray = SimulationConfig(backend="ray", vectorise=False)
    inproc = SimulationConfig(backend="inprocess", vectorise=False)
    cluster = SimulationConfig(backend="ray", ray_address="auto", vectorise=False)
    assert users_per_message(ray, 100) == 13  # 8 messages: 4 per actor
    assert users_per_message(ray, 10) == 5  # 2 messages: one per actor, >= 5 users each
    assert users_per_message(ray, 1) == 1
    assert users_per_message(SimulationConfig(backend="ray", num_cpus_per_client=0.5,
                                              vectorise=False), 1000) == 63
    assert users_per_message(inproc, 100) == 25 and users_per_message(inproc, 3) == 3
    assert users_per_message(cluster, 100) == 5 and users_per_message(cluster, 1000) == 32
    assert users_per_message(SimulationConfig(backend="inprocess", users_per_message=3), 100) == 3
    # Vectorised: one cohort per message, the same on every backend (determinism).
    for sim in (SimulationConfig(backend="ray"), SimulationConfig(backend="inprocess"),
                SimulationConfig(backend="ray", ray_address="auto")):
        assert users_per_message(sim, 100) == 25  # 4 cohorts of <= 32
        assert users_per_message(sim, 32) == 32 and users_per_message(sim, 33) == 17
    with pytest.raises(ConfigError, match="simulation.users_per_message"):
        load_run_config(small_run(**{"simulation.users_per_message": -1}))


@pytest.mark.parametrize("extra", [
    {},
    # Per-user settings travel in the batch: HeteroFL widths and compression by tier,
    # and faults injected for some users only.
    {"optimization.width": {"low": 0.5}, "optimization.quant_bits": {"mid": 8},
     "fault_injection": [{"kind": "raise", "users": list(range(0, 200, 7)), "rounds": [2]}]},
])
def test_batching_users_changes_no_number(tmp_path: Path, extra: dict) -> None:
    """On the per-user path; vectorised cohorts are the messages (test_cohort.py).
    One update per client: partial sums (test_partial_sums.py) add a message's updates
    together, so another batching rounds differently."""
    rows = {}
    for per_message in (1, 6, 0):
        cfg = small_run(num_rounds=3, **{"devices.profile": "rf2-3tier"}, **extra,
                        **{"simulation.users_per_message": per_message,
                           "simulation.vectorise": False,
                           "simulation.partial_aggregation": False})
        run_job(cfg, tmp_path / f"b{per_message}")
        rows[per_message] = without_timing(read_rows(tmp_path / f"b{per_message}"))
    assert rows[1] == rows[6] == rows[0]
    assert rows[1][-1]["num_clients_trained"] > 0
    if extra:
        assert rows[1][2]["fault/client_error"] > 0
