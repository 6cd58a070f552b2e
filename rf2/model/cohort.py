"""Cohort-vectorised local training: C clients' SGD as one stacked, row-sparse computation.

Every client of a cohort starts from the same global model, but trains alone: its own
seed, its own examples, its own loss sample, its own parameters. Each client's
parameters are gathered into a stacked copy that holds only the rows it can touch:

* row tables read by history items (``FederatedModel.row_tables``; the two-tower's
  ``history_table``): the items of its histories, (C, Rh, D);
* row tables read by candidates (``item_table`` / ``bias``): its targets, its negatives
  and (index) its balance sample (``FederatedModel.candidate_rows``), (C, Ri, D) /
  (C, Ri); the whole catalogue for a full softmax (every row moves);
* every other parameter (genre table, index nodes): a full copy, (C, ...).

Only models that declare it (``FederatedModel.cohort_unsupported_reason`` is None) come
here: the stacked loss below is rf2's two-tower / index maths, by parameter name.

Clients are padded to the cohort's largest row set and example count; padded rows are
never read and padded examples carry zero weight, so they get exactly zero gradient.
The clients' losses are independent, so one backward pass of sum_c L_c gives every
client its own gradient: this is FedJAX's ``for_each_client`` as one stacked tensor
program (faster than ``torch.func.vmap`` for gathers over embedding tables).

The maths is that of ``TwoTower.loss`` / ``HierIndexModel.loss`` + ``train_locally``
(the per-user reference path, tested equal to 1e-5). A row a client cannot touch has
zero gradient there too (FedProx's (mu/2)||w - w_t||^2 included: it is zero while the
row sits at w_t), so training on the gathered rows changes exactly what the full model
would. Cost per client: O(rows touched · D), not O(catalogue) (sampled softmax).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rf2.core.arrays import sorted_unique
from rf2.model.base import CANDIDATE, HISTORY, FederatedModel
from rf2.model.hier_index import _JOINT_LIMIT, HierIndexModel
from rf2.model.local_training import client_sample
from rf2.model.two_tower import TwoTower


class NotVectorisable(Exception):
    """The model does not declare cohort support: train its users one by one."""


@dataclass(frozen=True)
class ClientJob:
    """One client's data and seed (the same seed ``train_locally`` takes)."""

    histories: np.ndarray  # (n, H) int64, PAD = -1
    targets: np.ndarray  # (n,) int64
    seed: int


@dataclass
class ClientUpdate:
    """One client's trained state, row-sparse.

    ``rows[name]``: sorted global row ids of a row table it may have changed;
    ``values[name]``: its new values there ((R, D) / (R,)) or, for any other
    parameter, its whole new value.
    """

    num_examples: int
    loss_before: float
    loss_after: float
    rows: dict[str, np.ndarray]
    values: dict[str, np.ndarray]

    def dense(self, received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The full arrays: ``received`` with this client's rows written in (float32, as
        the per-user path's ``state_dict``, whatever dtype the server's arrays have)."""
        out: dict[str, np.ndarray] = {}
        for name, g in received.items():
            if name in self.rows:
                full = np.array(g, dtype=self.values[name].dtype, copy=True)
                full[self.rows[name]] = self.values[name]
                out[name] = full
            elif name in self.values:
                out[name] = self.values[name]
            else:  # a client without examples: nothing trained
                out[name] = np.array(g, dtype=np.float32, copy=True)
        return out


def _pad_stack(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
    """(C, width) int64: each client's ids left-aligned, padded with 0 (a real row)."""
    out = np.zeros((len(rows), width), dtype=np.int64)
    for c, r in enumerate(rows):
        out[c, : len(r)] = r
    return out


