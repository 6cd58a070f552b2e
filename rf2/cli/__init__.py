"""The ``rf2`` command: the Hydra entry point and the sweep's end (``main``), checks of
every job before Hydra writes anything (``precheck``; one-line override errors in
``support``), one federated run end to end (``runner``) or a central one (``central``),
what a resume may change (``resume``), the config reference generated from the schema
(``config_docs``) and sweeps as Ray tasks on a cluster (``ray_sweep``).

May import: everything.
"""
