"""Prompt token ids in `trcli generate` (and judge hf:) are training's, on a tiny model whose
tokenizer adds a BOS as Llama's does: plain text gets the BOS once, text a chat template renders
(--chat-template PATH here) gets none added, HH transcripts and messages become turns. Checked
by greedy decoding by hand from the expected ids: the scored log-probs only match from those."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_generate_sampling import greedy

from conftest import ok, run_cli

N = 8
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory, tiny_model):
    """The tiny model, its tokenizer made to prepend its BOS (<|endoftext|>) to every text."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("bos") / "model"
    shutil.copytree(tiny_model, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path)("hi")["input_ids"][0] == tok.bos_token_id
    return path


@pytest.fixture(scope="module")
def lm(bos_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(bos_model).eval(), AutoTokenizer.from_pretrained(bos_model)


def generate(tmp_path, model, rows, *args):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    out.unlink(missing_ok=True)
    ok("generate", "--model", model, "--prompts", prompts, "--temperature", "0", "--max-new-tokens", N,
       "--score-with", model, "--batch-size", "3", *map(str, args), "-o", out)
    return {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}


def check(record, lm, ids):
    want, logps = greedy(lm, ids, N, end_ids=(lm[1].eos_token_id,))
    assert record["n_tokens"] == len(want)
    assert record["token_logps"] == pytest.approx(logps, abs=1e-4)


def test_plain_prompts_get_the_bos_once(tmp_path, bos_model, lm):
    tok = lm[1]
    bos = tok.bos_token_id
    hh = "\n\nHuman: Hi\n\nAssistant:"
    got = generate(tmp_path, bos_model, [{"id": "a", "prompt": "Hello there"},
                                         {"id": "b", "prompt": tok.bos_token + "Hello there"},
                                         {"id": "c", "prompt": hh}])
    plain = [bos] + tok("Hello there", add_special_tokens=False)["input_ids"]
    check(got["a"], lm, plain)
    check(got["b"], lm, plain)  # already there: not twice
    assert got["a"]["completion"] == got["b"]["completion"]
    check(got["c"], lm, [bos] + tok(hh, add_special_tokens=False)["input_ids"])


def test_a_chat_template_renders_raw_prompts_and_messages(tmp_path, bos_model, lm):
    tok = lm[1]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    rows = [{"id": "hh", "prompt": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Bye\n\nAssistant:"},
            {"id": "text", "prompt": "  What is rain?  "},
            {"id": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}]
    got = generate(tmp_path, bos_model, rows, "--chat-template", template)
    rendered = {"hh": "<|endoftext|>user: Hi\nassistant: Hello.\nuser: Bye\nassistant:",
                "text": "<|endoftext|>user: What is rain?\nassistant:",
                "m": "<|endoftext|>system: Be brief.\nuser: Hi\nassistant:"}
    for rid, text in rendered.items():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1  # the template's, none added
        check(got[rid], lm, ids)
    # The record keeps a readable prompt, the same whatever the model's template.
    assert got["hh"]["prompt"] == rows[0]["prompt"]
    assert got["m"]["prompt"] == "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:"
    assert got["m"]["messages"] == rows[2]["messages"]
    # --chat-template none: plain text (messages as that transcript), with the BOS.
    plain = generate(tmp_path, bos_model, rows, "--chat-template", "none")
    check(plain["m"], lm, [tok.bos_token_id] + tok(got["m"]["prompt"], add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("rows, message", [
    ([{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}], "id 'x' already used"),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     "must end with a user message"),
    ([{"messages": []}], "'messages' must be a non-empty list"),
    ([{"text": "a"}], "missing string field 'prompt'"),
])
def test_bad_prompt_rows_exit_2_naming_the_line(tmp_path, tiny_model, rows, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("generate", "--model", tiny_model, "--prompts", prompts, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and message in result.stderr and f"{prompts}:" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_hf_judge_reads_the_bos_once(bos_model, lm):
    from trcli.judge.local import LMJudge

    tok = lm[1]
    judge = LMJudge(str(bos_model), torch.device("cpu"), "hh")
    seen = []
    judge._logp = lambda ids, option: seen.append((ids, option)) or 0.0
    judge.logit_gap("\n\nHuman: Which?\n\nAssistant:")
    text = judge._text("\n\nHuman: Which?\n\nAssistant:")
    for s, (ids, option) in zip((" A", " B"), seen):
        assert ids + option == [tok.bos_token_id] + tok(text + s, add_special_tokens=False)["input_ids"]
        assert ids.count(tok.bos_token_id) == 1 and option and tok.decode(option) == s


def test_a_prep_output_is_encoded_as_prep_rendered_it(tmp_path, bos_model, lm, pairs_file):
    tok = lm[1]
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    for setting in (template, "none"):
        prep = tmp_path / f"prep-{'none' if setting == 'none' else 'chat'}"
        ok("prep", "--source", "jsonl", "--input", pairs_file, "--model", bos_model, "--chat-template", setting, "-o", prep)
        out = tmp_path / f"{prep.name}.jsonl"
        ok("generate", "--model", bos_model, "--prompts", prep, "--limit", "2", "--temperature", "0",
           "--max-new-tokens", N, "--score-with", bos_model, "-o", out)
        for r in map(json.loads, out.read_text().splitlines()):
            ids = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            if setting == "none":  # plain text: the tokenizer's BOS, as training adds it
                assert r["prompt"].startswith("\n\nHuman:")
                ids = [tok.bos_token_id] + ids
            else:  # rendered: the template wrote the BOS, nothing is added
                assert r["prompt"].startswith("<|endoftext|>user: ")
            assert ids.count(tok.bos_token_id) == 1
            check(r, lm, ids)


def test_raw_prompts_rendered_otherwise_than_the_training_data_warn(tmp_path, bos_model, prep_run):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\n')
    env = {"TRCLI_DATA__PATH": str(prep_run)}  # what --from an sft run on that (plain) prep output sets
    args = ["generate", "--model", bos_model, "--prompts", prompts, "--max-new-tokens", "2"]
    warned = ok(*args, "--chat-template", template, "-o", tmp_path / "a.jsonl", env=env)
    assert "trained on" in warned.stderr and "rendered as plain text" in warned.stderr
    assert "--chat-template none" in warned.stderr
    assert "warning" not in ok(*args, "--chat-template", "none", "-o", tmp_path / "b.jsonl", env=env).stderr
