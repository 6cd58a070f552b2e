"""One run end to end: validate and load everything, then open the run folder, then train.

Order matters: every input check (config values, data files, device profile, tier
names) happens in :func:`prepare` before the run folder is touched, so bad input never
leaves a folder that looks like a run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rf2.core.config import RunConfig
from rf2.core.errors import DataError
from rf2.core.plugins import recorded_config, unused_keys
from rf2.core.typed import check
from rf2.data import load_dataset
from rf2.data.base import FederatedDataset
from rf2.eval.evaluation import Evaluator
from rf2.fl.checkpointing import ServerState, restore_state
from rf2.fl.client import client_spec_from, make_client_app, retire_worker_model, worker_state
from rf2.fl.interrupt import RunInterrupted, stop_on_signals, stop_requested
from rf2.fl.params import load_numpy_into, state_to_numpy
from rf2.fl.ray_nodes import NodeRecord, records_as_json
from rf2.fl.selection import ClientSelector
from rf2.fl.server import FederatedServer, ServerSetup
from rf2.fl.simulation import launch, users_per_message
from rf2.fl.tier_settings import TierSettings
from rf2.fl.user_state import UserStateStore
from rf2.hetero.clock import SimClock, num_to_select
from rf2.hetero.devices import DeviceProfile, load_profile
from rf2.hetero.population import Population, assign_tiers, population_summary
from rf2.hetero.tier_file import tier_csv_text
from rf2.model import FederatedModel, build_model
from rf2.model.examples import num_training_examples
from rf2.model.ttt import check_ttt, ttt_if_enabled
from rf2.privacy.plan import PrivacyPlan, plan_privacy
from rf2.runs.run_folder import Checkpoint, RunFolder
from rf2.strategies import instantiate_strategy

if TYPE_CHECKING:  # Flower is imported by rf2.fl and rf2.strategies only
    from flwr.serverapp.strategy import Strategy

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    cfg: RunConfig
    dataset: FederatedDataset
    profile: DeviceProfile
    population: Population
    model: FederatedModel
    strategy: Strategy
    num_examples: np.ndarray  # (num_users,)
    privacy: PrivacyPlan | None = None  # privacy=dp, resolved against the population


def resolved_data_path(path: str) -> str:
    """``dataset.path`` made absolute with symlinks resolved; a symlink loop (or a path
    the OS cannot resolve) is one data error, not a traceback."""
    try:
        return str(Path(path).resolve())
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise DataError(path, "symlink loop: the path (or a folder in it) is a link that "
                        "points back to itself; point dataset.path at the data") from None
    except OSError as ex:
        raise DataError(path, f"cannot resolve the path: {ex.strerror or ex}") from None


def check_profile(cfg: RunConfig) -> DeviceProfile:
    """The device profile and the tier names the config uses (needs no data: cheap)."""
    profile = load_profile(cfg.devices.profile)
    tier_names = [t.name for t in profile.tiers]
    opt = cfg.optimization
    for field_name in ("prune_rate", "quant_bits", "width"):
        for tier in getattr(opt, field_name):
            check(tier in tier_names, f"optimization.{field_name}.{tier}", tier,
                  f"tiers of profile {profile.name}: {', '.join(tier_names)}")
    for tier in opt.exclude_tiers:
        check(tier in tier_names, "optimization.exclude_tiers", tier,
              f"tiers of profile {profile.name}: {', '.join(tier_names)}")
    return profile


def check_against_data(cfg: RunConfig, dataset: FederatedDataset) -> None:
    """Config values whose allowed range depends on the loaded dataset."""
    check(max(cfg.eval.ks) <= dataset.num_items, "eval.ks", cfg.eval.ks,
          f"cut-offs <= the number of items ({dataset.num_items})")
    check(cfg.clients_per_round <= dataset.num_users, "clients_per_round", cfg.clients_per_round,
          f"an integer in [1, {dataset.num_users}] (the number of users)")
    if cfg.model.name == "hier_index" and not cfg.model._target_:
        # k-means initialises each level from the items: more nodes than items is empty
        # clusters at best.
        check(max(cfg.model.index.nodes_per_level) <= dataset.num_items,
              "model.index.nodes_per_level", cfg.model.index.nodes_per_level,
              f"node counts <= the number of items ({dataset.num_items})")
    for i, fi in enumerate(cfg.fault_injection):
        bad = [u for u in fi.users if not 0 <= u < dataset.num_users]
        check(not bad, f"fault_injection[{i}].users", bad[:5],
              f"user ids in [0, {dataset.num_users - 1}]")
        late = [r for r in fi.rounds if not 1 <= r <= cfg.num_rounds]
        check(not late, f"fault_injection[{i}].rounds", late[:5],
              f"rounds in [1, num_rounds={cfg.num_rounds}]")


def check_model_supports(cfg: RunConfig, model: FederatedModel) -> None:
    """Tier policies the model cannot follow are one config error, not a client crash."""
    narrows = any(w < 1 for w in cfg.optimization.width.values())
    if narrows and cfg.mode != "central" and type(model).at_width is FederatedModel.at_width:
        check(False, "optimization.width", cfg.optimization.width,
              f"no width below 1 ({type(model).__name__} has no HeteroFL sub-model: "
              "FederatedModel.at_width); optimization=none, exclude-low, over-select, "
              "prune, quantize or fsl")


def central_negatives(cfg: RunConfig, num_items: int) -> RunConfig:
    """``mode=central`` where ``model.loss=auto`` picks the sampled softmax: with
    ``central.num_negatives`` negatives (at most the catalogue); config.yaml records it."""
    k = cfg.central.num_negatives
    if (cfg.mode != "central" or cfg.model.loss != "auto" or k <= 0
            or cfg.model.loss_kind(num_items) != "sampled"):
        return cfg
    model = dataclasses.replace(cfg.model, num_negatives=min(k, num_items))
    return dataclasses.replace(cfg, model=model)


def prepare(cfg: RunConfig) -> PreparedRun:
    """Load and cross-check every input; raises UserInputError before any training.

    The device profile is checked first: it needs no data, so its errors come back
    before a large dataset has loaded.
    """
    if cfg.dataset.path:
        resolved = resolved_data_path(cfg.dataset.path)
        cfg = dataclasses.replace(cfg, dataset=dataclasses.replace(cfg.dataset, path=resolved))
    profile = check_profile(cfg)
    for unused in unused_keys(cfg):  # the errors among them failed validation already
        log.warning("rf2: warning: %s", unused.message())
    for setting in cfg.optimization.unnamed_settings():
        log.warning("rf2: warning: optimization.%s acts but optimization.name=%s does not "
                    "say so (results and figures label the run %s)", setting,
                    cfg.optimization.name, cfg.optimization.name)
    dataset = load_dataset(cfg.dataset, cfg.seed)
    cfg = central_negatives(cfg, dataset.num_items)
    check_against_data(cfg, dataset)
    population = assign_tiers(dataset, profile, cfg.population, cfg.seed)
    model = build_model(cfg.model, dataset, cfg.seed)
    check_model_supports(cfg, model)
    check_ttt(cfg.model, model)
    strategy = instantiate_strategy(cfg.strategy, cfg.client)
    num_examples = num_training_examples(dataset)
    prep = PreparedRun(cfg, dataset, profile, population, model, strategy, num_examples)
    if cfg.privacy.name == "dp":
        # Solving z for a target epsilon can fail: before the run folder exists.
        eligible = int(eligible_users(prep).size)
        selected = num_to_select(cfg.clients_per_round,
                                 cfg.round.overcommit + cfg.optimization.overselect)
        prep.privacy = plan_privacy(cfg.privacy, eligible, min(selected, eligible),
                                    cfg.num_rounds, cfg.clients_per_round)
    return prep


def data_summary(cfg: RunConfig, dataset: FederatedDataset) -> dict[str, object]:
    """``data.json``: sizes, the split used and (random split) the seed that drew it."""
    out = dataset.summary()
    if dataset.split == "random":
        out["split_seed"] = cfg.seed if cfg.dataset.split_seed is None else cfg.dataset.split_seed
    if dataset.split != "given":
        out["train_fraction"] = cfg.dataset.train_fraction
    return out


def tiering_info(cfg: RunConfig) -> dict[str, object]:
    """How the tier map was made, for population.json (leaky maps say so)."""
    pop = cfg.population
    if pop._target_:  # the user's own tiering: mode and its settings were not used
        # It gets the whole split dataset: whether it read test clicks is its own.
        return {"_target_": pop._target_, "kwargs": pop.kwargs,
                "dataset_protocol": cfg.dataset.protocol}
    info: dict[str, object] = {"mode": pop.mode, "dataset_protocol": cfg.dataset.protocol,
                               "leak_test": bool(pop.leak_test),
                               "uses_test_clicks": bool(pop.leak_test)}
    if pop.mode in ("popularity-dirichlet", "rf2-dirichlet"):
        info["alpha"] = pop.alpha
    if pop.mode == "from-file":
        info["path"] = pop.path
    return info


def eligible_users(prep: PreparedRun) -> np.ndarray:
    """Users that may be selected: with local examples, not in an excluded tier."""
    allowed = prep.population.eligible_users(prep.cfg.optimization.exclude_tiers)  # (n,) ascending
    return allowed[prep.num_examples[allowed] > 0]


def execute(prep: PreparedRun, folder: RunFolder, resuming: bool = False) -> Path:
    """Train and write the run folder. With ``resuming``, continue from its checkpoint."""
    cfg = prep.cfg
    selector = ClientSelector(eligible_users(prep), seed=cfg.seed)
    # What travels: the federated state (per-user state never does).
    model_bytes = float(sum(a.nbytes for a in state_to_numpy(prep.model).values()))
    # Per-user sizes come from TierSettings each round; these are the defaults.
    clock = SimClock(prep.population, seed=cfg.seed, model_bytes_down=model_bytes,
                     update_bytes_up=model_bytes, local_epochs=cfg.client.local_epochs)
    fingerprint = prep.dataset.fingerprint()
    if resuming:
        check_same_data(folder, fingerprint)
    checkpoint = folder.latest_checkpoint() if resuming else None
    if checkpoint is not None:
        check_same_shapes(checkpoint, prep.model)
        state = restore_state(checkpoint, selector, clock, prep.strategy)
        folder.truncate_to_round(state.round)
    else:
        if resuming:
            restart_from_round_0(folder)
            if not (folder.path / DATASET).exists():
                folder.write_json(DATASET, fingerprint)  # checked by the next resume
        else:
            folder.create(recorded_config(cfg))
            folder.write_json(DATASET, fingerprint)
        summary = population_summary(prep.dataset, prep.population)
        summary["tiering"] = tiering_info(cfg)
        folder.write_json("population.json", summary)
        folder.write_json("data.json", data_summary(cfg, prep.dataset))
        folder.write_text("tiers.csv", tier_csv_text(
            prep.dataset.raw_user_ids(), prep.population.tier_of_user,
            prep.population.tier_names))
        state = ServerState(round=0, arrays=state_to_numpy(prep.model), selector=selector,
                            clock=clock)
    # Per-user state (rf2.fl.user_state): from the model's initial tables, or restored.
    user_state = UserStateStore.of_model(prep.model)
    if user_state is not None and state.user_state:
        user_state = UserStateStore(state.user_state)
    evaluator = Evaluator.from_config(prep.dataset, cfg.eval, cfg.seed,
                                      prep.population.tier_of_user, prep.population.tier_names)
    shapes = {k: tuple(v.shape) for k, v in state.arrays.items()}
    tiers = TierSettings(cfg.optimization, prep.population, shapes, cfg.model.dim,
                         prep.model.width_rules())
    # Messages go only to clients that will finish, at most K per round, batched.
    per_message = users_per_message(cfg.simulation, cfg.clients_per_round)
    max_clients = max(1, min(cfg.clients_per_round, len(selector.eligible)))
    num_slots = -(-max_clients // per_message)
    setup = ServerSetup(cfg=cfg, num_examples=prep.num_examples, model=prep.model,
                        strategy=prep.strategy, evaluator=evaluator, folder=folder, tiers=tiers,
                        num_slots=num_slots, users_per_message=per_message,
                        privacy=prep.privacy, user_state=user_state)
    server = FederatedServer(setup, state)
    spec = client_spec_from(cfg.dataset, cfg.model, cfg.seed, cfg.simulation.fast_transport,
                            cfg.simulation.vectorise, cfg.simulation.sparse_updates)
    spec = dataclasses.replace(spec, user_state=user_state)
    if cfg.simulation.backend == "inprocess":
        worker_state(spec, prep.dataset)  # clients run here: share the loaded dataset
    if state.round < cfg.num_rounds or not folder.read_metrics():
        with stop_on_signals():
            nodes = launch(server.main, lambda shared: make_client_app(
                               dataclasses.replace(spec, data=shared)),
                           num_slots, cfg.simulation,
                           on_abandoned=lambda: retire_worker_model(spec), dataset=prep.dataset,
                           user_state=user_state)
        write_nodes(folder, nodes)
        if stop_requested() and server.state.round < cfg.num_rounds:
            raise RunInterrupted
    load_numpy_into(prep.model, server.state.arrays)
    if user_state is not None:
        user_state.load_into(prep.model)  # model.pt holds every user's own rows
    return finish_run(prep, folder, evaluator)


def finish_run(prep: PreparedRun, folder: RunFolder, evaluator: Evaluator) -> Path:
    """Save the final model, run test-time training if enabled, mark the run done.

    Test-time training (model.index.ttt) fine-tunes the final model on (user,
    node-on-path) pairs; its metric change goes to ttt.json, model.pt stays the trained
    (federated or central) result.
    """
    cfg = prep.cfg
    folder.save_model(lambda fh: torch.save(prep.model.state_dict(), fh))
    # TTT's before/after compare on the users of the run's last evaluation.
    ttt = ttt_if_enabled(prep.model, prep.dataset, evaluator.final().evaluate_model, cfg.model,
                         cfg.seed)
    if ttt is not None:
        folder.write_json("ttt.json", ttt)
    folder.mark_done()
    return folder.path


NODES = "nodes.json"  # the Ray nodes the run's clients trained on (rf2.fl.ray_nodes)


def write_nodes(folder: RunFolder, nodes: list[NodeRecord]) -> None:
    """Record the Ray nodes of this launch in ``nodes.json``; a resumed run adds its
    clients to the nodes already listed (by node id)."""
    if not nodes:
        return
    path = folder.path / NODES
    listed: dict[str, dict[str, Any]] = {}
    if path.exists():
        listed = {n["node_id"]: n for n in json.loads(path.read_text(encoding="utf-8"))["nodes"]}
    for node in records_as_json(nodes):
        if node["node_id"] in listed:
            listed[node["node_id"]]["clients_trained"] += node["clients_trained"]
        else:
            listed[node["node_id"]] = node
    folder.write_json(NODES, {"nodes": list(listed.values())})


DATASET = "data_fingerprint.json"  # the data's sizes and SHA-256, checked on resume


def restart_from_round_0(folder: RunFolder) -> None:
    """A resume without a checkpoint to continue from: say so, and start at round 0.

    (When checkpoints exist but none is valid, ``latest_checkpoint`` has said so.)
    """
    rows = folder.read_metrics()
    if not (folder.path / "checkpoints").is_dir() or not any(
            (folder.path / "checkpoints").glob("round_*")):
        held = (f"its {len(rows)} row(s) are computed again" if rows
                else "it holds no rounds yet")
        log.warning("rf2: warning: %s has no checkpoint; resuming from round 0 (%s)",
                    folder.path, held)
    folder.truncate_to_round(-1)


def check_same_data(folder: RunFolder, now: dict[str, Any]) -> None:
    """A resume must see the data the run started with (else rows and shapes mix)."""
    path = folder.path / DATASET
    if not path.exists():
        return  # a run folder from before data_fingerprint.json
    then = json.loads(path.read_text(encoding="utf-8"))
    if then == now:
        return
    changed = [f"{k} {then.get(k)} -> {now.get(k)}" for k in now
               if k != "sha256" and then.get(k) != now.get(k)] or ["same sizes, other clicks"]
    raise DataError(str(folder.path / DATASET), "the dataset changed since the run started ("
                    + ", ".join(changed) + "); resume needs the same data: restore it or "
                    "start a new run")


def check_same_shapes(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """The checkpoint's model arrays must fit the model built from today's data."""
    for name, tensor in model.state_dict().items():
        saved = checkpoint.arrays.get(f"model/{name}")
        if saved is not None and tuple(saved.shape) != tuple(tensor.shape):
            raise DataError(str(checkpoint.path), f"model/{name} has shape {tuple(saved.shape)} "
                            f"but the data now gives {tuple(tensor.shape)}: the dataset changed "
                            "since the run started; restore it or start a new run")
