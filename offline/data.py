"""Raw files -> one typed, dense-indexed ``Dataset`` (see offline/dataset.py).

Two sources: MovieLens-100K, read out of the ``recbole`` wheel on PyPI and cached so that later
runs need no network, and the user's own CSV files. Every problem with the input becomes a
``DataError`` naming the file, the line and the reason: a model silently trained on part of the
data is worse than one that refuses to start. With ``skip_bad_rows`` bad data rows are dropped,
but counted in ``Dataset.skipped`` and logged, never silently.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from loguru import logger

from recsys.dataset import UNKNOWN, Dataset, FeatureTable, Interactions, ItemTable
from recsys.text import TEXT_COLUMNS

RECBOLE_VERSION = "1.2.1"
_WHEEL_DIR = "recbole/dataset_example/ml-100k/"
ML_FILES = ("ml-100k.inter", "ml-100k.user", "ml-100k.item")
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_CSV_REQUIRED = ("user_id", "item_id", "timestamp")  # no rating column: implicit feedback, every rating is 1
_INTEGER_ID = re.compile(r"[+-]?[0-9]+")
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_INT64_RANGE = (-(2**63), 2**63)


class DataError(ValueError):
    """Bad input, located precisely enough to fix by hand: file, 1-based line (header = 1), reason."""

    def __init__(self, path: Path | str, reason: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = self.path.name if line is None else f"{self.path.name} line {line}"
        super().__init__(f"{where}: {reason}")


class _RowProblem(Exception):
    """A bad data row; ``kind`` groups the counts that ``skip_bad_rows`` reports."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass
class _BadRows:
    """Raises on the first bad row, or (``skip``) counts it per kind so nothing vanishes unreported."""

    skip: bool
    counts: dict[str, int] = field(default_factory=dict)
    first_line: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def row(self, path: Path, line: int) -> Iterator[None]:
        """Wrap the checks of one data row; a problem either raises or skips the rest of the block."""
        try:
            yield
        except _RowProblem as problem:
            self.report(path, line, problem)

    def report(self, path: Path, line: int, problem: _RowProblem) -> None:
        """Counted under "<file>: <kind>", the key ``Dataset.skipped`` reports."""
        if not self.skip:
            raise DataError(path, problem.reason, line) from None
        key = f"{path.name}: {problem.kind}"
        self.counts[key] = self.counts.get(key, 0) + 1
        self.first_line.setdefault(key, line)

    def log(self) -> None:
        for key, count in self.counts.items():
            logger.warning("{}: skipped {} row(s), first on line {}", key, count, self.first_line[key])


@dataclass
class _Table:
    """A delimited file's header and well-formed data rows (stripped fields, with their line numbers)."""

    path: Path
    columns: dict[str, int]
    rows: list[tuple[int, list[str]]]

    def has(self, name: str) -> bool:
        return name in self.columns

    def cell(self, row: list[str], name: str) -> str:
        return row[self.columns[name]]

    def require(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.columns]
        if missing:
            raise DataError(self.path, f"header lacks required column(s): {', '.join(missing)}", 1)


@dataclass
class _Events:
    """Interactions with raw ids, before dense rows are known."""

    users: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)
    ratings: list[float] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------- MovieLens-100K


