"""RF²'s tier-aware optimizations as plain array maths: unbiased update compression
(``compression``), HeteroFL sub-model slicing and aggregation (``heterofl``) and per-row
embedding averaging (``row_averaging``).

May import: rf2.core and numpy (never Flower, Ray or torch).
"""
