"""``python -m offline recommend``: top-K for many users from a bundle, written as CSV or Parquet.

The rows come from the core's engine, the service's own (``Engine.recommend_batch``, what ``POST /recommend/batch``
runs), so a file written here holds what the service would answer for the same bundle and state: for
e-mails, precomputed feeds or offline analysis. Users are answered in batches (one tower call, one
batched ANN query, one ranker pass each); with ``--events`` the service's recorded events and catalogue
changes are applied first, as a replica applies them at start-up.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from offline.data import DataError
from recsys.bundle import BundleError, read_bundle, resolve
from recsys.errors import RecsysError
from recsys.state.open import read_source

COLUMNS = ("user_id", "rank", "item_id", "title", "score", "recall_score", "recall_rank", "source")
FORMATS = (".csv", ".parquet")
ROW_GROUP = 100_000


def load_engine(root: Path, events: str | None = None, redis_prefix: str = "recsys"):
    """The engine the service would build for the bundle at ``root`` (a bundle root or a version directory)."""
    from recsys.engine.engine import Engine  # imported here so that training never loads the engine

    try:
        engine = Engine.from_bundle(read_bundle(resolve(root)))
    except BundleError as err:
        raise DataError(root, str(err)) from err
    if events:
        try:
            logged = read_source(events, redis_prefix)
        except OSError as err:
            raise DataError(events, f"cannot read it as --events ({err})") from err
        engine.changes.load(logged.items)
        engine.history = logged.histories(after=engine.meta.events_after(logged.source))
    return engine


def read_users(spec: str, engine) -> list[str]:
    """``all`` (the bundle's users) or a file of user ids: one per line (an optional ``user_id`` first line),
    or a CSV whose header names a ``user_id`` column. Blank lines are skipped."""
    if spec == "all":
        return list(engine.bundle.catalog["user_ids"])
    path = Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read the user list ({err})") from err
    header = [name.strip() for name in lines[0].split(",")] if lines else []
    if len(header) > 1 and "user_id" not in header:
        raise DataError(path, "line 1: a CSV user list needs a 'user_id' column")
    column = header.index("user_id") if "user_id" in header else None
    users = []
    for number, line in enumerate(lines[1:] if column is not None else lines, start=2 if column is not None else 1):
        fields = line.split(",")
        if line.strip() and column is not None and len(fields) <= column:
            raise DataError(path, f"{len(fields)} fields, no user_id (column {column + 1})", line=number)
        user = (fields[column] if column is not None else line).strip()
        if user:
            users.append(user)
    if not users:
        raise DataError(path, "no user ids in the file")
    return users


def recommend_rows(engine, users: list[str], opts, batch_size: int, progress: bool = True) -> Iterator[dict]:
    """One result per user (``Engine.recommend_batch``'s), ``batch_size`` users per engine pass."""
    with tqdm(total=len(users), unit="user", disable=not progress, desc="recommend") as bar:
        for start in range(0, len(users), batch_size):
            chunk = users[start : start + batch_size]
            batch = engine.recommend_batch(chunk, opts)
            for user, answer in zip(batch.user_ids, batch.answers):
                yield {"user_id": str(user), "error": answer.message} if isinstance(answer, RecsysError) else answer
            bar.update(len(chunk))


def flatten(result: dict) -> list[tuple]:
    """A user's items as rows of ``COLUMNS`` (rank from 1; score: the re-ranker's, else the recall score,
    else the popularity of a fallback)."""
    rows = []
    for rank, item in enumerate(result["items"], start=1):
        score = next((item[key] for key in ("ranking_score", "recall_score", "popularity") if item[key] is not None), None)
        rows.append((result["user_id"], rank, item["item_id"], item["title"], score, item["recall_score"],
                     item["recall_rank"], item["source"] or "popularity"))
    return rows


def write(results: Iterator[dict], out: Path) -> tuple[int, list[dict]]:
    """Write every answered user's rows to ``out`` (written beside it, then renamed: no half file);
    returns how many users were written and the failed results."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        written, failed = (_write_csv if out.suffix == ".csv" else _write_parquet)(results, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)
    return written, failed


def _write_csv(results: Iterator[dict], tmp: Path) -> tuple[int, list[dict]]:
    failed: list[dict] = []
    written = 0
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for rows in _answered(results, failed):
            writer.writerows(rows)
            written += 1
    return written, failed


def _write_parquet(results: Iterator[dict], tmp: Path) -> tuple[int, list[dict]]:
    """One row group per ``ROW_GROUP`` rows, so memory stays flat however many users are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(list(zip(COLUMNS, [pa.string(), pa.int32(), pa.string(), pa.string(), pa.float64(), pa.float64(),
                                          pa.int32(), pa.string()])))
    failed: list[dict] = []
    written, pending = 0, []
    with pq.ParquetWriter(tmp, schema) as writer:
        for rows in _answered(results, failed):
            pending += rows
            written += 1
            if len(pending) >= ROW_GROUP:
                writer.write_table(pa.Table.from_pylist([dict(zip(COLUMNS, r)) for r in pending], schema))
                pending = []
        writer.write_table(pa.Table.from_pylist([dict(zip(COLUMNS, r)) for r in pending], schema))
    return written, failed


def _answered(results: Iterator[dict], failed: list[dict]) -> Iterator[list[tuple]]:
    """Each answered user's rows; the failed results are collected into ``failed``."""
    for result in results:
        if result.get("error") is not None:
            failed.append(result)
        else:
            yield flatten(result)
