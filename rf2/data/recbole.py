"""RecBole atomic files: ``DIR/NAME.inter`` (required), ``DIR/NAME.item``, ``DIR/NAME.user``.

The format (RecBole's "atomic files", https://recbole.io/docs/user_guide/data/atomic_files.html):
tab-separated text, one header line of ``name:type`` columns, one row per record. Types:

- ``token``      a categorical value, kept as a string (ids such as ``0`` or ``B00004``)
- ``token_seq``  several tokens separated by single spaces (e.g. genres)
- ``float``      a number (ratings, timestamps)
- ``float_seq``  several numbers separated by single spaces

rf2 reads, with RecBole's default field names:

- ``.inter``: ``user_id:token`` and ``item_id:token`` (required), ``rating:float`` and
  ``timestamp:float`` (optional); other columns are type-checked and ignored.
- ``.item`` (optional): the catalogue. Items listed there but never interacted with are
  still items (as RecBole's id remapping keeps them); ``dataset.genre_field`` names a
  ``token``/``token_seq`` column used as multi-hot item genres.
- ``.user`` (optional): only its header is checked; users come from ``.inter`` (a user
  without a click cannot be a client).

Clicks: without a rating column every interaction is a click; with one, a click is
``rating >= dataset.click_threshold``. Duplicate (user, item) rows are kept, as RecBole
keeps them by default. Users without a click are dropped.

Ids: tokens are remapped to contiguous indices in sorted order -- numerically when every
token of the column is an integer (so ``0..N-1`` stay ``0..N-1``), as strings otherwise.

Split: with a timestamp, RF²'s chronological per-user split (:mod:`rf2.data.split`);
without one, the same fractions over a seeded per-user random order (``split_seed``):
the loader turns a seeded permutation into the ordering key, so one split routine serves
both, and the dataset records which one it used (``FederatedDataset.split``).

Bulk parsing is pandas' C reader (777k rows in well under a second); on failure the file
is re-scanned in Python to name the first bad line.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rf2.core.errors import DataError
from rf2.data.base import Interactions
from rf2.data.compressed import compressed_sibling, refuse_compressed
from rf2.data.movielens import line_of_row, require_dir

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
USER_FIELD, ITEM_FIELD, RATING_FIELD, TIME_FIELD = "user_id", "item_id", "rating", "timestamp"
# Which columns rf2 reads, and the RecBole type each must have.
_INTER_TYPES = {USER_FIELD: "token", ITEM_FIELD: "token", RATING_FIELD: "float", TIME_FIELD: "float"}
_SEP = "\t"  # RecBole's field_separator default
_SEQ_SEP = " "  # RecBole's seq_separator default
_INT_TOKEN = re.compile(r"-?\d{1,18}")


@dataclass(frozen=True)
class AtomicFile:
    """A parsed atomic file: its columns (name -> type) and their raw string values."""

    path: Path
    types: dict[str, str]  # column name -> RecBole type, in file order
    values: pd.DataFrame  # one string column per header column, one row per data line

    @property
    def num_rows(self) -> int:
        return int(self.values.shape[0])


def parse_header(path: Path, line: str) -> dict[str, str]:
    """``name:type`` columns of a header line, checked against RecBole's types."""
    types: dict[str, str] = {}
    for col in line.rstrip("\r\n").split(_SEP):
        name, colon, kind = col.strip().rpartition(":")
        if not colon or not name:
            raise DataError(str(path), f"header column {col!r} is not 'name:type' (RecBole atomic "
                            f"files: tab-separated 'name:type' columns, type one of "
                            f"{', '.join(FIELD_TYPES)})", 1)
        if kind not in FIELD_TYPES:
            raise DataError(str(path), f"column {name!r} has unknown type {kind!r}; allowed: "
                            f"{', '.join(FIELD_TYPES)}", 1)
        if name in types:
            raise DataError(str(path), f"column {name!r} appears twice in the header", 1)
        types[name] = kind
    return types


