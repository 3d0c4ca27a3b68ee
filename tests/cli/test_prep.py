"""`trcli prep` end to end on fixtures the tests write in each layout, and on broken files."""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import pytest

from conftest import ok, run_cli

H, A = "\n\nHuman:", "\n\nAssistant:"
# shared/ sits beside the repository (here and in CI's clean clone).
REAL_HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant: {% endif %}")


def write_jsonl(path: Path, rows: list) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def prep_json(*args) -> dict:
    return json.loads(ok("prep", *args, "--json").stdout)


def load(out: Path):
    from trcli.data.records import load_prepped

    return load_prepped(out)


def hh_rows(n_good: int = 6) -> list[dict]:
    rows = []
    for i in range(n_good):
        prefix = f"{H} Hi {i}{A} Hello.{H} Tell me about topic {i}.{A}"
        rows.append({"chosen": prefix + f" Topic {i} is nice.", "rejected": prefix + " No."})
    rows += [
        {"chosen": f"{H} a{A} b{H} c{A} d", "rejected": f"{H} a{A} X{H} c{A} e"},  # diverged earlier
        {"chosen": f"{H} a{A}", "rejected": f"{H} a{A} something"},               # empty chosen reply
        {"chosen": f"{H} a{A} same", "rejected": f"{H} a{A} same"},               # identical
    ]
    return rows


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> Path:
    from trcli.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("chat-tok")
    tok = build_tokenizer(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return path


# --- HH ---------------------------------------------------------------------------------------

def test_hh_transcripts_become_pairs_and_drops_are_counted(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "hh.jsonl.gz", hh_rows())
    out = tmp_path / "run"
    report = prep_json("--source", "hh", "--input", src, "--model", tiny_model, "-o", out)
    assert (report["rows_in"], report["rows_out"]) == (9, 6)
    assert report["dropped"] == {"diverged": 1, "empty": 1, "identical": 1}
    train = load(out)["train"]
    assert train[0]["prompt"] == f"{H} Hi 0{A} Hello.{H} Tell me about topic 0.{A}"
    assert (train[0]["chosen"], train[0]["rejected"]) == (" Topic 0 is nice.", " No.")
    # The report is in the manifest too, with per-field token lengths from the tokenizer.
    manifest = json.loads((out / "trcli-run.json").read_text())
    assert manifest["status"] == "completed" and manifest["outputs"]["report"] == report
    assert set(report["tokens"]) == {"prompt", "chosen", "rejected"}
    assert report["tokens"]["rejected"]["max"] < report["tokens"]["chosen"]["max"]


def test_truncation_counts_follow_the_configured_limits(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    words = "how to save money and sleep well".split()
    rows = [{"prompt": " ".join(words[: i + 1]), "chosen": " ".join(words[i:]), "rejected": "no"} for i in range(7)]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    n = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    limits = {"prompt": n(rows[3]["prompt"]), "length": n(rows[3]["prompt"]) + 3}
    report = prep_json("--input", src, "--model", tiny_model, "--max-prompt-length", limits["prompt"],
                       "--max-length", limits["length"], "-o", tmp_path / "run")
    # Training cuts the prompt to max_prompt_length, then completion + EOS to what max_length leaves.
    cut = sum(min(n(r["prompt"]), limits["prompt"]) + n(r["chosen"]) + 1 > limits["length"] for r in rows)
    # A cut completion keeps what max_length leaves after the prompt: short when under 8 tokens.
    short = sum(min(n(r["prompt"]), limits["prompt"]) + n(r["chosen"]) + 1 > limits["length"]
                and limits["length"] - min(n(r["prompt"]), limits["prompt"]) < 8 for r in rows)
    assert report["truncated"] == {"prompt": 3, "completion": cut, "dropped": 0, "short": short,
                                   "truncation": "keep_start",
                                   "max_prompt_length": limits["prompt"], "max_length": limits["length"]}
    assert 0 < cut < len(rows)
    # Without --max-prompt-length (the default) the whole prompt is kept, as TRL does; a prompt that
    # alone fills --max-length leaves no completion token, and training drops its record.
    result = run_cli("prep", "--input", src, "--model", tiny_model, "--max-length", 8, "--json",
                     "-o", tmp_path / "run2")
    report = json.loads(result.stdout)
    assert report["truncated"]["dropped"] == sum(n(r["prompt"]) >= 8 for r in rows) == 3
    assert report["truncated"]["prompt"] == 0 and "training will drop" in result.stderr
    # Token counts are training's (TRL's rule): prompt and prompt + completion + EOS tokenized whole,
    # the completion starting where both of a pair's sequences leave the prompt's tokens.
    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    rejected = []
    for r in rows:
        whole = [ids(r["prompt"] + c + tok.eos_token) for c in (r["chosen"], r["rejected"])]
        rejected.append(len(whole[1]) - min(common(ids(r["prompt"]), w) for w in whole))
    assert report["tokens"]["rejected"]["max"] == max(rejected) and report["tokens"]["rejected"]["p50"] == sorted(rejected)[3]
    assert report["tokens"]["prompt"]["max"] == n(rows[-1]["prompt"])


@pytest.mark.skipif(not REAL_HH.exists(), reason=f"real HH file not present at {REAL_HH}")
def test_real_hh_harmless_base_test_split(tmp_path):
    report = prep_json("--source", "hh", "--input", REAL_HH, "--test-size", "0.05", "-o", tmp_path / "run")
    assert report["rows_in"] == 2312 and report["rows_out"] >= 2290
    assert report["rows_out"] + sum(report["dropped"].values()) == 2312
    data = load(tmp_path / "run")
    rows = data["train"].to_list() + data["test"].to_list()
    assert all(r["prompt"].endswith(A) and H not in r["chosen"] + r["rejected"] for r in rows)
    assert not {r["prompt"] for r in data["train"]} & {r["prompt"] for r in data["test"]}


# --- TL;DR ------------------------------------------------------------------------------------

def comparison(post: int, choice: int) -> dict:
    return {"info": {"id": f"p{post}", "post": f"Post number {post}.", "title": f"Title {post}", "subreddit": "tifu"},
            "summaries": [{"text": f"summary A{post}"}, {"text": f"summary B{post}"}], "choice": choice}


def test_tldr_comparisons_keep_every_comparison_of_a_post_on_one_side(tmp_path):
    # Three comparisons per post: a row-level split would leak posts into the test split.
    rows = [comparison(post, choice) for post in range(10) for choice in (0, 1, 0)]
    src = write_jsonl(tmp_path / "comparisons.jsonl", rows)
    report = prep_json("--source", "tldr", "--input", src, "--test-size", "0.3", "--seed", "1",
                       "--template", "r/{subreddit} | {title} | {post}\nTL;DR:", "-o", tmp_path / "run")
    assert report["splits"] == {"train": 21, "test": 9}
    data = load(tmp_path / "run")
    train_prompts, test_prompts = set(data["train"]["prompt"]), set(data["test"]["prompt"])
    assert len(test_prompts) == 3 and not train_prompts & test_prompts
    row = next(r for r in data["train"] if r["chosen"] == " summary B0" or r["chosen"] == " summary A0")
    assert row["prompt"] == "r/tifu | Title 0 | Post number 0.\nTL;DR:"


def test_tldr_sft_from_reference_summaries(tmp_path):
    rows = [{"prompt": f"SUBREDDIT: r/x\nTITLE: t{i}\nPOST: p{i}\nTL;DR: ", "label": f"s{i}"} for i in range(4)]
    src = write_jsonl(tmp_path / "tldr.jsonl", rows)
    report = prep_json("--source", "tldr", "--input", src, "-o", tmp_path / "run")
    assert report["kind"] == "sft"
    assert load(tmp_path / "run")["train"][0]["completion"] == " s0"


# --- UltraFeedback / chat ---------------------------------------------------------------------

def uf_row(i: int) -> dict:
    user = {"role": "user", "content": f"Question {i}?"}
    return {"prompt": f"Question {i}?", "prompt_id": f"id{i}",
            "chosen": [user, {"role": "assistant", "content": f"Answer {i}."}],
            "rejected": [user, {"role": "assistant", "content": "Dunno."}], "score_chosen": 9.0, "score_rejected": 2.0}


def test_ultrafeedback_renders_with_the_chat_template_and_shows_the_boundary(tmp_path, chat_tokenizer):
    src = write_jsonl(tmp_path / "uf.jsonl", [uf_row(i) for i in range(4)])
    result = ok("prep", "--source", "ultrafeedback", "--input", src, "--model", chat_tokenizer,
                "--show", "2", "--json", "-o", tmp_path / "run")
    assert json.loads(result.stdout)["rows_out"] == 4  # stdout is the report alone
    row = load(tmp_path / "run")["train"][0]
    assert row["prompt"] == "<|endoftext|>user: Question 0?\n<|endoftext|>assistant: "
    assert row["chosen"] == "Answer 0.\n"
    # --show: the special tokens and the boundary are visible, EOS included, on stderr.
    assert "── example 2 of 2" in result.stderr and "── example 3" not in result.stderr
    assert "«<|endoftext|>»user: Question 0?\n«<|endoftext|>»assistant: ⟫" in result.stderr
    assert "⟫ chosen" in result.stderr and "Answer 0.\n«<|endoftext|>»" in result.stderr


def test_chat_sources_need_a_tokenizer_with_a_chat_template(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "uf.jsonl", [uf_row(0)])
    result = run_cli("prep", "--source", "chat", "--input", src, "-o", tmp_path / "a")
    assert result.exit_code == 2 and "pass --model" in result.stderr
    result = run_cli("prep", "--source", "chat", "--input", src, "--model", tiny_model, "-o", tmp_path / "b")
    assert result.exit_code == 2 and "has no chat template" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- generic files, kinds ---------------------------------------------------------------------

def test_csv_with_column_map_and_native_unpaired_labels(tmp_path):
    src = tmp_path / "kto.csv"
    with open(src, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["question", "answer", "thumbs_up"])
        writer.writerows([[f"q{i}", f"a{i}", "true" if i % 2 else "false"] for i in range(6)])
    report = prep_json("--source", "csv", "--input", src,
                       "--columns", "prompt=question,completion=answer,label=thumbs_up", "-o", tmp_path / "run")
    assert report["kind"] == "unpaired"
    train = load(tmp_path / "run")["train"]
    assert train["label"] == [False, True, False, True, False, True] and train["completion"][1] == "a1"


def test_parquet_with_column_map_to_unpaired_and_sft(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"q": [f"q{i}" for i in range(5)], "good": ["g"] * 5, "bad": ["b"] * 5}), src)
    cols = ("--columns", "prompt=q,chosen=good,rejected=bad")
    paired = prep_json("--source", "parquet", "--input", src, *cols, "-o", tmp_path / "p")
    assert paired["kind"] == "paired" and paired["rows_out"] == 5
    unpaired = prep_json("--source", "parquet", "--input", src, *cols, "--kind", "unpaired", "-o", tmp_path / "u")
    assert unpaired["rows_out"] == 10
    rows = load(tmp_path / "u")["train"].to_list()
    assert [(r["completion"], r["label"]) for r in rows[:2]] == [("g", True), ("b", False)]
    sft = prep_json("--source", "parquet", "--input", src, *cols, "--sft", "-o", tmp_path / "s")
    assert sft["kind"] == "sft" and load(tmp_path / "s")["train"]["completion"] == ["g"] * 5


