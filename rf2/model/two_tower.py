"""The global retrieval model: a two-tower recommender with no per-user parameters.

Every parameter is shared by all clients, so the whole ``state_dict`` is what FedAvg
averages. The user tower sees only the user's recent clicks (RF² drops the user-id
feature for the same reason: a user-id table would be per-client state).

Why the user tower is a plain mean of history embeddings, with no layer on top: under
the RF² recipe (one full-batch client SGD step at lr 1.0, server Adagrad lr 0.1) the
first Adagrad step moves every coordinate by ~lr, which knocks a dense D x D layer far
from its identity init; on MovieLens-100K a linear layer on top cost ~0.02-0.03
Recall@20 at every round versus plain mean pooling.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rf2.core.arrays import sorted_unique
from rf2.core.config import ModelConfig
from rf2.model.base import CANDIDATE, HISTORY, FederatedModel, Role

PAD = -1


@dataclass(frozen=True)
class LossSample:
    """The random item ids one client's loss uses, drawn once per client and round.

    Drawn up front (from a generator seeded by the client's seed) so that the rows a
    client touches are known before training: its history items, its targets, these
    negatives and, for the index, the balance sample. ``None`` means "all items" (full
    softmax; a catalogue no larger than the balance sample).
    """

    negatives: torch.Tensor | None = None  # (K,) int64, uniform with replacement
    balance: torch.Tensor | None = None  # (S,) int64, items for the index's balance term


class TwoTower(FederatedModel):
    """score(user, item) = <u(history), v(item)> + b_item.

    u(history) = mean of the history-item embeddings of the clicked items (PAD ignored;
    an empty history gives the zero vector, so the score falls back to the item bias).
    v(item) = item embedding + mean of its genres' embeddings (when ``cfg.use_genres``
    and the dataset has genres), which lets rarely clicked items borrow from their genre.
    """

    def __init__(
        self,
        num_items: int,
        cfg: ModelConfig,
        item_genres: np.ndarray | None = None,
        history_len: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_items, self.cfg, self.history_len = num_items, cfg, history_len
        self.dim = d = cfg.dim
        # Separate tables: an item as context (history) and as candidate play different roles.
        self.history_table = nn.Parameter(torch.empty(num_items, d))  # (I, D)
        self.item_table = nn.Parameter(torch.empty(num_items, d))  # (I, D)
        self.bias: nn.Parameter | None = (
            nn.Parameter(torch.zeros(num_items)) if cfg.item_bias else None  # (I,)
        )
        self.genre_table: nn.Parameter | None = None
        self.item_genres: torch.Tensor | None
        if cfg.use_genres and item_genres is not None and item_genres.shape[1] > 0:
            self._genres_raw = np.asarray(item_genres)  # as given, for at_width
            g = torch.as_tensor(np.asarray(item_genres), dtype=torch.float32)  # (I, G)
            if g.shape[0] != num_items:
                raise ValueError(f"item_genres has {g.shape[0]} rows, expected {num_items}")
            # Row-normalised so genres @ table is the mean genre embedding (0 if none).
            g = g / g.sum(dim=1, keepdim=True).clamp(min=1.0)
            # Data, not a parameter: non-persistent keeps it out of state_dict and FedAvg.
            self.register_buffer("item_genres", g, persistent=False)
            self.genre_table = nn.Parameter(torch.empty(g.shape[1], d))  # (G, D)
        else:
            self.item_genres = None
        self._sampler = torch.Generator()
        self.reset_parameters(seed)

    # -- the model contract (rf2.model.base) ----------------------------------------------
    def score_users(self, histories: torch.Tensor, users: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """(B, H) histories -> (B, I) scores (no per-user state: ``users`` unused)."""
        return self.score_all(self.user_embedding(histories))

    def row_tables(self) -> Mapping[str, frozenset[Role]]:
        tables: dict[str, frozenset[Role]] = {"history_table": frozenset({HISTORY}),
                                              "item_table": frozenset({CANDIDATE})}
        if self.bias is not None:
            tables["bias"] = frozenset({CANDIDATE})
        return tables

    def candidate_rows(self, targets: np.ndarray, sample: LossSample | None
                       ) -> np.ndarray | None:
        if sample is None or sample.negatives is None:
            return None  # full softmax: every item's score is in the loss
        parts = [np.asarray(targets, dtype=np.int64), sample.negatives.numpy()]
        if sample.balance is not None:
            parts.append(sample.balance.numpy())
        return sorted_unique(np.concatenate(parts))

    def width_rules(self) -> dict[str, tuple[int, ...]]:
        """Embedding tables narrow along D (columns); the per-item bias has no D axis."""
        return {"history_table": (1,), "item_table": (1,), "genre_table": (1,), "bias": ()}

    def at_width(self, width: float) -> TwoTower:
        # ceil(width * D), rounded first: rf2.optim.heterofl.kept's rule (tested equal).
        dim = max(1, math.ceil(round(width * self.dim, 9)))
        cfg = dataclasses.replace(self.cfg, dim=dim)
        genres = None if self.item_genres is None else self._genres_raw
        return type(self)(self.num_items, cfg, genres, self.history_len, seed=0)

    # Classes whose maths rf2.model.cohort re-implements, stacked over clients. A
    # subclass may change any method (tie tables, add a layer), so it is vectorised
    # only if it says so by setting ``cohort_vectorisable = True`` in its own body.
    cohort_vectorisable = True

    def cohort_unsupported_reason(self) -> str | None:
        cls = type(self)
        if cls.__dict__.get("cohort_vectorisable", False):
            return None
        return (f"{cls.__module__}.{cls.__qualname__} subclasses {cls.__mro__[1].__name__} "
                "without declaring cohort_vectorisable = True (the cohort trains rf2's own "
                "two-tower maths, which a subclass may have changed)")

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Deterministic init from ``seed`` alone (own generator: global RNG untouched)."""
        gen = torch.Generator().manual_seed(seed)
        s = self.cfg.init_scale
        self.history_table.normal_(0.0, s, generator=gen)
        self.item_table.normal_(0.0, s, generator=gen)
        if self.genre_table is not None:
            self.genre_table.normal_(0.0, s, generator=gen)
        if self.bias is not None:
            self.bias.zero_()
        self.seed_sampler(seed)

    def seed_sampler(self, seed: int) -> None:
        """Seed the negative sampler of ``sampled_softmax``.

        Clients built from the same global seed would otherwise all draw the same
        negatives; a client should seed it from (run seed, round, client id).
        """
        self._sampler.manual_seed(seed)

    def user_embedding(self, history: torch.Tensor) -> torch.Tensor:
        """(B, H) item ids, PAD = -1 -> (B, D). An all-PAD history pools to zero."""
        mask = (history >= 0).unsqueeze(-1).to(self.history_table.dtype)  # (B, H, 1)
        emb = self.history_table[history.clamp(min=0)] * mask  # (B, H, D)
        return emb.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # (B, D)

    def item_embeddings(self) -> torch.Tensor:
        """(I, D) item-tower outputs for the whole catalogue."""
        if self.genre_table is None or self.item_genres is None:
            return self.item_table
        return self.item_table + self.item_genres @ self.genre_table  # (I, D)

    def item_bias_vector(self) -> torch.Tensor:
        """(I,) per-item bias; zeros when ``cfg.item_bias`` is off."""
        if self.bias is None:
            return self.item_table.new_zeros(self.num_items)
        return self.bias

    def item_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) item ids -> (N, D) item-tower outputs and (N,) biases of those items only.

        O(N) work: the sampled loss never builds the whole catalogue's embeddings.
        """
        items = self.item_table[ids]  # (N, D)
        if self.genre_table is not None and self.item_genres is not None:
            items = items + self.item_genres[ids] @ self.genre_table  # (N, D)
        bias = self.bias[ids] if self.bias is not None else items.new_zeros(ids.shape[0])
        return items, bias

    def score_all(self, user_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) user embeddings -> (B, I) scores for every item."""
        return user_emb @ self.item_embeddings().T + self.item_bias_vector()  # (B, I)

    @property
    def sampled(self) -> bool:
        """True when this model trains with the sampled softmax (``model.loss``)."""
        return self.cfg.loss_kind(self.num_items) == "sampled"

    def draw_sample(self, generator: torch.Generator) -> LossSample:
        """The negatives of one client's loss (none for the full softmax)."""
        if not self.sampled:
            return LossSample()
        k = self.cfg.num_negatives
        return LossSample(negatives=torch.randint(0, self.num_items, (k,), generator=generator))

    def loss(
        self, history: torch.Tensor, target: torch.Tensor,
        sample: LossSample | None = None,
    ) -> torch.Tensor:
        """Mean softmax cross-entropy of the target item; full or sampled (``cfg.loss``).

        ``sample``: the client's pre-drawn negatives; None draws fresh ones from the
        model's own sampler (central training: new negatives every step).
        """
        if sample is None:
            sample = self.draw_sample(self._sampler)
        user = self.user_embedding(history)  # (B, D)
        return self.item_loss(user, target, sample)

    def item_loss(
        self, user: torch.Tensor, target: torch.Tensor, sample: LossSample | None = None
    ) -> torch.Tensor:
        """The item softmax part of the loss for (B, D) user embeddings."""
        if sample is None:
            sample = self.draw_sample(self._sampler)
        if sample.negatives is None:
            return F.cross_entropy(self.score_all(user), target)
        return self._sampled_softmax(user, target, sample.negatives)

    def _sampled_softmax(
        self, user: torch.Tensor, target: torch.Tensor, neg: torch.Tensor
    ) -> torch.Tensor:
        return sampled_softmax(user, target, neg, self.item_rows, self.num_items)


