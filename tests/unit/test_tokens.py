"""trcli.tokens: the one tokenization of every stage, against TRL's rule written out by hand.

TRL 1.16 tokenizes ``prompt`` and ``prompt + completion + EOS`` whole (with the tokenizer's own
special tokens for plain text, none for text a chat template rendered) and starts the completion
where the two stop agreeing. These tests pin that, the BOS rules and the truncation modes on a
tokenizer that adds a BOS, as Llama and Gemma's do.
"""

import pytest

from trcli.tokens import Encoder, end_of_turn_ids, leading_specials, resolve_chat_template


@pytest.fixture(scope="module")
def bos_tokenizer(tiny_model):
    """The tiny byte-level tokenizer, made to prepend <bos> like Llama / Gemma tokenizers do."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.add_special_tokens({"bos_token": "<bos>"})
    bos = tok.convert_tokens_to_ids("<bos>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert tok("hi")["input_ids"][0] == bos
    return tok


def _trl(tok, prompt, completions):
    """TRL 1.16's DPO tokenize_fn for plain text, written out."""
    prompt_ids = tok(prompt)["input_ids"]
    fulls = [tok(prompt + c + (tok.eos_token if not c.endswith(tok.eos_token) else ""))["input_ids"]
             for c in completions]
    n = min(next((i for i, (a, b) in enumerate(zip(prompt_ids, f)) if a != b), min(len(prompt_ids), len(f)))
            for f in fulls)
    return prompt_ids[:n], [f[n:] for f in fulls]


def test_plain_text_gets_one_bos_and_one_eos_like_trl(bos_tokenizer):
    tok = bos_tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt, chosen, rejected = "\n\nHuman: hi there\n\nAssistant:", " Hello, how can I help?", " Go away."
    out = Encoder(tok, 512)(prompt, [chosen, rejected])
    want_prompt, want = _trl(tok, prompt, [chosen, rejected])
    assert out[0].prompt == out[1].prompt == want_prompt and want_prompt[0] == bos and want_prompt.count(bos) == 1
    assert [e.completion for e in out] == want
    assert all(e.completion[-1] == eos and e.completion.count(eos) == 1 for e in out)
    assert leading_specials(tok) == [bos]


def test_a_text_that_already_starts_with_bos_does_not_get_it_twice(bos_tokenizer):
    tok = bos_tokenizer
    out = Encoder(tok, 512)("<bos>Question:", [" answer"])[0]
    assert out.prompt[:2] != [tok.bos_token_id] * 2 and out.prompt[0] == tok.bos_token_id
    # An EOS already at the end of a completion is not doubled either (TRL's rule).
    again = Encoder(tok, 512)("Question:", [" answer" + tok.eos_token])[0]
    assert again.completion.count(tok.eos_token_id) == 1


def test_rendered_text_gets_no_added_specials_but_an_end_when_the_template_writes_none(bos_tokenizer):
    tok = bos_tokenizer
    tok.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<bos>assistant: {% endif %}")
    assert end_of_turn_ids(tok) == [tok.eos_token_id]  # writes <bos> before the next turn, no end token
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    out = Encoder(tok, 512, templated=True)(text, ["Hello.\n"])[0]
    assert out.prompt == tok(text, add_special_tokens=False)["input_ids"]  # <bos> once, as the template wrote it
    assert out.completion[-1] == tok.eos_token_id  # appended: otherwise the model never learns to stop


def test_a_template_end_of_turn_is_the_end(bos_tokenizer):
    tok = bos_tokenizer
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    end = tok.convert_tokens_to_ids("<|end|>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    assert end_of_turn_ids(tok) == [tok.eos_token_id, end]
    out = Encoder(tok, 512, templated=True)("user: hi<|end|>\nassistant: ", ["Hello.<|end|>\n"])[0]
    assert tok.eos_token_id not in out.completion and out.completion.count(end) == 1


def test_keep_start_keeps_the_whole_prompt_and_drops_what_cannot_fit(bos_tokenizer):
    tok = bos_tokenizer
    prompt, completion = "one two three four five six", " seven eight nine ten eleven twelve thirteen"
    whole = Encoder(tok, 10**6)(prompt, [completion])[0]
    n = len(whole.prompt) + 3
    enc = Encoder(tok, n)
    cut = enc(prompt, [completion])[0]
    assert cut.prompt == whole.prompt and cut.completion == whole.completion[:3]
    assert enc(prompt, [completion]) is not None and Encoder(tok, len(whole.prompt))(prompt, [completion]) is None
    assert enc.report("test") == {"sequences": 2, "truncated": 2, "dropped": 0, "short_completions": 2, "prompt_cut": 0}


def test_keep_end_cuts_the_prompt_from_the_left_and_max_prompt_length_keeps_bos(bos_tokenizer):
    tok = bos_tokenizer
    prompt, completion = "one two three four five six", " seven"
    whole = Encoder(tok, 10**6)(prompt, [completion])[0]
    total = len(whole.prompt) + len(whole.completion)
    end = Encoder(tok, total - 2, truncation="keep_end")(prompt, [completion])[0]
    assert end.completion == whole.completion and end.prompt == whole.prompt[2:]
    capped = Encoder(tok, 10**6, max_prompt_length=3)(prompt, [completion])[0]
    assert capped.prompt == [tok.bos_token_id] + whole.prompt[-2:]


def test_chat_template_setting(bos_tokenizer, tmp_path):
    tok = bos_tokenizer
    tok.chat_template = "{{ messages[0]['content'] }}"
    assert resolve_chat_template(tok, "none") is None
    assert resolve_chat_template(tok, "auto") == "{{ messages[0]['content'] }}"
    path = tmp_path / "t.jinja"
    path.write_text("X{{ messages[0]['content'] }}")
    assert resolve_chat_template(tok, str(path)) == "X{{ messages[0]['content'] }}" == tok.chat_template
    from trcli.errors import UsageError

    with pytest.raises(UsageError, match="missing.jinja"):
        resolve_chat_template(tok, str(tmp_path / "missing.jinja"))
