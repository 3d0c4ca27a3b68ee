"""Anthropic HH-RLHF: two whole transcripts per row ("\\n\\nHuman: ... \\n\\nAssistant: ...").

The prompt is the shared multi-turn prefix up to and including the last "\\n\\nAssistant:" the
two transcripts have in common; chosen and rejected are the final replies after it. Taking the
prefix from both transcripts (rather than from the chosen one alone) keeps rows whose replies
happen to start alike, and exposes rows that differ in an earlier turn: their remainders hold
another turn, and they are dropped as 'diverged'.
"""

from __future__ import annotations

import os
import re

from trcli.data import columns
from trcli.data.records import Drop, SourceOptions

HUB_ID = "Anthropic/hh-rlhf"
ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen reply, rejected reply), or Drop('empty' | 'identical' | 'diverged')."""
    if not chosen.strip() or not rejected.strip():
        raise Drop("empty")
    if chosen == rejected:
        raise Drop("identical")
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise Drop("diverged")
    prompt = chosen[: cut + len(ASSISTANT)]
    replies = chosen[len(prompt):], rejected[len(prompt):]
    if any(HUMAN in r or ASSISTANT in r for r in replies):
        raise Drop("diverged")
    return prompt, replies[0], replies[1]


def convert(row: dict, where: str, opts: SourceOptions) -> dict:
    row = columns.rename(row, where, opts.columns)
    prompt, chosen, rejected = split_transcripts(columns.text(row, "chosen", where),
                                                 columns.text(row, "rejected", where))
    # Empty replies and identical ones are dropped by prep's generic check.
    return {"id": None, "prompt": prompt, "chosen": chosen, "rejected": rejected}


_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def turns(prompt: str) -> list[dict] | None:
    """An HH prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:") as chat messages
    (user / assistant turns, the final empty Assistant: dropped); None if it is not a transcript."""
    parts = _TURN.split(prompt)
    if len(parts) < 3 or parts[0].strip() or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text.strip()} for who, text in zip(parts[1:-2:2], parts[2:-2:2])]
