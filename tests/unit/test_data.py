"""Parsing: the HH transcript split, the file readers' error locations, the layout converters."""

from __future__ import annotations

import pytest

from trcli.data import chat, columns, hh, tldr
from trcli.data.files import RowError, read_csv, read_file, read_json, read_jsonl
from trcli.data.records import Drop, SourceOptions
from trcli.errors import DataError, UsageError

H, A = "\n\nHuman:", "\n\nAssistant:"


# --- HH ---------------------------------------------------------------------------------------

def test_hh_prompt_is_the_shared_multi_turn_prefix_up_to_the_last_assistant():
    prefix = f"{H} Hi{A} Hello!{H} How do I bake bread?{A}"
    prompt, chosen, rejected = hh.split_transcripts(prefix + " I think you knead it.", prefix + " I think not.")
    # Replies that start alike ("I think") must not lend their common words to the prompt.
    assert prompt == prefix
    assert (chosen, rejected) == (" I think you knead it.", " I think not.")


def test_hh_reply_containing_the_word_assistant_is_kept_whole():
    prefix = f"{H} Who are you?{A}"
    _, chosen, _ = hh.split_transcripts(prefix + " An Assistant: that is me.", prefix + " Nobody.")
    assert chosen == " An Assistant: that is me."


@pytest.mark.parametrize("chosen,rejected,reason", [
    (f"{H} a{A} b{H} c{A} d", f"{H} a{A} X{H} c{A} d2", "diverged"),   # differ in an earlier reply
    (f"{H} a{A} b", f"{H} z{A} b", "diverged"),                         # differ before any Assistant
    (f"{H} a{A} b", f"{H} a{A} b", "identical"),
    ("", "", "empty"),
    ("   ", f"{H} a{A} b", "empty"),
])
def test_hh_drops_by_reason(chosen, rejected, reason):
    with pytest.raises(Drop) as err:
        hh.split_transcripts(chosen, rejected)
    assert err.value.reason == reason


def test_hh_convert_names_a_missing_or_mistyped_field():
    with pytest.raises(RowError, match="missing field 'rejected'"):
        hh.convert({"chosen": f"{H} a{A} b"}, "f:3", SourceOptions())
    with pytest.raises(RowError, match="field 'chosen' must be a string, not int"):
        hh.convert({"chosen": 5, "rejected": "x"}, "f:3", SourceOptions())
    # A column map renames before parsing.
    record = hh.convert({"good": f"{H} a{A} b", "bad": f"{H} a{A} c"}, "f:1",
                        SourceOptions(columns={"chosen": "good", "rejected": "bad"}))
    assert (record["prompt"], record["chosen"], record["rejected"]) == (f"{H} a{A}", " b", " c")


# --- file readers -----------------------------------------------------------------------------

def test_jsonl_reader_locates_each_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": "ok"}\n\n{"a": \n[1, 2]\n{"a": "caf\xe9"}\n')
    rows = list(read_jsonl(path))
    assert rows[0] == (f"{path}:1", {"a": "ok"})
    assert [w for w, _ in rows[1:]] == [f"{path}:3", f"{path}:4", f"{path}:5"]  # blank line 2 skipped
    problems = [r.problem for _, r in rows[1:]]
    assert "malformed JSON" in problems[0] and problems[1] == "expected a JSON object"
    assert problems[2].startswith("invalid UTF-8")


def test_json_array_rows_know_their_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"a": "x"},\n\n  {"a":\n   "y"}\n]\n')
    assert list(read_json(path)) == [(f"{path}:2", {"a": "x"}), (f"{path}:4", {"a": "y"})]


@pytest.mark.parametrize("text,line,needle", [
    ('[\n {"a": "x"},\n {"a": }\n]', 3, "malformed JSON"),
    ('{"a": "x"}', 1, "expected a JSON array"),
    ('[{"a": "x"}\n {"a": "y"}]', 2, "expected ',' or ']'"),
    ('[{"a": "x"}] trailing', 1, "extra data"),
])
def test_broken_json_is_a_file_error_naming_the_line(tmp_path, text, line, needle):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=needle) as err:
        list(read_json(path))
    assert str(err.value).startswith(f"{path}:{line}:")