def test_json_array_input(tmp_path):
    src = tmp_path / "pairs.json"
    src.write_text(json.dumps([{"prompt": f"p{i}", "chosen": "c", "rejected": "r", "id": f"x{i}"} for i in range(3)]))
    prep_json("--source", "json", "--input", src, "-o", tmp_path / "run")
    assert load(tmp_path / "run")["train"]["id"] == ["x0", "x1", "x2"]


def test_asking_for_paired_records_from_sft_data_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    result = run_cli("prep", "--input", src, "--kind", "paired", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "missing field 'chosen'" in result.stderr


# --- bad input --------------------------------------------------------------------------------

GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}


def _broken_parquet(path: Path) -> None:
    path.write_bytes(b"PAR1 this is not really parquet")


@pytest.mark.parametrize("name,content,source,needle", [
    ("malformed.jsonl", [GOOD, '{"prompt": "p", "chosen": '], "jsonl", ":2: malformed JSON"),
    ("missing.jsonl", [GOOD, GOOD, {"prompt": "p", "chosen": "c"}], "jsonl", ":3: missing field 'rejected'"),
    ("nonstring.jsonl", [{**GOOD, "chosen": ["c"]}], "jsonl", ":1: field 'chosen' must be a string, not list"),
    ("utf8.jsonl", b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "\xff"}\n', "jsonl",
     ":2: invalid UTF-8"),
    ("empty.jsonl", b"", "jsonl", "no rows (empty input)"),
    ("hh.jsonl", [{"chosen": f"{H} a{A} b"}], "hh", ":1: missing field 'rejected'"),
    ("tldr.jsonl", [{**comparison(0, 0), "choice": None}], "tldr", ":1: field 'choice' must be 0 or 1"),
    ("broken.json", b'[{"prompt": "p",\n "chosen": }]', "json", ":2: malformed JSON"),
    ("broken.csv", b'prompt,chosen,rejected\np,c,r\np,c\n', "csv", ":3: missing field 'rejected'"),
    ("broken.parquet", None, "parquet", "not a readable Parquet file"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, name, content, source, needle):
    src = tmp_path / name
    if content is None:
        _broken_parquet(src)
    elif isinstance(content, bytes):
        src.write_bytes(content)
    else:
        write_jsonl(src, content)
    out = tmp_path / "out"
    result = run_cli("prep", "--source", source, "--input", src, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and str(src) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stdout == "" and not out.exists()


def test_on_error_skip_counts_bad_rows(tmp_path):
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b'{"prompt": "p1", "chosen": "c", "rejected": "r"}\n{oops\n{"prompt": "p2"}\n'
                    b'{"prompt": "\xff"}\n{"prompt": "p3", "chosen": "c", "rejected": "r"}\n'
                    b'{"prompt": "p4", "chosen": "c", "rejected": "c"}\n')
    result = ok("prep", "--input", src, "--on-error", "skip", "--json", "-o", tmp_path / "run")
    report = json.loads(result.stdout)
    assert (report["rows_in"], report["rows_out"]) == (6, 2)
    assert report["dropped"] == {"malformed": 3, "identical": 1}
    assert "skipped 3 malformed rows; the first: " + f"{src}:2" in result.stderr


def test_a_dataset_that_ends_up_empty_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "hh.jsonl", hh_rows(n_good=0))
    result = run_cli("prep", "--source", "hh", "--input", src, "-o", tmp_path / "run")
    assert result.exit_code == 2 and "no usable rows (3 read" in result.stderr
    assert not (tmp_path / "run").exists()


