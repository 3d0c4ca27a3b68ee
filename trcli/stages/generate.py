"""generate: sample completions for prompts, appending JSONL records as batches finish.

Re-running with the same output skips ids already written, so an interrupted run loses at most
the batch in flight. ``--score-with`` adds each completion's log-probability under the policy
and under a reference (e.g. the SFT run), for KL(π‖π_ref) in `judge`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from trcli.batching import collate, token_logps
from trcli.config import Config
from trcli.data.files import RowError, read_jsonl
from trcli.data.records import load_prepped
from trcli.errors import DataError, UsageError
from trcli.modeling import load_base, load_tokenizer, pick_device
from trcli.runs import inherit, upstream


def _prompts(cfg: Config) -> list[dict]:
    source = cfg.generate.prompts or cfg.data.path
    if not source:
        raise UsageError("generate needs prompts: --prompts PREP_DIR|FILE.jsonl (or --from a run with data)")
    if Path(source).is_dir():
        data = load_prepped(source)
        split = cfg.generate.split if cfg.generate.split in data else "train"
        rows = data[split].to_list()
        seen, out = set(), []
        for row in rows:  # one prompt can carry several pairs: generate once per prompt
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                out.append({"id": str(row["id"]), "prompt": row["prompt"]})
    else:
        out = []
        for where, row in read_jsonl(source):
            if isinstance(row, RowError):
                raise DataError(str(row))
            if not isinstance(row.get("prompt"), str):
                raise DataError(f"{where}: missing string field 'prompt'")
            out.append({"id": str(row.get("id", where.rsplit(":", 1)[1])), "prompt": row["prompt"]})
    return out[: cfg.generate.limit] if cfg.generate.limit else out


def load_policy(cfg: Config, run: dict, device: torch.device):
    """Base model plus the run's policy adapter (merged for speed when not quantized)."""
    model = load_base(cfg.model, device, path=run.get("weights"))
    if run.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run["adapter"])
        if cfg.model.quantize != "4bit":
            model = model.merge_and_unload()
    return model.eval()


def _scorer(cfg: Config, spec: str, device: torch.device):
    """A model to score completions under: a run directory (its policy) or a model path / id."""
    if (Path(spec) / "trcli-run.json").is_file():
        return load_policy(cfg, upstream(spec), device)
    return load_policy(cfg, {"weights": spec}, device)


def _existing_ids(path: Path) -> set[str]:
    """Ids already written; a torn last line (killed mid-write) is cut off first."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        data = data[: data.rfind(b"\n") + 1]
    ids = set()
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            ids.add(json.loads(line)["id"])
    return ids


def run(cfg: Config) -> dict:
    up = inherit(cfg)
    if not cfg.output:
        raise UsageError("generate needs --output FILE.jsonl (or '-' for stdout)")
    gen = cfg.generate
    prompts = _prompts(cfg)
    to_stdout = cfg.output == "-"
    out_path = None if to_stdout else Path(cfg.output)
    done = set() if to_stdout else _existing_ids(out_path)
    samples = [(p, k) for p in prompts for k in range(gen.num_samples)]
    record_id = (lambda p, k: p["id"]) if gen.num_samples == 1 else (lambda p, k: f"{p['id']}-{k}")
    todo = [(p, k) for p, k in samples if record_id(p, k) not in done]

    device = pick_device(cfg.train.device)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    tokenizer.padding_side = "left"
    model = load_policy(cfg, up, device)
    scorer = _scorer(cfg, gen.score_with, device) if gen.score_with else None
    name = cfg.from_run or cfg.model.name_or_path
    sampling = {"temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
                "seed": gen.seed}

    todo.sort(key=lambda item: len(item[0]["prompt"]))  # similar lengths batch with less padding
    sink = sys.stdout if to_stdout else open(out_path, "a", encoding="utf-8")
    written = 0
    try:
        for start in range(0, len(todo), gen.batch_size):
            chunk = todo[start:start + gen.batch_size]
            torch.manual_seed(gen.seed + start)
            enc = tokenizer([p["prompt"] for p, _ in chunk], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(
                    **enc, do_sample=gen.temperature > 0, temperature=gen.temperature or None,
                    top_p=gen.top_p if gen.temperature > 0 else None, max_new_tokens=gen.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            records = []
            for i, (p, k) in enumerate(chunk):
                ids = [t for t in new[i].tolist() if t != tokenizer.pad_token_id]
                if tokenizer.eos_token_id in ids:
                    ids = ids[: ids.index(tokenizer.eos_token_id)]
                records.append({"id": record_id(p, k), "prompt_id": p["id"], "sample": k, "prompt": p["prompt"],
                                "completion": tokenizer.decode(ids, skip_special_tokens=True), "model": name,
                                "sampling": sampling, "_ids": ids})
            if scorer is not None:
                _score(records, tokenizer, model, scorer, device)
            for record in records:
                record.pop("_ids")
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            if not to_stdout:
                os.fsync(sink.fileno())
            written += len(records)
    finally:
        if not to_stdout:
            sink.close()
    result = {"output": cfg.output, "written": written, "skipped_existing": len(samples) - len(todo),
              "prompts": len(prompts)}
    print(json.dumps(result), file=sys.stderr)
    return None if to_stdout else result


@torch.no_grad()
def _score(records: list[dict], tokenizer, policy, reference, device) -> None:
    """Add logp / ref_logp (sums) and per-token values of each completion under both models."""
    pairs = [(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id],
              r["_ids"] + [tokenizer.eos_token_id]) for r in records]
    batch = collate(pairs, tokenizer.pad_token_id, device)
    for key, model in (("", policy), ("ref_", reference)):
        logps, mask = token_logps(model, batch)
        for record, row, m in zip(records, logps, mask):
            values = row[m].tolist()
            record[f"{key}token_logps"] = values
            record[f"{key}logp"] = sum(values)
    for record in records:
        record["n_tokens"] = len(record["token_logps"])