def default_cache_dir() -> Path:
    """``$RECSYS_DATA_DIR`` if set, so that containers and CI can point at a prepared copy."""
    env = os.environ.get("RECSYS_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "recsys" / "ml-100k"


def load_movielens(cache_dir: Path | None = None) -> Dataset:
    """MovieLens-100K; downloaded once (the recbole wheel from PyPI), then read from the cache offline."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not all((cache / name).is_file() for name in ML_FILES):
        _fetch_movielens(cache)
    return _parse_movielens(cache)


def download_recbole_wheel(dest_dir: Path) -> Path:
    """Fetch the recbole wheel with pip (its index, proxy and certificate settings apply); never import it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         f"recbole=={RECBOLE_VERSION}", "-d", str(dest_dir)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    wheels = sorted(Path(dest_dir).glob("recbole-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip reported success but left no recbole wheel in {dest_dir}")
    return wheels[0]


def _fetch_movielens(cache: Path) -> None:
    """Extract the three files from the wheel into ``cache``; any failure says how to supply them by hand."""
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = download_recbole_wheel(Path(tmp))
            with zipfile.ZipFile(wheel) as zf:
                for name in ML_FILES:
                    _write_atomically(cache / name, zf.read(_WHEEL_DIR + name))
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
        raise DataError(
            cache,
            f"could not obtain MovieLens-100K from the recbole=={RECBOLE_VERSION} wheel ({_failure_detail(err)}). "
            f"To supply it by hand, place {', '.join(ML_FILES)} (from {_WHEEL_DIR} inside that wheel) "
            f"in {cache}, or set RECSYS_DATA_DIR to a directory that holds them.",
        ) from err


def _failure_detail(err: Exception) -> str:
    """pip's last stderr line says why (no network, no such version); other errors speak for themselves."""
    stderr = err.stderr if isinstance(err, subprocess.CalledProcessError) else None
    lines = stderr.strip().splitlines() if isinstance(stderr, str) else []
    return lines[-1] if lines else str(err)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file then rename, so an interrupted download never leaves a truncated file in the cache."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared (e.g. with a container user)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_movielens(cache: Path) -> Dataset:
    """RecBole's atomic files -> Dataset: users from the .user file, the catalogue from the .item file."""
    bad = _BadRows(skip=False)
    inter, user, item = (_read_table(cache / name, bad, delimiter="\t", typed_header=True) for name in ML_FILES)
    inter.require(INTERACTION_COLUMNS)
    user.require(("user_id", "age", "gender", "occupation", "zip_code"))
    item.require(("item_id", "movie_title", "release_year", "class"))
    users = _rows_by_id(user, "user_id", bad)
    items = _rows_by_id(item, "item_id", bad)
    events = _read_events(inter, item, items, bad)
    _require_rows(inter, events, bad)
    user_ids = _dense_order([*users, *events.users])
    item_ids = _dense_order(items)
    zips = _aligned(user, users, user_ids, "zip_code")
    user_columns = {
        "age": _aligned(user, users, user_ids, "age"),
        "gender": _aligned(user, users, user_ids, "gender"),
        "occupation": _aligned(user, users, user_ids, "occupation"),
        "zip": zips,
        "zip_region": [z[:1] for z in zips],
    }
    titles = _aligned(item, items, item_ids, "movie_title")
    items_table = _item_table(
        titles=titles,
        years=[_number_or_nan(y) for y in _aligned(item, items, item_ids, "release_year")],
        genre_lists=[g.split() for g in _aligned(item, items, item_ids, "class")],
        extra=FeatureTable(n_rows=len(item_ids)),
        text={"title": titles},
    )
    return Dataset(
        name="ml-100k",
        interactions=_interactions(events, user_ids, item_ids),
        user_ids=user_ids,
        item_ids=item_ids,
        users=_feature_table(user_columns, len(user_ids), categorical={"gender", "occupation", "zip", "zip_region"}),
        items=items_table,
    )


# --------------------------------------------------------------------------- bring your own CSV


def load_csv(
    interactions: Path,
    users: Path | None = None,
    items: Path | None = None,
    skip_bad_rows: bool = False,
    text_columns: Sequence[str] = (),
) -> Dataset:
    """The user's own data; users are those who interact, items.csv (if given) defines the catalogue. The
    item text the sentence encoder reads: items.csv's ``title`` and ``description`` when present, then
    ``text_columns`` (other columns of items.csv, which are then text rather than features)."""
    bad = _BadRows(skip=skip_bad_rows)
    item_table = _read_table(Path(items), bad) if items is not None else None
    item_rows = _csv_item_rows(item_table, bad) if item_table is not None else {}
    inter = _read_table(Path(interactions), bad)
    inter.require(_CSV_REQUIRED)
    events = _read_events(inter, item_table, item_rows, bad)
    _require_rows(inter, events, bad)
    user_ids = _dense_order(events.users)
    item_ids = _dense_order(item_rows if item_table is not None else events.items)
    user_features = (
        _csv_user_features(Path(users), user_ids, inter.path, bad) if users is not None else FeatureTable(len(user_ids))
    )
    bad.log()
    return Dataset(
        name=inter.path.resolve().parent.name,
        interactions=_interactions(events, user_ids, item_ids),
        user_ids=user_ids,
        item_ids=item_ids,
        users=user_features,
        items=_csv_item_table(item_table, item_rows, item_ids, text_columns),
        skipped=dict(bad.counts),
    )


def _csv_item_rows(table: _Table, bad: _BadRows) -> dict[str, list[str]]:
    """items.csv rows by id; a year that is present must be a number, checked here so the row can be skipped."""
    table.require(["item_id"])
    has_year = table.has("year")

    def check(_: str, row: list[str]) -> None:
        if has_year:
            _year(table.cell(row, "year"))

    return _rows_by_id(table, "item_id", bad, check)


def _csv_user_features(path: Path, user_ids: list[str], inter_path: Path, bad: _BadRows) -> FeatureTable:
    """users.csv only adds features: a row for someone who never interacted is an error (likely an id typo)."""
    table = _read_table(path, bad)
    table.require(["user_id"])
    known = set(user_ids)

    def check(raw: str, _: list[str]) -> None:
        if raw not in known:
            raise _RowProblem("unknown id", f"unknown id: user_id {raw!r} does not appear in {inter_path.name}")

    rows = _rows_by_id(table, "user_id", bad, check)
    columns = {name: _aligned(table, rows, user_ids, name) for name in table.columns if name != "user_id"}
    return _feature_table(columns, len(user_ids))


def _csv_item_table(table: _Table | None, rows: dict[str, list[str]], item_ids: list[str],
                    text_columns: Sequence[str] = ()) -> ItemTable:
    """Title defaults to the raw id, year to NaN, genres to none; the text columns are text; other columns
    become extra features."""
    if text_columns and table is None:
        raise DataError("items.csv", f"--item-text-columns {','.join(text_columns)} needs an items file (--items)")
    if table is None:
        return _item_table(item_ids, [math.nan] * len(item_ids), [[] for _ in item_ids], FeatureTable(len(item_ids)))
    missing = [c for c in text_columns if not table.has(c)]
    if missing:
        raise DataError(table.path, f"header lacks the text column(s) named by --item-text-columns: {', '.join(missing)}", 1)
    titles = _aligned(table, rows, item_ids, "title") if table.has("title") else [""] * len(item_ids)
    years = _aligned(table, rows, item_ids, "year") if table.has("year") else [""] * len(item_ids)
    genres = _aligned(table, rows, item_ids, "genres") if table.has("genres") else [""] * len(item_ids)
    text_names = list(dict.fromkeys([*(c for c in TEXT_COLUMNS if table.has(c)), *text_columns]))
    text = {name: _aligned(table, rows, item_ids, name) for name in text_names}
    special = {"item_id", "title", "year", "genres", *text_names}
    extra = {name: _aligned(table, rows, item_ids, name) for name in table.columns if name not in special}
    return _item_table(
        titles=[title or raw for title, raw in zip(titles, item_ids)],
        years=[_year(y) for y in years],
        genre_lists=[[g.strip() for g in s.split("|") if g.strip()] for s in genres],
        extra=_feature_table(extra, len(item_ids)),
        text=text,
    )


# --------------------------------------------------------------------------- shared parsing


def _read_table(path: Path, bad: _BadRows, delimiter: str = ",", typed_header: bool = False) -> _Table:
    """Header + rows with the header's field count; ``typed_header`` drops RecBole's ``:token`` suffixes."""
    if not path.is_file():
        raise DataError(path, f"file not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            quoting = csv.QUOTE_NONE if typed_header else csv.QUOTE_MINIMAL
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            header = next(reader, None)
            if not header:
                raise DataError(path, "file is empty (no header line)")
            if delimiter == ",":
                _check_comma_delimited(path, header)
            columns = _header_columns(path, header, typed_header)
            return _Table(path, columns, list(_data_rows(path, reader, len(columns), bad)))
    except UnicodeDecodeError as err:
        raise DataError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(path, f"malformed CSV: {err}", reader.line_num) from None


def _check_comma_delimited(path: Path, header: list[str]) -> None:
    """A one-column header holding ``;`` or a tab is a file written with another delimiter (a
    spreadsheet's locale default, a TSV export): say so, rather than "lacks required columns"."""
    if len(header) != 1:
        return
    found = [name for sep, name in ((";", "';'"), ("\t", "a tab")) if sep in header[0]]
    if found:
        raise DataError(path, f"the header is a single column containing {' and '.join(found)}: "
                              "the delimiter must be a comma (user_id,item_id,...)", 1)


def _header_columns(path: Path, header: list[str], typed: bool) -> dict[str, int]:
    """Column name -> position; a nameless or repeated column would make "the rating column" ambiguous."""
    names = [(h.split(":", 1)[0] if typed else h).strip() for h in header]
    columns: dict[str, int] = {}
    for pos, name in enumerate(names):
        if not name:
            raise DataError(path, f"column {pos + 1} of the header has no name", 1)
        if name in columns:
            raise DataError(path, f"duplicate column {name!r} in header", 1)
        columns[name] = pos
    return columns


def _data_rows(path: Path, reader: csv._reader, width: int, bad: _BadRows) -> Iterator[tuple[int, list[str]]]:
    """Yields (line, stripped fields); blank lines carry no data and are passed over."""
    line = 1
    for record in reader:
        start, line = line + 1, reader.line_num  # a quoted field may span lines: report where the row starts
        if not record:
            continue
        if len(record) != width:
            bad.report(path, start, _RowProblem("wrong field count", f"expected {width} fields, got {len(record)}"))
            continue
        yield start, [value.strip() for value in record]


def _rows_by_id(
    table: _Table, id_column: str, bad: _BadRows, check: Callable[[str, list[str]], None] | None = None
) -> dict[str, list[str]]:
    """One row per id, in file order; a repeated id would make the features ambiguous, so it is an error."""
    first_line: dict[str, int] = {}
    rows: dict[str, list[str]] = {}
    for line, row in table.rows:
        with bad.row(table.path, line):
            raw = _id(table, row, id_column)
            if raw in first_line:
                raise _RowProblem("duplicate id", f"duplicate {id_column} {raw!r} (first on line {first_line[raw]})")
            if check is not None:
                check(raw, row)
            first_line[raw], rows[raw] = line, row
    return rows


def _read_events(table: _Table, catalogue: _Table | None, items: Collection[str], bad: _BadRows) -> _Events:
    """Parse each interaction; with a catalogue file, an item it does not list is a bad row (likely a typo)."""
    events = _Events()
    has_rating = table.has("rating")
    for line, row in table.rows:
        with bad.row(table.path, line):
            user, item = _id(table, row, "user_id"), _id(table, row, "item_id")
            rating = _rating(table.cell(row, "rating")) if has_rating else 1.0
            timestamp = _timestamp(table.cell(row, "timestamp"))
            if catalogue is not None and item not in items:
                raise _RowProblem("unknown item", f"item_id {item!r} is not in {catalogue.path.name}")
            events.users.append(user)
            events.items.append(item)
            events.ratings.append(rating)
            events.timestamps.append(timestamp)
    return events


def _require_rows(table: _Table, events: _Events, bad: _BadRows) -> None:
    """No usable interaction means nothing to train on: stop here rather than fail obscurely later."""
    if events.users:
        return
    bad.log()
    skipped = sum(bad.counts.values())
    reason = f"no usable data rows ({skipped} skipped as bad)" if skipped else "no data rows after the header"
    raise DataError(table.path, reason)


def _id(table: _Table, row: list[str], name: str) -> str:
    value = table.cell(row, name)
    if not value:
        raise _RowProblem(f"empty {name}", f"empty {name}")
    return value


def _rating(value: str) -> float:
    try:
        rating = float(value)
    except ValueError:
        raise _RowProblem("bad rating", f"rating {value!r} is not a number") from None
    if not (math.isfinite(rating) and abs(rating) <= _FLOAT32_MAX):
        raise _RowProblem("non-finite rating", f"rating {value!r} is not a finite number")
    return rating


def _timestamp(value: str) -> int:
    """Epoch seconds from a number or an ISO-8601 date/datetime (UTC when no zone is given).

    Integer strings are converted exactly (float would round beyond 2**53); fractions are truncated.
    """
    try:
        seconds = float(value)
    except ValueError:
        seconds = _iso_seconds(value)
    if not (math.isfinite(seconds) and _INT64_RANGE[0] <= seconds < _INT64_RANGE[1]):
        raise _RowProblem("bad timestamp", f"timestamp {value!r} is not a finite number of seconds within int64")
    return int(value) if _INTEGER_ID.fullmatch(value) else int(seconds)


def _iso_seconds(value: str) -> float:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _RowProblem("bad timestamp", f"timestamp {value!r} is neither a number nor an ISO-8601 date") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def _year(value: str) -> float:
    """Empty means unknown (NaN); anything else must be a number, since text there is likely a shifted column."""
    if not value:
        return math.nan
    year = _number_or_nan(value)
    if math.isnan(year):
        raise _RowProblem("bad year", f"year {value!r} is not a number")
    return year


def _number_or_nan(value: str) -> float:
    """A finite number, else NaN (MovieLens spells unknown years 'unkonwn')."""
    try:
        number = float(value)
    except ValueError:
        return math.nan
    return number if math.isfinite(number) else math.nan


def _dense_order(ids: Iterable[str]) -> list[str]:
    """Row order: numeric when every id is an integer (MovieLens user "1" is row 0), else first appearance."""
    unique = list(dict.fromkeys(ids))
    if unique and all(_INTEGER_ID.fullmatch(raw) for raw in unique):
        return sorted(unique, key=lambda raw: (int(raw), raw))
    return unique


def _aligned(table: _Table, rows: dict[str, list[str]], ids: list[str], name: str) -> list[str]:
    """Column ``name`` in dense-row order; '' (missing) for ids the file does not list."""
    pos = table.columns[name]
    return [rows[raw][pos] if raw in rows else "" for raw in ids]


def _interactions(events: _Events, user_ids: list[str], item_ids: list[str]) -> Interactions:
    user_row = {raw: row for row, raw in enumerate(user_ids)}
    item_row = {raw: row for row, raw in enumerate(item_ids)}
    return Interactions(
        user=np.fromiter((user_row[u] for u in events.users), dtype=np.int64, count=len(events.users)),
        item=np.fromiter((item_row[i] for i in events.items), dtype=np.int64, count=len(events.items)),
        rating=np.asarray(events.ratings, dtype=np.float32),
        timestamp=np.asarray(events.timestamps, dtype=np.int64),
    )


def _feature_table(columns: dict[str, list[str]], n_rows: int, categorical: Collection[str] = ()) -> FeatureTable:
    """Numeric when every non-empty value is a finite number (empty -> NaN), else categorical (empty -> 0)."""
    table = FeatureTable(n_rows=n_rows)
    for name, values in columns.items():
        numbers = None if name in categorical else _numeric_column(values)
        if numbers is not None:
            table.numeric[name] = numbers
        else:
            table.vocab[name], table.categorical[name] = _encode(values)
    return table


def _numeric_column(values: list[str]) -> np.ndarray | None:
    """float32 with NaN for empty cells, or None when any non-empty cell is not a finite number."""
    numbers = np.array([_number_or_nan(v) for v in values], dtype=np.float64)
    if any(v and math.isnan(x) for v, x in zip(values, numbers)):
        return None
    return numbers.astype(np.float32)


def _encode(values: list[str]) -> tuple[list[str], np.ndarray]:
    """Sorted vocabulary after the reserved UNKNOWN, so codes do not depend on row order."""
    vocab = [UNKNOWN, *sorted({v for v in values if v and v != UNKNOWN})]
    code = {v: i for i, v in enumerate(vocab)}
    return vocab, np.array([code.get(v, 0) for v in values], dtype=np.int64)


def _item_table(titles: list[str], years: list[float], genre_lists: list[list[str]], extra: FeatureTable,
                text: dict[str, list[str]] | None = None) -> ItemTable:
    """Multi-hot genres over the sorted genre names."""
    names = sorted({g for genres in genre_lists for g in genres})
    column = {g: j for j, g in enumerate(names)}
    multi_hot = np.zeros((len(titles), len(names)), dtype=bool)
    for row, genres in enumerate(genre_lists):
        multi_hot[row, [column[g] for g in genres]] = True
    year = np.asarray(years, dtype=np.float32)
    return ItemTable(titles=titles, year=year, genres=multi_hot, genre_names=names, extra=extra, text=text or {})


def dataset_fingerprint(ds: Dataset) -> str:
    """sha256 over the interactions and id maps, so a bundle records exactly which data trained it."""
    digest = hashlib.sha256()
    inter = ds.interactions
    for array, dtype in ((inter.user, "<i8"), (inter.item, "<i8"), (inter.rating, "<f4"), (inter.timestamp, "<i8")):
        digest.update(np.ascontiguousarray(array, dtype=dtype).tobytes())
    digest.update(json.dumps([ds.user_ids, ds.item_ids]).encode())
    return digest.hexdigest()
