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

Text: strict UTF-8. A byte sequence that is not UTF-8 is an error naming file, line and
column (before, it was replaced by U+FFFD, and two distinct tokens such as ``caf\xe9``
and ``caf\xe8`` merged into one). Tokens are compared exactly as written.

Bulk parsing is pyarrow's multi-threaded CSV reader and hash encoding (a 25M-row
``.inter`` in seconds; no Python object per row); when it refuses a file, pandas' C
reader (the loader's reference semantics) re-reads it and the file is re-scanned in
Python to name the first bad line.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from rf2.core.errors import DataError
from rf2.data.base import Interactions
from rf2.data.compressed import compressed_sibling, refuse_compressed
from rf2.data.movielens import line_of_row, require_dir
from rf2.data.sorting import first_of_each

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
USER_FIELD, ITEM_FIELD, RATING_FIELD, TIME_FIELD = "user_id", "item_id", "rating", "timestamp"
# Which columns rf2 reads, and the RecBole type each must have.
_INTER_TYPES = {USER_FIELD: "token", ITEM_FIELD: "token", RATING_FIELD: "float", TIME_FIELD: "float"}
_SEP = "\t"  # RecBole's field_separator default
_SEQ_SEP = " "  # RecBole's seq_separator default
_INT_TOKEN = re.compile(r"-?\d{1,18}")
_BLOCK = 16 << 20  # bytes per block read (pyarrow's parse unit; the UTF-8 scan's too)


@dataclass(frozen=True)
class AtomicFile:
    """A parsed atomic file: its columns (name -> type) and their raw string values."""

    path: Path
    types: dict[str, str]  # column name -> RecBole type, in file order
    values: pa.Table  # one string column per header column, one row per data line

    @property
    def num_rows(self) -> int:
        return int(self.values.num_rows)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.values.column(name)


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


def read_header(path: Path) -> dict[str, str]:
    """The checked header of an atomic file (strict UTF-8, a leading BOM allowed)."""
    refuse_compressed(path)
    try:
        with open(path, "rb") as f:  # up to the first line end (\n, \r\n or \r)
            head = b""
            while not re.search(rb"[\r\n]", head) and (block := f.read(1 << 16)):
                head += block
        head = re.split(rb"\r\n|\r|\n", head, maxsplit=1)[0]
    except OSError as exc:
        raise DataError(str(path), f"cannot read file: {exc.strerror or exc}") from None
    try:
        header = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), _utf8_problem(head, exc.start, exc.end), 1) from None
    if not header.strip():
        raise DataError(str(path), "empty file (expected a header of 'name:type' columns)", 1)
    return parse_header(path, header.lstrip("\ufeff"))


def read_atomic(path: Path) -> AtomicFile:
    """Read one atomic file: header checked, every row with the header's field count.

    pyarrow's multi-threaded CSV reader parses the rows (a 25M-row ``.inter`` in
    seconds) as strict UTF-8 strings; when it refuses a file, the invalid byte is named
    by file:line, or the reference reader (pandas' C parser, the loader's original
    semantics) re-reads it and names the bad line.
    """
    types = read_header(path)
    names = list(types)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1, block_size=_BLOCK),
            parse_options=pacsv.ParseOptions(delimiter=_SEP, quote_char=False,
                                             double_quote=False, escape_char=False,
                                             newlines_in_values=False, ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                 strings_can_be_null=False, check_utf8=True),
        )
    except pa.ArrowInvalid as exc:
        _raise_invalid_utf8(path)
        table = _read_reference(path, names, exc)
    return AtomicFile(path, types, table)


def _utf8_problem(line: bytes, start: int, end: int) -> str:
    return (f"invalid UTF-8 (bytes {line[start:end].hex(' ')} at column {start + 1}): RecBole "
            "atomic files are UTF-8 text; re-encode the file (e.g. iconv -f latin1 -t utf-8)")


def _raise_invalid_utf8(path: Path) -> None:
    """Raise a DataError at the first line that is not valid UTF-8; return if none is."""
    lineno, rest = 1, b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)  # whole lines only
            whole, rest = data[:cut], data[cut:]
            try:
                whole.decode("utf-8")
            except UnicodeDecodeError as exc:
                first = whole.rfind(b"\n", 0, exc.start) + 1
                line = whole[first:].split(b"\n", 1)[0]
                raise DataError(str(path), _utf8_problem(line, exc.start - first, exc.end - first),
                                lineno + whole.count(b"\n", 0, exc.start)) from None
            lineno += whole.count(b"\n")
            if not block:
                return


def _read_reference(path: Path, names: list[str], exc: Exception) -> pa.Table:
    """pandas' C reader with the loader's original checks: the exact errors (or table)."""
    try:
        df = pd.read_csv(
            path, sep=_SEP, header=None, names=names, skiprows=1, dtype=str, engine="c",
            quoting=csv.QUOTE_NONE, na_filter=False, keep_default_na=False, encoding="utf-8",
        )
    except (ValueError, pd.errors.ParserError) as pd_exc:
        _raise_field_count(path, len(names), pd_exc)
    # The C reader pads short rows with empty strings instead of failing; catch that here.
    if len(names) > 1 and df.shape[0]:
        empty_last = (df[names[-1]] == "").to_numpy()
        if empty_last.any():
            short = empty_last & ~_has_tabs(path, len(names) - 1)
            if short.any():
                _raise_field_count(path, len(names), None, int(np.argmax(short)))
    return pa.table({n: pa.array(df[n].to_numpy(dtype=object), type=pa.string()) for n in names})