def test_offline_hub_dataset_is_a_clear_error(tmp_path):
    result = run_cli("prep", "--source", "hh", "--subset", "harmless-base", "-o", tmp_path / "run",
                     env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.exit_code == 2 and "cannot load dataset 'Anthropic/hh-rlhf'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_table_report_on_stdout(tmp_path, tiny_model):
    src = write_jsonl(tmp_path / "hh.jsonl", hh_rows())
    out = ok("prep", "--source", "hh", "--input", src, "--model", tiny_model, "-o", tmp_path / "run").stdout
    assert "dropped: diverged" in out and "tokens per field" in out and "truncation (keep_start):" in out


def test_datasets_loader_keeps_the_sources_own_splits(tmp_path):
    # A local directory goes through datasets.load_dataset like a hub id, offline.
    repo = tmp_path / "repo"
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(5)])
    write_jsonl(repo / "validation.jsonl", [{"prompt": f"v{i}", "chosen": "c", "rejected": "r"} for i in range(2)])
    result = ok("prep", "--source", "hub", "--input", repo, "--test-size", "0.5", "--json", "-o", tmp_path / "run")
    assert json.loads(result.stdout)["splits"] == {"train": 5, "test": 2}  # validation serves as test
    assert "ignoring --test-size" in result.stderr
    assert load(tmp_path / "run")["test"]["prompt"] == ["v0", "v1"]
    one = prep_json("--source", "hub", "--input", repo, "--split", "validation", "-o", tmp_path / "one")
    assert one["splits"] == {"train": 2}


