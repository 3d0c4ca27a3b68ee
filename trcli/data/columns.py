"""Generic source: rows that already hold the canonical fields, under their own column names.

Also the field checks every source converter shares, so that each error names the field.
"""

from __future__ import annotations

from trcli.data.files import RowError
from trcli.data.records import FIELDS, SourceOptions

# CSV cannot carry booleans; these spellings of a KTO label are unambiguous.
_LABELS = {"true": True, "1": True, "false": False, "0": False}


def text(row: dict, name: str, where: str, shown: str | None = None) -> str:
    """``row[name]`` as a string, or a RowError naming the field (as ``shown`` if given)."""
    if name not in row or row[name] is None:
        raise RowError(where, f"missing field '{shown or name}'")
    if not isinstance(row[name], str):
        raise RowError(where, f"field '{shown or name}' must be a string, not {type(row[name]).__name__}")
    return row[name]


def label(value, where: str, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise RowError(where, f"field '{name}' must be true or false, not {value!r}"[:200])


def rename(row: dict, where: str, columns: dict[str, str]) -> dict:
    """The row with mapped source columns under their canonical names (for the layout sources)."""
    row = dict(row)
    for canonical, column in columns.items():
        if column not in row:
            raise RowError(where, f"missing field '{column}' (mapped to {canonical} by --columns)")
        row[canonical] = row.pop(column)
    return row


def detect(row: dict, want: str, col=lambda f: f) -> str:
    """The record kind a row provides: the wanted kind if its fields are there, else paired rows
    (convertible to unpaired / sft), else with 'auto' the first kind that fits. A row that fits
    nothing is read as the wanted (or paired) kind, so that the error names a missing field."""
    def has(kind: str) -> bool:
        return all(col(f) in row for f in FIELDS[kind])

    if want != "auto" and has(want):
        return want
    if has("paired"):
        return "paired"
    if want == "auto":
        return next((k for k in ("unpaired", "sft") if has(k)), "paired")
    return want


def convert(row: dict, where: str, opts: SourceOptions) -> dict:
    """Map ``row`` to a canonical record. Raises RowError naming the missing or mistyped field."""
    def col(field: str) -> str:
        return opts.columns.get(field, field)

    kind = detect(row, opts.kind, col)
    record = {}
    for field in FIELDS[kind]:
        if field == "label":
            if col(field) not in row:
                raise RowError(where, f"missing field '{col(field)}'")
            record[field] = label(row[col(field)], where, col(field))
        else:
            record[field] = text(row, col(field), where)
    record["id"] = None if row.get(col("id")) in (None, "") else str(row[col("id")])
    return record
