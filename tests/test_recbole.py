"""RecBole atomic-file loader: written fixtures in each shape, errors, the real amazon-cds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rf2.core.config import DatasetConfig
from rf2.core.errors import DataError
from rf2.data import load_dataset, load_interactions
from rf2.data.recbole import encode_tokens

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path, name: str = "toy", **files: str) -> Path:
    """Write ``root/name.<ext>`` for each ``ext=text``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for ext, text in files.items():
        (root / f"{name}.{ext}").write_text(text, encoding="utf-8")
    return root


def _cfg(root: Path, **kw: object) -> DatasetConfig:
    return DatasetConfig(name="recbole", path=str(root), **kw)  # type: ignore[arg-type]


def _tsv(*rows: str) -> str:
    return "\n".join(rows) + "\n"


_TIMED = _tsv(
    "user_id:token\titem_id:token\trating:float\ttimestamp:float",
    "u1\ti1\t5\t4.5", "u1\ti2\t5\t1", "u1\ti3\t4\t3", "u1\ti4\t5\t2",
    "u2\ti2\t5\t10", "u2\ti3\t5\t5",
    "u3\ti4\t1\t7",  # never clicks: dropped
)


def test_chronological_split_with_rating_and_timestamp(tmp_path: Path) -> None:
    root = _files(tmp_path / "toy", inter=_TIMED)
    ds = load_dataset(_cfg(root, train_fraction=0.5), seed=0)
    assert ds.split == "chronological"
    assert (ds.num_users, ds.num_items) == (2, 4)  # u3 dropped; i1..i4 stay items
    # u1 clicks (rating >= 5): i2@1, i4@2, i1@4.5 -> floor(0.5 * 3) = 1 train, 2 test
    assert ds.train_of(0).tolist() == [1] and ds.test_of(0).tolist() == [3, 0]
    assert ds.train_of(1).tolist() == [2] and ds.test_of(1).tolist() == [1]
    assert ds.report is not None
    assert ds.report["users_without_click_dropped"] == 1 and ds.report["clicks"] == 5
    assert ds.raw_user_ids().tolist() == ["u1", "u2"]  # the tokens name users in tiers.csv
    # click_threshold applies to the rating column
    assert load_dataset(_cfg(root, click_threshold=1.0), seed=0).num_users == 3


def test_no_rating_every_row_is_a_click_and_random_split_is_seeded(tmp_path: Path) -> None:
    rows = ["user_id:token\titem_id:token"]
    rows += [f"{u}\t{i}" for u in range(30) for i in range(u % 7, u % 7 + 10)]
    root = _files(tmp_path / "toy", inter=_tsv(*rows))
    a = load_dataset(_cfg(root), seed=1)
    assert a.split == "random"
    assert (a.num_users, a.num_items) == (30, 16)
    assert a.train_counts.tolist() == [9] * 30 and a.test_counts.tolist() == [1] * 30
    # a user's train + test is exactly its rows; the test item differs between seeds
    for u in range(30):
        got = sorted(a.train_of(u).tolist() + a.test_of(u).tolist())
        assert got == list(range(u % 7, u % 7 + 10))
    b, c = load_dataset(_cfg(root), seed=1), load_dataset(_cfg(root), seed=2)
    assert np.array_equal(a.test_items, b.test_items)
    assert not np.array_equal(a.test_items, c.test_items)
    # split_seed pins the split whatever the run seed
    d = load_dataset(_cfg(root, split_seed=1), seed=2)
    assert np.array_equal(a.test_items, d.test_items)


