"""prep: input data -> canonical records saved as a DatasetDict at RUN/data, and a report.

Reads every row first and writes nothing until the whole input is known to be good, so a bad
file leaves the output path untouched.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

from trcli.config import Config
from trcli.data import chat, columns, hh, tldr
from trcli.data.files import FORMATS, RowError, read_file, read_hub
from trcli.data.records import FIELDS, Drop, SourceOptions, drop_reason, kind_of, paired_to_sft, paired_to_unpaired
from trcli.errors import DataError, UsageError
from trcli.progress import Progress
from trcli.runs import Run, atomic_path
from trcli.tokens import SHORT, Encoder, template_id

CONVERTERS = {"hh": hh.convert, "tldr": tldr.convert, "ultrafeedback": chat.convert, "chat": chat.convert}
# What --source X reads when no --input is given: (hub id, config).
HUB_DEFAULTS = {"hh": (hh.HUB_ID, None), "tldr": (tldr.HUB_ID, tldr.HUB_SUBSET),
                "ultrafeedback": (chat.ULTRAFEEDBACK, None)}
CHAT_SOURCES = ("ultrafeedback", "chat")
PERCENTILES = (50, 90, 99)


def _rows(cfg: Config, name: str):
    """(split, where, row) from a local file or, for hub ids, through datasets.load_dataset.
    The default source (auto) is a local file in the format its suffix names, jsonl when it names
    none; the format found is recorded as data.source (the manifest says how the input was read)."""
    from trcli.data.files import suffix_format

    data = cfg.data
    if data.source == "auto":
        data.source = suffix_format(name) or "jsonl"
    if data.source in FORMATS:
        return read_file(name, data.source)
    if data.source != "hub" and (Path(name).is_file() or Path(name).suffix.lstrip(".") in (*FORMATS, "gz")):
        return read_file(name)  # a missing file is reported as such, not as an unknown hub id
    subset, data_dir = data.subset, None
    default_id, default_subset = HUB_DEFAULTS.get(data.source, (None, None))
    if name == default_id:
        subset = subset or default_subset
    if data.source == "hh":  # Anthropic/hh-rlhf keeps its subsets in directories, not configs
        subset, data_dir = None, subset
    splits = chat.ultrafeedback_splits(data.kind) if data.source == "ultrafeedback" else None
    return read_hub(name, subset, data.split, data.revision, data_dir=data_dir, splits=splits)


def _tokenizer(cfg: Config):
    """(tokenizer or None, the chat template in force or None)."""
    from trcli.tokens import resolve_chat_template

    name = cfg.model.tokenizer or cfg.model.name_or_path
    if cfg.data.source in CHAT_SOURCES and not name:
        raise UsageError(f"--source {cfg.data.source} renders messages with a chat template: "
                         "pass --model to pick the tokenizer (or set model.tokenizer)")
    if not name:
        if cfg.data.chat_template not in ("auto", "none"):
            raise UsageError("--chat-template PATH renders with a tokenizer: pass --model too")
        return None, None
    from trcli.modeling import load_tokenizer

    tok = load_tokenizer(name)
    template = resolve_chat_template(tok, cfg.data.chat_template)
    if cfg.data.source in CHAT_SOURCES and template is None:
        raise UsageError(f"--source {cfg.data.source} needs a chat template, and tokenizer '{name}' has no chat "
                         "template in force (or --chat-template none was given): pass --chat-template PATH")
    return tok, template


def _split(records: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a fraction of the prompts (not of the rows), so that pairs sharing a prompt, and
    the two halves of a converted pair, never straddle train and test."""
    prompts = sorted({r["prompt"] for r in records})
    random.Random(seed).shuffle(prompts)
    n_test = min(len(prompts) - 1, max(1, round(test_size * len(prompts))))
    held_out = set(prompts[:n_test])
    return [r for r in records if r["prompt"] not in held_out], [r for r in records if r["prompt"] in held_out]


def _percentiles(values: list[int]) -> dict:
    import numpy as np

    arr = np.asarray(values)
    return {**{f"p{q}": int(np.percentile(arr, q)) for q in PERCENTILES}, "max": int(arr.max()),
            "mean": round(float(arr.mean()), 1)}


