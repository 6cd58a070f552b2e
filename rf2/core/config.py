"""Typed schema of a run's configuration.

Hydra composes ``rf2/conf`` into a plain mapping; :func:`load_run_config` turns it into
these dataclasses and validates every value before any compute starts. Each group of
``conf/`` (dataset, model, strategy, devices, population, optimization, simulation)
maps to one dataclass here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rf2.core.plugins import check_plugins
from rf2.core.typed import check, from_dict

DatasetName = Literal[
    "synthetic", "movielens100k", "movielens1m", "movielens20m", "lightgcn", "recbole"
]


@dataclass
class DatasetConfig:
    # A loader from the user's own module: a dotted path to a function (cfg, seed) ->
    # rf2.data.Interactions (docs/extending.md); rf2 then applies ``protocol`` and the
    # split. Empty: rf2's loader named by ``name``.
    _target_: str = ""
    # Keyword arguments for the ``_target_`` loader (``+dataset.kwargs.min_rating=4``).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Which loader reads the data (the dataset= group sets it with its defaults).
    name: DatasetName = "synthetic"
    # Directory holding the dataset's files (MovieLens: u.data/ratings.dat/ratings.csv;
    # lightgcn: train.txt/test.txt; recbole: NAME.inter). Unused by ``synthetic``.
    path: str | None = None
    # recbole: the atomic files' NAME (DIR/NAME.inter); null = the directory's name.
    name_in_dir: str | None = None
    # recbole: a token/token_seq column of NAME.item used as multi-hot item genres.
    genre_field: str | None = None
    # Seed of the per-user random split of data without timestamps; null = the run seed.
    split_seed: int | None = None
    # Implicit click = rating >= click_threshold (RF²: 5 stars on MovieLens; recbole:
    # applies only when NAME.inter has a rating column, else every row is a click).
    click_threshold: float = 5.0
    # Per user, first ``train_fraction`` of clicks in time order train, the rest test.
    train_fraction: float = 0.9
    # "clicks": clicks only, users without a click dropped. "rf2": RF²'s protocol, every
    # rating a labelled sample, first ceil(train_fraction * n) ratings per user train,
    # users without a click kept (rf2.data.protocol). The model trains on clicks either way.
    protocol: Literal["clicks", "rf2"] = "clicks"
    # Features: the last ``history_len`` clicked items before the predicted click.
    history_len: int = 10
    # Synthetic: number of users (this and the keys below: the synthetic generator only).
    num_users: int = 1000
    # Synthetic: number of items.
    num_items: int = 1000
    # Synthetic: latent taste groups users and items are drawn from.
    num_groups: int = 20
    # Synthetic: mean clicks per user (activity is long-tailed around it).
    mean_clicks_per_user: float = 25.0
    # Synthetic: Zipf exponent of item popularity (0 = uniform).
    popularity_exponent: float = 1.0
    # Synthetic: number of item genres (0 = none).
    num_genres: int = 18

    def validate(self, path: str = "dataset") -> None:
        check(self.name == "synthetic" or bool(self._target_) or bool(self.path),
              f"{path}.path", self.path,
              f"a directory containing the {self.name} files (required for {self.name})")
        check(0.0 < self.train_fraction < 1.0, f"{path}.train_fraction", self.train_fraction,
              "a fraction in (0, 1)")
        check(self.history_len >= 1, f"{path}.history_len", self.history_len, "an integer >= 1")
        check(self.num_users >= 2, f"{path}.num_users", self.num_users, "an integer >= 2")
        check(self.num_items >= 2, f"{path}.num_items", self.num_items, "an integer >= 2")
        check(1 <= self.num_groups <= self.num_items, f"{path}.num_groups", self.num_groups,
              "an integer in [1, num_items]")
        check(self.mean_clicks_per_user >= 2, f"{path}.mean_clicks_per_user",
              self.mean_clicks_per_user, "a number >= 2")
        check(self.popularity_exponent >= 0, f"{path}.popularity_exponent",
              self.popularity_exponent, "a number >= 0")
        check(self.num_genres >= 0, f"{path}.num_genres", self.num_genres, "an integer >= 0")


@dataclass
class IndexConfig:
    """Learned hierarchical index (HILL/HSNN); used when model.name = hier_index.

    A "step" is a server round in federated training, an optimizer step centrally.
    """

    # Residual levels of the index tree.
    levels: int = 2
    # Learnable nodes per level; leaves = their product (aim for a few items per leaf).
    nodes_per_level: list[int] = field(default_factory=lambda: [16, 16])
    # Node initialisation: k-means of the item embeddings at build time, or random.
    init: Literal["kmeans", "random"] = "kmeans"
    # Soft-assignment temperature alpha = min + (max - min) * progress ** alpha_power,
    # progress = min(1, step / anneal_steps); anneal_steps = 0: step / total steps of the
    # run (num_rounds). An absolute length keeps a resumed, extended run identical.
    min_alpha: float = 1.0
    # Final soft-assignment temperature (see min_alpha).
    max_alpha: float = 20.0
    # Shape of the temperature schedule (1 = linear in progress).
    alpha_power: float = 1.0
    # Steps from min_alpha to max_alpha; 0 = the whole run.
    anneal_steps: int = 100
    # Weight of the index's retrieval loss against the model's loss.
    index_loss_weight: float = 1.0
    # Steps over which the index loss ramps up from 0.
    warmup_steps: int = 20
    # Weight of the balance term against cluster collapse (share of items per path).
    balance_weight: float = 0.01
    # Catalogue items sampled per step for the balance term (all items when fewer).
    balance_sample: int = 4096
    # Weight of reconstructing item embeddings from their path.
    reconstruction_weight: float = 1.0
    # Paths kept per level by beam search at evaluation/serving.
    beam: int = 16
    # Test-time training: fine-tune on (user, node-on-path at depth ttt_depth) pairs.
    ttt: bool = False
    # Test-time training: tree depth of the (user, node) pairs.
    ttt_depth: int = 2
    ttt_rate: float = 1.0  # node pairs per training example (expected)
    # Test-time training: epochs over the node pairs.
    ttt_epochs: int = 2
    # Test-time training: learning rate.
    ttt_lr: float = 0.001

    def validate(self, path: str = "model.index") -> None:
        check(self.levels >= 1, f"{path}.levels", self.levels, "an integer >= 1")
        check(len(self.nodes_per_level) == self.levels, f"{path}.nodes_per_level",
              self.nodes_per_level, f"a list of {self.levels} integers (one per level)")
        check(all(k >= 2 for k in self.nodes_per_level), f"{path}.nodes_per_level",
              self.nodes_per_level, "integers >= 2")
        check(self.max_alpha > 0, f"{path}.max_alpha", self.max_alpha, "a number > 0")
        check(0 <= self.min_alpha <= self.max_alpha, f"{path}.min_alpha", self.min_alpha,
              "a number in [0, max_alpha]")
        check(self.alpha_power > 0, f"{path}.alpha_power", self.alpha_power, "a number > 0")
        check(self.beam >= 1, f"{path}.beam", self.beam, "an integer >= 1")
        for name in ("index_loss_weight", "balance_weight", "reconstruction_weight"):
            check(getattr(self, name) >= 0, f"{path}.{name}", getattr(self, name), "a number >= 0")
        check(self.warmup_steps >= 0, f"{path}.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(self.anneal_steps >= 0, f"{path}.anneal_steps", self.anneal_steps,
              "an integer >= 0 (0 = the whole run)")
        check(self.balance_sample >= 1, f"{path}.balance_sample", self.balance_sample,
              "an integer >= 1")
        check(1 <= self.ttt_depth <= self.levels, f"{path}.ttt_depth", self.ttt_depth,
              f"an integer in [1, levels={self.levels}]")
        check(self.ttt_rate >= 0, f"{path}.ttt_rate", self.ttt_rate, "a number >= 0")
        check(self.ttt_epochs >= 1, f"{path}.ttt_epochs", self.ttt_epochs, "an integer >= 1")
        check(self.ttt_lr > 0, f"{path}.ttt_lr", self.ttt_lr, "a number > 0")


@dataclass
class FCFConfig:
    """Federated collaborative filtering (model.name = fcf, ``rf2.model.fcf``)."""

    # Before its federated step a client fits its own user vector to the current item
    # table (the paper's on-device user update): this many full-batch gradient steps on
    # the vector alone (0 = none: the vector moves only with the joint step).
    user_steps: int = 10
    # Learning rate of those user-vector steps.
    user_lr: float = 1.0

    def validate(self, path: str = "model.fcf") -> None:
        check(self.user_steps >= 0, f"{path}.user_steps", self.user_steps, "an integer >= 0")
        check(self.user_lr > 0, f"{path}.user_lr", self.user_lr, "a number > 0")


@dataclass
class ModelConfig:
    # A model from the user's own module: a dotted path to a ``rf2.model.base
    # .FederatedModel`` subclass (built with its ``from_dataset``) or a function
    # (dataset, cfg, seed) -> model. Empty: rf2's model named by ``name``.
    _target_: str = ""
    # two_tower: the retrieval model alone; hier_index: with a jointly learned index;
    # fcf: federated collaborative filtering (matrix factorisation, user vectors kept on
    # the clients as per-user state; docs/extending.md "Stateful models").
    name: Literal["two_tower", "hier_index", "fcf"] = "hier_index"
    # Embedding width D of users and items.
    dim: int = 64
    # Add the item's genre embedding to the item tower.
    use_genres: bool = True
    # Learn a per-item bias added to the score.
    item_bias: bool = True
    # full: softmax over the whole catalogue (exact; O(I) work and an O(I) update per
    # client). sampled: ``num_negatives`` uniform negatives drawn once per client per
    # round (seeded from the client's seed), shared by its examples, logQ-corrected;
    # a client then touches only its own items and its negatives. auto: sampled when
    # the catalogue has more than ``auto_sampled_above`` items (see docs/performance.md "Scale").
    loss: Literal["full", "sampled", "auto"] = "auto"
    # Uniform negatives per client and round for loss=sampled.
    num_negatives: int = 200
    # 5,000: below it full softmax costs a client about as much as the rest of its step
    # and K=200 negatives would already be >4% of the catalogue (ML-100K, ML-1M, the
    # synthetic default stay exact); above it the full softmax's O(I) scores and its
    # O(I·D) dense update dominate a round (36k items: ~15x the 1.7k-item round).
    auto_sampled_above: int = 5000
    # Std of the normal initialisation of the embeddings.
    init_scale: float = 0.1
    index: IndexConfig = field(default_factory=IndexConfig)
    fcf: FCFConfig = field(default_factory=FCFConfig)

    def loss_kind(self, num_items: int) -> Literal["full", "sampled"]:
        """The loss actually trained for a catalogue of ``num_items`` (``auto`` resolved)."""
        if self.loss == "auto":
            return "sampled" if num_items > self.auto_sampled_above else "full"
        return self.loss

    def validate(self, path: str = "model") -> None:
        check(self.dim >= 1, f"{path}.dim", self.dim, "an integer >= 1")
        check(self.num_negatives >= 1, f"{path}.num_negatives", self.num_negatives,
              "an integer >= 1")
        check(self.auto_sampled_above >= 0, f"{path}.auto_sampled_above",
              self.auto_sampled_above, "an integer >= 0")
        check(self.init_scale > 0, f"{path}.init_scale", self.init_scale, "a number > 0")


@dataclass
class ClientConfig:
    # Passes over the client's own examples per round.
    local_epochs: int = 1
    # Client SGD learning rate (RF²: 1.0 with one full-batch step).
    lr: float = 1.0
    # 0 = full batch (RF²: one full-batch SGD step per local epoch).
    batch_size: int = 0

    def validate(self, path: str = "client") -> None:
        check(self.local_epochs >= 1, f"{path}.local_epochs", self.local_epochs, "an integer >= 1")
        check(self.lr > 0, f"{path}.lr", self.lr, "a number > 0")
        check(self.batch_size >= 0, f"{path}.batch_size", self.batch_size,
              "an integer >= 0 (0 = full batch)")


@dataclass
class CentralConfig:
    """``mode=central``: the same model trained on all users' pooled examples."""

    # Epochs over the pooled training examples.
    epochs: int = 1
    # Examples per optimizer step.
    batch_size: int = 256
    # Optimizer of central training.
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    # Adam 0.01: on MovieLens-100K (two_tower) Recall@20 0.258 after 2 epochs at batch
    # 256; 0.001 reached 0.097, 0.05 peaked at 0.232 after 1 epoch then overfit.
    lr: float = 0.01
    # L2 weight decay of the optimizer.
    weight_decay: float = 0.0
    # Metrics rows per epoch (evenly spaced in steps); round = evaluation number, so
    # with 1 (the default) round = epoch.
    evals_per_epoch: int = 1
    # Negatives of the sampled softmax when model.loss=auto picks it (catalogues above
    # model.auto_sampled_above), at most the catalogue: central training is the
    # reference a federated run is judged against, so it gets the stronger estimate. On
    # amazon-cds (36k items, two_tower) a step with 2,000 negatives cost 1.4x one with
    # 200 and a full-softmax step 10x (docs/central.md). An explicit model.loss=sampled
    # keeps model.num_negatives; 0 = always model.num_negatives.
    num_negatives: int = 2000

    def validate(self, path: str = "central") -> None:
        check(self.epochs >= 1, f"{path}.epochs", self.epochs, "an integer >= 1")
        check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "an integer >= 1")
        check(self.lr > 0, f"{path}.lr", self.lr, "a number > 0")
        check(self.weight_decay >= 0, f"{path}.weight_decay", self.weight_decay, "a number >= 0")
        check(self.evals_per_epoch >= 1, f"{path}.evals_per_epoch", self.evals_per_epoch,
              "an integer >= 1")
        check(self.num_negatives >= 0, f"{path}.num_negatives", self.num_negatives,
              "an integer >= 0 (0 = model.num_negatives)")


