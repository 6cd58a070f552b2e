"""Evaluation: per-user ranking metrics in torch (``ranking``), group/fairness summaries
and RF²'s D_t/MDAC in NumPy (``fairness``, no torch: the analysis layer shares it), the
per-user distributions (``distribution``: std, tails, Gini, no-hit share, CDF; NumPy only), and
RF²'s CTR metrics over labelled test ratings (``ctr``), and the server-side evaluation
of a model over the test users, per tier and per activity group (``evaluation``).

May import: rf2.core, rf2.data, rf2.model (``fairness`` itself: numpy only).
"""
