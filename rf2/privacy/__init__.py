"""Client-level differential privacy (DP-FedAvg): clipping each client's update, the
Gaussian noise on the aggregate, adaptive clipping (Andrew et al. 2021) as NumPy array
maths (``clipping``), and (epsilon, delta) accounting with Google's ``dp-accounting``
(``accounting``). Wired into the server's aggregation by ``rf2.fl.private_aggregation``;
see docs/privacy.md.

May import: rf2.core, rf2.optim (numpy and dp_accounting; no torch, no Flower).
"""