@dataclass
class StrategyConfig:
    """Aggregation rule + server optimizer.

    ``_target_`` names what builds the strategy (``hydra.utils.instantiate``): rf2's
    builder, which reads the fields below, or a user's Flower Strategy class, which is
    called with ``kwargs`` (see ``rf2.strategies.instantiate``); the fields only the
    builder reads are then an error when set (``rf2.core.plugins``).
    """

    # What builds the strategy: rf2's builder, or your Flower Strategy class (docs/extending.md).
    _target_: str = "rf2.strategies.build_strategy"
    # Keyword arguments for a custom ``_target_`` (``+strategy.kwargs.alpha=0.5``).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Aggregation rule of rf2's builder (the strategy= group sets it). fedbuff: FedAvg's
    # mean (and server optimizer) applied asynchronously, FedBuff on the simulated clock:
    # one server step per "round" after clients_per_round arrivals (docs/strategies.md).
    # With a custom _target_: fedavg (synchronous rounds) or fedbuff (asynchronous).
    name: Literal["fedavg", "fedprox", "qffl", "fedbuff"] = "fedavg"
    # Server optimizer applied to the aggregated pseudo-gradient: adagrad/adam/yogi are
    # FedOpt (Reddi et al.), momentum is FedAvgM (Hsu et al.: server SGD with momentum).
    server_optimizer: Literal["none", "adagrad", "adam", "yogi", "momentum"] = "adagrad"
    # Server optimizer's learning rate (momentum: the SGD step, whose steady-state size
    # is server_lr / (1 - server_momentum); 1.0 without momentum is plain FedAvg).
    server_lr: float = 0.1
    # Adaptivity constant of Adagrad/Adam/Yogi (FedOpt's tau).
    tau: float = 1e-9
    # Adam/Yogi first-moment decay.
    beta_1: float = 0.9
    # Adam/Yogi second-moment decay.
    beta_2: float = 0.99
    # momentum (FedAvgM): the server momentum beta.
    server_momentum: float = 0.9
    # FedProx: weight mu of the proximal term (mu/2)||w - w_global||^2.
    proximal_mu: float = 0.01
    # q-FFL: fairness exponent q (0 = unweighted mean, larger = fairer).
    q: float = 1.0
    # fedbuff: clients training at once (null = 2 x clients_per_round, the buffer size K).
    concurrency: int | None = None
    # fedbuff: a delta s server steps stale weighs (1 + s)^-staleness_exponent (0: no
    # down-weighting; FedBuff's default 0.5).
    staleness_exponent: float = 0.5

    def validate(self, path: str = "strategy") -> None:
        check(self.server_lr > 0, f"{path}.server_lr", self.server_lr, "a number > 0")
        check(self.tau > 0, f"{path}.tau", self.tau, "a number > 0")
        check(0 <= self.beta_1 < 1, f"{path}.beta_1", self.beta_1, "a number in [0, 1)")
        check(0 <= self.beta_2 < 1, f"{path}.beta_2", self.beta_2, "a number in [0, 1)")
        check(0 <= self.server_momentum < 1, f"{path}.server_momentum", self.server_momentum,
              "a number in [0, 1)")
        check(self.proximal_mu >= 0, f"{path}.proximal_mu", self.proximal_mu, "a number >= 0")
        check(self.q >= 0, f"{path}.q", self.q, "a number >= 0")
        check(self.concurrency is None or self.concurrency >= 1, f"{path}.concurrency",
              self.concurrency, "null (= 2 x clients_per_round) or an integer >= 1")
        check(self.staleness_exponent >= 0, f"{path}.staleness_exponent",
              self.staleness_exponent, "a number >= 0")