def _has_tabs(path: Path, n: int) -> np.ndarray:
    """(rows,) whether each data line has at least ``n`` tabs (an empty last field is ok)."""
    counts = [line.count(_SEP) for _, line in _lines(path)]
    return np.asarray(counts, dtype=np.int64) >= n


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of every data line, skipping blank lines as pandas does."""
    with open(path, encoding="utf-8") as f:  # valid UTF-8: checked before this runs
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
    """A ``float`` column as float64; an empty or non-numeric value names its line.

    Arrow's parser first; it accepts a subset of what pandas' ``to_numeric`` does (no
    surrounding spaces, no empty fields), so on refusal pandas decides, as before.
    """
    raw = f.column(name)
    try:
        out = pc.cast(raw, pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = pd.to_numeric(raw.to_pandas(), errors="coerce").to_numpy(dtype=np.float64,
                                                                     na_value=np.nan)
    bad = ~np.isfinite(out)  # (N,)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(str(f.path), f"field {name} is {raw[row].as_py()!r}, not a finite number",
                        line_of_row(f.path, row, header=True))
    return out


def _tokens(f: AtomicFile, name: str) -> pa.ChunkedArray:
    raw = f.column(name)
    empty = pc.equal(pc.utf8_length(raw), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        row = int(np.argmax(empty))
        raise DataError(str(f.path), f"field {name} is empty (every row needs a {name})",
                        line_of_row(f.path, row, header=True))
    return raw


@dataclass(frozen=True)
class Codes:
    """A token column factorized: ``codes`` (N,) int64 index ``uniq`` (V,) distinct tokens.

    ``ints`` (V,) int64 is set when every token is a canonical integer of at most 18
    digits (``7``, not ``07``, ``+7`` or `` 7``): ``uniq`` is then in ascending numeric
    order, which is the order :func:`sorted_codes` would give anyway.
    """

    codes: np.ndarray
    uniq: np.ndarray  # (V,) object array of str
    ints: np.ndarray | None = None

    def subset(self, rows: np.ndarray) -> Codes:
        """The same factorization restricted to ``rows`` (only tokens that occur there)."""
        sub = self.codes[rows]
        present = np.bincount(sub, minlength=self.uniq.size) > 0  # (V,)
        local = np.cumsum(present) - 1  # (V,) index among the present tokens
        ints = None if self.ints is None else self.ints[present]
        return Codes(local[sub], self.uniq[present], ints)


def _canonical_ints(tokens: pa.ChunkedArray) -> np.ndarray | None:
    """(N,) int64 when every token is a canonical integer of <= 18 digits, else None."""
    try:
        ints = pc.cast(tokens, pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if len(tokens) and not pc.all(pc.equal(pc.cast(ints, pa.string()), tokens)).as_py():
        return None  # "07", "+7": same number, different token
    out = ints.to_numpy()
    if out.size and np.abs(out).max() >= 10**18:
        return None  # the text rule only reads up to 18 digits as a number
    return out


def _dense_rank(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ascending (V,), rank of each value (N,)) for int64 values."""
    if values.size == 0:
        return values, np.zeros(0, dtype=np.int64)
    lo, span = int(values.min()), int(values.max()) - int(values.min()) + 1
    if span <= 4 * values.size + 1024:  # dense ids (0..U-1 and the like): O(N), no sort
        present = np.zeros(span, dtype=bool)
        present[values - lo] = True
        rank = np.cumsum(present) - 1
        return np.flatnonzero(present) + lo, rank[values - lo]
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, inverse.reshape(-1).astype(np.int64)


def factorize(tokens: pa.ChunkedArray) -> Codes:
    """Distinct tokens and each row's code; tokens compared exactly, never merged.

    Canonical integer tokens (most id columns) are parsed by Arrow and ranked in O(N).
    Other tokens go through Arrow's hash encoding per chunk, the chunks' dictionaries
    unified (first-appearance order, what ``pd.factorize`` gives) -- no Python object
    per row either way.
    """
    ints = _canonical_ints(tokens)
    if ints is not None:
        uniq_ints, codes = _dense_rank(ints)
        return Codes(codes, uniq_ints.astype(str).astype(object), uniq_ints)
    parts, dicts, offset = [], [], 0
    for chunk in tokens.chunks:
        enc = chunk.dictionary_encode()
        parts.append(enc.indices.to_numpy(zero_copy_only=False).astype(np.int64) + offset)
        dicts.append(enc.dictionary)
        offset += len(enc.dictionary)
    if not dicts:
        return Codes(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object))
    every = pa.concat_arrays(dicts)  # (sum of per-chunk distinct,)
    uniq = pc.unique(every)  # first appearance order across chunks
    remap = pc.index_in(every, value_set=uniq).to_numpy(zero_copy_only=False).astype(np.int64)
    return Codes(remap[np.concatenate(parts)], np.asarray(uniq.to_pylist(), dtype=object))


