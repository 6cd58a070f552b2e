"""Global models (no per-user parameters) and the examples a client trains them on."""

from rf2.model.examples import PAD, eval_histories, user_examples
from rf2.model.two_tower import TwoTower, build_model

__all__ = ["PAD", "TwoTower", "build_model", "eval_histories", "user_examples"]