@dataclass
class DevicesConfig:
    # Name of a shipped profile (device_profiles/<name>.yaml) or a path to a YAML file.
    profile: str = "uniform"


PopulationMode = Literal["independent", "popularity-dirichlet", "activity", "rf2-sorted",
                         "rf2-random", "rf2-dirichlet", "from-file"]


@dataclass
class PopulationConfig:
    # A tiering from the user's own module: a dotted path to a function (dataset,
    # profile, seed) -> one tier per user (index or name; docs/extending.md); ``mode``
    # is then unused. Empty: rf2's tiering named by ``mode``.
    _target_: str = ""
    # Keyword arguments for the ``_target_`` tiering (``+population.kwargs.k=3``).
    kwargs: dict[str, Any] = field(default_factory=dict)
    # How users get tiers (the population= group sets it; docs/populations.md).
    mode: PopulationMode = "independent"
    alpha: float = 0.005  # popularity-dirichlet / rf2-dirichlet concentration
    strength: float = 1.0  # activity: 0 = independent, larger = stronger correlation
    # rf2-dirichlet only: true = RF²'s exact map, built from train AND TEST clicks (the
    # tiering sees test labels: it leaks); false = from train clicks only.
    leak_test: bool = False
    # from-file only: a tiers.csv (user_id,tier) or JSON ({user_id: tier}) to read back.
    path: str | None = None

    def validate(self, path: str = "population") -> None:
        check(self.alpha > 0, f"{path}.alpha", self.alpha, "a number > 0")
        check(self.strength >= 0, f"{path}.strength", self.strength, "a number >= 0")
        check(not self.leak_test or self.mode == "rf2-dirichlet", f"{path}.leak_test",
              self.leak_test, f"false with population.mode={self.mode} (only rf2-dirichlet "
              "can build its map from test clicks)")