def _lengths(encoder, records: list[dict], kind: str) -> dict:
    """Token-length percentiles per field (whole, as tokenized for training) and what truncation at
    the configured limits does to them, counted by the encoder training uses."""
    from trcli.tokens import Encoder

    whole = Encoder(encoder.tok, max_length=10**9, templated=encoder.templated)
    encoder = Encoder(encoder.tok, encoder.max_length, encoder.max_prompt_length, encoder.truncation,
                      templated=encoder.templated)
    completions = [f for f in FIELDS[kind] if f not in ("prompt", "label")]
    counts: dict[str, list[int]] = {f: [] for f in ("prompt", *completions)}
    cut = dropped = short = prompt_cut = 0
    # Most of a large prep's time (~90% of 46k HH pairs with SmolLM2's tokenizer): progress of its own.
    with Progress("trcli prep: tokenize", len(records), "records") as progress:
        for r in records:
            texts = [r[f] for f in completions]
            for f, e in zip(completions, whole(r["prompt"], texts)):
                counts[f].append(len(e.completion))
            counts["prompt"].append(len(e.prompt))
            before = dict(encoder.counts)
            limited = encoder(r["prompt"], texts)
            delta = {k: encoder.counts[k] - before.get(k, 0) for k in ("truncated", "dropped", "short", "prompt_cut")}
            dropped += limited is None
            cut += limited is not None and delta["truncated"] > 0
            short += delta["short"] > 0
            prompt_cut += delta["prompt_cut"] > 0
            progress.advance(tokens=len(e.prompt) + sum(counts[f][-1] for f in completions))
    return {
        "tokens": {f: _percentiles(v) for f, v in counts.items()},
        "truncated": {"prompt": prompt_cut, "completion": cut, "dropped": dropped, "short": short,
                      "max_prompt_length": encoder.max_prompt_length, "max_length": encoder.max_length,
                      "truncation": encoder.truncation},
    }


def _marked(tokenizer, ids: list[int]) -> str:
    """Decoded text with every special token shown as «token»."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out, plain = [], []
    for i in ids + [None]:
        if (i is None or i in special) and plain:
            out.append(tokenizer.decode(plain))
            plain = []
        if i is None:
            break
        if i in special:
            out.append(f"«{tokenizer.convert_ids_to_tokens(i)}»")
        else:
            plain.append(i)
    return "".join(out)


def _show(shown: list[dict], kind: str, encoder) -> None:
    """Print examples to stderr exactly as training will see them: the prompt's tokens, '⟫' at the
    boundary, then each completion's, special tokens marked «so»."""
    completions = [f for f in FIELDS[kind] if f not in ("prompt", "label")]
    for n, record in enumerate(shown, start=1):
        label = f" · label {record['label']}" if kind == "unpaired" else ""
        lines = [f"── example {n} of {len(shown)} · id {record['id']}{label} ──"]
        if encoder is None:
            lines.append(record["prompt"] + "⟫")
            lines += [f"⟫ {f}:\n{record[f]}" for f in completions]
        else:
            encoded = encoder(record["prompt"], [record[f] for f in completions])
            if encoded is None:
                lines.append(f"(dropped: the prompt alone fills --max-length {encoder.max_length})")
            else:
                lines.append(_marked(encoder.tok, encoded[0].prompt) + "⟫")
                for f, e in zip(completions, encoded):
                    lines.append(f"⟫ {f} · prompt {len(e.prompt)} tokens · completion {len(e.completion)}:\n"
                                 + _marked(encoder.tok, e.completion))
        print("\n".join(lines), file=sys.stderr)
    if encoder is None:
        print("(raw text: pass --model to see the tokens training will see)", file=sys.stderr)


