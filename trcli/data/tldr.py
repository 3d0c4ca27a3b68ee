"""Reddit TL;DR, in the layouts it is published in.

- ``openai/summarize_from_feedback`` comparisons: ``info.{post,title,subreddit}``,
  ``summaries[].text`` and ``choice`` (index of the preferred summary). The prompt is the
  template filled with the post; summaries become " " + text, as they follow "TL;DR:".
- prompt / chosen / rejected (``trl-lib/tldr-preference``): already canonical.
- prompt / label (``CarperAI/openai_summarize_tldr``), the reference summaries: SFT records.
"""

from __future__ import annotations

from dataclasses import replace

from trcli.data import columns
from trcli.data.files import RowError
from trcli.data.records import Drop, SourceOptions
from trcli.errors import ConfigError

HUB_ID = "openai/summarize_from_feedback"
HUB_SUBSET = "comparisons"
TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"
_SLOTS = ("subreddit", "title", "post")


def check_template(template: str) -> None:
    """Fail before reading any data if the template names a slot it cannot fill."""
    try:
        template.format(**{slot: "" for slot in _SLOTS})
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"data.template: cannot fill {exc!s} (slots: {', '.join('{' + s + '}' for s in _SLOTS)})") from None


def _summary(summaries, index: int, where: str) -> str:
    item = summaries[index]
    if not isinstance(item, dict):
        raise RowError(where, f"field 'summaries[{index}]' must be an object")
    return " " + columns.text(item, "text", where, f"summaries[{index}].text").strip()


def _comparison(row: dict, where: str, template: str) -> dict:
    info = row["info"]
    if not isinstance(info, dict):
        raise RowError(where, "field 'info' must be an object")
    if info.get("post") is None and info.get("article") is not None:
        raise Drop("not a reddit post")  # the CNN/DM comparisons share the dataset
    slots = {slot: columns.text(info, slot, where, f"info.{slot}") for slot in _SLOTS}
    summaries, choice = row.get("summaries"), row.get("choice")
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise RowError(where, "field 'summaries' must be a list of two summaries")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise RowError(where, f"field 'choice' must be 0 or 1, not {choice!r}"[:200])
    return {"id": None, "prompt": template.format(**slots),
            "chosen": _summary(summaries, choice, where), "rejected": _summary(summaries, 1 - choice, where)}


def convert(row: dict, where: str, opts: SourceOptions) -> dict:
    row = columns.rename(row, where, opts.columns)
    if "info" in row:
        return _comparison(row, where, opts.template or TEMPLATE)
    if "label" in row and "chosen" not in row:
        # CarperAI's prompts end in "TL;DR: "; the space moves to the summary so that SFT and
        # preference data split prompt and completion at the same place.
        prompt = columns.text(row, "prompt", where)
        return {"id": None, "prompt": prompt.rstrip(" "), "completion": " " + columns.text(row, "label", where).strip()}
    return columns.convert(row, where, replace(opts, columns={}))
