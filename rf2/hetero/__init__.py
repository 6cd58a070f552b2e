"""System heterogeneity: device-tier profiles (``devices``), which user gets which tier
(``population``), the FedScale-style simulated clock with availability, deadlines and
dropout (``clock``), and fault screening/injection (``faults``).

May import: rf2.core, rf2.data (never Flower, Ray or torch).
"""