def read_atomic(path: Path) -> AtomicFile:
    """Read one atomic file: header checked, every row with the header's field count."""
    refuse_compressed(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            header = f.readline()
    except OSError as exc:
        raise DataError(str(path), f"cannot read file: {exc.strerror or exc}") from None
    if not header.strip():
        raise DataError(str(path), "empty file (expected a header of 'name:type' columns)", 1)
    types = parse_header(path, header.lstrip("\ufeff"))
    names = list(types)
    try:
        df = pd.read_csv(
            path, sep=_SEP, header=None, names=names, skiprows=1, dtype=str, engine="c",
            quoting=csv.QUOTE_NONE, na_filter=False, keep_default_na=False,
            encoding="utf-8", encoding_errors="replace",
        )
    except (ValueError, pd.errors.ParserError) as exc:
        _raise_field_count(path, len(names), exc)
    # The C reader pads short rows with empty strings instead of failing; catch that here.
    if len(names) > 1 and df.shape[0]:
        empty_last = (df[names[-1]] == "").to_numpy()
        if empty_last.any():
            short = empty_last & ~_has_tabs(path, len(names) - 1)
            if short.any():
                _raise_field_count(path, len(names), None, int(np.argmax(short)))
    return AtomicFile(path, types, df)


def _has_tabs(path: Path, n: int) -> np.ndarray:
    """(rows,) whether each data line has at least ``n`` tabs (an empty last field is ok)."""
    counts = [line.count(_SEP) for _, line in _lines(path)]
    return np.asarray(counts, dtype=np.int64) >= n


def _lines(path: Path):  # type: ignore[no-untyped-def]
    """(line number, line) of every data line, skipping blank lines as pandas does."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if lineno == 1 or not line.strip(" "):
                continue
            yield lineno, line


def _raise_field_count(path: Path, n: int, exc: Exception | None, row: int | None = None) -> None:
    for i, (lineno, line) in enumerate(_lines(path)):
        found = len(line.split(_SEP))
        if found != n or i == row:
            hint = ""
            if found == 1 and ("," in line or " " in line.strip()):
                hint = " (the separator looks wrong: atomic files are tab-separated)"
            raise DataError(str(path), f"expected {n} tab-separated fields as in the header, "
                            f"found {found}{hint}", lineno)
    raise DataError(str(path), f"could not parse: {exc}")


def _floats(f: AtomicFile, name: str) -> np.ndarray:
    """A ``float`` column as float64; an empty or non-numeric value names its line."""
    raw = f.values[name]
    out = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(out)  # (N,)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(str(f.path), f"field {name} is {raw.iloc[row]!r}, not a finite number",
                        line_of_row(f.path, row, header=True))
    return out


def _tokens(f: AtomicFile, name: str) -> pd.Series:
    raw = f.values[name]
    empty = (raw == "").to_numpy()
    if empty.any():
        row = int(np.argmax(empty))
        raise DataError(str(f.path), f"field {name} is empty (every row needs a {name})",
                        line_of_row(f.path, row, header=True))
    return raw


def encode_tokens(tokens: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) int64, vocabulary (V,) str): contiguous ids in sorted token order.

    Sorted numerically when every token is an integer (ids 0..N-1 stay 0..N-1), as
    text otherwise. Hash-based (``pd.factorize``), then only the V distinct tokens sort.
    """
    codes, uniq = pd.factorize(tokens)  # (N,), (V,) in order of first appearance
    text = pd.Series(np.asarray(uniq, dtype=object), dtype=object)  # (V,)
    order = np.argsort(text.to_numpy(dtype=str), kind="stable")
    if text.str.fullmatch(_INT_TOKEN.pattern).all():
        keys = text.astype(np.int64).to_numpy()
        # "07" and "7" are different tokens but the same number: keep text order then.
        if np.unique(keys).size == keys.size:
            order = np.argsort(keys, kind="stable")
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)  # (V,) sorted position of each first-seen token
    return rank[codes], text.to_numpy(dtype=str)[order]


def token_ids(vocab: np.ndarray) -> np.ndarray:
    """(V,) raw ids of a sorted vocabulary: int64 where :func:`encode_tokens` sorted it
    numerically (every token an integer, no two equal as numbers), else the tokens."""
    text = pd.Series(vocab, dtype=object)
    if vocab.size and text.str.fullmatch(_INT_TOKEN.pattern).all():
        ids = text.astype(np.int64).to_numpy()
        if np.unique(ids).size == ids.size:
            return ids
    return np.asarray(vocab, dtype=str)


def _require_columns(f: AtomicFile, expected: dict[str, str], required: tuple[str, ...]) -> None:
    for name in required:
        if name not in f.types:
            have = ", ".join(f"{n}:{t}" for n, t in f.types.items())
            raise DataError(str(f.path), f"missing column {name}:{expected[name]} (header has "
                            f"{have})", 1)
    for name, kind in expected.items():
        if name in f.types and f.types[name] != kind:
            raise DataError(str(f.path), f"column {name} has type {f.types[name]}, rf2 reads it "
                            f"as {kind} ({name}:{kind})", 1)


