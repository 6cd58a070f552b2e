"""The federated layer: Flower ServerApp round loop (``server``) and its collaborators
(``dispatch``, ``screening``, ``traffic``, ``aggregation``, ``checkpointing``), ClientApp (``client``),
the launcher that starts Ray or the in-process backend (``simulation``, the only Ray
caller), the transport (``round_grid``, ``grid_view``, ``prompt_delivery``,
``user_batch``, ``params``; Flower internals behind ``fast_transport``), seeded client
selection (``selection``), per-tier client settings (``tier_settings``), the typed
per-user task and its wire codec (``user_task``) and the progress line (``progress``).

Importing it checks the installed Flower against the tested range (one warning line).

May import: everything above it (core, data, model, hetero, optim, eval, runs), rf2.strategies, Flower, Ray.
"""

from rf2.core.flower_version import warn_if_untested_flower

warn_if_untested_flower()
