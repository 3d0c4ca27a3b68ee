"""prep: input data -> canonical records saved as a DatasetDict at RUN/data.

Reads every row first and writes nothing until the whole input is known to be good, so a bad
file leaves the output path untouched.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from trcli.config import Config
from trcli.data import columns
from trcli.data.files import RowError, read_jsonl
from trcli.data.records import FIELDS, paired_to_sft, paired_to_unpaired
from trcli.errors import DataError, UsageError
from trcli.runs import Run, atomic_path


def _rows(cfg: Config):
    data = cfg.data
    if data.input is None:
        raise UsageError("prep needs an input: --input FILE (or data.input in the recipe)")
    if data.source == "jsonl":
        for where, row in read_jsonl(data.input):
            if isinstance(row, RowError):
                yield where, row
                continue
            try:
                yield where, columns.convert(row, where, data.columns, data.kind)
            except RowError as err:
                yield where, err
        return
    raise UsageError(f"data.source={data.source} is not supported yet")


def _drop_reason(record: dict) -> str | None:
    texts = [record[f] for f in ("prompt", "chosen", "rejected", "completion") if f in record]
    if any(not t.strip() for t in texts[1:]) or not record["prompt"].strip():
        return "empty"
    if "chosen" in record and record["chosen"] == record["rejected"]:
        return "identical"
    return None


def run(cfg: Config) -> dict:
    if not cfg.output:
        raise UsageError("prep needs --output DIR")
    rows_in, dropped, records = 0, Counter(), []
    for where, item in _rows(cfg):
        rows_in += 1
        if isinstance(item, RowError):
            if cfg.data.on_error == "fail":
                raise DataError(f"{item} (use --on-error skip to skip bad rows)")
            dropped["malformed"] += 1
            continue
        reason = _drop_reason(item)
        if reason:
            dropped[reason] += 1
            continue
        item["id"] = item["id"] or f"{len(records)}"
        records.append(item)

    kind = next(k for k in FIELDS if set(FIELDS[k]) <= set(records[0])) if records else None
    if cfg.data.kind in ("unpaired", "sft") and kind == "paired":
        records = paired_to_unpaired(records) if cfg.data.kind == "unpaired" else paired_to_sft(records)
        kind = cfg.data.kind
    if not records:
        raise DataError(f"{cfg.data.input}: no usable rows ({rows_in} read, dropped {dict(dropped)})")

    from datasets import Dataset, DatasetDict

    dataset = Dataset.from_list([{"id": r["id"], **{f: r[f] for f in FIELDS[kind]}} for r in records])
    if cfg.data.test_size > 0 and len(dataset) >= 2:
        split = dataset.train_test_split(test_size=cfg.data.test_size, seed=cfg.data.seed)
        splits = DatasetDict({"train": split["train"], "test": split["test"]})
    else:
        splits = DatasetDict({"train": dataset})

    run_dir = Run("prep", cfg.output, cfg)
    run_dir.add_input("input", cfg.data.input)
    with atomic_path(Path(cfg.output) / "data") as tmp:
        splits.save_to_disk(str(tmp))
    summary = {
        "rows_in": rows_in,
        "rows_out": len(records),
        "dropped": dict(dropped),
        "kind": kind,
        "splits": {name: len(ds) for name, ds in splits.items()},
    }
    run_dir.finish(data="data", report=summary)
    return summary
