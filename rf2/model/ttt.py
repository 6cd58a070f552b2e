"""Central training and test-time training (TTT) of the hierarchical-index model.

TTT (HILL): once the index is trained, the nodes on an item's path are compact,
denoised summaries of many items. Each training example (history, target item) yields,
at rate ``ttt_rate``, an extra pair (history, the target's path prefix at depth d); the
model is fine-tuned on its examples plus these pairs. A pair's loss is the
cross-entropy over all depth-d path prefixes with logit <query, c_1 + ... + c_d>,
which factorises into one softmax per level (labels: the target's hard codes), so it
trains the user tower to route to the right subtree, which is what beam search needs.

Measured on MovieLens-100K (central and federated models, fine-tuned 2 epochs): the
pairs do not beat the control (the same fine-tuning without pairs, ``rate=0``): at
lr 0.01 they cost 0.003-0.009 index Recall@20 against it, at lr 0.001 both move it by
< 0.002. Always compare with the control: plain extra training alone can move it.

Everything here is plain PyTorch on a whole dataset (no Flower): it is the "centrally
trained" reference, the fine-tuning step after a federated run, and the trainer the
retrieval benchmark uses for its MovieLens model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rf2.core.config import IndexConfig, ModelConfig
from rf2.core.errors import ConfigError
from rf2.data.base import FederatedDataset
from rf2.model.base import FederatedModel
from rf2.model.examples import user_examples
from rf2.model.hier_index import HierIndexModel
from rf2.model.two_tower import TwoTower


def all_examples(dataset: FederatedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(N, H) histories and (N,) targets of every user's train clicks."""
    parts = [user_examples(dataset, u) for u in range(dataset.num_users)]
    hist = np.concatenate([h for h, _ in parts]) if parts else np.zeros((0, dataset.history_len))
    tgt = np.concatenate([t for _, t in parts]) if parts else np.zeros(0)
    return hist.astype(np.int64), tgt.astype(np.int64)


def node_pairs(
    model: HierIndexModel, histories: np.ndarray, targets: np.ndarray, depth: int, rate: float,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(M, H) histories and (M, depth) hard codes of the targets' depth-d nodes.

    Each example contributes floor(rate) pairs plus one more with probability
    rate - floor(rate), so ``rate`` is the expected number of node pairs per example.
    """
    codes = model.refresh_index()[torch.from_numpy(targets)][:, :depth].numpy()  # (N, d)
    rng = np.random.default_rng(seed)
    whole, frac = int(np.floor(rate)), rate - np.floor(rate)
    repeat = whole + (rng.random(len(targets)) < frac).astype(np.int64)  # (N,)
    return np.repeat(histories, repeat, axis=0), np.repeat(codes, repeat, axis=0)


def node_loss(model: HierIndexModel, history: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (history, depth-d path) pairs: one softmax per level <= d."""
    q = model.query_vectors(model.user_embedding(history))  # (B, Dq)
    total = q.new_zeros(())
    for level in range(codes.shape[1]):
        logits = q @ model.node_keys(level).T  # (B, K_l)
        total = total + F.cross_entropy(logits, codes[:, level])
    return total


def fit_central(
    model: TwoTower,
    dataset: FederatedDataset,
    epochs: int,
    lr: float = 0.01,
    batch_size: int = 512,
    seed: int = 0,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    schedule: bool = True,
) -> list[float]:
    """Adam on all users' examples (mini-batches); optional TTT node pairs mixed in.

    The index schedules follow the optimizer step over the whole run (unless
    ``schedule`` is False: the model keeps its current progress). Node pairs are
    spread over the same number of batches as the examples, so one epoch sees both once.
    Returns the mean training loss per epoch.
    """
    hist, tgt = (torch.from_numpy(a) for a in all_examples(dataset))
    n = len(tgt)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    set_progress = getattr(model, "set_training_progress", None) if schedule else None
    pair_h = pair_c = None
    if pairs is not None and len(pairs[1]):
        pair_h, pair_c = torch.from_numpy(pairs[0]), torch.from_numpy(pairs[1]).long()
    losses, step = [], 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        pair_order = None if pair_c is None else torch.randperm(len(pair_c), generator=gen)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            step += 1
            if callable(set_progress):
                set_progress(step, total)
            loss = model.loss(hist[idx], tgt[idx])
            if pair_order is not None and pair_h is not None and pair_c is not None:
                per = -(-len(pair_order) // steps_per_epoch)
                pidx = pair_order[b * per : (b + 1) * per]
                if len(pidx):
                    loss = loss + node_loss(model, pair_h[pidx], pair_c[pidx])  # type: ignore[arg-type]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
        losses.append(running / steps_per_epoch)
        if on_epoch is not None:
            on_epoch(epoch, losses[-1])
    model.eval()
    return losses


SUMMARY_KEYS = ("recall@20", "ndcg@20", "index/recall@20", "index/ndcg@20", "exactness@20",
                "items_scored_frac")


def run_ttt(
    model: HierIndexModel,
    dataset: FederatedDataset,
    evaluate: Callable[[FederatedModel], dict[str, float]],
    cfg: IndexConfig,
    seed: int = 0,
    rate: float | None = None,
) -> dict[str, float]:
    """Fine-tune a trained model with node pairs; ``ttt/{before,after,delta}/<metric>``.

    ``evaluate`` is e.g. ``Evaluator.evaluate_model``. ``rate`` overrides
    ``cfg.ttt_rate``; rate 0 is the control (the same fine-tuning without node pairs),
    which separates the pairs' effect from that of simply training longer.
    """
    rate = cfg.ttt_rate if rate is None else rate
    before = evaluate(model)
    hist, tgt = all_examples(dataset)
    pairs = node_pairs(model, hist, tgt, cfg.ttt_depth, rate, seed) if rate > 0 else None
    # Fine-tuning continues at the end of the schedules: hard temperature, full weight.
    model.finish_schedules()
    fit_central(model, dataset, cfg.ttt_epochs, lr=cfg.ttt_lr, seed=seed, pairs=pairs,
                schedule=False)
    after = evaluate(model)
    out: dict[str, float] = {"ttt/rate": float(rate), "ttt/depth": float(cfg.ttt_depth),
                             "ttt/pairs": float(0 if pairs is None else len(pairs[1]))}
    for key in SUMMARY_KEYS:
        if key in before and key in after:
            out[f"ttt/before/{key}"] = before[key]
            out[f"ttt/after/{key}"] = after[key]
            out[f"ttt/delta/{key}"] = after[key] - before[key]
    return out


def check_ttt(cfg: ModelConfig, model: torch.nn.Module) -> None:
    """``model.index.ttt`` needs a model with rf2's learned index: on any other (a
    ``two_tower``, a ``model._target_`` of your own) it would silently do nothing."""
    if cfg.index.ttt and not isinstance(model, HierIndexModel):
        built = f"model._target_={cfg._target_}" if cfg._target_ else f"model.name={cfg.name}"
        raise ConfigError("model.index.ttt", cfg.index.ttt,
                          f"false with {built} (test-time training tunes rf2's learned index; "
                          f"a {type(model).__name__} has none)")


def ttt_if_enabled(
    model: torch.nn.Module,
    dataset: FederatedDataset,
    evaluate: Callable[[FederatedModel], dict[str, float]],
    cfg: ModelConfig,
    seed: int = 0,
) -> dict[str, float] | None:
    """The runner's hook after training: :func:`run_ttt` when ``model.index.ttt`` is on."""
    if not cfg.index.ttt or not isinstance(model, HierIndexModel):
        return None
    return run_ttt(model, dataset, evaluate, cfg.index, seed)