def sampled_softmax(
    user: torch.Tensor, target: torch.Tensor, neg: torch.Tensor,
    item_rows: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], num_items: int,
) -> torch.Tensor:
    """K uniform negatives shared by the batch, logQ-corrected, accidental hits masked.

    (B, D) users, (B,) targets, (K,) negatives; ``item_rows(ids)`` gives (N, D) item
    vectors and (N,) biases. Each logit is shifted by -log(expected count) = -log(K / I)
    (Bengio & Senecal; TF's sampled_softmax_loss), so sum_k exp(logit_k) is an unbiased
    estimate of the full-softmax partition function: the loss estimates the full-softmax
    loss rather than one that under-weights negatives by I / K.
    """
    k = neg.shape[0]
    log_q = math.log(k / num_items)
    tgt_emb, tgt_bias = item_rows(target)  # (B, D), (B,)
    neg_emb, neg_bias = item_rows(neg)  # (K, D), (K,)
    pos = (user * tgt_emb).sum(-1) + tgt_bias  # (B,) exact, not an estimate
    negs = user @ neg_emb.T + neg_bias - log_q  # (B, K)
    # A negative equal to the target would count the positive twice.
    negs = negs.masked_fill(neg.unsqueeze(0) == target.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos.unsqueeze(1), negs], dim=1)  # (B, 1 + K)
    return F.cross_entropy(logits, torch.zeros_like(target))
