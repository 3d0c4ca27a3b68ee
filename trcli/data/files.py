"""Read input rows from local files (or the hub) with errors that name file, line and field.

Each file reader yields ``(where, row)`` where ``where`` is 'file:line' (or 'file:row N') and
``row`` is a dict, or a :class:`RowError` for a row that cannot be read. Problems with the file
as a whole (missing, unreadable, not the format it claims) raise :class:`DataError` instead.
:func:`read_file` and :func:`read_hub` add the split each row belongs to.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

from trcli.errors import DataError

FORMATS = ("jsonl", "json", "csv", "parquet")


class RowError(Exception):
    """A malformed input row; ``where`` is 'file:line' (or 'file:row N')."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


Rows = Iterator[tuple[str, "dict | RowError"]]


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


# What a damaged file raises while it is read: gzip.BadGzipFile (not gzip) is an OSError, a
# truncated .gz an EOFError, corrupt compressed data a zlib.error.
_READ_ERRORS = (OSError, EOFError, zlib.error)


def _unreadable(path: Path, exc: BaseException, after_line: int | None = None) -> DataError:
    what = str(exc) or exc.__class__.__name__
    if path.suffix == ".gz":
        if isinstance(exc, gzip.BadGzipFile):
            what = f"not a gzip file ({exc}); rename it without .gz if it is not compressed"
        elif isinstance(exc, (EOFError, zlib.error)):
            what = f"damaged or truncated gzip file ({exc})"
    where = f"{path}:{after_line + 1}" if after_line else str(path)
    return DataError(f"{where}: cannot read ({what})")


def _read_bytes(path: Path) -> bytes:
    try:
        with _open_binary(path) as fh:
            return fh.read()
    except _READ_ERRORS as exc:
        raise _unreadable(path, exc) from None


def _bad_utf8_field(value, name: str = "") -> str | None:
    """Name of the first string (at any depth) holding bytes that were not UTF-8. Text is decoded
    with 'surrogateescape', so such bytes survive as lone surrogates and can be blamed on one row."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return name
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _bad_utf8_field(item, f"{name}.{key}" if name else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _bad_utf8_field(item, f"{name}[{i}]")
            if found:
                return found
    return None


def _checked(where: str, row) -> "dict | RowError":
    if not isinstance(row, dict):
        return RowError(where, "expected a JSON object")
    try:
        bad = _bad_utf8_field(row)
    except RecursionError:
        return RowError(where, _TOO_DEEP)
    return RowError(where, f"invalid UTF-8 in field '{bad}'") if bad else row


_TOO_DEEP = "JSON nested too deeply"


def read_jsonl(path: str | Path) -> Rows:
    """One JSON object per non-blank line (.jsonl or .jsonl.gz)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    number = 0
    try:
        with _open_binary(path) as fh:
            for number, line in enumerate(fh, start=1):
                where = f"{path}:{number}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield where, RowError(where, f"invalid UTF-8 at byte {exc.start}")
                    continue
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    yield where, RowError(where, f"malformed JSON ({exc.msg}, column {exc.colno})")
                    continue
                except RecursionError:
                    yield where, RowError(where, _TOO_DEEP)
                    continue
                yield where, _checked(where, row)
    except _READ_ERRORS as exc:  # the file itself, past its last whole line: no row can say it
        raise _unreadable(path, exc, after_line=number) from None


def read_json(path: str | Path) -> Rows:
    """A JSON array of objects. Elements are decoded one by one so that each row knows its line;
    a syntax error anywhere makes the rest unreadable, so it is a file error."""
    path = Path(path)
    text = _read_bytes(path).decode("utf-8", errors="surrogateescape")
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def malformed(pos: int, what: str) -> DataError:
        return DataError(f"{path}:{line_of(pos)}: malformed JSON ({what})")

    pos = len(text) - len(text.lstrip())
    if pos == len(text):
        return
    if text[pos] != "[":
        raise malformed(pos, "expected a JSON array of objects; use --source jsonl for one object per line")
    pos += 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == "]":
            break
        start = pos
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise malformed(exc.pos, exc.msg) from None
        except RecursionError:
            raise malformed(start, _TOO_DEEP) from None
        where = f"{path}:{line_of(start)}"
        yield where, _checked(where, row)
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
        elif pos < len(text) and text[pos] == "]":
            break
        else:
            raise malformed(pos, "expected ',' or ']'")
    if text[pos + 1:].strip():
        raise malformed(pos + 1, "extra data after the array")


