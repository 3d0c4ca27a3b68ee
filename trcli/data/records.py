"""Canonical records, the one format every stage after `prep` reads.

    paired    {id, prompt, chosen, rejected}          DPO / IPO (and KTO, split in two)
    unpaired  {id, prompt, completion, label: bool}   KTO
    sft       {id, prompt, completion}                SFT

`prep` saves them as a ``datasets.DatasetDict`` at ``RUN/data``; the kind follows from the columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trcli.errors import DataError

FIELDS = {
    "paired": ("prompt", "chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
    "sft": ("prompt", "completion"),
}


class Drop(Exception):
    """A well-formed input row that yields no usable record; `prep` counts it by ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class SourceOptions:
    """What a source converter needs besides the row. ``kind`` is the kind asked for ('auto' until
    the first record fixes it); a converter may still return paired records for 'unpaired' or
    'sft', which `prep` then converts."""

    kind: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    template: str | None = None
    tokenizer: Any = None


def record_id(row: dict, where: str) -> str:
    """A JSONL record's id (generate's prompts, judge's generations): its own, else its line
    number (``where`` is "path:line")."""
    return str(row.get("id", where.rsplit(":", 1)[1]))


def drop_reason(record: dict) -> str | None:
    """Why a canonical record is unusable: an empty text, or a pair with nothing to prefer."""
    if any(not record[f].strip() for f in ("prompt", "chosen", "rejected", "completion") if f in record):
        return "empty"
    if "chosen" in record and record["chosen"] == record["rejected"]:
        return "identical"
    return None


def kind_of(columns) -> str:
    columns = set(columns)
    for kind in ("paired", "unpaired", "sft"):
        if set(FIELDS[kind]) <= columns:
            return kind
    raise DataError(f"dataset columns {sorted(columns)} match no record kind "
                    f"(need one of {', '.join('/'.join(f) for f in FIELDS.values())})")


def load_prepped(path: str | Path):
    """Load a `prep` output: the run directory or its ``data`` subdirectory."""
    from datasets import DatasetDict, load_from_disk

    path = Path(path)
    if (path / "data").is_dir():
        path = path / "data"
    if not path.is_dir():
        raise DataError(f"{path}: no prepared dataset here (run `trcli prep` first)")
    try:
        data = load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a wrong directory
        raise DataError(f"{path}: not a saved dataset ({exc.__class__.__name__})") from None
    if not isinstance(data, DatasetDict):
        data = DatasetDict({"train": data})
    return data


def paired_to_unpaired(rows: list[dict]) -> list[dict]:
    """Each pair becomes one desirable and one undesirable example (KTO on paired data)."""
    out = []
    for row in rows:
        out.append({"id": f"{row['id']}:chosen", "prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"id": f"{row['id']}:rejected", "prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


def paired_to_sft(rows: list[dict]) -> list[dict]:
    """SFT on the preferred responses, as the paper's SFT stage does."""
    return [{"id": row["id"], "prompt": row["prompt"], "completion": row["chosen"]} for row in rows]


def as_kind(dataset, kind: str) -> list[dict]:
    """Rows of a prepared split as ``kind`` records, converting paired data when needed."""
    have = kind_of(dataset.column_names)
    rows = dataset.to_list()
    if have == kind:
        return rows
    if have == "paired" and kind == "unpaired":
        return paired_to_unpaired(rows)
    if have == "paired" and kind == "sft":
        return paired_to_sft(rows)
    raise DataError(f"this stage needs {kind} records but the dataset holds {have} records")


def rendering(path: str | Path) -> str | None:
    """The chat template (its fingerprint) `prep` rendered a prepared dataset with; None for plain text
    (also for data prepared before trcli recorded it)."""
    import json

    path = Path(path)
    for run_dir in (path, path.parent):
        manifest = run_dir / "trcli-run.json"
        if (run_dir / "data").is_dir() and manifest.is_file():
            try:
                return json.loads(manifest.read_text(encoding="utf-8")).get("outputs", {}).get("chat_template")
            except (OSError, ValueError):
                return None
    return None
