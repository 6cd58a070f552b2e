"""Federated collaborative filtering (FCF, Ammad-ud-din et al. 2019): matrix
factorisation whose user vectors never leave the device.

score(u, i) = <p_u, q_i> + b_i. The item table ``q`` (and the item bias ``b``) is
federated: a row table read by candidates, so a client replies only the rows its loss
touched (its clicks and, with the sampled softmax, its negatives). The user table ``p``
is **per-user state** (:meth:`FCF.user_state_names`): each client trains its own row
and keeps it; rf2 stores it between rounds (``rf2.fl.user_state``), never sends it to
the server and never aggregates it. Evaluation scores a user with its own stored row;
central mode trains the whole table as plain MF.

The loss is the same item softmax as the two-tower's (full, or sampled with logQ
correction, ``model.loss``), with the user's vector in place of the pooled history:
next-click examples of one user differ only in their target, so MF ignores the history
and the loss reads the ``users`` rf2 passes to a stateful model. The paper's loss is a
confidence-weighted squared loss with a closed-form user update; the softmax keeps FCF
comparable with rf2's other models on the same metrics and sampled-negative machinery.

Each user's vector starts as a deterministic draw from the run seed (row u of a table
drawn in user order), so every backend starts from the same vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rf2.core.arrays import sorted_unique
from rf2.core.config import ModelConfig
from rf2.model.base import CANDIDATE, FederatedModel, Role
from rf2.model.two_tower import LossSample, sampled_softmax

if TYPE_CHECKING:
    from rf2.data.base import FederatedDataset


class FCF(FederatedModel):
    """Matrix factorisation with per-user state: ``user_table`` (U, D) stays on each
    client, ``item_table`` (I, D) and ``bias`` (I,) are federated."""

    def __init__(self, num_items: int, num_users: int, cfg: ModelConfig, seed: int = 0) -> None:
        super().__init__()
        self.num_items, self.num_users, self.cfg = num_items, num_users, cfg
        self.dim = d = cfg.dim
        self.user_table = nn.Parameter(torch.empty(num_users, d))  # (U, D) per-user state
        self.item_table = nn.Parameter(torch.empty(num_items, d))  # (I, D) federated
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(num_items)) if cfg.item_bias else None  # (I,)
        )
        self._sampler = torch.Generator()
        self.reset_parameters(seed)

    @classmethod
    def from_dataset(cls, dataset: FederatedDataset, cfg: ModelConfig, seed: int) -> FCF:
        return cls(dataset.num_items, dataset.num_users, cfg, seed=seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed`` alone (own generator: global RNG untouched)."""
        gen = torch.Generator().manual_seed(seed)
        s = self.cfg.init_scale
        self.item_table.normal_(0.0, s, generator=gen)
        self.user_table.normal_(0.0, s, generator=gen)
        if self.bias is not None:
            self.bias.zero_()
        self._sampler.manual_seed(seed)

    def seed_sampler(self, seed: int) -> None:
        """Seed the negative sampler (central mode: one seed per step)."""
        self._sampler.manual_seed(seed)

    # -- the model contract (rf2.model.base) ----------------------------------------------
    def user_state_names(self) -> tuple[str, ...]:
        return ("user_table",)

    def row_tables(self) -> Mapping[str, frozenset[Role]]:
        tables: dict[str, frozenset[Role]] = {"item_table": frozenset({CANDIDATE})}
        if self.bias is not None:
            tables["bias"] = frozenset({CANDIDATE})
        return tables

    def candidate_rows(self, targets: np.ndarray, sample: LossSample | None
                       ) -> np.ndarray | None:
        if sample is None or sample.negatives is None:
            return None  # full softmax: every item's score is in the loss
        return sorted_unique(np.concatenate([np.asarray(targets, dtype=np.int64),
                                             sample.negatives.numpy()]))

    def draw_sample(self, generator: torch.Generator) -> LossSample:
        if self.cfg.loss_kind(self.num_items) != "sampled":
            return LossSample()
        k = self.cfg.num_negatives
        return LossSample(negatives=torch.randint(0, self.num_items, (k,), generator=generator))

    def score_users(self, histories: torch.Tensor, users: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B,) users' own vectors against every item -> (B, I); ``users`` is required."""
        if users is None:
            raise ValueError("FCF scores users by their own vectors: pass their user ids")
        return self.user_table[users] @ self.item_table.T + self._bias_vector()  # (B, I)

    def loss(self, history: torch.Tensor, target: torch.Tensor,
             sample: LossSample | None = None, users: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean item-softmax cross-entropy of (B,) targets for (B,) ``users``.

        Sparse gradients for the rows read by id (the user's vector, and with the sampled
        softmax the candidate item rows): a client's step then costs O(rows it touches),
        not O(users + items)."""
        if users is None:
            raise ValueError("FCF's loss needs the user of each example (users=)")
        if sample is None:
            sample = self.draw_sample(self._sampler)
        user = F.embedding(users, self.user_table, sparse=True)  # (B, D)
        return self._item_loss(user, target, sample, self.item_table, self.bias, sparse=True)

    @torch.no_grad()
    def fit_user_state(self, history: torch.Tensor, target: torch.Tensor,
                       sample: LossSample | None, users: torch.Tensor) -> None:
        """``model.fcf.user_steps`` full-batch gradient steps on the users' own vectors
        alone, against the item table as it is (the paper's on-device user update; the
        loss is convex in the vector). The gradient of the softmax cross-entropy in the
        vector is written out (E_p[q] - q_target): no autograd graph per step."""
        steps, lr = self.cfg.fcf.user_steps, self.cfg.fcf.user_lr
        if steps == 0 or target.numel() == 0:
            return
        ids, where = torch.unique(users, return_inverse=True)
        # Each user's own mean loss (a device sees its own examples only).
        counts = torch.bincount(where, minlength=len(ids)).clamp(min=1).unsqueeze(1)  # (G, 1)
        bias = self._bias_vector().detach()
        if sample is None or sample.negatives is None:
            cand = self.item_table.detach()  # (I, D), every example scores all of it
            cand_bias, log_q, mask = bias, 0.0, None
            tgt = cand[target]  # (B, D)
        else:
            neg = sample.negatives
            cand = self.item_table.detach()[neg]  # (K, D)
            cand_bias = bias[neg]
            log_q = math.log(neg.numel() / self.num_items)
            mask = neg.unsqueeze(0) == target.unsqueeze(1)  # (B, K) accidental hits
            tgt = self.item_table.detach()[target]  # (B, D)
            tgt_bias = bias[target]
        own = self.user_table[ids].clone()  # (G, D)
        for _ in range(steps):
            u = own[where]  # (B, D)
            logits = u @ cand.T + cand_bias - log_q  # (B, I) or (B, K)
            if mask is None:
                p = torch.softmax(logits, dim=1)
                grad = p @ cand - tgt  # (B, D)
            else:
                pos = (u * tgt).sum(1, keepdim=True) + tgt_bias.unsqueeze(1)  # (B, 1)
                logits = logits.masked_fill(mask, float("-inf"))
                p = torch.softmax(torch.cat([pos, logits], dim=1), dim=1)  # (B, 1 + K)
                grad = p[:, :1] * tgt + p[:, 1:] @ cand - tgt  # (B, D)
            summed = torch.zeros_like(own).index_add_(0, where, grad)  # (G, D)
            own -= lr * summed / counts
        self.user_table[ids] = own

    # -- helpers ---------------------------------------------------------------------------
    def _bias_vector(self) -> torch.Tensor:
        if self.bias is None:
            return self.item_table.new_zeros(self.num_items)
        return self.bias

    def _item_loss(self, user: torch.Tensor, target: torch.Tensor, sample: LossSample,
                   items: torch.Tensor, bias: torch.Tensor | None, sparse: bool
                   ) -> torch.Tensor:
        """Softmax cross-entropy of (B, D) user vectors against ``items`` (I, D) and
        ``bias`` (I,): over the catalogue, or the sample's negatives (logQ-corrected)."""
        if sample.negatives is None:
            logits = user @ items.T  # (B, I)
            return F.cross_entropy(logits if bias is None else logits + bias, target)

        def item_rows(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            vecs = F.embedding(ids, items, sparse=sparse)  # (N, D)
            return vecs, (bias[ids] if bias is not None else vecs.new_zeros(len(ids)))

        return sampled_softmax(user, target, sample.negatives, item_rows, self.num_items)
