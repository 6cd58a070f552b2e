"""Central training: the same global model trained on all users' pooled examples.

The reference a federated run is measured against ("how far is federated from
central"). Plain PyTorch, no Flower. The examples are exactly the clients' (one per
train click, the previous ``history_len`` clicks as features; :mod:`rf2.model.examples`)
pooled over every user, shuffled once per epoch, in mini-batches.

Resumable without RNG state: epoch e's shuffle is drawn from ``(seed, e)`` and step s's
negative sampler is seeded from ``(seed, s)``, so a checkpoint needs only the step, the
model and the optimizer's state, and a resumed run repeats an uninterrupted one exactly.
The index's schedules (``set_training_progress``) follow the optimizer step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rf2.core.config import CentralConfig
from rf2.data.base import FederatedDataset
from rf2.data.split import sliding_histories
from rf2.model.base import FederatedModel
from rf2.model.examples import PAD


def pooled_examples(dataset: FederatedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(N, H) histories and (N,) targets of every user's train clicks, user by user.

    Row for row what :func:`rf2.model.examples.user_examples` gives each client.
    """
    hist = sliding_histories(dataset.train_items, dataset.train_indptr, dataset.history_len, PAD)
    return hist, dataset.train_items.astype(np.int64)


def pooled_users(dataset: FederatedDataset) -> np.ndarray:
    """(N,) the user of each row of :func:`pooled_examples` (a stateful model's loss
    reads it: e.g. FCF trains every user's vector centrally, as plain MF)."""
    return np.repeat(np.arange(dataset.num_users, dtype=np.int64), dataset.train_counts)


def make_optimizer(params: list[torch.nn.Parameter], cfg: CentralConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class CentralTrainer:
    """Mini-batch training over pooled examples, advanced to given step counts."""

    def __init__(self, model: FederatedModel, histories: np.ndarray, targets: np.ndarray,
                 cfg: CentralConfig, seed: int, users: np.ndarray | None = None) -> None:
        """``users``: (N,) the user of each example, for a model with per-user state."""
        self.model, self.cfg, self.seed = model, cfg, seed
        self.hist = torch.from_numpy(np.ascontiguousarray(histories, dtype=np.int64))  # (N, H)
        self.tgt = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64))  # (N,)
        names = getattr(model, "user_state_names", None)
        self.users = (torch.from_numpy(np.ascontiguousarray(users, dtype=np.int64))
                      if callable(names) and names() and users is not None else None)  # (N,)
        self.n = int(self.tgt.numel())
        self.batch_size = min(cfg.batch_size, max(self.n, 1))
        self.steps_per_epoch = max(1, -(-self.n // self.batch_size))
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg)
        self.step = 0
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    def eval_steps(self) -> list[int]:
        """Steps after which a metrics row is written: ``evals_per_epoch`` per epoch,
        evenly spaced, the last at the epoch's end."""
        per, e = self.steps_per_epoch, self.cfg.evals_per_epoch
        points = {ep * per + -(-j * per // e) for ep in range(self.cfg.epochs) for j in range(1, e + 1)}
        return sorted(points)

    def examples_seen(self, step: int) -> int:
        """Examples trained on after ``step`` steps (the last batch of an epoch is short)."""
        epochs, rest = divmod(step, self.steps_per_epoch)
        return epochs * self.n + min(rest * self.batch_size, self.n)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=gen))
        return self._order[1]

    def train_until(self, target_step: int) -> tuple[float, int]:
        """Run steps ``self.step + 1 .. target_step``; (mean batch loss, examples seen)."""
        self.model.train()
        set_progress = getattr(self.model, "set_training_progress", None)
        seed_sampler = getattr(self.model, "seed_sampler", None)
        total, examples = 0.0, 0
        while self.step < target_step:
            epoch, b = divmod(self.step, self.steps_per_epoch)
            idx = self._epoch_order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
            self.step += 1
            if callable(set_progress):
                set_progress(self.step, self.total_steps)
            if callable(seed_sampler):
                seed_sampler(self.seed * 1_000_003 + self.step)
            extra = {} if self.users is None else {"users": self.users[idx]}
            loss = self.model.loss(self.hist[idx], self.tgt[idx], **extra)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in self.params:  # a model may give sparse gradients (FCF's tables);
                if p.grad is not None and p.grad.is_sparse:  # these optimizers take dense
                    p.grad = p.grad.to_dense()
            self.optimizer.step()
            total += float(loss.detach()) * len(idx)
            examples += len(idx)
        self.model.eval()
        return total / max(examples, 1), examples

    # -- checkpoints: arrays + a JSON part --------------------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {f"model/{k}": v.detach().cpu().numpy().copy()
                  for k, v in self.model.state_dict().items()}
        opt = self.optimizer.state_dict()
        meta: dict[str, Any] = {"step": self.step, "optimizer": {}}
        for idx, slots in opt["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    arrays[f"optim/{idx}/{name}"] = value.detach().cpu().numpy().copy()
                else:
                    meta["optimizer"][f"{idx}/{name}"] = value
        return arrays, meta

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        model = {k[len("model/"):]: torch.from_numpy(v) for k, v in arrays.items()
                 if k.startswith("model/")}
        self.model.load_state_dict(model)
        slots: dict[int, dict[str, Any]] = {}
        for key, value in arrays.items():
            if key.startswith("optim/"):
                idx, name = key[len("optim/"):].split("/", 1)
                slots.setdefault(int(idx), {})[name] = torch.from_numpy(value)
        for key, value in meta.get("optimizer", {}).items():
            idx, name = key.split("/", 1)
            slots.setdefault(int(idx), {})[name] = value
        opt = self.optimizer.state_dict()
        opt["state"] = slots
        self.optimizer.load_state_dict(opt)
        self.step = int(meta["step"])