def test_missing_local_file_for_a_layout_source_is_not_looked_up_on_the_hub(tmp_path):
    result = run_cli("prep", "--source", "hh", "--input", tmp_path / "nope.jsonl.gz", "-o", tmp_path / "run")
    assert result.exit_code == 2 and "nope.jsonl.gz: input file not found" in result.stderr


# --- prep -> sft -> align on the HH and TL;DR fixtures -------------------------------------------

@pytest.mark.parametrize("source", ["hh", "tldr"])
def test_sft_then_align_from_the_source_fixtures(tmp_path, tiny_model, source):
    rows = hh_rows(8) if source == "hh" else [comparison(post, post % 2) for post in range(8)]
    src = write_jsonl(tmp_path / f"{source}.jsonl", rows)
    ok("prep", "--source", source, "--input", src, "-o", tmp_path / "prep")
    ok("sft", "--model", tiny_model, "--from", tmp_path / "prep", "--max-steps", "2", "--batch-size", "4",
       "-o", tmp_path / "sft")
    ok("align", "--from", tmp_path / "sft", "--method", "tr-kto", "--update", "hard", "--tau", "2",
       "--max-steps", "2", "--batch-size", "4", "-o", tmp_path / "align")
    manifest = json.loads((tmp_path / "align" / "trcli-run.json").read_text())
    assert manifest["status"] == "completed" and manifest["outputs"]["final"]["ref_updates"] == 1


