"""Tier maps in and out: ``tiers.csv`` (``user_id,tier``; raw dataset user ids, tier names).

User ids are the dataset's own under every ``dataset.protocol`` (MovieLens: 1..943 on
ML-100K; RecBole: the ``user_id`` tokens; synthetic: the index). Integer ids match by
value (``007`` is user 7); RecBole token ids that are not all integers match as text.

Every run folder gets one (:func:`tier_csv_text`), whatever tiering ran, so a map can be
compared user by user with another tool's, or fed back with ``population=from-file
population.path=RUN/tiers.csv`` (:func:`read_tier_file`; also a JSON object
``{"user_id": "tier", ...}`` or a list of ``{"user_id": ..., "tier": ...}`` records).
Problems are one-line :class:`rf2.core.errors.DataError`\\ s naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rf2.core.errors import DataError
from rf2.data.compressed import refuse_compressed

HEADER = ("user_id", "tier")


def tier_csv_text(user_ids: np.ndarray, tier_of_user: np.ndarray,
                  tier_names: Sequence[str]) -> str:
    """The ``tiers.csv`` content: header, then one row per user in index order."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(HEADER)
    for uid, t in zip(np.asarray(user_ids).tolist(), np.asarray(tier_of_user).tolist(),
                      strict=True):
        w.writerow([uid, tier_names[t]])
    return buf.getvalue()


def _rows(path: Path) -> list[tuple[int | None, str, str]]:
    """(line or None, user id text, tier name) of every entry of a CSV or JSON file."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(str(path), f"not a readable JSON file ({exc})") from None
        if isinstance(data, dict):
            return [(None, str(k), str(v)) for k, v in data.items()]
        if isinstance(data, list) and all(isinstance(r, dict) and set(HEADER) <= set(r)
                                          for r in data):
            return [(None, str(r["user_id"]), str(r["tier"])) for r in data]
        raise DataError(str(path), 'expected {"user_id": "tier", ...} or a list of '
                        '{"user_id": ..., "tier": ...} records')
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = list(csv.reader(f))
    except OSError as exc:
        raise DataError(str(path), f"cannot read file: {exc.strerror or exc}") from None
    if not lines or [c.strip().lstrip("\ufeff") for c in lines[0]] != list(HEADER):
        raise DataError(str(path), f"the first line must be the header {','.join(HEADER)}", 1)
    out: list[tuple[int | None, str, str]] = []
    for lineno, row in enumerate(lines[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DataError(str(path), f"expected 2 fields user_id,tier, found {len(row)}", lineno)
        out.append((lineno, row[0].strip(), row[1].strip()))
    return out


def read_tier_file(path: str, user_ids: np.ndarray, tier_names: Sequence[str]) -> np.ndarray:
    """(U,) tier index per user (index order of ``user_ids``) from a tier map file."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise DataError(str(f), "tier map file does not exist (population.path)")
    refuse_compressed(f)
    ids = np.asarray(user_ids)
    numeric = ids.dtype.kind in "iu"
    index: dict[int | str, int] = {(int(u) if numeric else str(u)): i
                                   for i, u in enumerate(ids.tolist())}
    names = list(tier_names)
    out = np.full(len(index), -1, dtype=np.int64)
    for lineno, uid_text, tier in _rows(f):
        uid: int | str = uid_text
        if numeric:
            try:
                uid = int(uid_text)
            except ValueError:
                raise DataError(str(f), f"user_id {uid_text!r} is not an integer",
                                lineno) from None
        if uid not in index:
            raise DataError(str(f), f"user_id {uid} is not a user of this dataset", lineno)
        if tier not in names:
            raise DataError(str(f), f"tier {tier!r} is not a tier of the device profile "
                            f"(tiers: {', '.join(names)})", lineno)
        if out[index[uid]] >= 0:
            raise DataError(str(f), f"user_id {uid} is listed twice", lineno)
        out[index[uid]] = names.index(tier)
    missing = np.flatnonzero(out < 0)
    if missing.size:
        first = ids[missing[0]].item()
        raise DataError(str(f), f"{missing.size} users of the dataset have no tier "
                        f"(first: user_id {first}); every user needs one")
    return out