def run(cfg: Config) -> dict:
    data = cfg.data
    if not cfg.output:
        raise UsageError("prep needs --output DIR")
    name = data.input or HUB_DEFAULTS.get(data.source, (None,))[0]
    if name is None:
        raise UsageError("prep needs an input: --input FILE (or data.input in the recipe)")
    if data.template is not None:
        tldr.check_template(data.template)
    tokenizer, template = _tokenizer(cfg)
    opts = SourceOptions(kind=data.kind, columns=data.columns, template=data.template, tokenizer=tokenizer)
    convert = CONVERTERS.get(data.source, columns.convert)

    # Read and check every row; the first record fixes the kind for the rest. Shown as progress (a chat
    # template renders every row): a count and a rate, as how many rows a file holds is not known ahead.
    rows_in, dropped, by_split, kind, first_skipped = 0, Counter(), {}, None, None
    with Progress("trcli prep: read", None, "rows") as reading:
        for split, where, row in _rows(cfg, name):
            rows_in += 1
            reading.advance()
            try:
                if isinstance(row, RowError):
                    raise row
                record = convert(row, where, opts)
                if template is not None and data.source not in CHAT_SOURCES:
                    record = chat.render_text(record, tokenizer, where)
                have = kind_of(record)
                if kind is not None and have != kind:
                    raise RowError(where, f"a {have} record among {kind} records")
                kind = opts.kind = have
                reason = drop_reason(record)
                if reason:
                    raise Drop(reason)
            except RowError as err:
                if data.on_error == "fail":
                    raise DataError(f"{err} (use --on-error skip to skip bad rows)") from None
                dropped["malformed"] += 1
                first_skipped = first_skipped or str(err)
                continue
            except Drop as drop:
                dropped[drop.reason] += 1
                continue
            record["id"] = record["id"] or str(rows_in)
            by_split.setdefault(split, []).append(record)
    if first_skipped:
        print(f"trcli prep: skipped {dropped['malformed']} malformed rows; the first: {first_skipped}", file=sys.stderr)
    if rows_in == 0:
        raise DataError(f"{name}: no rows (empty input)")
    if not by_split.get("train"):
        raise DataError(f"{name}: no usable rows ({rows_in} read, dropped {dict(dropped)})")

    # Convert to the kind asked for.
    if data.kind in ("unpaired", "sft") and kind == "paired":
        to = paired_to_unpaired if data.kind == "unpaired" else paired_to_sft
        by_split = {s: to(recs) for s, recs in by_split.items()}
        kind = data.kind
    elif data.kind not in ("auto", kind):
        raise DataError(f"{name}: asked for {data.kind} records but the input holds {kind} records")

    # Splits: the source's own, or a held-out fraction of the prompts.
    if "test" in by_split and data.test_size > 0:
        print("trcli prep: the input has its own test split; ignoring --test-size", file=sys.stderr)
    elif "train" in by_split and data.test_size > 0:
        by_split["train"], by_split["test"] = _split(by_split["train"], data.test_size, data.seed)
    records = [r for recs in by_split.values() for r in recs]
    encoder = None
    if tokenizer is not None:
        encoder = Encoder(tokenizer, data.max_length, data.max_prompt_length, data.truncation,
                          templated=template is not None)
    if data.show:
        _show((by_split.get("train") or records)[: data.show], kind, encoder)

    summary = {
        "source": data.source,
        "input": name,
        "kind": kind,
        "rows_in": rows_in,
        "rows_out": len(records),
        "dropped": dict(dropped),
        "splits": {s: len(recs) for s, recs in by_split.items() if recs},
        "chat_template": template_id(template),
    }
    if encoder is not None:
        summary.update(_lengths(encoder, records, kind))
        cut = summary["truncated"]
        if cut["dropped"] or cut["short"]:
            print(f"trcli prep: warning: at --max-length {data.max_length} ({data.truncation}) training will drop "
                  f"{cut['dropped']} records (prompt fills max_length) and cut {cut['short']} to completions "
                  f"shorter than {SHORT} tokens", file=sys.stderr)

    from datasets import Dataset, DatasetDict

    fields = ["id", *FIELDS[kind]]
    splits = DatasetDict({s: Dataset.from_list([{f: r[f] for f in fields} for r in recs])
                          for s, recs in by_split.items() if recs})
    run_dir = Run("prep", cfg.output, cfg)
    run_dir.add_input("input", name)
    with atomic_path(Path(cfg.output) / "data") as tmp:
        splits.save_to_disk(str(tmp))
    run_dir.finish(data="data", report=summary, chat_template=summary["chat_template"])
    return summary


def render(result: dict):
    from rich.console import Group
    from rich.table import Table

    table = Table(title="prep", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", f"{result['source']}  {result['input']}")
    table.add_row("kind", result["kind"])
    table.add_row("rows in", str(result["rows_in"]))
    table.add_row("rows out", str(result["rows_out"]))
    for reason, n in sorted(result["dropped"].items()):
        table.add_row(f"dropped: {reason}", str(n))
    table.add_row("splits", ", ".join(f"{s} {n}" for s, n in result["splits"].items()))
    table.add_row("chat template", result.get("chat_template") or "none (plain text)")
    if "tokens" not in result:
        return table
    lengths = Table(title="tokens per field")
    for column in ("field", *(f"p{q}" for q in PERCENTILES), "max", "mean"):
        lengths.add_column(column, justify="left" if column == "field" else "right")
    for field, stats in result["tokens"].items():
        lengths.add_row(field, *(str(stats[f"p{q}"]) for q in PERCENTILES), str(stats["max"]), str(stats["mean"]))
    cut = result["truncated"]
    prompts = (f"{cut['prompt']} prompts cut at max_prompt_length={cut['max_prompt_length']}, "
               if cut["max_prompt_length"] else "whole prompts kept, ")
    note = (f"truncation ({cut['truncation']}): {prompts}{cut['completion']} records cut and {cut['dropped']} dropped at max_length="
            f"{cut['max_length']}, {cut['short']} left with a completion under {SHORT} tokens")
    return Group(table, lengths, note)


gate = None
