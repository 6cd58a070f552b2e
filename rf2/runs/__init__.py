"""The run-folder format: ``config.yaml``, append-only ``metrics.jsonl``, atomic
checkpoints, and the optional TensorBoard export of its rows (``tensorboard_log``).
Written by rf2.fl, read by rf2.analysis.

May import: rf2.core and the standard library.
"""