@dataclass
class RoundConfig:
    """Round policies of the simulated clock (FedScale-style); combinable."""

    # Round deadline in simulated seconds; clients finishing later are dropped.
    deadline_s: float | None = None
    # Deadline at this quantile of the selected clients' simulated times.
    deadline_quantile: float | None = None
    # Select ceil((1 + overcommit) K) clients and keep the K that finish first.
    overcommit: float = 0.0
    # Apply each tier's availability (offline clients cannot be selected).
    availability: bool = True
    # Apply each tier's mid-round dropout probability.
    dropout: bool = True
    # A round with fewer completed clients is skipped (logged with its reason).
    min_completed: int = 1

    def validate(self, path: str = "round") -> None:
        check(self.deadline_s is None or self.deadline_s > 0, f"{path}.deadline_s",
              self.deadline_s, "null or a number > 0")
        check(self.deadline_quantile is None or 0 < self.deadline_quantile <= 1,
              f"{path}.deadline_quantile", self.deadline_quantile, "null or a fraction in (0, 1]")
        check(self.overcommit >= 0, f"{path}.overcommit", self.overcommit, "a number >= 0")
        check(self.min_completed >= 1, f"{path}.min_completed", self.min_completed,
              "an integer >= 1")


# The conf/optimization/*.yaml options (tests/test_config.py keeps them equal).
OptimizationName = Literal["none", "exclude-low", "fsl", "heterofl", "over-select", "prune",
                           "quantize"]
