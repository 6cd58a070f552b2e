"""Two-tower model with a jointly learned hierarchical index (HILL / HSNN).

The index is a residual quantiser over the *retrieval space*: key(i) = [v_i, b_i] and
query(u) = [u, 1], so <query, key> is exactly the model's score <u, v_i> + b_i and a
routing decision made on keys is made on what is finally ranked (without the bias
coordinate, popular items with large biases would be routed as if they were average).

Level l holds K_l learnable node embeddings, ``node_vecs.l`` (K_l, D) and, with an item
bias, ``node_bias.l`` (K_l,), so node key = [c, beta]. They are ordinary parameters:
FedAvg averages them like any other weight. Item codes are derived state (a
non-persistent buffer) recomputed from the current parameters whenever a retriever is
built, i.e. after every aggregation, so clients and server never exchange codes.

Training (``loss``) = item softmax + w(t) * (sum_l CE_l + lambda_rec * rec + lambda_bal * bal):

- soft assignment ("cross-attention": the item's residual queries the nodes, which are
  keys and values): a_l = softmax(-alpha * ||r_l - c||), c_bar_l = a_l @ C_l,
  r_1 = key, r_{l+1} = r_l - c_bar_l;
- CE_l: softmax over level-l nodes of <query, c_k> with the target item's soft
  assignment a_l as label. Summed over levels this is exactly the cross-entropy over
  whole paths with path logit <query, c_1 + ... + c_L> (the softmax factorises), which
  is the score beam search ranks paths by. The label is detached: with gradient through
  it, the CE pulls each item towards the nodes its users already score high, a
  rich-get-richer collapse (measured on MovieLens-100K: 1089 of 1682 items in one
  level-1 node, 65% of items scored at beam 4; detached: largest leaf 58 items);
- rec = ||sum_l c_bar_l - key||^2 over the batch's target items. Its gradient reaches
  the item embeddings too (joint learning: items become quantisable); detaching it
  there cut exactness@20 at beam 16 from 0.98 to 0.70 on MovieLens-100K;
- bal: K * sum_k p_k^2 - 1 (0 when uniform) of the catalogue-wide share of items per
  path prefix (joint over levels while small enough, else per level). It is over the
  catalogue, not the batch: a federated batch is one user's items, which *should*
  concentrate in a few nodes;
- alpha = min_alpha + (max_alpha - min_alpha) * t^p, t = min(1, step / anneal_steps)
  (soft to hard); w(t) = index_loss_weight * min(1, step / warmup_steps). Both count
  absolute steps, not a share of num_rounds, so extending a run on resume replays the
  same schedule.

Progress comes from ``set_training_progress(step, total)``: the server round in
federated training (the client calls it), the optimizer step in central training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rf2.core.config import ModelConfig
from rf2.model.retrieval import BeamSearchRetriever
from rf2.model.two_tower import LossSample, TwoTower

# Joint prefix distributions for the balance term only while N x P stays this small.
_JOINT_LIMIT = 1 << 23


def sq_distances(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(N, D), (K, D) -> (N, K) squared Euclidean distances (clamped at 0)."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)).clamp(min=0.0)


@torch.no_grad()
def nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, ...]:
    """(N, D), (K, D) -> (N,) squared distance to and index of the nearest row of c.

    In row chunks, so 10^6 points x 1024 centroids never materialise a 4 GB matrix.
    """
    c_sq = (c * c).sum(1)  # (K,)
    best, idx = [], []
    for lo in range(0, x.shape[0], chunk):
        xc = x[lo : lo + chunk]
        d = torch.addmm(c_sq, xc, c.T, alpha=-2.0)  # (n, K) = ||c||^2 - 2 <x, c>
        b, i = d.min(1)
        best.append((b + (xc * xc).sum(1)).clamp(min=0.0))
        idx.append(i)
    if not best:
        return x.new_zeros(0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(best), torch.cat(idx)


@torch.no_grad()
def kmeans(
    x: torch.Tensor, k: int, iters: int = 25, seed: int = 0, points_per_centroid: int = 256
) -> torch.Tensor:
    """(N, D) -> (k, D) Lloyd's k-means from k distinct random points, seeded.

    At most ``points_per_centroid`` * k points are used (FAISS's default cap is 256). An
    empty cluster is re-seeded at the point farthest from its centroid, so no node
    starts dead.
    """
    gen = torch.Generator().manual_seed(seed)
    x = x.detach().float()
    n = x.shape[0]
    if n > points_per_centroid * k:
        x = x[torch.randperm(n, generator=gen)[: points_per_centroid * k]]
        n = x.shape[0]
    if n < k:  # fewer points than nodes: duplicates, jittered apart
        idx = torch.randint(n, (k,), generator=gen)
        noise = torch.randn(k, x.shape[1], generator=gen) * 1e-3 * (x.std(correction=0) + 1e-6)
        return x[idx] + noise
    centroids = x[torch.randperm(n, generator=gen)[:k]].clone()  # (k, D)
    for _ in range(iters):
        best, assign = nearest(x, centroids)  # (N,), (N,)
        counts = torch.bincount(assign, minlength=k)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).float()
        empty = torch.nonzero(~nonempty).squeeze(1)
        if len(empty):
            far = torch.topk(best, len(empty)).indices
            centroids[empty] = x[far]
    return centroids


def hard_codes(keys: torch.Tensor, codebooks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, Dq) -> (N, L) residual argmin codes: code_l = argmin_k ||r_l - c_k||."""
    r = keys.detach().float()
    codes = []
    for book in codebooks:
        book = book.detach().float()
        c = nearest(r, book)[1]  # (N,)
        codes.append(c)
        r = r - book[c]
    return torch.stack(codes, 1)  # (N, L)


def residual_kmeans(
    keys: torch.Tensor, sizes: Sequence[int], seed: int = 0, iters: int = 25,
    points_per_centroid: int = 256,
) -> list[torch.Tensor]:
    """Codebooks of a residual quantiser: k-means on the keys, then on their residuals."""
    r = keys.detach().float()
    books = []
    for level, k in enumerate(sizes):
        book = kmeans(r, k, iters=iters, seed=seed + level,
                      points_per_centroid=points_per_centroid)
        books.append(book)
        r = r - book[nearest(r, book)[1]]
    return books


class HierIndexModel(TwoTower):
    """TwoTower + L levels of learnable nodes; see the module docstring."""

    def __init__(
        self,
        num_items: int,
        cfg: ModelConfig,
        item_genres: np.ndarray | None = None,
        history_len: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__(num_items, cfg, item_genres, history_len, seed)
        icfg = cfg.index
        self.node_vecs = nn.ParameterList(
            [nn.Parameter(torch.empty(k, self.dim)) for k in icfg.nodes_per_level]  # (K_l, D)
        )
        self.node_bias: nn.ParameterList | None = None
        if self.bias is not None:
            self.node_bias = nn.ParameterList(
                [nn.Parameter(torch.zeros(k)) for k in icfg.nodes_per_level]  # (K_l,)
            )
        # Derived serving state: never aggregated, never checkpointed.
        self.register_buffer(
            "codes", torch.zeros(num_items, icfg.levels, dtype=torch.int64), persistent=False
        )
        self._step, self._total = math.inf, 1.0  # schedules finished until told otherwise
        self.init_index(icfg.init, seed)

    # -- parameters and initialisation ----------------------------------------------
    def reset_parameters(self, seed: int) -> None:
        super().reset_parameters(seed)
        if "node_vecs" in self._modules:  # TwoTower.__init__ runs this before nodes exist
            self.init_index(self.cfg.index.init, seed)

    @torch.no_grad()
    def init_index(self, method: str = "kmeans", seed: int = 0) -> None:
        """Nodes from residual k-means of the current item keys, or random normal.

        Calling it after some training (e.g. a two-tower warm-up) re-seeds the index on
        item embeddings that already carry structure.
        """
        sizes = self.cfg.index.nodes_per_level
        if method == "kmeans":
            books = residual_kmeans(self.item_keys(), sizes, seed=seed + 1)
        elif method == "random":
            gen = torch.Generator().manual_seed(seed + 1)
            s = self.cfg.init_scale
            books = [torch.randn(k, self.key_dim, generator=gen) * s for k in sizes]
            if self.node_bias is not None:
                for b in books:
                    b[:, -1] = 0.0
        else:
            raise ValueError(f"init must be 'kmeans' or 'random', got {method!r}")
        for level, book in enumerate(books):
            self.node_vecs[level].copy_(book[:, : self.dim])
            if self.node_bias is not None:
                self.node_bias[level].copy_(book[:, self.dim])
        self.refresh_index()

    @property
    def key_dim(self) -> int:
        """Dq: D, plus one coordinate for the item bias."""
        return self.dim + (1 if self.bias is not None else 0)

    def item_keys(self) -> torch.Tensor:
        """(I, Dq) [v_i, b_i]: <query_vectors(u), item_keys()> = score_all(u)."""
        items = self.item_embeddings()  # (I, D)
        if self.bias is None:
            return items
        return torch.cat([items, self.bias.unsqueeze(1)], dim=1)

    def query_vectors(self, user_emb: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, Dq) [u, 1]."""
        if self.bias is None:
            return user_emb
        return torch.cat([user_emb, user_emb.new_ones(user_emb.shape[0], 1)], dim=1)

    def node_keys(self, level: int) -> torch.Tensor:
        """(K_l, Dq) node embeddings of ``level`` in the retrieval space."""
        vecs = self.node_vecs[level]
        if self.node_bias is None:
            return vecs
        return torch.cat([vecs, self.node_bias[level].unsqueeze(1)], dim=1)

    def codebooks(self) -> list[torch.Tensor]:
        return [self.node_keys(level) for level in range(len(self.node_vecs))]

    # -- schedules --------------------------------------------------------------------
    def set_training_progress(self, step: int | float, total_steps: int | float) -> None:
        """Drive the temperature and the warm-up (server round / num_rounds in FL)."""
        self._step, self._total = float(step), float(max(total_steps, 1))

    def finish_schedules(self) -> None:
        """Hard temperature and full index-loss weight (serving, fine-tuning)."""
        self._step, self._total = math.inf, 1.0

    def alpha(self) -> float:
        icfg = self.cfg.index
        length = icfg.anneal_steps if icfg.anneal_steps > 0 else self._total
        t = min(1.0, max(0.0, self._step / length))
        return icfg.min_alpha + (icfg.max_alpha - icfg.min_alpha) * t**icfg.alpha_power

    def index_weight(self) -> float:
        icfg = self.cfg.index
        ramp = 1.0 if icfg.warmup_steps == 0 else min(1.0, self._step / icfg.warmup_steps)
        return icfg.index_loss_weight * max(ramp, 0.0)

    # -- soft assignment and losses ---------------------------------------------------
    def soft_assign(
        self, keys: torch.Tensor, alpha: float
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(N, Dq) -> per-level (N, K_l) assignments and the (N, Dq) soft reconstruction."""
        r, recon, assign = keys, torch.zeros_like(keys), []
        for book in self.codebooks():
            dist = torch.sqrt(sq_distances(r, book) + 1e-12)  # (N, K_l); eps: finite grad at 0
            a = torch.softmax(-alpha * dist, dim=1)  # (N, K_l)
            c_bar = a @ book  # (N, Dq)
            assign.append(a)
            recon = recon + c_bar
            r = r - c_bar
        return assign, recon

    def balance_loss(self, keys: torch.Tensor, alpha: float) -> torch.Tensor:
        """Mean over levels of K * sum p^2 - 1 for the share of ``keys`` per path prefix.

        ``keys``: the catalogue's keys, or the client's balance sample of them.
        """
        n = keys.shape[0]
        assign, _ = self.soft_assign(keys, alpha)
        terms: list[torch.Tensor] = []
        joint: torch.Tensor | None = keys.new_ones(n, 1)  # (N, P) soft prefix membership
        for a in assign:
            if joint is not None and n * joint.shape[1] * a.shape[1] <= _JOINT_LIMIT:
                joint = (joint.unsqueeze(2) * a.unsqueeze(1)).flatten(1)  # (N, P * K_l)
                share = joint.mean(0)  # (P,)
            else:
                joint, share = None, a.mean(0)  # (K_l,)
            terms.append(share.numel() * (share * share).sum() - 1.0)
        return torch.stack(terms).mean()

    cohort_vectorisable = True  # rf2.model.cohort re-implements this loss too

    def width_rules(self) -> dict[str, tuple[int, ...]]:
        """The towers' rules; node tables (K_l, D) narrow along D, node biases do not."""
        rules = super().width_rules()
        for level in range(len(self.node_vecs)):
            rules[f"node_vecs.{level}"] = (1,)
            rules[f"node_bias.{level}"] = ()
        return rules

    def candidate_rows(self, targets: np.ndarray, sample: LossSample | None
                       ) -> np.ndarray | None:
        # Without a balance sample the balance term reads every item's key.
        if sample is not None and sample.balance is None and self.index_weight() > 0:
            return None
        return super().candidate_rows(targets, sample)

    def item_keys_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(N,) item ids -> (N, Dq) their keys, without building the catalogue's."""
        items, bias = self.item_rows(ids)
        if self.bias is None:
            return items
        return torch.cat([items, bias.unsqueeze(1)], dim=1)

    def draw_sample(self, generator: torch.Generator) -> LossSample:
        """Negatives (sampled softmax), then the balance term's items: ``balance_sample``
        uniform draws when the catalogue is larger (a fresh seeded sample keeps the cost
        flat in I), else all items."""
        sample = super().draw_sample(generator)
        cap = self.cfg.index.balance_sample
        if self.num_items <= cap:
            return sample
        balance = torch.randint(self.num_items, (cap,), generator=generator)
        return LossSample(negatives=sample.negatives, balance=balance)

    def index_losses(
        self, user_emb: torch.Tensor, target: torch.Tensor, sample: LossSample | None = None
    ) -> dict[str, torch.Tensor]:
        """Unweighted index loss terms: ``level{l}`` (per level), ``rec``, ``bal``."""
        if sample is None:
            sample = self.draw_sample(self._sampler)
        alpha = self.alpha()
        tk = self.item_keys_of(target)  # (B, Dq)
        q = self.query_vectors(user_emb)  # (B, Dq)
        assign, recon = self.soft_assign(tk, alpha)
        out: dict[str, torch.Tensor] = {}
        for level, a in enumerate(assign):
            logp = F.log_softmax(q @ self.node_keys(level).T, dim=1)  # (B, K_l)
            # Detached label: the CE moves nodes and the user tower, never the assignment.
            out[f"level{level}"] = -(a.detach() * logp).sum(1).mean()
        out["rec"] = ((recon - tk) ** 2).sum(1).mean()
        bal_keys = self.item_keys() if sample.balance is None else self.item_keys_of(sample.balance)
        out["bal"] = self.balance_loss(bal_keys, alpha)
        return out

    def loss(
        self, history: torch.Tensor, target: torch.Tensor,
        sample: LossSample | None = None,
    ) -> torch.Tensor:
        """Item softmax + warmed-up index losses (see the module docstring)."""
        if sample is None:
            sample = self.draw_sample(self._sampler)
        user = self.user_embedding(history)  # (B, D)
        total = self.item_loss(user, target, sample)
        w = self.index_weight()
        if w > 0 and target.numel() > 0:
            icfg = self.cfg.index
            parts = self.index_losses(user, target, sample)
            levels = sum(v for k, v in parts.items() if k.startswith("level"))
            index = levels + icfg.reconstruction_weight * parts["rec"]
            total = total + w * (index + icfg.balance_weight * parts["bal"])
        return total

    # -- serving ------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_index(self) -> torch.Tensor:
        """Recompute every item's hard code from the current parameters; (I, L)."""
        self.codes = hard_codes(self.item_keys(), self.codebooks())
        return self.codes

    @torch.no_grad()
    def build_retriever(self, beam: int | None = None) -> BeamSearchRetriever:
        """A beam-search retriever over freshly recomputed codes."""
        codes = self.refresh_index()
        width = self.cfg.index.beam if beam is None else beam
        return BeamSearchRetriever(self.item_keys(), self.codebooks(), codes, width)

    def num_paths(self) -> int:
        return math.prod(self.cfg.index.nodes_per_level)
