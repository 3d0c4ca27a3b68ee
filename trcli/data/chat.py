"""Conversational data: message lists rendered to text with the tokenizer's chat template.

- implicit prompt (``HuggingFaceH4/ultrafeedback_binarized``): ``chosen`` and ``rejected`` are
  whole conversations that share every message but the final assistant reply;
- explicit prompt (TRL's conversational layout): ``prompt`` is a message list and ``chosen`` /
  ``rejected`` (or ``completion`` with ``label``) hold the reply messages;
- ``messages`` alone (ultrafeedback's *_sft splits): an SFT record on the last assistant reply.

The prompt is the rendering of the prompt messages with the generation prompt; the completion is
what the full conversation's rendering adds after it (so it carries the end-of-turn tokens).
"""

from __future__ import annotations

from trcli.data import columns, hh
from trcli.data.files import RowError
from trcli.data.records import Drop, SourceOptions

ULTRAFEEDBACK = "HuggingFaceH4/ultrafeedback_binarized"


def ultrafeedback_splits(kind: str) -> dict[str, str]:
    """UltraFeedback keeps preference and SFT data in separately named splits."""
    suffix = "sft" if kind == "sft" else "prefs"
    return {f"train_{suffix}": "train", f"test_{suffix}": "test"}


def messages(row: dict, name: str, where: str) -> list[dict]:
    value = row.get(name)
    if value is None:
        raise RowError(where, f"missing field '{name}'")
    if not isinstance(value, list) or not value:
        raise RowError(where, f"field '{name}' must be a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(where, f"field '{name}[{i}]' must be a message object")
        for key in ("role", "content"):
            columns.text(message, key, where, f"{name}[{i}].{key}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _render(tokenizer, prompt: list[dict], reply: list[dict], where: str, name: str) -> tuple[str, str]:
    if reply[-1]["role"] != "assistant":
        raise RowError(where, f"field '{name}' must end with an assistant message, not '{reply[-1]['role']}'")
    if not reply[-1]["content"].strip():
        raise Drop("empty")  # the rendered reply is never empty: it carries the template's tokens
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not full.startswith(text):
        raise RowError(where, f"the chat template does not render the prompt of '{name}' as the start "
                              "of the conversation; use a tokenizer whose template is prefix-stable")
    return text, full[len(text):]


def convert(row: dict, where: str, opts: SourceOptions) -> dict:
    row = columns.rename(row, where, opts.columns)
    tok = opts.tokenizer
    if isinstance(row.get("prompt"), list):
        prompt = messages(row, "prompt", where)
        if "chosen" in row or "completion" not in row:
            text, chosen = _render(tok, prompt, messages(row, "chosen", where), where, "chosen")
            _, rejected = _render(tok, prompt, messages(row, "rejected", where), where, "rejected")
            return {"id": None, "prompt": text, "chosen": chosen, "rejected": rejected}
        text, completion = _render(tok, prompt, messages(row, "completion", where), where, "completion")
        if "label" not in row:
            return {"id": None, "prompt": text, "completion": completion}
        return {"id": None, "prompt": text, "completion": completion, "label": columns.label(row["label"], where, "label")}
    if "chosen" not in row and "messages" in row:
        conversation = messages(row, "messages", where)
        text, completion = _render(tok, conversation[:-1], conversation[-1:], where, "messages")
        return {"id": None, "prompt": text, "completion": completion}
    chosen, rejected = messages(row, "chosen", where), messages(row, "rejected", where)
    if chosen[:-1] != rejected[:-1]:
        raise Drop("diverged")
    text, chosen_text = _render(tok, chosen[:-1], chosen[-1:], where, "chosen")
    _, rejected_text = _render(tok, rejected[:-1], rejected[-1:], where, "rejected")
    return {"id": None, "prompt": text, "chosen": chosen_text, "rejected": rejected_text}


def render_text(record: dict, tokenizer, where: str) -> dict:
    """A text record (HH, TL;DR, your own columns) rendered through the chat template: an HH
    transcript prompt becomes its user / assistant turns, any other prompt one user message, and
    each completion the assistant's reply (surrounding white space dropped, as a chat reply has none)."""
    prompt = hh.turns(record["prompt"]) or [{"role": "user", "content": record["prompt"].strip()}]
    out = dict(record)
    for name in ("chosen", "rejected", "completion"):
        if name in record:
            out["prompt"], out[name] = _render(
                tokenizer, prompt, [{"role": "assistant", "content": record[name].strip()}], where, name)
    return out