# --- damaged files and the format from the suffix (issue 13) ---------------------------------------

def _gz_rows(n: int = 200) -> bytes:
    return gzip.compress("".join(json.dumps({**GOOD, "prompt": f"p{i}"}) + "\n" for i in range(n)).encode())


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads recurses once per level


@pytest.mark.parametrize("name,content,source,needle", [
    ("cut.jsonl.gz", lambda: _gz_rows()[: len(_gz_rows()) // 2], "jsonl", "damaged or truncated gzip file"),
    ("cut-auto.jsonl.gz", lambda: _gz_rows()[: len(_gz_rows()) // 2], None, "damaged or truncated gzip file"),
    ("plain.jsonl.gz", lambda: json.dumps(GOOD).encode() + b"\n", "jsonl", "not a gzip file"),
    ("flipped.jsonl.gz", lambda: _gz_rows()[:30] + bytes(b ^ 0xFF for b in _gz_rows()[30:60]) + _gz_rows()[60:],
     "jsonl", "damaged or truncated gzip file"),
    ("cut.csv.gz", lambda: gzip.compress(b"prompt,chosen,rejected\n" + b"p,c,r\n" * 500)[:-40], "csv",
     "damaged or truncated gzip file"),
    ("deep.jsonl", lambda: (json.dumps(GOOD) + "\n" + '{"prompt": ' + DEEP + "}\n").encode(), "jsonl",
     ":2: JSON nested too deeply"),
    ("deep.json", lambda: ("[" + json.dumps(GOOD) + ",\n" + DEEP + "]").encode(), "json", ":2: malformed JSON (JSON nested too deeply)"),
    ("hh-cut.jsonl.gz", lambda: _gz_rows()[:-25], "hh", "damaged or truncated gzip file"),
])
def test_damaged_files_are_one_line_exit_2_naming_the_file(tmp_path, name, content, source, needle):
    src = tmp_path / name
    src.write_bytes(content())
    out = tmp_path / "out"
    result = run_cli("prep", *(["--source", source] if source else []), "--input", src, "-o", out)
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and str(src) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "Aborted" not in result.stderr and not out.exists()


def test_a_truncated_gz_names_the_line_it_broke_after(tmp_path):
    src = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({**GOOD, "prompt": f"p{i}", "pad": "x" * 200}) + "\n"
                                  for i in range(2000)).encode())
    src.write_bytes(whole[: len(whole) // 2])
    result = run_cli("prep", "--input", src, "--on-error", "skip", "-o", tmp_path / "out")
    assert result.exit_code == 2  # skip is for bad rows; a file that ends early is not one
    line = int(re.search(rf"{re.escape(str(src))}:(\d+): cannot read", result.stderr).group(1))
    assert 1 < line < 2000


def test_a_deeply_nested_row_is_skipped_like_any_bad_row(tmp_path):
    src = tmp_path / "deep.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + DEEP + "\n" + json.dumps({**GOOD, "prompt": "q"}) + "\n")
    report = prep_json("--input", src, "--on-error", "skip", "-o", tmp_path / "out")
    assert (report["rows_in"], report["rows_out"], report["dropped"]) == (3, 2, {"malformed": 1})


def _write_as(path: Path, rows: list[dict]) -> Path:
    if path.name.endswith(".csv"):
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=1))
    elif path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("name,source", [("pairs.csv", "csv"), ("pairs.json", "json"), ("pairs.parquet", "parquet"),
                                         ("pairs.CSV", "csv")])
def test_without_source_the_suffix_names_the_format(tmp_path, name, source):
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    if name == "pairs.CSV":
        _write_as(tmp_path / "x.csv", rows).rename(tmp_path / name)
    else:
        _write_as(tmp_path / name, rows)
    out = tmp_path / "out"
    report = prep_json("--input", tmp_path / name, "-o", out)
    assert (report["source"], report["rows_out"]) == (source, 5)
    assert load(out)["train"]["chosen"] == [f"good {i}" for i in range(5)]
    manifest = json.loads((out / "trcli-run.json").read_text())
    assert manifest["config"]["data"]["source"] == source  # the manifest says how the input was read


def test_the_default_source_is_auto_jsonl_when_the_suffix_says_nothing_and_an_explicit_one_wins(tmp_path):
    assert json.loads(ok("config", "show", "--json").stdout)["data"]["source"] == "auto"
    for name in ("pairs.jsonl.gz", "pairs.txt", "pairs"):
        write_jsonl(tmp_path / name, [GOOD])
        assert prep_json("--input", tmp_path / name, "-o", tmp_path / f"out-{name}")["source"] == "jsonl"
    src = _write_as(tmp_path / "pairs.csv", [GOOD])
    result = run_cli("prep", "--source", "jsonl", "--input", src, "-o", tmp_path / "out")
    assert result.exit_code == 2 and f"{src}:1: malformed JSON" in result.stderr
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data:\n  source: jsonl\n")
    result = run_cli("prep", "-c", recipe, "--input", src, "-o", tmp_path / "out")
    assert result.exit_code == 2 and f"{src}:1: malformed JSON" in result.stderr