def test_item_and_user_files_and_genres(tmp_path: Path) -> None:
    root = _files(
        tmp_path / "shop", name="shop",
        inter=_tsv("user_id:token\titem_id:token", "a\tB02", "a\tA01", "b\tB02", "b\tC03"),
        item=_tsv("item_id:token\ttitle:token_seq\tgenre:token_seq\tprice:float",
                  "A01\tsome title\trock pop\t1.5", "B02\tx\tjazz\t2", "C03\ty\t\t3",
                  "Z99\tnever bought\trock\t4"),
        user=_tsv("user_id:token\tage:float", "a\t20", "b\t30"),
    )
    ds = load_dataset(_cfg(root, genre_field="genre"), seed=0)
    assert ds.num_items == 4  # Z99 is in the catalogue though nobody bought it
    assert ds.genre_names == ("jazz", "pop", "rock")
    assert ds.item_genres is not None
    assert ds.item_genres.tolist() == [[0, 1, 1], [1, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert ds.report is not None and ds.report["items_without_click"] == 1
    with pytest.raises(DataError, match="genre_field='title2'.*candidates: title, genre"):
        load_dataset(_cfg(root, genre_field="title2"), seed=0)


def test_name_in_dir_and_token_order(tmp_path: Path) -> None:
    root = _files(tmp_path / "folder", name="other",
                  inter=_tsv("user_id:token\titem_id:token", "10\t2", "9\t10", "10\t10"))
    with pytest.raises(DataError, match=r"folder\.inter is missing.*found other\.inter: set "
                       r"dataset\.name_in_dir"):
        load_dataset(_cfg(root), seed=0)
    inter = load_interactions(_cfg(root, name_in_dir="other"), seed=0)
    # integer tokens sort numerically: user 9 -> 0, user 10 -> 1; item 2 -> 0, 10 -> 1
    assert inter.user.tolist() == [1, 0, 1] and inter.item.tolist() == [0, 1, 1]
    ds = load_dataset(_cfg(root, name_in_dir="other"), seed=0)
    assert ds.raw_user_ids().tolist() == [9, 10]  # integer tokens are integer ids


def test_encode_tokens() -> None:
    import pandas as pd

    codes, vocab = encode_tokens(pd.Series(["b", "a", "c", "a"]))
    assert codes.tolist() == [1, 0, 2, 0] and vocab.tolist() == ["a", "b", "c"]
    codes, vocab = encode_tokens(pd.Series(["10", "9", "100"]))
    assert codes.tolist() == [1, 0, 2]
    # "07" and "7" are different tokens with the same number: text order
    codes, vocab = encode_tokens(pd.Series(["7", "07"]))
    assert vocab.tolist() == ["07", "7"] and codes.tolist() == [1, 0]


_H = "user_id:token\titem_id:token"


@pytest.mark.parametrize(("inter", "line", "problem"), [
    (_tsv("user_id:token\titem_id:tok", "1\t2"), 1, "column 'item_id' has unknown type 'tok'; "
     "allowed: token, token_seq, float, float_seq"),
    (_tsv("user_id\titem_id:token", "1\t2"), 1, "header column 'user_id' is not 'name:type'"),
    (_tsv("user_id:token\trating:float", "1\t2"), 1, "missing column item_id:token"),
    (_tsv("user_id:token\titem_id:float", "1\t2"), 1, "column item_id has type float"),
    (_tsv(_H, "1\t2", "1\t2\t3"), 3, "expected 2 tab-separated fields as in the header, found 3"),
    (_tsv(_H, "1\t2", "", "3"), 4, "expected 2 tab-separated fields as in the header, found 1"),
    (_tsv(_H, "1\t2", "1,2"), 3, "found 1 (the separator looks wrong: atomic files are tab"),
    (_tsv(_H, "1\t2", "\t5"), 3, "field user_id is empty"),
    (_tsv(_H + "\trating:float", "1\t2\t5", "1\t3\tfive"), 3,
     "field rating is 'five', not a finite number"),
    (_tsv(_H + "\ttimestamp:float", "1\t2\t5", "1\t3\t"), 3, "field timestamp is '', not a"),
    (_tsv(_H + "\trating:float", "1\t2\t1", "1\t3\t4"), None,
     "no interaction has rating >= 5 (dataset.click_threshold)"),
    (_tsv(_H), None, "holds no interactions (only a header)"),
])
def test_errors_name_file_line_and_problem(tmp_path: Path, inter: str, line: int | None,
                                           problem: str) -> None:
    root = _files(tmp_path / "toy", inter=inter)
    with pytest.raises(DataError) as info:
        load_dataset(_cfg(root), seed=0)
    err = info.value
    assert err.path.endswith("toy.inter") and err.line == line
    assert problem in err.problem
    assert "\n" not in str(err)


def test_errors_in_side_files(tmp_path: Path) -> None:
    inter = _tsv(_H, "1\t2")
    root = _files(tmp_path / "toy", inter=inter, item=_tsv("item_id:token", "2", "5", "2"))
    with pytest.raises(DataError, match=r"toy\.item:4: item_id '2' listed twice"):
        load_dataset(_cfg(root), seed=0)
    root = _files(tmp_path / "toy", inter=inter, item=_tsv("item_id:token", "2"),
                  user=_tsv("user_id:token\tage:number", "1\t3"))
    with pytest.raises(DataError, match=r"toy\.user:1: column 'age' has unknown type 'number'"):
        load_dataset(_cfg(root), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(_cfg(tmp_path / "nowhere"), seed=0)


def test_compressed_inter_is_named_as_such(tmp_path: Path) -> None:
    import gzip

    root = tmp_path / "toy"
    root.mkdir()
    (root / "toy.inter").write_bytes(gzip.compress(_tsv(_H, "1\t2").encode()))
    with pytest.raises(DataError, match=r"toy\.inter: is a gzip-compressed file.*gunzip"):
        load_dataset(_cfg(root), seed=0)
    (root / "toy.inter").rename(root / "toy.inter.gz")
    with pytest.raises(DataError, match=r"found toy\.inter\.gz: decompress it first"):
        load_dataset(_cfg(root), seed=0)


def test_tokens_are_read_exactly_and_never_merge(tmp_path: Path) -> None:
    # café / cafè are distinct valid UTF-8 tokens; so are "a" and "a " (spaces count)
    root = _files(tmp_path / "toy", inter=_tsv(_H, "u1\tcafé", "u1\tcafè", "u2\tcafé",
                                               "u2\ta", "u2\ta "))
    ds = load_dataset(_cfg(root), seed=0)
    assert ds.num_items == 4 and ds.num_users == 2


def test_invalid_utf8_names_file_line_and_bytes(tmp_path: Path) -> None:
    # Latin-1 bytes: before, both decoded to U+FFFD and the two items merged silently
    root = tmp_path / "toy"
    root.mkdir()
    (root / "toy.inter").write_bytes(b"user_id:token\titem_id:token\nu1\tcafe\n"
                                     b"u1\tcaf\xe9\nu2\tcaf\xe8\n")
    with pytest.raises(DataError) as info:
        load_dataset(_cfg(root), seed=0)
    err = info.value
    assert err.path.endswith("toy.inter") and err.line == 3
    assert "invalid UTF-8 (bytes e9 at column 7)" in err.problem and "\n" not in str(err)
    (root / "toy.inter").write_bytes(b"user_id:token\titem_\xffid:token\n1\t2\n")
    with pytest.raises(DataError, match=r"toy\.inter:1: invalid UTF-8 \(bytes ff"):
        load_dataset(_cfg(root), seed=0)
    (root / "toy.inter").write_bytes(_tsv(_H, "1\t2").encode())
    (root / "toy.item").write_bytes(b"item_id:token\n2\n\xc3(\n")  # broken 2-byte sequence
    with pytest.raises(DataError, match=r"toy\.item:3: invalid UTF-8 \(bytes c3"):
        load_dataset(_cfg(root), seed=0)


def test_bom_and_old_mac_line_ends(tmp_path: Path) -> None:
    root = tmp_path / "toy"
    root.mkdir()
    (root / "toy.inter").write_bytes("\ufeffuser_id:token\titem_id:token\r1\t2\r3\t4\r".encode())
    ds = load_dataset(_cfg(root), seed=0)
    assert (ds.num_users, ds.num_items) == (2, 2)


def test_cli_writes_data_json_and_rejects_bad_files(tmp_path: Path) -> None:
    from conftest import small_run

    from rf2.cli.support import run_job
    from rf2.core.errors import UserInputError

    rows = ["user_id:token\titem_id:token"]
    rows += [f"{u}\t{(u * 7 + k) % 40}" for u in range(60) for k in range(6)]
    root = _files(tmp_path / "toy", inter=_tsv(*rows))
    cfg = small_run(**{"dataset": {"name": "recbole", "path": str(root)}, "num_rounds": 1,
                       "eval.ks": [5]})
    run = run_job(cfg, tmp_path / "run")
    data = json.loads((run / "data.json").read_text())
    assert data["split"] == "random" and data["split_seed"] == 7
    assert (data["users"], data["items"], data["loader"]["rows"]) == (60, 40, 360)
    assert data["train_interactions"] + data["test_interactions"] == 360
    (root / "toy.inter").write_text(_tsv("user_id:token\titem_id:tok", "1\t2"))
    with pytest.raises(UserInputError, match="unknown type 'tok'"):
        run_job(cfg, tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_real_amazon_cds(amazon_cds: Path) -> None:
    ds = load_dataset(_cfg(amazon_cds), seed=123)
    assert (ds.num_users, ds.num_items) == (43_169, 35_648)
    assert ds.train_items.size + ds.test_items.size == 777_426
    assert ds.split == "random" and ds.report is not None
    assert ds.report["users_without_click_dropped"] == 0 and ds.report["items_without_click"] == 0
    # >= 5 interactions per user: floor(0.9 n) train, at least one test click each
    assert ds.train_counts.min() == 4 and ds.test_counts.min() == 1
    assert (ds.train_items.size, ds.test_items.size) == (682_868, 94_558)
    # user ids are the file's integer tokens: user 0's rows are items 3443, 4125, ...
    row0 = sorted(ds.train_of(0).tolist() + ds.test_of(0).tolist())
    assert row0[:3] == [3443, 4125, 4560]
