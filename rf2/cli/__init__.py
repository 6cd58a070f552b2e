"""The ``rf2`` command: Hydra entry point (``main``), pre-checks and resume handling
(``support``), and one run end to end (``runner``).

May import: everything.
"""
