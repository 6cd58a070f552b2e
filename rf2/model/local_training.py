"""One client's local training: plain PyTorch, no Flower, so it is testable directly.

RF²'s recipe is the default: one local epoch, one full-batch SGD step at lr 1.0.
FedProx adds (mu/2)·||w − w_global||² to the loss (squared norm, as in the paper).
The loss at the global model before training is reported too: q-FFL needs F_k(w_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rf2.core.arrays import sorted_unique
from rf2.model.base import FederatedModel


def client_sample(model: torch.nn.Module, seed: int) -> Any:  # noqa: ANN401 - LossSample
    """One client's loss sample (``TwoTower.draw_sample``) from its own seed; None for a
    model without one (its ``loss`` then takes (history, target) only)."""
    draw = getattr(model, "draw_sample", None)
    return draw(torch.Generator().manual_seed(seed)) if callable(draw) else None


@dataclass(frozen=True)
class LocalTrainingResult:
    num_examples: int
    loss_before: float  # F_k(w_t): mean loss on the local data at the global model
    loss_after: float  # mean loss over the last local epoch's batches
    # Row table -> (R,) sorted ids of every row that had a nonzero gradient at some step:
    # plain SGD changes no other row, so the reply and the sum need look at these rows
    # only (O(rows touched), not O(catalogue)). None: not tracked (a row table that is not
    # a trainable parameter, or no example).
    touched: dict[str, np.ndarray] | None = None


def _row_table_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter] | None:
    """The model's row tables (``FederatedModel.row_tables``) as parameters, or None
    when one of them is not a trainable parameter (it may then change without a
    gradient: its rows cannot be tracked)."""
    tables = getattr(model, "row_tables", None)
    if not callable(tables):
        return None
    params = dict(model.named_parameters())
    out = {}
    for name in tables():
        p = params.get(name)
        if p is None or not p.requires_grad:
            return None
        out[name] = p
    return out


def _nonzero_rows(values: torch.Tensor) -> torch.Tensor:
    """(r, ...) -> (r,) bool: the rows holding a nonzero (or NaN)."""
    flat = (values.unsqueeze(1) if values.dim() == 1 else values).flatten(1)
    if flat.shape[1] == 0:
        return torch.zeros(flat.shape[0], dtype=torch.bool)
    # |g| max per row (NaN stays NaN, so it counts): ~8x faster than ne(0).any(1), which
    # on a 36k x 64 table cost more than the user's backward pass.
    return flat.abs().amax(1).ne(0)


def _rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """(r,) ids of the rows of a row table's gradient (dense or sparse) that hold a
    nonzero (or NaN)."""
    if grad.is_sparse:
        g = grad.coalesce()
        return g.indices()[0][_nonzero_rows(g.values())]
    return torch.nonzero(_nonzero_rows(grad)).flatten()


def train_locally(
    model: FederatedModel,
    histories: np.ndarray,  # (n, H) int64, PAD = -1
    targets: np.ndarray,  # (n,) int64
    *,
    lr: float,
    local_epochs: int,
    batch_size: int,
    proximal_mu: float = 0.0,
    seed: int = 0,
    user: int | None = None,
    track_rows: bool = False,
) -> LocalTrainingResult:
    """Train ``model`` in place on one client's examples with plain SGD.

    ``user``: the client's user id, passed to the loss of a model with per-user state
    (``FederatedModel.user_state_names``) as ``users=``; other models never see it.
    ``track_rows``: record the rows of each row table that got a gradient
    (``LocalTrainingResult.touched``; rf2's per-user client path builds its reply from
    them); off, training is the plain loop alone.
    """
    n = int(len(targets))
    hist_t = torch.from_numpy(np.asarray(histories, dtype=np.int64))
    tgt_t = torch.from_numpy(np.asarray(targets, dtype=np.int64))
    names = getattr(model, "user_state_names", None)
    stateful = callable(names) and bool(names())
    if stateful and user is None:
        raise ValueError(f"{type(model).__name__} has per-user state: train_locally needs user=")
    users_t = torch.full((n,), int(user or 0), dtype=torch.int64)

    def users_of(idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not stateful:
            return {}
        return {"users": users_t if idx is None else users_t[idx]}

    # The client's negatives (and the index's balance sample) are drawn once, from its
    # own seed: they depend on (seed, user, round) only, not on which clients this worker
    # ran before (Ray runs repeat), and the rows it touches are known before training.
    sample = client_sample(model, seed)
    extra = () if sample is None else (sample,)
    fit_user_state = getattr(model, "fit_user_state", None)
    if stateful and n and callable(fit_user_state):
        fit_user_state(hist_t, tgt_t, sample, users_t)  # the device's own rows first
    with torch.no_grad():
        loss_before = float(model.loss(hist_t, tgt_t, *extra, **users_of())) if n else 0.0
    if n == 0:
        return LocalTrainingResult(0, 0.0, 0.0)
    global_params = (
        [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    )
    # Plain SGD by hand: ``torch.optim`` imports torch._dynamo on first use (~2-6 s in
    # every fresh worker) and costs a constructor per client for a one-line update.
    params = [p for p in model.parameters() if p.requires_grad]
    row_params = _row_table_params(model) if track_rows else None
    touched: dict[str, list[torch.Tensor]] = {name: [] for name in row_params or {}}
    bs = n if batch_size <= 0 else min(batch_size, n)
    gen = torch.Generator().manual_seed(seed)
    loss_after = loss_before
    for _ in range(local_epochs):
        order = torch.randperm(n, generator=gen) if bs < n else torch.arange(n)
        total, count = 0.0, 0
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            for p in params:
                p.grad = None
            loss = model.loss(hist_t[idx], tgt_t[idx], *extra, **users_of(idx))
            objective = loss
            if global_params is not None:
                prox = sum(
                    ((p - g) ** 2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                objective = loss + 0.5 * proximal_mu * prox
            objective.backward()
            with torch.no_grad():
                for name, p in (row_params or {}).items():
                    if p.grad is not None:
                        touched[name].append(_rows_with_gradient(p.grad))
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        loss_after = total / max(count, 1)
    rows = None if row_params is None else {
        name: sorted_unique(torch.cat(ids).numpy()) if ids else np.zeros(0, np.int64)
        for name, ids in touched.items()}
    return LocalTrainingResult(n, loss_before, loss_after, rows)
