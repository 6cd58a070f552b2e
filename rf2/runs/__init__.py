"""The run-folder format: ``config.yaml``, append-only ``metrics.jsonl``, atomic
checkpoints (``run_folder``), the writer's lock (``lock``), the console copy
``rf2.log`` (``console``), the end-of-run summary (``summary``), what a recorded config
says ran (``what_ran``) and the optional TensorBoard export of the rows
(``tensorboard_log``). Written by rf2.fl and rf2.cli, read by rf2.analysis.

May import: rf2.core, NumPy and PyYAML (``tensorboard_log``: the optional tensorboard).
"""
