"""Anthropic HH-RLHF: two whole transcripts per row ("\\n\\nHuman: ... \\n\\nAssistant: ...").

The prompt is the shared multi-turn prefix up to and including the last "\\n\\nAssistant:" the
two transcripts have in common; chosen and rejected are the final replies after it. Taking the
prefix from both transcripts (rather than from the chosen one alone) keeps rows whose replies
happen to start alike, and exposes rows that differ in an earlier turn: their remainders hold
another turn, and they are dropped as 'diverged'.
"""

from __future__ import annotations

import os

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