def _item_genres(f: AtomicFile, field: str, rows: np.ndarray,
                 num_items: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """(num_items, G) multi-hot from a token/token_seq column of ``.item``."""
    kind = f.types.get(field)
    if kind not in ("token", "token_seq"):
        allowed = [n for n, t in f.types.items() if t in ("token", "token_seq") and n != ITEM_FIELD]
        raise DataError(str(f.path), f"dataset.genre_field={field!r} must name a token or "
                        f"token_seq column of {f.path.name}; candidates: {', '.join(allowed) or 'none'}",
                        1)
    # ``rows``: (R,) item index of each .item row
    lists = [v.split(_SEQ_SEP) if kind == "token_seq" else [v] for v in f.values[field].tolist()]
    names = tuple(sorted({g for gs in lists for g in gs if g}))
    col = {g: j for j, g in enumerate(names)}
    out = np.zeros((num_items, len(names)), dtype=np.float32)  # (I, G)
    r = np.repeat(rows, [len(gs) for gs in lists])
    c = np.fromiter((col[g] if g else -1 for gs in lists for g in gs), dtype=np.int64,
                    count=r.size)
    keep = c >= 0
    out[r[keep], c[keep]] = 1.0
    return out, names


@dataclass(frozen=True)
class RecBoleData:
    """Clicks plus what the run folder records about how they were made."""

    interactions: Interactions
    has_timestamp: bool
    report: dict[str, int | str | bool]


def load_recbole(path: str | None, name_in_dir: str | None, threshold: float, seed: int,
                 genre_field: str | None = None) -> RecBoleData:
    """Read ``DIR/NAME.inter`` (+ optional ``.item``/``.user``) into clicks.

    Without a timestamp column, ``Interactions.timestamp`` is a seeded per-user random
    order (a permutation of each row's position), so the usual split is a random one.
    """
    root = require_dir(path, "recbole", "NAME.inter (RecBole atomic files)")
    name = name_in_dir or root.name
    inter_f = root / f"{name}.inter"
    if not inter_f.is_file():
        others = sorted(p.name for p in root.glob("*.inter"))
        packed = compressed_sibling(inter_f)
        hint = (f"; found {packed.name}: decompress it first" if packed
                else f"; found {', '.join(others)}: set dataset.name_in_dir" if others
                else "; no .inter file there")
        raise DataError(str(inter_f), f"required file {name}.inter is missing from {root}{hint}")
    inter = read_atomic(inter_f)
    _require_columns(inter, _INTER_TYPES, (USER_FIELD, ITEM_FIELD))
    users_raw, items_raw = _tokens(inter, USER_FIELD), _tokens(inter, ITEM_FIELD)  # (N,), (N,)
    rows = inter.num_rows
    if rows == 0:
        raise DataError(str(inter_f), "holds no interactions (only a header)")
    has_rating, has_time = RATING_FIELD in inter.types, TIME_FIELD in inter.types
    click = np.ones(rows, dtype=bool)  # (N,) no rating column: every interaction is a click
    if has_rating:
        click = _floats(inter, RATING_FIELD) >= threshold

    item_file = root / f"{name}.item"
    item_atomic = read_atomic(item_file) if item_file.is_file() else None
    listed = pd.Series([], dtype=object)
    if item_atomic is not None:
        _require_columns(item_atomic, {ITEM_FIELD: "token"}, (ITEM_FIELD,))
        listed = _tokens(item_atomic, ITEM_FIELD)
        dup = listed.duplicated().to_numpy()
        if dup.any():
            row = int(np.argmax(dup))
            raise DataError(str(item_file), f"item_id {listed.iloc[row]!r} listed twice",
                            line_of_row(item_file, row, header=True))
    elif genre_field:
        raise DataError(str(item_file), f"dataset.genre_field={genre_field!r} needs {name}.item")
    user_file = root / f"{name}.user"
    if user_file.is_file():
        refuse_compressed(user_file)
        with open(user_file, encoding="utf-8", errors="replace") as f:
            user_types = parse_header(user_file, f.readline().lstrip("\ufeff"))
        if user_types.get(USER_FIELD) != "token":
            raise DataError(str(user_file), f"header needs {USER_FIELD}:token", 1)

    if not click.any():
        raise DataError(str(inter_f), f"no interaction has rating >= {threshold:g} "
                        "(dataset.click_threshold): nothing left to train on")
    # Catalogue: items of .item plus any interacted with (RecBole remaps them jointly).
    all_items = pd.concat([listed.astype(object), items_raw.astype(object)], ignore_index=True)
    item_codes, item_vocab = encode_tokens(all_items)  # (R + N,), (I,)
    item = item_codes[listed.size:][click]  # (C,)
    user, user_vocab = encode_tokens(users_raw[click])  # (C,), (U,) only users with a click
    if has_time:
        # Dense rank keeps the exact order of float timestamps in int64.
        ts = np.unique(_floats(inter, TIME_FIELD)[click], return_inverse=True)[1]
    else:
        ts = np.random.default_rng(seed).permutation(user.size)  # (C,) random per-user order
    genres, genre_names = None, ()
    if genre_field and item_atomic is not None:
        genres, genre_names = _item_genres(item_atomic, genre_field, item_codes[:listed.size],
                                           item_vocab.size)
    interactions = Interactions(
        user=user, item=item, timestamp=np.asarray(ts, dtype=np.int64).reshape(-1),
        num_users=int(user_vocab.size), num_items=int(item_vocab.size),
        item_genres=genres, genre_names=genre_names, user_ids=token_ids(user_vocab),
    )
    all_users = int(users_raw.nunique())
    report: dict[str, int | str | bool] = {
        "format": "recbole", "name_in_dir": name, "rows": int(rows),
        "has_rating": has_rating, "has_timestamp": has_time, "clicks": int(click.sum()),
        "users": interactions.num_users,
        "users_without_click_dropped": all_users - interactions.num_users,
        "items": interactions.num_items,
        "items_without_click": int(interactions.num_items - np.unique(item).size),
    }
    return RecBoleData(interactions, has_time, report)
