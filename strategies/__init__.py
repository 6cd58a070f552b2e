"""Server strategies, built on ``flwr.serverapp.strategy`` (thin subclasses, one hook each).

``build_strategy`` is the ``_target_`` of every ``conf/strategy/*.yaml``.
"""

from rf2.strategies.build import build_strategy

__all__ = ["build_strategy"]
