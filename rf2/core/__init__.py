"""The bottom layer: the typed run-config schema and its validation (``config``), the
dataclass <-> mapping conversion with one-line errors (``typed``) and rf2's error types
(``errors``).

May import: the standard library and numpy only.
"""
