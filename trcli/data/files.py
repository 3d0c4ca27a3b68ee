"""Read input rows from local files (or the hub) with errors that name file, line and field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from trcli.errors import DataError


class RowError(Exception):
    """A malformed input row; ``where`` is 'file:line' (or 'file:row N')."""

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where, self.problem = where, problem


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return raw


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict | RowError]]:
    """Yield (where, row) per non-blank line; a bad line yields (where, RowError) instead."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    with _open_text(path) as fh:
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
            if not isinstance(row, dict):
                yield where, RowError(where, "expected a JSON object")
                continue
            yield where, row