def test_invalid_utf8_inside_json_is_blamed_on_its_row_and_field(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"a": "ok"},\n {"info": {"post": "caf\xe9"}}]')
    rows = list(read_json(path))
    assert rows[0][1] == {"a": "ok"}
    assert isinstance(rows[1][1], RowError) and rows[1][1].problem == "invalid UTF-8 in field 'info.post'"
    assert rows[1][0] == f"{path}:2"


def test_csv_rows_name_their_starting_line_and_bad_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'q,good,bad\n"multi\nline",g,b\nx,y\nx,y,z,extra\nx,\xff,z\n')
    rows = list(read_csv(path))
    assert rows[0] == (f"{path}:2", {"q": "multi\nline", "good": "g", "bad": "b"})
    assert [w for w, _ in rows[1:]] == [f"{path}:4", f"{path}:5", f"{path}:6"]
    assert rows[1][1].problem == "missing field 'bad' (row has too few cells)"
    assert "4 cells, header has 3" in rows[2][1].problem
    assert rows[3][1].problem == "invalid UTF-8 in field 'good'"


def test_read_file_needs_an_existing_file_of_a_known_format(tmp_path):
    with pytest.raises(DataError, match="input file not found"):
        list(read_file(tmp_path / "nope.jsonl"))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="cannot tell the format"):
        list(read_file(odd))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=f"{broken}: not a readable Parquet file"):
        list(read_file(broken))


# --- generic columns --------------------------------------------------------------------------

