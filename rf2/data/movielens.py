"""MovieLens 100K / 1M / 20M loaders, in GroupLens's original file formats.

Ratings become implicit clicks (``rating >= click_threshold``; RF² uses 5 stars). Items
keep their full catalogue index -- every movie of the movie file (or, without one, every
movie rated at all), sorted by MovieLens id -- so ``item_genres`` rows align with item
ids even for movies nobody clicked. Every rating is kept as a labelled sample
(``Interactions.ratings``); users without clicks are dropped by the default
``dataset.protocol=clicks`` (rf2.data.protocol).

Bulk parsing goes through pandas' C reader (MovieLens-20M has 20M lines); it only says
*that* a file is bad, so on failure the file is re-scanned in Python to name the first
bad line and what is wrong with it. Nothing is ever downloaded.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from rf2.core.errors import DataError
from rf2.data.base import Interactions, Ratings
from rf2.data.compressed import compressed_sibling, refuse_compressed
from rf2.data.split import compact_users

Columns = tuple[tuple[str, type], ...]
# 32-bit ids/ratings halve the memory of MovieLens-20M's 20M rows (ids fit easily).
RATING_COLUMNS: Columns = (
    ("user", np.int32), ("item", np.int32), ("rating", np.float32), ("timestamp", np.int64)
)
_SEPARATORS = ("\t", "::", ",", ";", "|", " ")
_NO_GENRES = "(no genres listed)"


def require_dir(path: str | None, dataset: str, expected: str) -> Path:
    """The dataset directory, or a DataError saying what should be there."""
    if not path:
        raise DataError("<dataset.path>",
                        f"{dataset} needs dataset.path: a directory with {expected}")
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(str(root), f"directory does not exist (expected {expected} for {dataset})")
    if not root.is_dir():
        raise DataError(str(root), f"is not a directory (expected a folder with {expected})")
    return root


def require_file(root: Path, name: str, dataset: str) -> Path:
    """``root/name``, or a DataError naming the missing file."""
    f = root / name
    if not f.is_file():
        packed = compressed_sibling(f)
        hint = f"; found {packed.name}: decompress it first" if packed else ""
        raise DataError(str(f), f"required file {name} is missing from {root} ({dataset}){hint}")
    refuse_compressed(f)
    return f


def _field_problem(line: str, sep: str, columns: Columns) -> str | None:
    """What is wrong with one data line, or None."""
    parts = line.split(sep)
    if len(parts) != len(columns):
        for other in _SEPARATORS:
            if other != sep and other in line and len(line.split(other)) == len(columns):
                return (f"the separator looks wrong: fields seem separated by {other!r}, "
                        f"but this file must use {sep!r}")
        return f"expected {len(columns)} fields separated by {sep!r}, found {len(parts)}"
    for (name, kind), value in zip(columns, parts, strict=True):
        integer = np.issubdtype(kind, np.integer)
        try:
            number = float(value)
            ok = bool(np.isfinite(number)) and (not integer or number.is_integer())
        except ValueError:
            ok = False
        if not ok:
            return f"field {name} is {value!r}, not {'an integer' if integer else 'a number'}"
        if integer and not np.iinfo(kind).min <= number <= np.iinfo(kind).max:
            return f"field {name} is {value!r}, too large for {np.dtype(kind).name}"
    return None


def _plain_line(sep: str, columns: Columns) -> re.Pattern[str]:
    """Regex of an obviously valid line (short ints, plain decimals); the rest is checked."""
    def field(kind: type) -> str:
        if np.issubdtype(kind, np.integer):
            digits = len(str(np.iinfo(kind).max)) - 1  # always in range
            return rf" *[-+]?\d{{1,{digits}}} *"
        return r" *[-+]?(?:\d+\.?\d*|\.\d+) *"
    return re.compile(re.escape(sep).join(field(kind) for _, kind in columns))


def _data_lines(path: Path, header: bool) -> Iterator[tuple[int, str]]:
    """(line number, line) of every data line, skipping what pandas skips (blank lines)."""
    with open(path, encoding="latin-1") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if (header and lineno == 1) or not line.strip(" "):
                continue
            yield lineno, line


def line_of_row(path: Path, row: int, header: bool = False) -> int:
    """1-based line number of data row ``row`` (0-based, blank lines skipped)."""
    for i, (lineno, _) in enumerate(_data_lines(path, header)):
        if i == row:
            return lineno
    return -1


def read_table(path: Path, sep: str, columns: Columns = RATING_COLUMNS,
               header: bool = False) -> dict[str, np.ndarray]:
    """Parse a delimited numeric file fast; on failure name the first bad line."""
    try:
        source: Path | io.BytesIO = path
        pd_sep = sep
        if sep == "::":  # the C reader takes single-char separators only
            raw = path.read_bytes()
            if b"\t" in raw:
                raise ValueError("tab in a '::'-separated file")
            source, pd_sep = io.BytesIO(raw.replace(b"::", b"\t")), "\t"
        df = pd.read_csv(
            source, sep=pd_sep, header=None, names=[c for c, _ in columns],
            dtype=dict(columns), skiprows=1 if header else 0, engine="c",
            quoting=csv.QUOTE_NONE, na_filter=False, encoding="latin-1",
        )
    except OSError as exc:
        raise DataError(str(path), f"cannot read file: {exc.strerror or exc}") from None
    except (ValueError, OverflowError) as exc:  # pandas' ParserError is a ValueError
        plain = _plain_line(sep, columns)
        for lineno, line in _data_lines(path, header):
            if plain.fullmatch(line):  # cheap pre-check: 20M lines in seconds, not minutes
                continue
            problem = _field_problem(line, sep, columns)
            if problem:
                raise DataError(str(path), problem, lineno) from None
        raise DataError(str(path), f"could not parse: {exc}") from None
    return {c: df[c].to_numpy() for c, _ in columns}


def _fail_at(path: Path, bad: np.ndarray, values: np.ndarray, problem: str,
             header: bool) -> None:
    """Raise a DataError at the first row where ``bad`` holds; ``{v}`` = its value."""
    if bad.any():
        row = int(np.argmax(bad))
        value = values[row].item()
        msg = problem.format(v=f"{value:g}" if isinstance(value, float) else value)
        raise DataError(str(path), msg, line_of_row(path, row, header))


def to_interactions(path: Path, t: dict[str, np.ndarray], catalogue: np.ndarray | None,
                    threshold: float, rating_range: tuple[float, float], header: bool = False,
                    item_genres: np.ndarray | None = None,
                    genre_names: tuple[str, ...] = (), movie_file: str = "") -> Interactions:
    """Validate parsed rating columns, threshold them and index users/items."""
    lo, hi = rating_range
    r = t["rating"]
    u, i = t["user"], t["item"]
    if r.size == 0:
        raise DataError(str(path), "file holds no ratings")
    _fail_at(path, u < 1, u, "user id {v} must be >= 1", header)
    _fail_at(path, i < 1, i, "item id {v} must be >= 1", header)
    _fail_at(path, ~((r >= lo) & (r <= hi)), r,
             f"rating {{v}} out of range [{lo:g}, {hi:g}]", header)
    if catalogue is None:
        catalogue = np.unique(i)  # (I,) every rated movie
    idx = np.minimum(np.searchsorted(catalogue, i), catalogue.size - 1)  # (N,)
    _fail_at(path, catalogue[idx] != i, i, f"item id {{v}} is not listed in {movie_file}", header)
    click = r >= threshold  # (N,)
    if not click.any():
        raise DataError(str(path), f"no ratings >= {float(threshold)} in {path.name} "
                        "(dataset.click_threshold); nothing to train on")
    # Users are indexed over everyone who rated (RF²'s protocol keeps users without a
    # click); dataset.protocol=clicks drops those again (rf2.data.protocol).
    raw_users = np.unique(u)  # (U,) sorted raw ids
    user = compact_users(u)[0]  # (N,)
    ts = t["timestamp"].astype(np.int64)
    item = idx.astype(np.int64)
    ratings = Ratings(user=user, item=item, timestamp=ts, label=click.astype(np.int8))
    return Interactions(
        user=user[click], item=item[click], timestamp=ts[click],
        num_users=int(raw_users.size), num_items=int(catalogue.size),
        item_genres=item_genres, genre_names=genre_names, ratings=ratings,
        user_ids=raw_users.astype(np.int64),
    )


def _catalogue(path: Path, ids: list[int], lines: list[int]) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        dup = int(uniq[np.argmax(counts > 1)])
        later = [ln for i, ln in zip(ids, lines, strict=True) if i == dup][1]
        raise DataError(str(path), f"movie id {dup} listed twice", later)
    if uniq.size == 0:
        raise DataError(str(path), "no movies listed")
    return uniq


def _multi_hot(genre_lists: list[list[str]], names: tuple[str, ...]) -> np.ndarray:
    col = {g: j for j, g in enumerate(names)}
    out = np.zeros((len(genre_lists), len(names)), dtype=np.float32)  # (I, G)
    for i, gs in enumerate(genre_lists):
        out[i, [col[g] for g in gs if g in col]] = 1.0
    return out


def load_movielens100k(path: str | None, threshold: float) -> Interactions:
    """``u.data`` (user item rating timestamp, tabs) + ``u.item`` (19 genre flags)."""
    root = require_dir(path, "movielens100k", "u.data and u.item")
    data_f, item_f = (require_file(root, n, "movielens100k") for n in ("u.data", "u.item"))
    names: tuple[str, ...] = tuple(f"genre{j}" for j in range(19))
    genre_f = root / "u.genre"
    if genre_f.is_file():
        pairs: list[list[str]] = []
        for lineno, line in _data_lines(genre_f, False):
            pairs.append(line.split("|"))
            if len(pairs[-1]) != 2 or not pairs[-1][1].strip().isdigit():
                raise DataError(str(genre_f), "expected 'name|index'", lineno)
        names = tuple(p[0] for p in sorted(pairs, key=lambda p: int(p[1]))) or names
    ids: list[int] = []
    lines: list[int] = []
    flags: list[list[float]] = []
    for lineno, line in _data_lines(item_f, False):
        parts = line.split("|")
        if len(parts) < len(names) + 2:
            raise DataError(str(item_f), f"expected >= {len(names) + 2} '|'-separated fields "
                            f"(id|title|...|{len(names)} genre flags), found {len(parts)}", lineno)
        g = parts[-len(names):]
        if not parts[0].strip().isdigit() or any(v not in ("0", "1") for v in g):
            raise DataError(str(item_f), "movie id must be an integer and the last "
                            f"{len(names)} fields 0/1 genre flags", lineno)
        ids.append(int(parts[0]))
        lines.append(lineno)
        flags.append([float(v) for v in g])
    catalogue = _catalogue(item_f, ids, lines)
    genres = np.asarray(flags, dtype=np.float32)[np.argsort(ids, kind="stable")]  # (I, G)
    t = read_table(data_f, "\t")
    return to_interactions(data_f, t, catalogue, threshold, (1, 5), item_genres=genres,
                           genre_names=names, movie_file="u.item")


Movie = tuple[int, int, list[str]]  # (line number, movie id, genre names)


def _optional_movies(path: Path, parse: Callable[[Path], Iterator[Movie]]) -> tuple[
        np.ndarray | None, np.ndarray | None, tuple[str, ...]]:
    """Catalogue ids (sorted), their multi-hot genres (I, G), genre names; or no info."""
    if not path.is_file():
        return None, None, ()
    refuse_compressed(path)
    movies = list(parse(path))
    ids = [m[1] for m in movies]
    catalogue = _catalogue(path, ids, [m[0] for m in movies])
    names = tuple(sorted({g for m in movies for g in m[2]} - {_NO_GENRES, ""}))
    order = np.argsort(ids, kind="stable")
    return catalogue, _multi_hot([movies[i][2] for i in order], names), names


def _movies_dat(path: Path) -> Iterator[Movie]:
    for lineno, line in _data_lines(path, False):
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            raise DataError(str(path), "expected 'MovieID::Title::Genres' with an integer "
                            f"MovieID, found {len(parts)} '::'-separated fields", lineno)
        yield lineno, int(parts[0]), parts[2].split("|")


def _movies_csv(path: Path) -> Iterator[Movie]:
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)  # titles may be quoted and contain commas
        for row in reader:
            if reader.line_num == 1:
                if [c.lstrip("\ufeff") for c in row] != ["movieId", "title", "genres"]:
                    raise DataError(str(path), f"header is {','.join(row)!r}, "
                                    "expected 'movieId,title,genres'", 1)
            elif row and (len(row) != 3 or not row[0].strip().isdigit()):
                raise DataError(str(path), "expected 3 CSV fields movieId,title,genres with "
                                f"an integer movieId, found {len(row)}", reader.line_num)
            elif row:
                yield reader.line_num, int(row[0]), row[2].split("|")


def load_movielens1m(path: str | None, threshold: float) -> Interactions:
    """``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) + optional ``movies.dat``."""
    root = require_dir(path, "movielens1m", "ratings.dat (and optionally movies.dat)")
    data_f = require_file(root, "ratings.dat", "movielens1m")
    catalogue, genres, names = _optional_movies(root / "movies.dat", _movies_dat)
    t = read_table(data_f, "::")
    return to_interactions(data_f, t, catalogue, threshold, (1, 5), item_genres=genres,
                           genre_names=names, movie_file="movies.dat")


_ML20M_HEADER = "userId,movieId,rating,timestamp"


def load_movielens20m(path: str | None, threshold: float) -> Interactions:
    """``ratings.csv`` (header ``userId,movieId,rating,timestamp``) + optional ``movies.csv``."""
    root = require_dir(path, "movielens20m", "ratings.csv (and optionally movies.csv)")
    data_f = require_file(root, "ratings.csv", "movielens20m")
    with open(data_f, encoding="latin-1") as f:
        head = f.readline().strip().lstrip("\ufeff")
    if head != _ML20M_HEADER:
        raise DataError(str(data_f), f"header is {head!r}, expected {_ML20M_HEADER!r}", 1)
    catalogue, genres, names = _optional_movies(root / "movies.csv", _movies_csv)
    t = read_table(data_f, ",", header=True)
    return to_interactions(data_f, t, catalogue, threshold, (0.5, 5), header=True,
                           item_genres=genres, genre_names=names, movie_file="movies.csv")
