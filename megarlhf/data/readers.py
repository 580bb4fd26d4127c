"""Row readers: one per data source, each yielding rows with their location; one loop
(`Records`) maps columns, parses rows into records and fails or skips bad ones.

Layer: data/ (imports stdlib, megarlhf.config and data.jsonl; pyarrow and `datasets`
only when a source needs them).

Sources, picked from the name (and a file's first bytes):
  - JSONL (`.jsonl`, or a `.json` file whose first character is not `[`): one object per
    line, located as `file:line` (lines count from 1, as in an editor);
  - a JSON array (first character `[`): each object located by the line it starts on;
  - Parquet (`PAR1` magic, or a folder of `.parquet` files): record batches, `file row N`;
  - Arrow IPC (`.arrow`, file or stream format, as `datasets` caches write): `file row N`;
  - a `datasets.save_to_disk` folder (it has `state.json`): `folder row N`;
  - `hub:NAME[:CONFIG][@SPLIT]`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT)`, where
    NAME is a Hub id or a local folder of data files; `hub:NAME@SPLIT row N`.
Rows count from 0 (`dataset[N]`, `df.iloc[N]`). Columnar sources are read one record
batch (~1k rows) at a time, so only the tokenized tensors of a file ever sit in memory.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import urlparse

from megarlhf.config.errors import ConfigError, DataError
from megarlhf.data.jsonl import OPTIONAL_COLUMNS, RecordError, json_type

T = TypeVar("T")
ON_ERROR = ("error", "skip")
BATCH_ROWS = 1024
"""Rows converted to Python per record batch of a columnar source."""
_BOM = b"\xef\xbb\xbf"  # pandas (encoding='utf-8-sig') and Windows tools start files with it
_MISSING = object()


@dataclass(frozen=True)
class Location:
    """Where a row came from: `file:line` (JSON text, from 1) or `file row N` (columnar, from 0)."""

    source: str
    index: int
    unit: Literal["line", "row"]

    def __str__(self) -> str:
        return f"{self.source}:{self.index}" if self.unit == "line" else f"{self.source} row {self.index}"


Row = tuple[Location, "dict | RecordError"]
"""A row as a dict (column -> Python value), or the RecordError of a row that is not one."""


@dataclass
class RowSource:
    """The rows of one source, not yet read."""

    rows: Iterator[Row]
    """Rows in file order."""
    total: int | None
    """Number of rows where the format stores it (Parquet, Arrow files, datasets), else None."""


# ------------------------------------------------------------------------- dispatch


def open_rows(source: str | Path) -> RowSource:
    """The row reader for `source` (see the module docstring). A source that does not exist
    or cannot be opened is a DataError naming it; bad rows come later, as RecordErrors."""
    name = str(source)
    if name.startswith("hub:"):
        return _hub_rows(name)
    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(
                f"{name}: a datasets.DatasetDict folder with splits {splits}; point the file at one "
                f"split's folder, e.g. {path / (splits[0] if splits else 'train')}"
            )
        if (path / "state.json").is_file():
            return _saved_dataset_rows(name)
        parquet = sorted(path.glob("*.parquet"))
        if parquet:
            return _parquet_rows(parquet)
        raise DataError(
            f"{name}: a folder that is neither a datasets.save_to_disk folder (no state.json) nor a "
            "folder of .parquet files"
        )
    if not path.is_file():
        raise DataError(
            f"{name}: no such file (expected JSONL, a JSON array, Parquet, Arrow, a datasets.save_to_disk "
            "folder or hub:NAME@SPLIT)"
        )
    with open(path, "rb") as f:
        head = f.read(4096)  # magic bytes, or the first character of JSON text
    if head.startswith(b"PAR1"):
        return _parquet_rows([path])
    if head.startswith(b"ARROW1") or path.suffix == ".arrow":
        return _arrow_rows(path)
    first = head.removeprefix(_BOM).lstrip()[:1]
    if first == b"[" or (not first and path.suffix == ".json"):
        return RowSource(_json_array_rows(path), None)
    return RowSource(_jsonl_rows(path), None)


# ------------------------------------------------------------------------- JSON text


def loads_object(text: str) -> dict:
    """One JSON object, or RecordError naming what it is instead."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON: {e.msg} at column {e.colno}") from e
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {json_type(obj)}")
    return obj


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:
                raw = raw.removeprefix(_BOM)
            where = Location(str(path), lineno, "line")
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield where, RecordError(f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            if not text:
                continue  # blank lines (e.g. a trailing newline) are not records
            try:
                yield where, loads_object(text)
            except RecordError as e:
                yield where, e


def _json_array_rows(path: Path) -> Iterator[Row]:
    """Objects of a top-level JSON array, decoded one at a time from the text (the file's
    text is in memory, its objects are not). A syntax error ends the file: without line
    boundaries nothing after it can be located, so it fails even under on_error=skip."""
    data = path.read_bytes().removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    del data  # the text alone stays while the rows are read
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos, line = 0, 1

    def skip(i: int) -> int:
        nonlocal line
        j = ws.match(text, i).end()
        line += text.count("\n", i, j)
        return j

    def fail(what: str) -> DataError:
        return DataError(f"{path}:{line}: {what}; a JSON array file cannot be read past it (or use JSONL)")

    pos = skip(0)
    if text[pos : pos + 1] != "[":
        raise fail("expected a JSON array of objects")
    pos = skip(pos + 1)
    if text[pos : pos + 1] == "]":
        return
    while True:
        start_line = line
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            line = e.lineno
            raise fail(f"invalid JSON: {e.msg} at column {e.colno}") from None
        line += text.count("\n", pos, end)
        where = Location(str(path), start_line, "line")
        yield where, obj if isinstance(obj, dict) else RecordError(f"expected a JSON object, got {json_type(obj)}")
        pos = skip(end)
        sep = text[pos : pos + 1]
        if sep == "]":
            if text[skip(pos + 1) :]:
                raise fail("text after the closing ']'")
            return
        if sep != ",":
            raise fail(f"expected ',' or ']' after an array element, got {sep or 'the end of the file'!r}")
        pos = skip(pos + 1)


# ------------------------------------------------------------------------- columnar


def _import(module: str, pip: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise ConfigError(f"reading this data needs the `{module.split('.')[0]}` package: pip install {pip}") from None


def _batched_rows(batches: Iterable, source: str) -> Iterator[Row]:
    """Rows of Arrow record batches (or tables), converted to Python one batch at a time."""
    n = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield Location(source, n, "row"), row
            n += 1


def _parquet_rows(paths: list[Path]) -> RowSource:
    pq = _import("pyarrow.parquet", "pyarrow")
    files = []
    for p in paths:
        try:
            files.append(pq.ParquetFile(p))
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a damaged file
            raise DataError(f"{p}: not a readable Parquet file ({e})") from None
    rows = (
        row for p, f in zip(paths, files) for row in _batched_rows(f.iter_batches(batch_size=BATCH_ROWS), str(p))
    )
    return RowSource(rows, sum(f.metadata.num_rows for f in files))


def _arrow_rows(path: Path) -> RowSource:
    pa = _import("pyarrow", "pyarrow")
    source = pa.memory_map(str(path))
    try:
        reader = pa.ipc.open_file(source)  # random-access format (pyarrow.feather / ipc.new_file)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except pa.ArrowInvalid:
        source.seek(0)
        try:
            batches = pa.ipc.open_stream(source)  # stream format: what `datasets` writes
        except pa.ArrowInvalid as e:
            raise DataError(f"{path}: not an Arrow IPC file or stream ({e})") from None
        total = None
    return RowSource(_batched_rows(batches, str(path)), total)


def _dataset_rows(dataset, source: str) -> RowSource:
    """Rows of a `datasets.Dataset` (memory-mapped Arrow), one Arrow table per batch."""
    batches = dataset.with_format("arrow").iter(batch_size=BATCH_ROWS)
    return RowSource(_batched_rows(batches, source), len(dataset))


def _saved_dataset_rows(name: str) -> RowSource:
    datasets = _import("datasets", "'megarlhf[datasets]' (or: pip install datasets)")
    try:
        dataset = datasets.load_from_disk(name)
    except Exception as e:
        raise DataError(f"{name}: datasets.load_from_disk failed: {e}") from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(f"{name}: holds {type(dataset).__name__}, expected one split (a datasets.Dataset)")
    return _dataset_rows(dataset, name)


def parse_hub(name: str) -> tuple[str, str | None, str]:
    """`hub:NAME[:CONFIG][@SPLIT]` -> (NAME, CONFIG or None, SPLIT, default 'train')."""
    spec = name.removeprefix("hub:")
    spec, _, split = spec.partition("@")
    path, _, config = spec.partition(":")
    if not path:
        raise ConfigError(f"{name!r}: expected hub:NAME[:CONFIG][@SPLIT], e.g. hub:openai/gsm8k:main@train")
    return path, config or None, split or "train"


def _offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(v in ("1", "true", "yes", "on") for v in flags)


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hub cannot be reached (None if a TCP connection opens): checked up front so
    that a machine without a network fails in seconds, not after minutes of retries."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        return f"cannot connect to {endpoint}: {e}"
    return None


def _hub_rows(name: str) -> RowSource:
    path, config, split = parse_hub(name)
    datasets = _import("datasets", "'megarlhf[datasets]' (or: pip install datasets)")
    local = Path(path).exists()
    call = f"load_dataset({path!r}, " + (f"{config!r}, " if config else "") + f"split={split!r})"
    if not local and not _offline() and (why := _hub_unreachable()) is not None:
        raise DataError(
            f"{name}: the Hugging Face Hub is unreachable ({why}). On a machine with a network run "
            f"python -c \"import datasets; datasets.{call}.save_to_disk('DIR')\" and point the file at DIR, "
            "or set HF_HUB_OFFLINE=1 to load it from the local Hugging Face cache"
        )
    try:
        dataset = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # DatasetNotFoundError, ConnectionError, a bad split, ...: all name the dataset
        raise DataError(f"{name}: datasets.{call} failed: {e}") from None
    return _dataset_rows(dataset, name)


# ------------------------------------------------------------------------- columns


def lookup(row: dict, key: str) -> Any:
    """row[key]; a dotted key (`reward_model.ground_truth`) walks nested objects unless the
    row has a column of that exact name. Returns _MISSING when absent."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def map_columns(row: dict, columns: Mapping[str, str]) -> dict:
    """The row with each record key (`prompt`, `answer`, ...) read from its column.

    `columns` maps record key -> column (dotted for nested). A mapped column that is a
    top-level column is renamed (it leaves the row's other keys, which become metadata); a
    column of the record key's own name is replaced. A mapped optional key (`answer`) that
    is absent or null is an error: it was asked for, and a reward without it is silently 0.
    """
    out = row
    for key, column in columns.items():
        if column == key:
            continue
        if out is row:
            out = dict(row)
        value = lookup(row, column)
        out.pop(column, None)
        out.pop(key, None)
        if value is _MISSING or (value is None and key in OPTIONAL_COLUMNS):
            if key in OPTIONAL_COLUMNS:
                state = "missing" if value is _MISSING else "null"
                raise RecordError(f"column {column!r} (data.{key}_key) is {state} (columns present: {sorted(row)})")
            continue  # the parser names the missing record key; Records adds the column
        out[key] = value
    return out


# ------------------------------------------------------------------------- records


class Records(Generic[T]):
    """Iterate `(Location, record)` over a source's good rows, parsed with `parse`.

    A bad row raises `DataError("<location>: <reason>")` under on_error="error"; under
    "skip" it is dropped and counted by kind (`skipped`), with the first of each kind kept
    (`first_skipped`) so the summary can point at it. Callers that reject records later
    (tokenization, length) report through `reject` / `drop` so one tally covers the file.
    """

    def __init__(
        self, source: str | Path, parse: Callable[[dict], T], on_error: Literal["error", "skip"] = "error",
        columns: Mapping[str, str] | None = None,
    ):  # fmt: skip
        if on_error not in ON_ERROR:
            raise ConfigError(f"on_error={on_error!r}; expected one of {ON_ERROR}")
        self.source = str(source)
        self.parse, self.on_error = parse, on_error
        self.columns = {k: v for k, v in (columns or {}).items() if v != k}
        self._rows = open_rows(source)
        self.total = self._rows.total
        self.skipped: Counter[str] = Counter()
        self.first_skipped: dict[str, str] = {}

    def __iter__(self) -> Iterator[tuple[Location, T]]:
        for where, row in self._rows.rows:
            try:
                if isinstance(row, RecordError):
                    raise row
                record = self.parse(map_columns(row, self.columns) if self.columns else row)
            except RecordError as e:
                self.reject(where, e)
                continue
            yield where, record

    def reject(self, where: Location, error: RecordError) -> None:
        """A bad record: raise DataError, or count it (on_error="skip")."""
        message = f"{where}: {error}"
        column = self.columns.get(error.column or "")
        if column is not None:
            message += f" (column {column!r}, set by data.{error.column}_key)"
        if self.on_error == "error":
            raise DataError(message) from None
        self.drop(where, error.kind, message)

    def drop(self, where: Location, kind: str, message: str | None = None) -> None:
        """Count a record left out on purpose (e.g. over max_length under truncation=drop)."""
        self.skipped[kind] += 1
        self.first_skipped.setdefault(kind, message or str(where))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """`'0 skipped'`, or `'3 skipped: 2 bad rows (first: f:7: ...); 1 ...'`."""
        if not self.skipped:
            return "0 skipped"
        parts = [f"{n} {kind} (first: {self.first_skipped[kind]})" for kind, n in self.skipped.most_common()]
        return f"{self.num_skipped} skipped: " + "; ".join(parts)


def read_jsonl(
    path: str | Path, parse: Callable[[dict], T], on_error: Literal["error", "skip"] = "error"
) -> tuple[list[tuple[int, T]], int]:
    """Every record of a file at once: ([(line or row number, record), ...], number skipped).
    For small files and tests; datasets stream through `Records`."""
    records = Records(path, parse, on_error)
    out = [(where.index, record) for where, record in records]
    return out, records.num_skipped
