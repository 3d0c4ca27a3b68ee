"""Generic source: rows that already hold the canonical fields, under their own column names."""

from __future__ import annotations

from trcli.data.files import RowError
from trcli.data.records import FIELDS


def convert(row: dict, where: str, columns: dict[str, str], kind: str) -> dict:
    """Map ``row`` to a canonical record of ``kind`` ('auto' picks the first kind whose fields
    are all present). Raises RowError naming the missing or mistyped field."""
    def col(field: str) -> str:
        return columns.get(field, field)

    if kind == "auto":
        kind = next((k for k in ("paired", "unpaired", "sft")
                     if all(col(f) in row for f in FIELDS[k])), "paired")
    record = {}
    for field in FIELDS[kind]:
        name = col(field)
        if name not in row:
            raise RowError(where, f"missing field '{name}'")
        value = row[name]
        if field == "label":
            if not isinstance(value, bool):
                raise RowError(where, f"field '{name}' must be true or false")
        elif not isinstance(value, str):
            raise RowError(where, f"field '{name}' must be a string")
        record[field] = value
    record["id"] = str(row.get(col("id"), "")) or None
    return record
