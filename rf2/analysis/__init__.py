"""Run folders -> tidy DataFrames (``results``), figures and the ``rf2-figures`` command
(``figures``). Runs on a laptop without the training stack.

May import: rf2.core, rf2.runs and the NumPy-only rf2.eval.fairness and
rf2.eval.distribution (never rf2.fl, rf2.model or torch).
"""
