"""Server strategies, built on ``flwr.serverapp.strategy`` (thin subclasses, one hook each).

The run's strategy comes from ``strategy._target_`` (``instantiate_strategy``):
``build_strategy`` is the ``_target_`` of every shipped ``conf/strategy/*.yaml``; a
user's own Strategy class can be named there instead (README: "Write your own strategy").
"""

from rf2.core.flower_version import warn_if_untested_flower

warn_if_untested_flower()

from rf2.strategies.build import build_strategy  # noqa: E402 - after the version check
from rf2.strategies.instantiate import instantiate_strategy  # noqa: E402

__all__ = ["build_strategy", "instantiate_strategy"]