def _local(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Global ids -> positions in the client's sorted ``rows`` (PAD < 0 -> 0, masked)."""
    pos = np.searchsorted(rows, np.maximum(ids, 0))
    return np.where(ids >= 0, np.minimum(pos, max(len(rows) - 1, 0)), 0).astype(np.int64)


class _Cohort:
    """The stacked index tensors and parameters of one cohort (see the module docstring)."""

    def __init__(self, model: TwoTower, arrays: Mapping[str, np.ndarray],
                 jobs: Sequence[ClientJob], shared: bool = False) -> None:
        """``shared``: every client reads one copy of each parameter (``leaves``), so a
        backward pass of sum_c n_c L_c leaves sum_c n_c grad L_c(w_t) in the leaves
        (:func:`summed_step`); else each client holds its own gathered copy."""
        self.model = model
        self.shared = shared
        # The index's terms of the loss, for a model with a learned index only.
        self.index_model = model if isinstance(model, HierIndexModel) else None
        c = len(jobs)
        self.n = np.array([len(j.targets) for j in jobs], dtype=np.int64)  # (C,)
        samples = [client_sample(model, j.seed) for j in jobs]
        self.samples = samples
        reason = model.cohort_unsupported_reason()
        if reason is not None:
            raise NotVectorisable(reason)
        tables = model.row_tables()
        self.history_tables = {n for n, roles in tables.items() if roles == {HISTORY}}
        self.item_tables = {n for n, roles in tables.items() if roles == {CANDIDATE}}
        if len(self.history_tables) + len(self.item_tables) != len(tables):
            raise NotVectorisable("a row table read by both history and candidate ids")
        num_items = model.num_items
        # Which item rows each client can touch (the same kind for every client: a full
        # softmax, or the index's balance term without a sample, reads every item).
        candidates = [model.candidate_rows(np.asarray(j.targets, dtype=np.int64), s)
                      for j, s in zip(jobs, samples, strict=True)]
        self.full_items = candidates[0] is None
        hrows = [sorted_unique(j.histories[j.histories >= 0]) for j in jobs]
        if self.full_items:
            irows = [np.arange(num_items, dtype=np.int64)] * c
        else:
            irows = [np.asarray(r, dtype=np.int64) for r in candidates]
        self.hrows, self.irows = hrows, irows
        rh = max(1, max(len(r) for r in hrows))
        ri = max(1, max(len(r) for r in irows))
        n_max = max(1, int(self.n.max()))
        hlen = jobs[0].histories.shape[1] if jobs[0].histories.ndim == 2 else model.history_len

        hist_local = np.zeros((c, n_max, hlen), dtype=np.int64)
        hist_mask = np.zeros((c, n_max, hlen), dtype=np.float32)
        tgt_local = np.zeros((c, n_max), dtype=np.int64)
        tgt_global = np.full((c, n_max), -1, dtype=np.int64)
        for k, j in enumerate(jobs):
            n = len(j.targets)
            hist_local[k, :n] = _local(j.histories, hrows[k])
            hist_mask[k, :n] = j.histories >= 0
            tgt_local[k, :n] = _local(j.targets, irows[k])
            tgt_global[k, :n] = j.targets
        self.hist_local = torch.from_numpy(hist_local)  # (C, N, H)
        self.hist_mask = torch.from_numpy(hist_mask)  # (C, N, H)
        self.tgt_local = torch.from_numpy(tgt_local)  # (C, N)
        self.tgt_global = torch.from_numpy(tgt_global)  # (C, N)
        self.arange_c = torch.arange(c)
        if model.sampled:
            neg = np.stack([s.negatives.numpy() for s in samples])  # (C, K)
            self.neg_global = torch.from_numpy(neg)
            self.neg_local = torch.from_numpy(
                np.stack([_local(neg[k], irows[k]) for k in range(c)]))  # (C, K)
        # An index model's samples all carry a balance sample, or none does.
        bal = ([s.balance for s in samples if s.balance is not None]
               if self.index_model is not None else [])
        self.bal_local = None
        if bal:
            assert len(bal) == c
            self.bal_local = torch.from_numpy(
                np.stack([_local(b.numpy(), irows[k]) for k, b in enumerate(bal)]))  # (C, S)

        # Parameters: gathered rows for the row tables, full copies for the rest.
        hidx, iidx = _pad_stack(hrows, rh), _pad_stack(irows, ri)
        self.names = list(arrays)
        params: dict[str, torch.Tensor] = {}
        self.leaves: dict[str, torch.Tensor] = {}
        for name, g in arrays.items():
            g = np.asarray(g)
            if shared:
                leaf = torch.tensor(g, dtype=torch.float32).requires_grad_(True)
                self.leaves[name] = leaf
                if name in self.history_tables:
                    params[name] = leaf[torch.from_numpy(hidx)]  # (C, Rh, D), grads add up
                elif name in self.item_tables:
                    params[name] = leaf if self.full_items else leaf[torch.from_numpy(iidx)]
                else:
                    params[name] = leaf.expand(c, *leaf.shape)
                continue
            if name in self.history_tables:
                value = g[hidx]  # (C, Rh, D)
            elif name in self.item_tables:
                value = np.broadcast_to(g, (c, *g.shape)) if self.full_items else g[iidx]
            else:
                value = np.broadcast_to(g, (c, *g.shape))
            params[name] = torch.tensor(value, dtype=torch.float32).requires_grad_(True)
        self.params = params
        self.start = {} if shared else {k: v.detach().clone() for k, v in params.items()}
        genres = model.item_genres
        if genres is None or model.genre_table is None:
            self.genres = None
        elif self.full_items:
            self.genres = genres.unsqueeze(0).expand(c, -1, -1)  # (C, I, G), no copy
        else:
            self.genres = genres[torch.from_numpy(iidx)]  # (C, Ri, G)

    # -- the stacked loss -----------------------------------------------------------
    def _gather(self, table: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """table (C, R, ...) and local ids (C, ...) -> rows (C, ..., ...)."""
        batch = self.arange_c.view(-1, *([1] * (local.dim() - 1)))
        return table[batch, local]

    def losses(self, ex: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(C,) each client's mean loss over its examples ``ex`` (C, B) where ``mask``."""
        p, model = self.params, self.model
        hist = self._gather(self.hist_local, ex)  # (C, B, H)
        hmask = self._gather(self.hist_mask, ex).unsqueeze(-1)  # (C, B, H, 1)
        emb = self._gather(p["history_table"], hist) * hmask  # (C, B, H, D)
        user = emb.sum(2) / hmask.sum(2).clamp(min=1.0)  # (C, B, D)
        items = p["item_table"]  # (C, Ri, D); shared full catalogue: (I, D)
        flat = items.dim() == 2
        if flat:
            if self.genres is not None and model.item_genres is not None:  # both or neither
                items = items + model.item_genres @ self.leaves["genre_table"]  # (I, D)
            bias = p["bias"] if "bias" in p else items.new_zeros(items.shape[0])  # (I,)
            flat_items, flat_bias = items, bias
            items = items.expand(user.shape[0], -1, -1)  # (C, I, D) views, for gathers
            bias = bias.expand(user.shape[0], -1)  # (C, I)
        else:
            if self.genres is not None:
                items = items + torch.bmm(self.genres, p["genre_table"])  # (C, Ri, D)
            bias = p["bias"] if "bias" in p else items.new_zeros(items.shape[:2])  # (C, Ri)
        tgt = self._gather(self.tgt_local, ex)  # (C, B)
        count = mask.sum(1).clamp(min=1.0)  # (C,)
        if flat and not model.sampled:
            # One (C*B, I) score matrix against the one table: its backward is one matmul
            # back into the item table, not C copies of it.
            scores = user @ flat_items.T + flat_bias  # (C, B, I)
            per_ex = F.cross_entropy(scores.flatten(0, 1), tgt.flatten(), reduction="none")
            per_ex = per_ex.view(tgt.shape)  # (C, B)
        elif model.sampled:
            per_ex = self._sampled_ce(user, items, bias, tgt, self._gather(self.tgt_global, ex))
        else:
            scores = torch.bmm(user, items.transpose(1, 2)) + bias.unsqueeze(1)  # (C, B, I)
            per_ex = F.cross_entropy(scores.flatten(0, 1), tgt.flatten(), reduction="none")
            per_ex = per_ex.view(tgt.shape)  # (C, B)
        total = (per_ex * mask).sum(1) / count  # (C,)
        if self.index_model is not None:
            w = self.index_model.index_weight()
            if w > 0:
                total = total + w * self._index_loss(user, items, bias, tgt, mask, count)
        return total

    def _sampled_ce(self, user: torch.Tensor, items: torch.Tensor, bias: torch.Tensor,
                    tgt: torch.Tensor, tgt_global: torch.Tensor) -> torch.Tensor:
        """(C, B) sampled-softmax cross-entropy, as ``TwoTower._sampled_softmax``."""
        k = self.neg_local.shape[1]
        log_q = math.log(k / self.model.num_items)
        pos = (user * self._gather(items, tgt)).sum(-1) + self._gather(bias, tgt)  # (C, B)
        neg_emb = self._gather(items, self.neg_local)  # (C, K, D)
        negs = torch.bmm(user, neg_emb.transpose(1, 2))  # (C, B, K)
        negs = negs + self._gather(bias, self.neg_local).unsqueeze(1) - log_q
        hit = self.neg_global.unsqueeze(1) == tgt_global.unsqueeze(2)  # (C, B, K)
        negs = negs.masked_fill(hit, float("-inf"))
        logits = torch.cat([pos.unsqueeze(2), negs], dim=2)  # (C, B, 1 + K)
        zeros = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.int64)
        return F.cross_entropy(logits.flatten(0, 1), zeros, reduction="none").view(pos.shape)

    def _index_model(self) -> HierIndexModel:
        assert self.index_model is not None  # the index terms run for an index model only
        return self.index_model

    def _codebooks(self) -> list[torch.Tensor]:
        p, books = self.params, []
        for level in range(len(self._index_model().node_vecs)):
            vecs = p[f"node_vecs.{level}"]  # (C, K_l, D)
            if f"node_bias.{level}" in p:
                vecs = torch.cat([vecs, p[f"node_bias.{level}"].unsqueeze(2)], dim=2)
            books.append(vecs)  # (C, K_l, Dq)
        return books

    def _soft_assign(self, keys: torch.Tensor, alpha: float,
                     books: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(C, N, Dq) -> per level (C, N, K_l) and the (C, N, Dq) reconstruction."""
        r, recon, assign = keys, torch.zeros_like(keys), []
        for book in books:
            sq = ((r * r).sum(2, keepdim=True) - 2.0 * torch.bmm(r, book.transpose(1, 2))
                  + (book * book).sum(2).unsqueeze(1)).clamp(min=0.0)  # (C, N, K_l)
            a = torch.softmax(-alpha * torch.sqrt(sq + 1e-12), dim=2)
            c_bar = torch.bmm(a, book)  # (C, N, Dq)
            assign.append(a)
            recon = recon + c_bar
            r = r - c_bar
        return assign, recon

    def _index_loss(self, user: torch.Tensor, items: torch.Tensor, bias: torch.Tensor,
                    tgt: torch.Tensor, mask: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """(C,) the index terms of ``HierIndexModel.loss`` (weighted, before w(t))."""
        index_model = self._index_model()
        icfg, alpha = index_model.cfg.index, index_model.alpha()
        has_bias = "bias" in self.params
        keys = torch.cat([items, bias.unsqueeze(2)], dim=2) if has_bias else items  # (C, Ri, Dq)
        q = torch.cat([user, user.new_ones(*user.shape[:2], 1)], dim=2) if has_bias else user
        books = self._codebooks()
        tk = self._gather(keys, tgt)  # (C, B, Dq)
        assign, recon = self._soft_assign(tk, alpha, books)
        levels = user.new_zeros(user.shape[0])
        for a, book in zip(assign, books, strict=True):
            logp = F.log_softmax(torch.bmm(q, book.transpose(1, 2)), dim=2)  # (C, B, K_l)
            levels = levels + (-(a.detach() * logp).sum(2) * mask).sum(1) / count
        rec = (((recon - tk) ** 2).sum(2) * mask).sum(1) / count  # (C,)
        bal_keys = keys if self.bal_local is None else self._gather(keys, self.bal_local)
        bal = self._balance(bal_keys, alpha, books)
        return levels + icfg.reconstruction_weight * rec + icfg.balance_weight * bal

    def _balance(self, keys: torch.Tensor, alpha: float, books: list[torch.Tensor]
                 ) -> torch.Tensor:
        """(C,) ``HierIndexModel.balance_loss`` per client."""
        c, n = keys.shape[:2]
        assign, _ = self._soft_assign(keys, alpha, books)
        terms: list[torch.Tensor] = []
        joint: torch.Tensor | None = keys.new_ones(c, n, 1)  # (C, N, P)
        for a in assign:
            if joint is not None and n * joint.shape[2] * a.shape[2] <= _JOINT_LIMIT:
                joint = (joint.unsqueeze(3) * a.unsqueeze(2)).flatten(2)  # (C, N, P * K_l)
                share = joint.mean(1)  # (C, P)
            else:
                joint, share = None, a.mean(1)  # (C, K_l)
            terms.append(share.shape[1] * (share * share).sum(1) - 1.0)
        return torch.stack(terms, 1).mean(1)

    def proximal(self) -> torch.Tensor:
        """(C,) ||w_c - w_t||^2 over every parameter the client holds."""
        total = None
        for name, value in self.params.items():
            d = (value - self.start[name]) ** 2
            term = d.flatten(1).sum(1)
            total = term if total is None else total + term
        assert total is not None
        return total


def _vectorisable(model: FederatedModel) -> TwoTower:
    """``model`` as the TwoTower whose maths the cohort trains, or NotVectorisable why not."""
    reason = model.cohort_unsupported_reason()
    if reason is not None:
        raise NotVectorisable(reason)
    if not isinstance(model, TwoTower):  # declared support, but the maths are TwoTower's
        raise NotVectorisable(f"{type(model).__name__} is no TwoTower (the cohort trains "
                              "rf2's two-tower maths only)")
    return model


def train_cohort(
    model: FederatedModel,
    arrays: Mapping[str, np.ndarray],
    jobs: Sequence[ClientJob],
    *,
    lr: float,
    local_epochs: int,
    batch_size: int,
    proximal_mu: float = 0.0,
) -> list[ClientUpdate]:
    """Train every job from ``arrays`` (the global state, shaped as ``model``'s) at once.

    ``model``: a skeleton of the clients' model (its config, item genres, catalogue size
    and training-progress schedules are read; its parameters are not used).
    Equal to ``train_locally`` per job (tests/test_cohort.py).
    """
    model = _vectorisable(model)
    if not jobs:
        return []
    active = [k for k, j in enumerate(jobs) if len(j.targets) > 0]
    updates: list[ClientUpdate | None] = [None] * len(jobs)
    for k, j in enumerate(jobs):
        if len(j.targets) == 0:  # no data: no training, nothing changed (train_locally too)
            updates[k] = ClientUpdate(0, 0.0, 0.0, {}, {})
    for group in _size_groups([len(jobs[k].targets) for k in active]):
        members = [active[i] for i in group]
        trained = _train(model, arrays, [jobs[k] for k in members], lr=lr,
                         local_epochs=local_epochs, batch_size=batch_size, proximal_mu=proximal_mu)
        for k, u in zip(members, trained, strict=True):
            updates[k] = u
    return [u for u in updates if u is not None]


def _size_groups(sizes: Sequence[int], spread: float = 2.0, slack: int = 8) -> list[list[int]]:
    """Positions grouped by example count (ascending; ties by position), each group's
    largest count <= max(spread x its smallest, smallest + slack).

    Stacking pads every client to the group's largest count; activity is long-tailed
    (ML-100K: median ~15 clicks, max ~400), so one stack of random users wasted ~6x the
    work. A pure function of the cohort, so the grouping, like the cohort, is the same
    on every backend.
    """
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    groups: list[list[int]] = []
    for i in order:
        if groups:
            smallest = sizes[groups[-1][0]]
            if sizes[i] <= max(spread * smallest, smallest + slack):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups


def _train(model: TwoTower, arrays: Mapping[str, np.ndarray], jobs: Sequence[ClientJob], *,
           lr: float, local_epochs: int, batch_size: int, proximal_mu: float
           ) -> list[ClientUpdate]:
    cohort = _Cohort(model, arrays, jobs)
    c, n = len(jobs), cohort.n
    full_ex = torch.arange(int(n.max())).unsqueeze(0).expand(c, -1)  # (C, N)
    full_mask = (full_ex < torch.from_numpy(n).unsqueeze(1)).to(torch.float32)
    bs = n.copy() if batch_size <= 0 else np.minimum(batch_size, n)  # (C,)
    steps = -(-n // bs)  # (C,) batches per epoch
    # Full batch: the first step's loss *is* the loss at the global model over all the
    # client's examples in order (same arithmetic), so it is not computed twice.
    full_batch = bool((steps == 1).all())
    loss_before: list[float] = []
    if not full_batch:
        with torch.no_grad():
            loss_before = cohort.losses(full_ex, full_mask).tolist()
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    names = list(cohort.params)
    leaves = [cohort.params[k] for k in names]
    loss_after: list[float] = []
    for _ in range(local_epochs):
        orders = [torch.randperm(int(n[k]), generator=gens[k]) if bs[k] < n[k]
                  else torch.arange(int(n[k])) for k in range(c)]
        totals, counts = [0.0] * c, [0] * c
        for step in range(int(steps.max())):
            width = int(bs.max())
            ex = torch.zeros((c, width), dtype=torch.int64)
            mask = torch.zeros((c, width), dtype=torch.float32)
            on = torch.zeros(c, dtype=torch.float32)  # clients that take this step
            sizes = [0] * c
            for k in range(c):
                if step < steps[k]:
                    idx = orders[k][step * int(bs[k]): (step + 1) * int(bs[k])]
                    ex[k, : len(idx)] = idx
                    mask[k, : len(idx)] = 1.0
                    on[k] = 1.0
                    sizes[k] = len(idx)
            loss = cohort.losses(ex, mask)  # (C,)
            objective = loss
            if proximal_mu > 0:
                objective = loss + 0.5 * proximal_mu * cohort.proximal()
            grads = torch.autograd.grad((objective * on).sum(), leaves, allow_unused=True)
            with torch.no_grad():
                for leaf, grad in zip(leaves, grads, strict=True):
                    if grad is not None:
                        leaf.add_(grad, alpha=-lr)
            step_losses = loss.detach().tolist()
            if not loss_before:
                loss_before = list(step_losses)
            for k in range(c):
                if sizes[k]:
                    totals[k] += step_losses[k] * sizes[k]
                    counts[k] += sizes[k]
        loss_after = [totals[k] / max(counts[k], 1) for k in range(c)]
    out = []
    for k in range(c):
        rows: dict[str, np.ndarray] = {}
        values: dict[str, np.ndarray] = {}
        for name in names:
            value = cohort.params[name].detach()[k]
            if name in cohort.history_tables:
                rows[name] = cohort.hrows[k]
                value = value[: len(cohort.hrows[k])]
            elif name in cohort.item_tables:
                rows[name] = cohort.irows[k]
                value = value[: len(cohort.irows[k])]
            values[name] = value.numpy()  # float32, as the model's state_dict
        out.append(ClientUpdate(int(n[k]), float(loss_before[k]), float(loss_after[k]),
                                rows, values))
    return out


@dataclass
class CohortSum:
    """sum_k n_k Δ_k over a cohort's clients (n_k its examples, Δ_k its update), the
    weight sum sum_k n_k, row-sparse: what a partial aggregate carries.

    ``rows[name]``: sorted ids of a row table's rows some client touched;
    ``deltas[name]``: the summed update there ((R, D) / (R,)) or, for any other
    parameter, over its whole shape.
    """

    weight: float
    rows: dict[str, np.ndarray]
    deltas: dict[str, np.ndarray]


@dataclass(frozen=True)
class ClientSummary:
    """One summed client's metrics and the rows its own reply would have carried."""

    num_examples: int
    loss_before: float
    loss_after: float
    rows: dict[str, np.ndarray]


def one_full_batch_step(jobs: Sequence[ClientJob], local_epochs: int, batch_size: int) -> bool:
    """True when every job trains one SGD step on all its examples (RF²'s recipe)."""
    largest = max((len(j.targets) for j in jobs), default=0)
    return local_epochs == 1 and (batch_size <= 0 or batch_size >= largest)


def summed_step(
    model: FederatedModel,
    arrays: Mapping[str, np.ndarray],
    jobs: Sequence[ClientJob],
    *,
    lr: float,
) -> tuple[CohortSum, list[ClientSummary]]:
    """The clients' summed update of one full-batch SGD step, never one table per client.

    One step from w_t gives Δ_k = -lr grad L_k(w_t), so sum_k n_k Δ_k = -lr grad
    (sum_k n_k L_k)(w_t): one backward pass into one copy of the parameters (for a
    full softmax one score matrix and one matmul back into the item table). FedProx's
    term has zero gradient at w_t, so mu does not enter. Equal to summing
    ``train_cohort``'s updates to rounding (tests/test_partial_sums.py).
    Requires :func:`one_full_batch_step` and clients with examples.
    """
    model = _vectorisable(model)
    if not jobs or any(len(j.targets) == 0 for j in jobs):
        raise ValueError("summed_step needs at least one job, each with examples")
    if not isinstance(model, HierIndexModel):
        return _flat_two_tower_step(model, arrays, jobs, lr)
    totals: dict[str, torch.Tensor] = {}
    summaries: list[ClientSummary | None] = [None] * len(jobs)
    row_sets: dict[str, list[np.ndarray]] = {}
    # Coarser groups than training's: shared parameters make padding cheap (no per-client
    # copies), while each group costs a pass over the parameters.
    for group in _size_groups([len(j.targets) for j in jobs], spread=4.0, slack=32):
        cohort = _Cohort(model, arrays, [jobs[k] for k in group], shared=True)
        c, n = len(group), cohort.n
        ex = torch.arange(int(n.max())).unsqueeze(0).expand(c, -1)  # (C, N)
        mask = (ex < torch.from_numpy(n).unsqueeze(1)).to(torch.float32)
        loss = cohort.losses(ex, mask)  # (C,) each client's loss at w_t
        names = list(cohort.leaves)
        weights = torch.from_numpy(n.astype(np.float32))
        grads = torch.autograd.grad((loss * weights).sum(), [cohort.leaves[k] for k in names],
                                    allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                totals[name] = grad if name not in totals else totals[name] + grad
        values = loss.detach().tolist()
        for i, k in enumerate(group):
            rows: dict[str, np.ndarray] = {}
            for name in cohort.history_tables:
                rows[name] = cohort.hrows[i]
            for name in cohort.item_tables:
                rows[name] = cohort.irows[i]
            for name, r in rows.items():
                row_sets.setdefault(name, []).append(r)
            # Full batch, one step: the step's loss is the loss at w_t (train_cohort too).
            summaries[k] = ClientSummary(int(n[i]), values[i], values[i], rows)
    rows_out: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    for name, g in arrays.items():
        total = totals.get(name)
        full = (torch.zeros(np.shape(g), dtype=torch.float32) if total is None
                else total.detach()) * -lr
        if name in row_sets:
            union = sorted_unique(np.concatenate(row_sets[name]))
            rows_out[name] = union
            deltas[name] = full.numpy()[union]
        else:
            deltas[name] = full.numpy()
    weight = float(sum(len(j.targets) for j in jobs))
    return CohortSum(weight, rows_out, deltas), [s for s in summaries if s is not None]


def _flat_two_tower_step(model: TwoTower, arrays: Mapping[str, np.ndarray],
                         jobs: Sequence[ClientJob], lr: float
                         ) -> tuple[CohortSum, list[ClientSummary]]:
    """:func:`summed_step` for the two-tower: sum_k n_k L_k is the sum of every example's
    cross-entropy, so all the cohort's examples go through one pass, unpadded, into one
    copy of the tables. Full softmax: one (examples x items) score matrix and one matmul
    back into the item table. Sampled: each client's examples against its own negatives
    (``TwoTower._sampled_softmax``'s maths)."""
    leaves = {name: torch.tensor(np.asarray(g), dtype=torch.float32).requires_grad_(True)
              for name, g in arrays.items()}
    n = np.array([len(j.targets) for j in jobs], dtype=np.int64)  # (C,)
    hist = torch.from_numpy(np.concatenate([np.asarray(j.histories, dtype=np.int64)
                                            for j in jobs]))  # (E, H)
    tgt = torch.from_numpy(np.concatenate([np.asarray(j.targets, dtype=np.int64)
                                           for j in jobs]))  # (E,)
    mask = (hist >= 0).unsqueeze(-1).to(torch.float32)  # (E, H, 1)
    emb = leaves["history_table"][hist.clamp(min=0)] * mask  # (E, H, D)
    user = emb.sum(1) / mask.sum(1).clamp(min=1.0)  # (E, D)
    genres = model.item_genres if model.genre_table is not None else None

    def item_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = leaves["item_table"][ids]  # (N, D)
        if genres is not None:
            rows = rows + genres[ids] @ leaves["genre_table"]
        return rows, (leaves["bias"][ids] if "bias" in leaves else None)

    samples = [client_sample(model, j.seed) for j in jobs]
    if not model.sampled:
        items = leaves["item_table"]  # (I, D)
        if genres is not None:
            items = items + genres @ leaves["genre_table"]  # (I, D)
        scores = user @ items.T  # (E, I)
        if "bias" in leaves:
            scores = scores + leaves["bias"]
        per_ex = F.cross_entropy(scores, tgt, reduction="none")  # (E,)
    else:
        k = samples[0].negatives.shape[0]
        log_q = math.log(k / model.num_items)
        tgt_emb, tgt_bias = item_rows(tgt)  # (E, D), (E,)
        pos = (user * tgt_emb).sum(-1)  # (E,)
        if tgt_bias is not None:
            pos = pos + tgt_bias
        # Every client's negatives gathered at once and the examples split per client
        # (split/unbind): one gather and one concatenation in the backward pass, where
        # per-client gathers and slices each wrote a zero-filled table-sized gradient.
        all_negs = torch.stack([s.negatives for s in samples])  # (C, K)
        neg_emb_all, neg_bias_all = item_rows(all_negs.reshape(-1))  # (C K, D), (C K,)
        neg_embs = neg_emb_all.reshape(len(samples), k, -1).unbind(0)  # C x (K, D)
        neg_biases = (None if neg_bias_all is None
                      else neg_bias_all.reshape(len(samples), k).unbind(0))  # C x (K,)
        sizes = [int(x) for x in n]
        users_c, tgts_c = torch.split(user, sizes), torch.split(tgt, sizes)
        parts = []
        for c, sample in enumerate(samples):  # a client's examples share its negatives
            negs = users_c[c] @ neg_embs[c].T - log_q  # (n_c, K)
            if neg_biases is not None:
                negs = negs + neg_biases[c]
            hit = sample.negatives.unsqueeze(0) == tgts_c[c].unsqueeze(1)
            parts.append(negs.masked_fill(hit, float("-inf")))
        logits = torch.cat([pos.unsqueeze(1), torch.cat(parts)], dim=1)  # (E, 1 + K)
        per_ex = F.cross_entropy(logits, torch.zeros_like(tgt), reduction="none")  # (E,)
    names = list(leaves)
    grads = torch.autograd.grad(per_ex.sum(), [leaves[k] for k in names], allow_unused=True)
    owner = torch.from_numpy(np.repeat(np.arange(len(jobs)), n))  # (E,) client of each example
    sums = torch.zeros(len(jobs), dtype=torch.float64).index_add_(
        0, owner, per_ex.detach().to(torch.float64))
    losses = (sums / torch.from_numpy(n).to(torch.float64)).tolist()  # (C,) mean per client
    hrows = [sorted_unique(j.histories[j.histories >= 0]).astype(np.int64) for j in jobs]
    candidates = [model.candidate_rows(np.asarray(j.targets, dtype=np.int64), s)
                  for j, s in zip(jobs, samples, strict=True)]
    all_items = np.arange(model.num_items, dtype=np.int64)
    irows = [all_items if r is None else np.asarray(r, dtype=np.int64) for r in candidates]
    tables = model.row_tables()
    history_tables = [t for t, roles in tables.items() if roles == {HISTORY}]
    item_tables = [t for t, roles in tables.items() if roles == {CANDIDATE}]
    summaries = [ClientSummary(int(n[k]), losses[k], losses[k],
                               {**{t: hrows[k] for t in history_tables},
                                **{t: irows[k] for t in item_tables}})
                 for k in range(len(jobs))]
    rows: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    unions = {"h": sorted_unique(np.concatenate(hrows)),
              "i": sorted_unique(np.concatenate(irows))}
    for name, grad in zip(names, grads, strict=True):
        full = (torch.zeros(leaves[name].shape) if grad is None else grad.detach()) * -lr
        if name in history_tables or name in item_tables:
            union = unions["h" if name in history_tables else "i"]
            rows[name] = union
            deltas[name] = full.numpy()[union]
        else:
            deltas[name] = full.numpy()
    return CohortSum(float(n.sum()), rows, deltas), summaries