def test_columns_map_and_kinds():
    opts = SourceOptions(columns={"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert columns.convert({"q": "p", "good": "g", "bad": "b", "id": 7}, "f:1", opts) == \
        {"prompt": "p", "chosen": "g", "rejected": "b", "id": "7"}
    # Unpaired labels arrive as bools, 0/1 or (from CSV) strings.
    for raw, want in [(True, True), (0, False), ("False", False), (" 1 ", True)]:
        record = columns.convert({"prompt": "p", "completion": "c", "label": raw}, "f:1", SourceOptions())
        assert record["label"] is want
    with pytest.raises(RowError, match="field 'label' must be true or false"):
        columns.convert({"prompt": "p", "completion": "c", "label": "maybe"}, "f:1", SourceOptions())
    # Asking for unpaired records still accepts paired rows (prep converts them) ...
    assert "chosen" in columns.convert({"prompt": "p", "chosen": "g", "rejected": "b"}, "f:1",
                                       SourceOptions(kind="unpaired"))
    # ... but an unpaired row without its label is named as such, not as a missing 'chosen'.
    with pytest.raises(RowError, match="missing field 'label'"):
        columns.convert({"prompt": "p", "completion": "c"}, "f:1", SourceOptions(kind="unpaired"))
    with pytest.raises(RowError, match="missing field 'bad'"):
        columns.convert({"q": "p", "good": "g"}, "f:1", opts)


# --- TL;DR ------------------------------------------------------------------------------------

def comparison(choice=1, post="My cat ignores me.", **info):
    return {"info": {"id": "t1", "subreddit": "cats", "title": "Help", "post": post, **info},
            "summaries": [{"text": "cat is sad ", "policy": "a"}, {"text": " cat ignores owner", "policy": "b"}],
            "choice": choice, "worker": "w1"}


def test_tldr_comparison_uses_the_choice_and_the_template():
    record = tldr.convert(comparison(choice=1), "f:1", SourceOptions())
    assert record["prompt"] == "SUBREDDIT: r/cats\nTITLE: Help\nPOST: My cat ignores me.\nTL;DR:"
    assert (record["chosen"], record["rejected"]) == (" cat ignores owner", " cat is sad")
    custom = tldr.convert(comparison(choice=0), "f:1", SourceOptions(template="{title}\n{post}\nTL;DR:"))
    assert custom["prompt"] == "Help\nMy cat ignores me.\nTL;DR:" and custom["chosen"] == " cat is sad"


def test_tldr_bad_rows_and_templates():
    with pytest.raises(RowError, match="field 'choice' must be 0 or 1"):
        tldr.convert(comparison(choice=2), "f:1", SourceOptions())
    with pytest.raises(RowError, match="field 'info.post' must be a string"):
        tldr.convert(comparison(post=3), "f:1", SourceOptions())
    with pytest.raises(Drop, match="not a reddit post"):  # CNN/DM rows in the same dataset
        tldr.convert(comparison(post=None, article="News."), "f:1", SourceOptions())
    with pytest.raises(UsageError, match="data.template: cannot fill 'body'"):
        tldr.check_template("{body} TL;DR:")


def test_tldr_reference_summaries_are_sft_records_split_after_tldr():
    record = tldr.convert({"prompt": "SUBREDDIT: r/a\nTITLE: t\nPOST: p\nTL;DR: ", "label": "short"}, "f:1",
                          SourceOptions())
    assert record == {"id": None, "prompt": "SUBREDDIT: r/a\nTITLE: t\nPOST: p\nTL;DR:", "completion": " short"}


# --- chat / UltraFeedback ---------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    from trcli.tiny import build_tokenizer

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
    tok.chat_template = TEMPLATE
    return tok


def conv(*turns):
    return [{"role": r, "content": c} for r, c in zip(["user", "assistant"] * 3, turns)]


def test_ultrafeedback_renders_the_shared_prefix_with_the_chat_template(chat_tokenizer):
    row = {"prompt": "Hi?", "chosen": conv("Hi?", "Hello."), "rejected": conv("Hi?", "Go away."), "score_chosen": 8.0}
    record = chat.convert(row, "f:1", SourceOptions(tokenizer=chat_tokenizer))
    assert record["prompt"] == "<|endoftext|>user: Hi?\n<|endoftext|>assistant: "
    assert (record["chosen"], record["rejected"]) == ("Hello.\n", "Go away.\n")


def test_chat_explicit_prompt_and_sft_messages(chat_tokenizer):
    opts = SourceOptions(tokenizer=chat_tokenizer)
    paired = chat.convert({"prompt": conv("a", "b", "c"), "chosen": [{"role": "assistant", "content": "d"}],
                           "rejected": [{"role": "assistant", "content": "e"}]}, "f:1", opts)
    assert paired["prompt"].endswith("assistant: b\n<|endoftext|>user: c\n<|endoftext|>assistant: ")
    assert paired["chosen"] == "d\n"
    sft = chat.convert({"messages": conv("a", "b")}, "f:1", opts)
    assert sft == {"id": None, "prompt": "<|endoftext|>user: a\n<|endoftext|>assistant: ", "completion": "b\n"}


def test_chat_bad_rows_name_the_field(chat_tokenizer):
    opts = SourceOptions(tokenizer=chat_tokenizer)
    with pytest.raises(RowError, match=r"field 'chosen\[1\]\.content' must be a string"):
        chat.convert({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}],
                      "rejected": conv("a", "b")}, "f:1", opts)
    with pytest.raises(RowError, match="field 'chosen' must end with an assistant message"):
        chat.convert({"chosen": conv("a", "b", "c"), "rejected": conv("a", "b", "c")}, "f:1", opts)
    with pytest.raises(RowError, match="field 'rejected' must be a non-empty list"):
        chat.convert({"chosen": conv("a", "b"), "rejected": "b"}, "f:1", opts)
    with pytest.raises(Drop, match="diverged"):
        chat.convert({"chosen": conv("a", "b"), "rejected": conv("x", "b")}, "f:1", opts)
    with pytest.raises(Drop, match="empty"):
        chat.convert({"chosen": conv("a", " "), "rejected": conv("a", "b")}, "f:1", opts)


def test_ultrafeedback_picks_preference_or_sft_splits():
    assert chat.ultrafeedback_splits("paired") == {"train_prefs": "train", "test_prefs": "test"}
    assert chat.ultrafeedback_splits("sft") == {"train_sft": "train", "test_sft": "test"}

