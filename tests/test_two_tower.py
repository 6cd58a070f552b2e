"""Two-tower model and client examples: shapes, PAD, aggregatable state, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rf2.core.config import ModelConfig
from rf2.data.base import FederatedDataset
from rf2.model import PAD, TwoTower, build_model, eval_histories, user_examples

# One thread: with the default two and a busy core, these tiny loops ran ~40x slower.
torch.set_num_threads(1)

NUM_ITEMS, NUM_USERS, HIST = 12, 5, 3


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """torch.testing.assert_close costs ~1.5 s of imports on first use."""
    assert a.shape == b.shape and torch.allclose(a, b, atol=1e-6), (a, b)


def _dataset(history_len: int = HIST, genres: bool = True) -> FederatedDataset:
    """5 users over 12 items; user 3 has one train click, user 4 none."""
    train = [[5, 3, 7, 2, 9], [1, 2], [0, 11, 4], [6], []]
    test = [[8], [3], [], [7], [1]]
    g = np.zeros((NUM_ITEMS, 4), dtype=np.float32)
    g[np.arange(NUM_ITEMS), np.arange(NUM_ITEMS) % 4] = 1.0
    g[0] = 0.0  # an item without genres
    g[1, :2] = 1.0  # an item with two genres
    return FederatedDataset(
        name="toy", num_users=NUM_USERS, num_items=NUM_ITEMS,
        train_indptr=np.cumsum([0] + [len(t) for t in train]),
        train_items=np.array([i for t in train for i in t], dtype=np.int64),
        test_indptr=np.cumsum([0] + [len(t) for t in test]),
        test_items=np.array([i for t in test for i in t], dtype=np.int64),
        history_len=history_len, item_genres=g if genres else None,
    )


def _toy_task(n_items: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic next item: history (i-1, i) predicts i+1 (mod n)."""
    i = torch.arange(n_items)
    hist = torch.stack([(i - 1) % n_items, i], dim=1)  # (n, 2)
    return hist, (i + 1) % n_items


def test_user_examples_exact() -> None:
    ds = _dataset()
    hist, tgt = user_examples(ds, 0)
    np.testing.assert_array_equal(
        hist, [[-1, -1, -1], [-1, -1, 5], [-1, 5, 3], [5, 3, 7], [3, 7, 2]])
    np.testing.assert_array_equal(tgt, [5, 3, 7, 2, 9])
    hist, tgt = user_examples(ds, 3)  # a single click: the cold-start example only
    np.testing.assert_array_equal(hist, [[-1, -1, -1]])
    np.testing.assert_array_equal(tgt, [6])
    hist, tgt = user_examples(ds, 4)
    assert hist.shape == (0, HIST) and tgt.shape == (0,)
    assert hist.dtype == np.int64 and tgt.dtype == np.int64
    hist, _ = user_examples(ds, 0)
    hist[0, 0] = 99  # a writable copy, not a view into the dataset
    assert ds.train_items.max() < NUM_ITEMS


def test_eval_histories_last_train_clicks() -> None:
    ds = _dataset()
    out = eval_histories(ds, np.array([0, 1, 3, 4]))
    np.testing.assert_array_equal(out, [[7, 2, 9], [-1, 1, 2], [-1, -1, 6], [-1, -1, -1]])
    for row, u in enumerate([0, 1, 3]):  # agrees with the dataset's own definition
        h = ds.train_of(u)[-HIST:]
        np.testing.assert_array_equal(out[row, HIST - len(h):], h)


def test_shapes_and_score_formula() -> None:
    ds = _dataset()
    model = build_model(ModelConfig(name="two_tower", dim=8), ds, seed=0)
    with torch.no_grad():
        model.bias.normal_()
    hist = torch.as_tensor(eval_histories(ds, np.arange(NUM_USERS)))  # (5, 3)
    u = model.user_embedding(hist)
    assert u.shape == (NUM_USERS, 8)
    assert model.item_embeddings().shape == (NUM_ITEMS, 8)
    assert model.item_bias_vector().shape == (NUM_ITEMS,)
    s = model.score_all(u)
    assert s.shape == (NUM_USERS, NUM_ITEMS)
    expected = u @ model.item_embeddings().T + model.bias
    _close(s, expected)
    loss = model.loss(hist, torch.arange(NUM_USERS))
    assert loss.shape == () and torch.isfinite(loss)
    no_bias = build_model(ModelConfig(name="two_tower", dim=8, item_bias=False), ds, seed=0)
    assert torch.equal(no_bias.item_bias_vector(), torch.zeros(NUM_ITEMS))


