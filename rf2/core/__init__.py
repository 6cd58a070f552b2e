"""The bottom layer: the typed run-config schema and its validation (``config``), the
dataclass <-> mapping conversion with one-line errors (``typed``) rf2's error types
(``errors``) and the Flower version rf2 is tested with (``flower_version``, read from
the package metadata: Flower itself is never imported here).

May import: the standard library and numpy only.
"""