def read_csv(path: str | Path) -> Rows:
    """A CSV file with a header row; every value is a string."""
    path = Path(path)
    text = _read_bytes(path).decode("utf-8-sig", errors="surrogateescape")
    reader = csv.DictReader(text.splitlines(keepends=True), strict=True)
    try:
        header = reader.fieldnames
        if not header:
            return
        start = reader.line_num + 1
        for row in reader:
            where = f"{path}:{start}"  # the line the row starts on (quoted cells may span lines)
            start = reader.line_num + 1
            if None in row:  # more cells than header columns
                yield where, RowError(where, f"{len(header) + len(row[None])} cells, header has {len(header)}")
                continue
            missing = [k for k, v in row.items() if v is None]
            if missing:
                yield where, RowError(where, f"missing field '{missing[0]}' (row has too few cells)")
                continue
            yield where, _checked(where, row)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_parquet(path: str | Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path}:row {number}", row


def suffix_format(path: str | Path) -> str | None:
    """The format a file's suffix names (``x.csv``, ``x.jsonl.gz`` -> jsonl), or None."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() != ".gz"]
    fmt = suffixes[-1].lstrip(".") if suffixes else None
    return fmt if fmt in FORMATS else None


def read_file(path: str | Path, fmt: str | None = None) -> Iterator[tuple[str, str, "dict | RowError"]]:
    """(split, where, row) of a local file, in ``fmt`` or the format its suffix names."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if fmt is None:
        suffixes = [s for s in path.suffixes if s != ".gz"]
        fmt = suffix_format(path) or ("jsonl" if not suffixes else suffixes[-1].lstrip("."))
        if fmt not in FORMATS:
            raise DataError(f"{path}: cannot tell the format from '{path.name}'; "
                            f"use --source {'|'.join(FORMATS)}")
    reader = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet}[fmt]
    for where, row in reader(path):
        yield "train", where, row


def read_hub(name: str, subset: str | None, split: str | None, revision: str | None,
             data_dir: str | None = None, splits: dict[str, str] | None = None,
             ) -> Iterator[tuple[str, str, "dict | RowError"]]:
    """(split, where, row) of a dataset on the Hugging Face hub (or in its cache).

    With ``split`` that split is read, as 'train'. Otherwise ``splits`` maps the dataset's split
    names to 'train' / 'test' (default: train, and test or else validation); others are skipped.
    """
    from trcli import hub

    if offline := hub.unreachable(name):  # without asking: the hub's retries took ~25 s to fail
        raise DataError(f"cannot load dataset '{name}': {offline}: pass a local file with --input, set "
                        "HF_HUB_OFFLINE=1 to use the local cache's copy, or HF_ENDPOINT=URL for a mirror")
    import datasets

    try:
        loaded = datasets.load_dataset(name, subset, data_dir=data_dir, split=split, revision=revision)
    except Exception as exc:  # offline, unknown id, bad config or split: datasets raises many types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"cannot load dataset '{name}' from the hub: {exc.__class__.__name__}: {first} "
                        "(offline? pass a local file with --input)") from None
    if isinstance(loaded, datasets.Dataset):
        chosen = {"train": ("train", loaded)}
    else:
        names = list(loaded)
        if splits is None:
            held_out = next((n for n in ("test", "validation", "valid") if n in names), None)
            splits = {"train": "train", **({held_out: "test"} if held_out else {})}
        chosen = {hub: (out, loaded[hub]) for hub, out in splits.items() if hub in loaded}
        if "train" not in [out for out, _ in chosen.values()]:
            raise DataError(f"dataset '{name}' has no train split (splits: {', '.join(names)}); pick one with --split")
    for hub_split, (out, dataset) in chosen.items():
        for number, row in enumerate(dataset, start=1):
            yield out, f"{name}[{hub_split}]:row {number}", row