def sorted_codes(c: Codes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (N,), vocabulary (V,) str, raw ids (V,)) in sorted token order.

    Sorted numerically when every token is an integer (ids 0..N-1 stay 0..N-1), as
    text (code point order) otherwise; only the V distinct tokens sort. Raw ids are
    int64 in the numeric case, the tokens otherwise (they name users in tiers.csv).
    """
    if c.ints is not None:
        return c.codes, c.uniq.astype(str), c.ints
    text = pd.Series(np.asarray(c.uniq, dtype=object), dtype=object)  # (V,)
    order = np.argsort(text.to_numpy(dtype=str), kind="stable")
    keys = None
    if text.size and text.str.fullmatch(_INT_TOKEN.pattern).all():
        keys = text.astype(np.int64).to_numpy()
        # "07" and "7" are different tokens but the same number: keep text order then.
        if np.unique(keys).size == keys.size:
            order = np.argsort(keys, kind="stable")
        else:
            keys = None
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)  # (V,) sorted position of each first-seen token
    vocab = text.to_numpy(dtype=str)[order]
    return rank[c.codes], vocab, (vocab if keys is None else keys[order])


def encode_tokens(tokens: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N,) int64, vocabulary (V,) str): contiguous ids in sorted token order."""
    codes, uniq = pd.factorize(tokens)  # (N,), (V,) in order of first appearance
    return sorted_codes(Codes(np.asarray(codes, dtype=np.int64),
                              np.asarray(uniq, dtype=object)))[:2]


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
    lists = [v.split(_SEQ_SEP) if kind == "token_seq" else [v]
             for v in f.column(field).to_pylist()]
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
    listed = pa.chunked_array([], type=pa.string())
    if item_atomic is not None:
        _require_columns(item_atomic, {ITEM_FIELD: "token"}, (ITEM_FIELD,))
        listed = _tokens(item_atomic, ITEM_FIELD)
        dup = ~first_of_each(factorize(listed).codes)
        if dup.any():
            row = int(np.argmax(dup))
            raise DataError(str(item_file), f"item_id {listed[row].as_py()!r} listed twice",
                            line_of_row(item_file, row, header=True))
    elif genre_field:
        raise DataError(str(item_file), f"dataset.genre_field={genre_field!r} needs {name}.item")
    user_file = root / f"{name}.user"
    if user_file.is_file():
        if read_header(user_file).get(USER_FIELD) != "token":
            raise DataError(str(user_file), f"header needs {USER_FIELD}:token", 1)

    if not click.any():
        raise DataError(str(inter_f), f"no interaction has rating >= {threshold:g} "
                        "(dataset.click_threshold): nothing left to train on")
    # Catalogue: items of .item plus any interacted with (RecBole remaps them jointly).
    n_listed = len(listed)
    item_codes, item_vocab, _ = sorted_codes(factorize(
        pa.chunked_array(listed.chunks + items_raw.chunks, type=pa.string())))  # (R + N,), (I,)
    item = item_codes[n_listed:][click]  # (C,)
    users_all = factorize(users_raw)  # every user of the file
    user, user_vocab, user_ids = sorted_codes(users_all.subset(click))  # only clickers
    if has_time:
        times = _floats(inter, TIME_FIELD)[click]  # (C,)
        if np.all(times == np.round(times)) and np.abs(times).max() < 2.0**53:
            ts = times.astype(np.int64)  # whole seconds (the usual case): exact as int64
        else:  # dense rank keeps the exact order of fractional timestamps in int64
            ts = np.unique(times, return_inverse=True)[1]
    else:
        ts = np.random.default_rng(seed).permutation(user.size)  # (C,) random per-user order
    genres: np.ndarray | None = None
    genre_names: tuple[str, ...] = ()
    if genre_field and item_atomic is not None:
        genres, genre_names = _item_genres(item_atomic, genre_field, item_codes[:n_listed],
                                           item_vocab.size)
    interactions = Interactions(
        user=user, item=item, timestamp=np.asarray(ts, dtype=np.int64).reshape(-1),
        num_users=int(user_vocab.size), num_items=int(item_vocab.size),
        item_genres=genres, genre_names=genre_names, user_ids=user_ids,
    )
    all_users = int(users_all.uniq.size)
    report: dict[str, int | str | bool] = {
        "format": "recbole", "name_in_dir": name, "rows": int(rows),
        "has_rating": has_rating, "has_timestamp": has_time, "clicks": int(click.sum()),
        "users": interactions.num_users,
        "users_without_click_dropped": all_users - interactions.num_users,
        "items": interactions.num_items,
        "items_without_click": int(interactions.num_items - np.unique(item).size),
    }
    return RecBoleData(interactions, has_time, report)
