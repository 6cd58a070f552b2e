"""The Flower version rf2 is tested with, read without importing Flower.

rf2 leans on a few Flower internals for speed (``simulation.fast_transport``, see
``rf2.fl.fast_transport``) and on Flower's strategy helpers; each such place names the
installed version when its assumption breaks, through :class:`FlowerCompatError`.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version

TESTED_FLWR = (1, 42)  # major, minor: every 1.42.x
TESTED_TEXT = "flwr 1.42.x"


class FlowerCompatError(RuntimeError):
    """An assumption about Flower's internals no longer holds in the installed version."""

    def __init__(self, what: str, remedy: str = "set simulation.fast_transport=false") -> None:
        super().__init__(f"flwr {flwr_version()}: {what} (rf2 is tested with {TESTED_TEXT}); "
                         f"{remedy}")


@lru_cache(maxsize=1)
def flwr_version() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:
        return "not installed"


def flwr_is_tested() -> bool:
    parts = flwr_version().split(".")
    try:
        return (int(parts[0]), int(parts[1])) == TESTED_FLWR
    except (ValueError, IndexError):
        return False


def warn_if_untested_flower() -> None:
    """Import-time check: one warning line when the installed Flower is outside the range."""
    if not flwr_is_tested():
        warnings.warn(
            f"rf2 is tested with {TESTED_TEXT}, found flwr {flwr_version()}: the fast transport "
            "refuses to start (set simulation.fast_transport=false) and results are unverified",
            stacklevel=2,
        )
