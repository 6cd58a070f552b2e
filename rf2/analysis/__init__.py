"""Run folders -> tidy DataFrames (``results``), figures and the ``rf2-figures`` command
(``figures``). Runs on a laptop without the training stack.

May import: rf2.core, rf2.runs, rf2.eval.fairness (never rf2.fl, rf2.model or torch).
"""