# A named optimization's own setting: its name alone would label a run it did not change.
_OPTIMIZATION_SETTING = {"exclude-low": "exclude_tiers", "fsl": "per_row_embedding_avg",
                         "heterofl": "width", "over-select": "overselect",
                         "prune": "prune_rate", "quantize": "quant_bits"}


@dataclass
class OptimizationConfig:
    """RF²'s tier-aware optimizations; each usable with any strategy."""

    # Which tier-aware optimization (the optimization= group sets it with its setting;
    # docs/strategies.md). The name labels the run (results, figures: "none" is the
    # reference of D_t); the settings below do the work.
    name: OptimizationName = "none"
    # Tiers never selected for training (still evaluated).
    exclude_tiers: list[str] = field(default_factory=list)
    # Over-selection: select ceil((1 + x) K), keep the K that finish first.
    overselect: float = 0.0
    # Per tier: probability of dropping each update element (unbiased rescaling).
    prune_rate: dict[str, float] = field(default_factory=dict)
    # Per tier: bits of unbiased stochastic quantization of the update.
    quant_bits: dict[str, int] = field(default_factory=dict)
    # Per tier: HeteroFL sub-model width as a fraction of the embedding dim.
    width: dict[str, float] = field(default_factory=dict)
    # Average each item row only over the clients that touched it (RF²'s fsl).
    per_row_embedding_avg: bool = False

    def unnamed_settings(self) -> list[str]:
        """Settings that act although ``name`` does not say so (e.g. ``prune_rate`` under
        ``name: none``, the reference of D_t): the runner warns, the label would mislead."""
        return [setting for name, setting in _OPTIMIZATION_SETTING.items()
                if name != self.name and getattr(self, setting)]

    def validate(self, path: str = "optimization") -> None:
        setting = _OPTIMIZATION_SETTING.get(self.name)
        check(setting is None or bool(getattr(self, setting)), f"{path}.name", self.name,
              f"a name whose setting is set: {self.name} needs {path}.{setting} "
              f"(optimization={self.name} sets both)")
        check(self.overselect >= 0, f"{path}.overselect", self.overselect, "a number >= 0")
        for tier, rate in self.prune_rate.items():
            check(0 <= rate < 1, f"{path}.prune_rate.{tier}", rate, "a fraction in [0, 1)")
        for tier, bits in self.quant_bits.items():
            check(1 <= bits <= 32, f"{path}.quant_bits.{tier}", bits, "an integer in [1, 32]")
        for tier, w in self.width.items():
            check(0 < w <= 1, f"{path}.width.{tier}", w, "a fraction in (0, 1]")
        narrower = any(w < 1 for w in self.width.values())
        # Columns a narrow client never held would count as "touched" rows.
        check(not (narrower and self.per_row_embedding_avg), f"{path}.per_row_embedding_avg",
              self.per_row_embedding_avg, "false when optimization.width narrows a tier")


