"""`trcli generate` on the real SmolLM2-135M-Instruct with its ChatML template: raw prompts are
rendered as a conversation, the reply ends at <|im_end|> (no fake next turn), --stop cuts."""

from __future__ import annotations

import json

import pytest

from conftest import ok

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one short sentence."
ROWS = [{"id": "plain", "prompt": QUESTION},
        {"id": "hh", "prompt": f"\n\nHuman: {QUESTION}\n\nAssistant:"},
        {"id": "messages", "messages": [{"role": "user", "content": QUESTION}]}]


def generate(tmp_path, smollm2, name, *args):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / f"{name}.jsonl"
    ok("generate", "--model", smollm2, "--prompts", prompts, "--temperature", "0", "--max-new-tokens", "24",
       "--batch-size", "3", *map(str, args), "-o", out)
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_a_reply_ends_at_the_end_of_turn_and_stop_strings_cut(tmp_path, smollm2):
    got = generate(tmp_path, smollm2, "chat")
    for r in got.values():
        assert r["stop"] == "eos", r
        assert "Paris" in r["completion"]
        for marker in ("<|im_end|>", "<|im_start|>", "\nuser", "Human:", "assistant\n"):
            assert marker not in r["completion"], r
    # The same conversation however it was given: one rendering, one greedy reply.
    assert got["plain"]["completion"] == got["hh"]["completion"] == got["messages"]["completion"]

    cut = generate(tmp_path, smollm2, "stop", "--stop", " Paris")
    reply = got["plain"]["completion"]
    for r in cut.values():
        assert r["stop"] == "stop_string"
        assert r["completion"] == reply[: reply.index(" Paris")]
