"""Token ids as the tokenizer and its chat template define them, the same in every stage.

sft, align, generate (and ``--score-with``), judge ``hf:`` and ``prep --show`` / its length stats
all encode through :class:`Encoder`, so a sequence has one tokenization everywhere. It is TRL
1.16's (``DPOTrainer`` / ``SFTTrainer`` / ``KTOTrainer`` ``tokenize_fn``), id for id:

- plain text: ``prompt_ids = tok(prompt)`` and ``full = tok(prompt + completion + eos)`` with the
  tokenizer's own special tokens (BOS when it adds one); EOS is appended as text unless the
  completion already ends with it;
- text a chat template rendered (``prep`` with a template): the same without adding special
  tokens or EOS, since the template wrote them (BOS if it has one, the end-of-turn after the
  reply) — what TRL's conversational path gets from ``apply_chat_template(tokenize=True)``.
  A template that writes no end token after a reply gets EOS appended (TRL appends nothing);
- the completion starts where ``prompt_ids`` and ``full`` stop agreeing (tokens can merge across
  the boundary), and a pair's chosen and rejected share the shorter common prefix, so both keep
  one prompt (which packing computes once).

Two choices go beyond TRL, both no-ops on ordinary data: a text that already starts with the
tokenizer's leading special tokens does not get them twice, and a prompt that tokenizes to
nothing gets EOS as its one token (something must predict the completion's first token).

Truncation (``data.truncation``), as TRL's collator does by default: ``keep_start`` keeps the
whole prompt and cuts the completion so prompt + completion ≤ ``max_length``; a prompt that alone
fills ``max_length`` leaves no completion token and its example is dropped (TRL drops it too).
``keep_end`` keeps the end of the sequence: the prompt is cut from the left (one prompt token at
least). ``max_prompt_length`` (off by default) first cuts the prompt from the left, keeping its
leading special tokens.
"""

from __future__ import annotations

import hashlib
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from trcli import common
from trcli.errors import UsageError

SHORT = 8  # a completion cut below this many tokens is worth a warning


@dataclass
class Encoded:
    prompt: list[int]
    completion: list[int]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def leading_specials(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS, for most that add one)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k]
    return []


def resolve_chat_template(tokenizer, setting: str) -> str | None:
    """Apply ``data.chat_template`` to ``tokenizer``; return the template in force (None = plain text).

    ``auto``: the tokenizer's own, when it has one; ``none``: plain text; otherwise a path to a
    Jinja file that replaces the tokenizer's template.
    """
    if setting == "none":
        return None
    if setting == "auto":
        return tokenizer.chat_template or None
    path = Path(setting)
    try:
        template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"data.chat_template: cannot read '{path}' ({exc.__class__.__name__}); "
                         "use auto, none or a Jinja file") from None
    tokenizer.chat_template = template
    return template