@dataclass
class SimulationConfig:
    # ray: Flower's simulation engine on Ray; inprocess: the same apps in this process.
    backend: Literal["ray", "inprocess"] = "ray"
    # Ray client resources: 1 CPU per client gives two actors on a 2-core machine.
    num_cpus_per_client: float = 1.0
    # Ray GPU share per client worker.
    num_gpus_per_client: float = 0.0
    # Join an existing Ray cluster (e.g. "auto" or "ray://host:10001") instead of starting one.
    ray_address: str | None = None
    # Ray's temp/session folder (null = Ray's default; keep the path short).
    ray_temp_dir: str | None = None
    # Client workers (Ray actors) at most; 0 = as many as the cluster's CPUs fit. Caps a
    # job's share of a cluster when a sweep runs several jobs at once (docs/cluster.md).
    ray_max_workers: int = 0
    # Local Ray without the processes a simulation never uses (autoscaler monitor, log
    # monitor, dashboard API server; rf2.fl.ray_start); false = plain ray.init().
    lean_start: bool = True
    # Seconds to wait for one round's replies before counting the missing ones as faults
    # (both backends: in-process, clients run in a worker thread the server stops waiting
    # for; rf2.fl.deadline).
    round_timeout_s: float = 600.0
    # Seconds one user's training may take inside its batch message; past it that user
    # alone counts as fault/timeout and the batch goes on. null = only the round budget.
    client_timeout_s: float | None = None
    # Users carried by one Flower message (each still trains and replies on its own;
    # rf2.fl.user_batch). 0 = auto: ~5 users per message, 1 to 4 messages per client worker
    # (rf2.fl.simulation.users_per_message).
    users_per_message: int = 0
    # Flower internals for speed (rf2.fl.fast_transport): FastArray, and on Ray push-driven
    # delivery. false = public Flower APIs only (stock Array, engine and polling); same metrics.
    fast_transport: bool = True
    # Train the users of a cohort in one stacked computation (rf2.model.cohort); false =
    # one user at a time (the reference path). Each user is still its own client.
    vectorise: bool = True
    # Users per cohort. A cohort never spans two messages, and cohorts depend on this
    # value alone (not on the backend or the worker count), so Ray and in-process runs
    # stay identical. An explicit, smaller users_per_message caps it.
    cohort_size: int = 32
    # Clients reply only the rows of the item tables they changed (rf2.optim.sparse);
    # aggregation is exactly the dense one. false = whole models (the reference).
    sparse_updates: bool = True
    # Partial aggregation inside a message (rf2.fl.partial_sum): when the aggregate is a
    # weighted mean of client deltas and no per-client transform applies, a message
    # replies the weighted sum of its users' deltas (the same mean to rounding).
    # false = one update per client (the reference).
    partial_aggregation: bool = True

    def validate(self, path: str = "simulation") -> None:
        check(self.num_cpus_per_client > 0, f"{path}.num_cpus_per_client",
              self.num_cpus_per_client, "a number > 0")
        check(self.ray_max_workers >= 0, f"{path}.ray_max_workers", self.ray_max_workers,
              "an integer >= 0 (0 = as many as fit)")
        check(self.num_gpus_per_client >= 0, f"{path}.num_gpus_per_client",
              self.num_gpus_per_client, "a number >= 0")
        check(self.round_timeout_s > 0, f"{path}.round_timeout_s", self.round_timeout_s,
              "a number > 0")
        check(self.client_timeout_s is None or self.client_timeout_s > 0,
              f"{path}.client_timeout_s", self.client_timeout_s, "null or a number > 0")
        check(self.users_per_message >= 0, f"{path}.users_per_message", self.users_per_message,
              "an integer >= 0 (0 = auto)")
        check(self.cohort_size >= 1, f"{path}.cohort_size", self.cohort_size,
              "an integer >= 1")


@dataclass
class PrivacyConfig:
    """Client-level differential privacy (DP-FedAvg, docs/privacy.md); ``name: none`` = off.

    Each client's update is clipped to L2 norm ``clip_norm`` (C); the server adds Gaussian
    noise of std z·C/m to the mean of the m clipped updates; (epsilon, delta) is accounted
    with Google's dp-accounting at the round's real sampling rate.
    """

    # none: off; dp: clip each update and add Gaussian noise to the mean.
    name: Literal["none", "dp"] = "none"
    # z: noise std / C. Ignored when target_epsilon is set (z is then solved for it).
    noise_multiplier: float = 1.0
    # Solve z so that num_rounds rounds at the expected sampling rate spend this epsilon.
    target_epsilon: float | None = None
    # delta of the (epsilon, delta) guarantee; null = 1 / (eligible users).
    delta: float | None = None
    # C (fixed) or the initial C (adaptive); null = no clipping (C = inf: z must be 0).
    clip_norm: float | None = 1.0
    # fixed C, or adaptive C following the target_quantile of update norms.
    clipping: Literal["fixed", "adaptive"] = "fixed"
    target_quantile: float = 0.5  # adaptive: gamma, the share of updates left unclipped
    clip_lr: float = 0.2  # adaptive: eta_C of C <- C exp(-eta_C (b - gamma))
    # adaptive: std of the noised unclipped count; null = clients_per_round / 20 (Flower's).
    clipped_count_stddev: float | None = None
    # Privacy accountant of dp-accounting: RDP or PLD.
    accountant: Literal["rdp", "pld"] = "rdp"
    # uniform: every client weighs 1/m (the DP-FedAvg estimator the accounting covers);
    # examples: FedAvg's num-examples weights, noise scaled to the largest weight share
    # (data-dependent noise: for comparison runs, not covered by the guarantee).
    weighting: Literal["uniform", "examples"] = "uniform"

    def validate(self, path: str = "privacy") -> None:
        check(self.noise_multiplier >= 0, f"{path}.noise_multiplier", self.noise_multiplier,
              "a number >= 0")
        check(self.target_epsilon is None or self.target_epsilon > 0,
              f"{path}.target_epsilon", self.target_epsilon, "null or a number > 0")
        check(self.delta is None or 0 < self.delta < 1, f"{path}.delta", self.delta,
              "null (= 1 / eligible users) or a number in (0, 1)")
        check(self.clip_norm is None or self.clip_norm > 0, f"{path}.clip_norm",
              self.clip_norm, "null (no clipping) or a number > 0")
        noisy = self.target_epsilon is not None or self.noise_multiplier > 0
        check(self.name != "dp" or not noisy or self.clip_norm is not None,
              f"{path}.clip_norm", self.clip_norm,
              "a number > 0 when noise is added (null = no clipping needs noise_multiplier=0)")
        check(self.clipping != "adaptive" or self.clip_norm is not None, f"{path}.clip_norm",
              self.clip_norm, "a number > 0 (the initial C) with clipping=adaptive")
        check(0 <= self.target_quantile <= 1, f"{path}.target_quantile", self.target_quantile,
              "a fraction in [0, 1]")
        check(self.clip_lr > 0, f"{path}.clip_lr", self.clip_lr, "a number > 0")
        check(self.clipped_count_stddev is None or self.clipped_count_stddev >= 0,
              f"{path}.clipped_count_stddev", self.clipped_count_stddev,
              "null (= clients_per_round / 20) or a number >= 0")


