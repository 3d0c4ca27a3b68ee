"""generate: sample completions for prompts, appending JSONL records as batches finish.

Prompts are token ids as training has them (:class:`trcli.tokens.Encoder`): a prep output's as
prep wrote them (rendered through a chat template or plain text), a JSONL of raw prompts rendered
through the chat template in force (``data.chat_template``), else plain text with the
tokenizer's BOS. Generation stops at EOS, the template's end-of-turn token, the model's own
``eos_token_id`` and ``--stop`` strings; each record says which (``stop``).

Each record's sample depends only on (seed, record id) and its own logits: the warped scores
(repetition penalty, temperature, top-p, as transformers' processors compute them) get Gumbel
noise from a generator seeded per (seed, record id, step) and the argmax is taken, which is an
exact sample from the warped distribution. Batches are formed over the whole (length-sorted)
sample list, so a re-run with the same output skips the batches already written and regenerates
the rest exactly as an uninterrupted run would have: the file is the same byte for byte.

``--score-with`` adds each completion's log-probability under the policy and under a reference
(e.g. the SFT run), for KL(π‖π_ref) in `judge`: the scored tokens are exactly the sampled ones,
the end token or the token that completed a stop string included.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from trcli.batching import collate, set_logps_chunk, token_logps
from trcli.config import Config
from trcli.data import hh
from trcli.data.files import RowError, read_jsonl
from trcli.data.records import load_prepped, record_id, rendering
from trcli.errors import DataError, UsageError
from trcli.modeling import load_base, load_tokenizer, pick_device
from trcli.progress import Progress
from trcli.runs import inherit, output_lock, read_jsonl_repairing, upstream
from trcli.tokens import Encoder, end_of_turn_ids, resolve_chat_template, template_id

_SPEAKER = {"user": "Human", "assistant": "Assistant"}


def _transcript(messages: list[dict]) -> str:
    """Messages as an HH-style transcript ending in "\\n\\nAssistant:" (the record's readable prompt,
    the same whatever the model's template; what a model without a template is given)."""
    turns = "".join(f"\n\n{_SPEAKER.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages)
    return turns + hh.ASSISTANT


def _messages(row: dict, where: str) -> list[dict]:
    from trcli.data.chat import messages

    try:
        out = messages(row, "messages", where)
    except RowError as err:
        raise DataError(str(err)) from None
    if out[-1]["role"] == "assistant":
        raise DataError(f"{where}: field 'messages' must end with a user message (the reply is what is generated)")
    return out


def _prompts(cfg: Config) -> list[dict]:
    """{id, prompt, messages?} per prompt, in the source's order; a prep output also says
    whether a chat template rendered it (``rendered``)."""
    source = cfg.generate.prompts or cfg.data.path
    if not source:
        raise UsageError("generate needs prompts: --prompts PREP_DIR|FILE.jsonl (or --from a run with data)")
    if Path(source).is_dir():
        data = load_prepped(source)
        split = cfg.generate.split if cfg.generate.split in data else "train"
        rows = data[split].to_list()
        rendered = rendering(source) is not None
        seen, out = set(), []
        for row in rows:  # one prompt can carry several pairs: generate once per prompt
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                out.append({"id": str(row["id"]), "prompt": row["prompt"], "rendered": rendered})
    else:
        out, ids = [], {}
        for where, row in read_jsonl(source):
            if isinstance(row, RowError):
                raise DataError(str(row))
            record = {"id": record_id(row, where)}
            if "messages" in row and "prompt" not in row:
                record["messages"] = _messages(row, where)
                record["prompt"] = _transcript(record["messages"])
            elif isinstance(row.get("prompt"), str):
                record["prompt"] = row["prompt"]
            else:
                raise DataError(f"{where}: missing string field 'prompt' (or a 'messages' list)")
            if record["id"] in ids:
                raise DataError(f"{where}: id '{record['id']}' already used at {ids[record['id']]}; ids must be unique")
            ids[record["id"]] = where
            out.append(record)
    return out[: cfg.generate.limit] if cfg.generate.limit else out


def _encode(prompts: list[dict], tokenizer, template: str | None, max_length: int) -> None:
    """Add each prompt's token ids (``ids``) as training has them."""
    plain = Encoder(tokenizer, max_length)
    templated = Encoder(tokenizer, max_length, templated=True)
    for p in prompts:
        if p.get("rendered"):  # a prep output that a chat template rendered
            p["ids"] = templated.prompt(p["prompt"])
        elif "rendered" in p or template is None:  # plain prep output, or no template in force
            p["ids"] = plain.prompt(p["prompt"])
        else:
            messages = p.get("messages") or hh.turns(p["prompt"]) or [
                {"role": "user", "content": p["prompt"].strip()}]
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja's TemplateError (raise_exception), a missing role ...
                raise DataError(f"prompt '{p['id']}': the chat template cannot render it ({exc}); "
                                "pass --chat-template none for plain text") from None
            p["ids"] = templated.prompt(text)


def _warn_if_trained_otherwise(cfg: Config, prompts: list[dict], template: str | None) -> None:
    """Raw prompts rendered otherwise than the policy's training data (``--from``'s data) were."""
    if not prompts or "rendered" in prompts[0] or not cfg.data.path or not Path(cfg.data.path).is_dir():
        return
    trained = rendering(cfg.data.path)
    if trained != template_id(template):
        how = "as plain text" if trained is None else "with another chat template"
        fix = "--chat-template none" if trained is None else "--chat-template with the template prep used"
        now = "plain text" if template is None else "a chat template"
        print(f"trcli generate: warning: the policy was trained on {cfg.data.path} rendered {how}, but these "
              f"prompts get {now}; pass {fix}", file=sys.stderr)


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


# --- sampling that depends on (seed, record id) only ---------------------------------------------

def _row_seed(seed: int, record_id: str, step: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{record_id}\x00{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def gumbel(seed: int, record_id: str, step: int, size: int) -> torch.Tensor:
    """Standard Gumbel noise for one record's ``step``-th token (on CPU, so any device draws the same)."""
    gen = torch.Generator().manual_seed(_row_seed(seed, record_id, step))
    u = torch.rand(size, generator=gen).clamp_(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


def _logits_processor(record_ids: list[str], seed: int, start: int, first_real: torch.Tensor,
                      temperature: float, top_p: float, repetition_penalty: float):
    """Transformers' repetition penalty, temperature and top-p, then Gumbel noise per record and
    step: greedy decoding over these scores samples each record from its own warped distribution
    (Gumbel-max), whatever else is in the batch. Temperature 0 adds no noise (greedy)."""
    from transformers import (
        LogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    steps = []
    if repetition_penalty != 1.0:  # the prompt counts, the left padding does not (as transformers does)
        steps.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty), prompt_ignore_length=first_real))
    if temperature > 0:
        if temperature != 1.0:
            steps.append(TemperatureLogitsWarper(float(temperature)))
        if top_p < 1.0:
            steps.append(TopPLogitsWarper(float(top_p)))

    class PerRecordSampling(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
            for warp in steps:
                scores = warp(input_ids, scores)
            if temperature > 0:
                step = input_ids.shape[1] - start
                noise = torch.stack([gumbel(seed, rid, step, scores.shape[-1]) for rid in record_ids])
                scores = scores + noise.to(scores.device, scores.dtype)
            return scores

    return PerRecordSampling()


def _stop_recorder(end_ids: list[int], strings, start: int, batch: int):
    """A stopping criterion (EOS / end-of-turn ids, then the stop strings) that records, per row,
    the index of the generated token that ended it and why."""
    from transformers import StoppingCriteria

    ends = torch.tensor(end_ids, dtype=torch.long)

    class Recorder(StoppingCriteria):
        def __init__(self):
            self.ended: list[tuple[int, str] | None] = [None] * batch

        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            is_end = torch.isin(input_ids[:, -1], ends.to(input_ids.device))
            is_stop = strings(input_ids, scores) if strings is not None else torch.zeros_like(is_end)
            done = is_end | is_stop
            step = input_ids.shape[1] - start - 1
            for i in done.nonzero().flatten().tolist():
                if self.ended[i] is None:
                    self.ended[i] = (step, "eos" if is_end[i] else "stop_string")
            return done

    return Recorder()


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(found)] if found else text


def run(cfg: Config) -> dict:
    up = inherit(cfg)
    if not cfg.output:
        raise UsageError("generate needs --output FILE.jsonl (or '-' for stdout)")
    prompts = _prompts(cfg)
    to_stdout = cfg.output == "-"
    # One writer per output file for the whole run (nothing for stdout): a second run is refused.
    with output_lock(None if to_stdout else cfg.output, "generate", file=True):
        try:
            result = _generate(cfg, up, prompts, to_stdout)
        except BrokenPipeError:
            if not to_stdout:
                raise
            _stdout_to_devnull()  # the reader is gone (`| head`): end quietly, as a Unix filter does
            return None
    if to_stdout:  # stdout carries the records: the summary goes to stderr
        print(json.dumps(result), file=sys.stderr)
        return None
    return result


def _generate(cfg: Config, up: dict, prompts: list[dict], to_stdout: bool) -> dict:
    gen = cfg.generate
    out_path = None if to_stdout else Path(cfg.output)
    # Ids already written; a torn last line (a kill mid-write) is cut off the file first.
    done = set() if to_stdout else {str(r.get("id")) for r in read_jsonl_repairing(out_path)}
    record_id = (lambda p, k: p["id"]) if gen.num_samples == 1 else (lambda p, k: f"{p['id']}-{k}")

    device = pick_device(cfg.train.device)
    set_logps_chunk(cfg.train.logps_chunk)  # --score-with
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    template = resolve_chat_template(tokenizer, cfg.data.chat_template)
    _warn_if_trained_otherwise(cfg, prompts, template)
    _encode(prompts, tokenizer, template, cfg.data.max_length)
    # Batches over the whole sample list, similar lengths together (less padding); stable, so a
    # re-run forms the same batches whatever is already written, and skips those written whole.
    samples = sorted(((p, k) for p in prompts for k in range(gen.num_samples)), key=lambda s: len(s[0]["ids"]))
    batches = [samples[i:i + gen.batch_size] for i in range(0, len(samples), gen.batch_size)]
    todo = [b for b in batches if any(record_id(p, k) not in done for p, k in b)]
    skipped = sum(record_id(p, k) in done for p, k in samples)

    model = load_policy(cfg, up, device)
    scorer = _scorer(cfg, gen.score_with, device) if gen.score_with else None
    name = cfg.from_run or cfg.model.name_or_path
    end_ids = _end_ids(model, tokenizer)
    strings = None
    if gen.stop:
        from transformers import StopStringCriteria

        strings = StopStringCriteria(tokenizer=tokenizer, stop_strings=gen.stop)
    sampling = {"temperature": gen.temperature, "top_p": gen.top_p, "max_new_tokens": gen.max_new_tokens,
                "seed": gen.seed, "repetition_penalty": gen.repetition_penalty, "stop_strings": list(gen.stop)}

    sink = sys.stdout if to_stdout else open(out_path, "a", encoding="utf-8")
    written = 0
    # A bar on a terminal, else a line every 30 s (completions done / all, completions/s, tokens/s, ETA).
    progress = Progress("trcli generate", len(samples), "completions", start=skipped)
    try:
        for chunk in todo:
            records = []
            for (p, k), r in zip(chunk, _sample(chunk, record_id, model, tokenizer, end_ids, strings, gen, device)):
                records.append({"id": record_id(p, k), "prompt_id": p["id"], "sample": k, "prompt": p["prompt"],
                                **({"messages": p["messages"]} if "messages" in p else {}),
                                "completion": r["completion"], "stop": r["stop"], "model": name,
                                "sampling": sampling, "_prompt_ids": r["prompt_ids"], "_ids": r["ids"]})
            if scorer is not None:  # the whole batch, as an uninterrupted run scores it
                _score(records, tokenizer, model, scorer, device)
            records = [r for r in records if r["id"] not in done]
            new_tokens = sum(len(r["_ids"]) for r in records)
            for record in records:
                del record["_prompt_ids"], record["_ids"]
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            if not to_stdout:
                os.fsync(sink.fileno())
            written += len(records)
            progress.advance(len(records), tokens=new_tokens)
        progress.close()
    finally:
        progress.close(completed=False)  # after an error: stop without a last line (a no-op once closed)
        if not to_stdout:
            sink.close()
    return {"output": cfg.output, "written": written, "skipped_existing": skipped, "prompts": len(prompts)}


def _end_ids(model, tokenizer) -> list[int]:
    """EOS, the chat template's end-of-turn token and the model's generation_config.eos_token_id."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    ids = list(end_of_turn_ids(tokenizer))
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    for i in [configured] if isinstance(configured, int) else (configured or []):
        if i not in ids:
            ids.append(int(i))
    return ids


@torch.no_grad()
def _sample(chunk, record_id, model, tokenizer, end_ids, strings, gen, device) -> list[dict]:
    """One batch: {completion, stop, prompt_ids, ids (the sampled ids to score)} per sample."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    rows = [p["ids"] for p, _ in chunk]
    input_ids, attention = _left_padded(rows, tokenizer.pad_token_id, device)
    start = input_ids.shape[1]
    first_real = (attention != 0).int().argmax(dim=1)
    # Only what is asked for: none of the model's own sampling defaults (top_k, a repetition
    # penalty ...) is filled in, and sampling is the processor's Gumbel-max.
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=gen.max_new_tokens,
                              eos_token_id=end_ids or None, pad_token_id=tokenizer.pad_token_id)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.generation_config = config
    recorder = _stop_recorder(end_ids, strings, start, len(chunk))
    processor = _logits_processor([record_id(p, k) for p, k in chunk], gen.seed, start, first_real,
                                  gen.temperature, gen.top_p, gen.repetition_penalty)
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                         logits_processor=LogitsProcessorList([processor]),
                         stopping_criteria=StoppingCriteriaList([recorder]))
    new = out[:, start:].tolist()
    results = []
    for i, ended in enumerate(recorder.ended):
        if ended is None:  # ran to max_new_tokens
            ids, reason, text_ids = new[i][:gen.max_new_tokens], "length", new[i][:gen.max_new_tokens]
        else:
            step, reason = ended
            ids = new[i][:step + 1]
            text_ids = ids[:-1] if reason == "eos" else ids
        text = tokenizer.decode(text_ids, skip_special_tokens=True)
        if reason == "stop_string":
            text = _cut_at_stop(text, gen.stop)
        results.append({"completion": text, "stop": reason, "prompt_ids": rows[i], "ids": ids})
    return results


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null so that Python's flush at exit does not fail (and print) again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


@torch.no_grad()
def _score(records: list[dict], tokenizer, policy, reference, device) -> None:
    """Add logp / ref_logp (sums) and per-token values of each completion under both models: the
    tokens sampled, the end token or the stop string's last token included (none when cut at
    max_new_tokens)."""
    if not records:
        return
    batch = collate([(r["_prompt_ids"], r["_ids"]) for r in records], tokenizer.pad_token_id, device)
    for key, model in (("", policy), ("ref_", reference)):
        logps, mask = token_logps(model, batch)
        for record, row, m in zip(records, logps, mask):
            values = row[m].tolist()
            record[f"{key}token_logps"] = values
            record[f"{key}logp"] = sum(values)
    for record in records:
        record["n_tokens"] = len(record["token_logps"])


render = None  # the result as JSON: what was written where
gate = None