def template_id(template: str | None) -> str | None:
    """A short fingerprint of a chat template, kept in prep's manifest to tell renderings apart."""
    return None if template is None else "sha256:" + hashlib.sha256(template.encode()).hexdigest()[:16]


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: EOS, and the chat template's end-of-turn token when it has one
    (the first special token the template writes after an assistant message, e.g. <|im_end|>,
    <|eot_id|>, <end_of_turn>)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if tokenizer.chat_template:
        marker = "Zq7xw"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # a template that needs other roles or arguments: EOS alone
            text = ""
        if marker in text:
            special = set(tokenizer.all_special_ids) | {
                i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            after = tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
            first = next((t for t in after if t in special), None)
            if first is not None and first not in ids:
                ids.append(first)
    return ids


class Encoder:
    """Encodes prompts and completions as training sees them, and counts what truncation did.

    ``templated``: the texts were rendered by a chat template (prep's manifest says so).
    """

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int | None = None,
                 truncation: str = "keep_start", templated: bool = False):
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.templated = templated
        self.lead = leading_specials(tokenizer)
        self.eos_text = tokenizer.eos_token
        # The texts that end a reply: EOS, and for rendered data the template's end-of-turn.
        self.end_texts = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)] if templated else []
        self.counts: Counter = Counter()

    def _ended(self, completion: str) -> str:
        """The completion with EOS appended as text when it has no end yet: plain text unless it
        ends with EOS (TRL's rule); rendered text unless the template wrote an end-of-turn or EOS
        into it (TRL appends nothing there; a template that writes no end would leave the model
        never learning to stop)."""
        eos = self.eos_text
        if eos is None:
            return completion
        if self.templated:
            return completion if any(t in completion for t in self.end_texts) else completion + eos
        return completion if completion.endswith(eos) else completion + eos

    def _ids(self, text: str) -> list[int]:
        ids = self.tok(text, add_special_tokens=not self.templated)["input_ids"]
        n = len(self.lead)
        if n and ids[:2 * n] == self.lead * 2:  # the text already carried them: never twice
            ids = ids[n:]
        return ids

    def prompt(self, text: str) -> list[int]:
        """A prompt's ids for generation: the same as training's prompt, untruncated."""
        return self._ids(text) or [self.tok.eos_token_id]

    def __call__(self, prompt: str, completions: list[str]) -> list[Encoded] | None:
        """One :class:`Encoded` per completion, all with the same prompt ids; None when the prompt
        alone fills ``max_length`` (keep_start), so the example has no completion token left."""
        prompt_ids = self._ids(prompt)
        fulls = []
        for c in completions:
            fulls.append(self._ids(prompt + self._ended(c)))
        cut = min(_common_prefix(prompt_ids, f) for f in fulls)
        head = prompt_ids[:cut]
        tails = [f[cut:] for f in fulls]
        if not head:  # nothing predicts the first completion token otherwise
            head = [self.tok.eos_token_id]
        self.counts["sequences"] += len(tails)
        if self.max_prompt_length is not None and len(head) > self.max_prompt_length:
            lead = len(self.lead) if head[:len(self.lead)] == self.lead else 0
            keep = max(self.max_prompt_length - lead, 1)
            head = head[:lead] + head[-keep:]
            self.counts["prompt_cut"] += len(tails)
        out = []
        for tail in tails:
            p, c = head, tail
            if len(p) + len(c) > self.max_length:
                if self.truncation == "keep_start":
                    if len(p) >= self.max_length:
                        self.counts["dropped"] += len(tails)
                        return None
                    c = c[: self.max_length - len(p)]
                else:  # keep_end: the sequence's last max_length tokens, one prompt token at least
                    c = c[-(self.max_length - 1):]
                    p = p[-(self.max_length - len(c)):]
                self.counts["truncated"] += 1
                if len(c) < SHORT:
                    self.counts["short"] += 1
            out.append(Encoded(p, c))
        return out

    def report(self, who: str) -> dict:
        """Warn on stderr (once, on rank 0 only) when truncation dropped examples or left short
        completions; the counts."""
        c = self.counts
        if (c["dropped"] or c["short"]) and common.is_main():
            print(f"{who}: warning: truncation at max_length={self.max_length} ({self.truncation}) "
                  f"dropped {c['dropped']} of {c['sequences']} sequences (prompt fills max_length) and left "
                  f"{c['short']} completions with fewer than {SHORT} tokens; raise --max-length "
                  "or set --max-prompt-length", file=sys.stderr)
        return {"sequences": c["sequences"], "truncated": c["truncated"], "dropped": c["dropped"],
                "short_completions": c["short"], "prompt_cut": c["prompt_cut"]}


def stage_encoder(cfg, tokenizer, who: str) -> Encoder:
    """The encoder a training stage uses for ``cfg.data.path``: templated when prep rendered the data
    with a chat template. Warns when the data's rendering and the model's template disagree."""
    from trcli.data.records import rendering

    rendered = rendering(cfg.data.path)
    model_template = template_id(resolve_chat_template(tokenizer, cfg.data.chat_template))
    if rendered is None and model_template is not None:
        print(f"{who}: warning: {cfg.data.path} holds plain text but the tokenizer has a chat template; "
              "re-run prep with --model to render it (or pass --chat-template none to silence this)",
              file=sys.stderr)
    elif rendered is not None and model_template is not None and rendered != model_template:
        print(f"{who}: warning: {cfg.data.path} was rendered with another chat template than this "
              "tokenizer's; re-run prep with this --model", file=sys.stderr)
    return Encoder(tokenizer, cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.truncation,
                   templated=rendered is not None)