# Metric families server-side evaluation can compute (rf2.eval.evaluation.FAMILIES):
# recall/ndcg@K and auc over all items, the per-user test loss, the index's served
# metrics (index/..., exactness@K, items_scored_frac; models with an index only) and the
# popularity baseline at round 0 (popularity/...), and RF²'s CTR metrics over test
# ratings (rated_auc/ap/logloss; dataset.protocol=rf2 only).
METRIC_FAMILIES = ("recall", "ndcg", "auc", "loss", "index", "popularity", "rated")


@dataclass
class EvalConfig:
    # Cut-offs K of recall@K and ndcg@K.
    ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    # Evaluate every N rounds (round 0 and the last round always).
    every: int = 1
    # Upper bound on users scored in one block; the evaluator also caps a block at a few
    # MB of scores so the passes over it stay in cache.
    batch_size: int = 1024
    # Also evaluate after every round that completes a pass over the eligible clients
    # (RF² evaluates per pass; rows log ``pass`` and ``pass_end``).
    at_pass_end: bool = False
    # Which metric families to compute (see METRIC_FAMILIES); fewer = faster.
    metrics: list[str] = field(default_factory=lambda: list(METRIC_FAMILIES))
    # Evaluate a fixed, seeded sample of this many test users, stratified by tier
    # (0 = all test users). Logged: eval_users, and se/recall@K.
    max_users: int = 0
    # Users of the run's last evaluation (the end of num_rounds or num_passes; central:
    # the last epoch's): null = as max_users, 0 = all test users. A sampled curve stays
    # cheap while the end point that studies compare has the whole test set's precision.
    final_max_users: int | None = None
    # Torch threads while evaluating (0 = every core this process may use). Client
    # workers pin themselves to 1 thread; evaluation restores the setting afterwards.
    num_threads: int = 0
    # Per-user distributions of every metric, overall and per tier (std, bottom/top 10%
    # mean, Gini, share without a hit, CDF of recall@20): ``dist/...`` keys
    # (rf2.eval.distribution, docs/fairness.md). false = smaller rows.
    distributions: bool = True

    def validate(self, path: str = "eval") -> None:
        check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), f"{path}.ks", self.ks,
              "a non-empty list of integers >= 1")
        check(self.every >= 1, f"{path}.every", self.every, "an integer >= 1")
        check(self.batch_size >= 1, f"{path}.batch_size", self.batch_size, "an integer >= 1")
        check(len(self.metrics) > 0 and all(m in METRIC_FAMILIES for m in self.metrics),
              f"{path}.metrics", self.metrics,
              f"a non-empty list of: {', '.join(METRIC_FAMILIES)}")
        check(self.max_users >= 0, f"{path}.max_users", self.max_users,
              "an integer >= 0 (0 = all test users)")
        check(self.final_max_users is None or self.final_max_users >= 0,
              f"{path}.final_max_users", self.final_max_users,
              "null (= max_users) or an integer >= 0 (0 = all test users)")
        check(self.num_threads >= 0, f"{path}.num_threads", self.num_threads,
              "an integer >= 0 (0 = all cores)")


@dataclass
class FaultInjection:
    """Testing aid: make chosen clients fail on purpose (exercise fault handling).

    ``raise``: the ClientApp raises; ``nan``: it returns NaN weights; ``shape``: it
    returns a wrongly shaped array; ``hang``: it sleeps ``hang_s`` seconds (exceeds
    ``simulation.round_timeout_s`` on the Ray backend).
    """

    # How the chosen clients fail: raise, nan (NaN weights), shape, hang.
    kind: Literal["raise", "nan", "shape", "hang"] = "raise"
    # User ids that fail.
    users: list[int] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # empty = every round
    # hang: seconds the client sleeps.
    hang_s: float = 30.0

    def validate(self, path: str = "fault_injection") -> None:
        check(self.hang_s > 0, f"{path}.hang_s", self.hang_s, "a number > 0")