def test_pad_does_not_change_mean() -> None:
    model = build_model(ModelConfig(name="two_tower", dim=8), _dataset(history_len=5), seed=1)
    short = model.user_embedding(torch.tensor([[4, 7]]))
    padded = model.user_embedding(torch.tensor([[PAD, PAD, PAD, 4, 7]]))
    _close(padded, short)
    manual = model.history_table[[4, 7]].mean(dim=0, keepdim=True)
    _close(padded, manual)
    empty = model.user_embedding(torch.full((2, 5), PAD))
    assert torch.equal(empty, torch.zeros(2, 8))


def test_genres_are_a_mean_and_not_state() -> None:
    ds = _dataset()
    model = build_model(ModelConfig(name="two_tower", dim=8), ds, seed=0)
    keys = set(model.state_dict())
    assert keys == {"history_table", "item_table", "genre_table", "bias"}
    assert "item_genres" in dict(model.named_buffers())  # present, but not aggregated
    # No per-user parameter: nothing is sized by the number of users.
    assert all(NUM_USERS not in p.shape for p in model.parameters())
    v, e, g = model.item_embeddings(), model.item_table, model.genre_table
    _close(v[0], e[0])  # no genres -> item embedding alone
    _close(v[1], e[1] + (g[0] + g[1]) / 2)  # two genres -> their mean
    _close(v[6], e[6] + g[2])
    # Genres off, or absent from the data: no genre table at all.
    plain = ModelConfig(name="two_tower")
    assert "genre_table" not in build_model(
        ModelConfig(name="two_tower", use_genres=False), ds, 0).state_dict()
    assert "genre_table" not in build_model(plain, _dataset(genres=False), 0).state_dict()
    # A fresh model loads the state strictly (what a client does with the global weights).
    fresh = build_model(ModelConfig(name="two_tower", dim=8), ds, seed=5)
    fresh.load_state_dict(model.state_dict(), strict=True)
    _close(fresh.item_embeddings(), model.item_embeddings())


def test_init_is_deterministic_per_seed() -> None:
    ds = _dataset()
    rng_before = torch.random.get_rng_state()
    a, b = (build_model(ModelConfig(name="two_tower", dim=8), ds, seed=7) for _ in range(2))
    c = build_model(ModelConfig(name="two_tower", dim=8), ds, seed=8)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.item_table, c.item_table)
    assert a.item_table.std().item() == pytest.approx(0.1, rel=0.2)  # cfg.init_scale
    assert torch.equal(a.bias, torch.zeros(NUM_ITEMS))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_sgd_learns_toy_task(loss: str) -> None:
    n = 20
    hist, tgt = _toy_task(n)
    cfg = ModelConfig(name="two_tower", dim=16, loss=loss, num_negatives=8, use_genres=False)
    model = TwoTower(n, cfg, history_len=2, seed=0)
    first = model.loss(hist, tgt).item()
    for _ in range(150):  # plain SGD, lr 1.0 (torch.optim would import dynamo: ~2 s)
        model.zero_grad()
        model.loss(hist, tgt).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1.0 * p.grad
    cfg.loss = "full"  # judge both on the exact loss
    with torch.no_grad():
        last = model.loss(hist, tgt).item()
        top1 = model.score_all(model.user_embedding(hist)).argmax(dim=1)
    assert first == pytest.approx(np.log(n), abs=0.1)  # uniform scores at init
    assert last < 0.3 * first
    assert (top1 == tgt).float().mean().item() == 1.0


def test_sampled_softmax_estimates_full_loss() -> None:
    """logQ correction: with many uniform negatives the sampled loss ~ the full loss."""
    n = 50
    hist, tgt = _toy_task(n)
    full = TwoTower(n, ModelConfig(name="two_tower", dim=8, init_scale=1.0), history_len=2, seed=3)
    cfg = ModelConfig(name="two_tower", dim=8, init_scale=1.0, loss="sampled", num_negatives=50_000)
    sampled = TwoTower(n, cfg, history_len=2, seed=3)
    exact = full.loss(hist, tgt).item()
    assert exact > 1.0  # random init: far from the trivial regime
    assert sampled.loss(hist, tgt).item() == pytest.approx(exact, abs=0.03)
    few = ModelConfig(name="two_tower", dim=8, init_scale=1.0, loss="sampled", num_negatives=5)
    m = TwoTower(n, few, history_len=2, seed=3)
    m.seed_sampler(11)
    x = m.loss(hist, tgt)
    m.seed_sampler(11)
    assert torch.equal(m.loss(hist, tgt), x)  # negatives reproducible from the seed


def test_num_training_examples_matches_user_examples() -> None:
    from rf2.core.config import DatasetConfig
    from rf2.data import load_dataset
    from rf2.model.examples import num_training_examples

    ds = load_dataset(DatasetConfig(num_users=60, num_items=40, num_groups=4), seed=3)
    counts = num_training_examples(ds)
    assert [len(user_examples(ds, u)[1]) for u in range(ds.num_users)] == counts.tolist()