@dataclass
class RunConfig:
    # federated: Flower rounds over clients; central: the same model on pooled data
    # (``central.*``), same run folder and metrics rows (round = evaluation number).
    mode: Literal["federated", "central"] = "federated"
    # Seed of every random stream (data split, tiers, devices, client sampling, training).
    seed: int = 123
    # Federated rounds to train (round 0, the untrained model, is always evaluated).
    num_rounds: int = 20
    # Stop after the round that completes this many passes over the eligible clients
    # (RF²'s "global epochs"; 0 = no limit). num_rounds stays an upper bound.
    num_passes: int = 0
    # Clients selected per round (K); over-selection and deadlines work from it.
    clients_per_round: int = 100
    # Save a resumable checkpoint every N rounds (0 = only at the end).
    checkpoint_every: int = 10
    # Path of a run folder to continue instead of starting a new run.
    resume: str | None = None
    # Show full tracebacks for input errors.
    debug: bool = False
    # One progress line per round on stdout.
    progress: bool = True
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    central: CentralConfig = field(default_factory=CentralConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    population: PopulationConfig = field(default_factory=PopulationConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault_injection: list[FaultInjection] = field(default_factory=list)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # Also write per-round scalars as TensorBoard events (needs the `tensorboard` extra).
    tensorboard: bool = False

    def validate(self, path: str = "") -> None:
        # numpy's SeedSequence rejects negatives; torch and Flower's records take 64 bits;
        # 32 bits is the range every consumer of the seed accepts.
        check(0 <= self.seed < 2**32, "seed", self.seed, f"an integer in [0, {2**32 - 1}]")
        # Round 0 (the untrained model) is always evaluated; a run trains >= 1 round.
        check(self.num_rounds >= 1, "num_rounds", self.num_rounds, "an integer >= 1")
        check(self.num_passes >= 0, "num_passes", self.num_passes, "an integer >= 0 (0 = no limit)")
        check(self.clients_per_round >= 1, "clients_per_round", self.clients_per_round,
              "an integer >= 1")
        # At most clients_per_round replies arrive (over-commit keeps the first K): a
        # larger minimum would skip every round.
        check(self.round.min_completed <= self.clients_per_round, "round.min_completed",
              self.round.min_completed,
              f"an integer in [1, clients_per_round={self.clients_per_round}]")
        check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every,
              "an integer >= 0")
        if self.privacy.name == "dp":
            self._validate_dp()
        if self.strategy.name == "fedbuff":
            self._validate_fedbuff()
        check_plugins(self)  # keys a _target_ plug-in would leave unused (rf2.core.plugins)

    def buffer_concurrency(self) -> int:
        """fedbuff: clients training at once (``strategy.concurrency`` resolved)."""
        return self.strategy.concurrency or 2 * self.clients_per_round

    def _validate_fedbuff(self) -> None:
        """Round policies that only mean something for a synchronous round."""
        check(self.buffer_concurrency() >= self.clients_per_round, "strategy.concurrency",
              self.strategy.concurrency,
              f"an integer >= clients_per_round={self.clients_per_round} (the buffer size)")
        rnd, opt = self.round, self.optimization
        for name, value, bad in (("round.deadline_s", rnd.deadline_s, rnd.deadline_s is not None),
                                 ("round.deadline_quantile", rnd.deadline_quantile,
                                  rnd.deadline_quantile is not None),
                                 ("round.overcommit", rnd.overcommit, rnd.overcommit > 0),
                                 ("optimization.overselect", opt.overselect, opt.overselect > 0)):
            check(not bad, name, value, "unset with strategy=fedbuff (no synchronous round to "
                  "cut short: slow clients arrive stale instead)")
        check(self.privacy.name == "none", "privacy.name", self.privacy.name,
              "none with strategy=fedbuff (DP accounting of buffered steps is not built)")
        check(self.mode == "federated", "strategy.name", self.strategy.name,
              "fedavg, fedprox or qffl with mode=central")

    def _validate_dp(self) -> None:
        """DP clips one update per client and feeds the strategy one noised mean."""
        check(self.mode == "federated", "privacy.name", self.privacy.name,
              "none with mode=central (DP-FedAvg protects users of federated rounds)")
        strategy = self.strategy
        check(strategy._target_ == "rf2.strategies.build_strategy", "strategy._target_",
              strategy._target_, "rf2.strategies.build_strategy with privacy=dp (rf2 feeds "
              "its strategies the noised mean; a custom strategy's rule is unknown)")
        check(strategy.name in ("fedavg", "fedprox"), "strategy.name", strategy.name,
              "fedavg or fedprox with privacy=dp (q-FFL weighs each raw update by its loss)")
        opt = self.optimization
        check(not any(w < 1 for w in opt.width.values()), "optimization.width", opt.width,
              "no tier narrower than 1 with privacy=dp (HeteroFL averages each element "
              "over its own clients: no per-client sensitivity bound)")
        check(not opt.per_row_embedding_avg, "optimization.per_row_embedding_avg",
              opt.per_row_embedding_avg, "false with privacy=dp (per-row averaging divides "
              "each row by its own client count)")
        dp = self.privacy
        if dp.clipping == "adaptive" and dp.target_epsilon is None and dp.noise_multiplier > 0:
            count_std = (dp.clipped_count_stddev if dp.clipped_count_stddev is not None
                         else self.clients_per_round / 20)
            check(dp.noise_multiplier < 2 * count_std, "privacy.noise_multiplier",
                  dp.noise_multiplier, f"a number < 2 * clipped_count_stddev = {2 * count_std:g} "
                  "with clipping=adaptive (raise privacy.clipped_count_stddev)")


def load_run_config(data: dict[str, Any]) -> RunConfig:
    """Validate a composed config mapping (e.g. ``OmegaConf.to_container(cfg)``)."""
    data = {k: v for k, v in data.items() if k != "hydra"}
    return from_dict(RunConfig, data)
