"""`trcli generate`: records, resume by id, torn lines, stdout, scoring."""

import json

import pytest

from conftest import ok, run_cli


@pytest.fixture(scope="module")
def align_run(tmp_path_factory, sft_run):
    out = tmp_path_factory.mktemp("gen") / "align"
    ok("align", "--from", sft_run, "--method", "tr-dpo", "--max-steps", "2", "--batch-size", "4", "-o", out)
    return out


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generates_one_record_per_prompt_and_resumes(tmp_path, align_run, prep_run):
    out = tmp_path / "gens.jsonl"
    args = ["generate", "--from", align_run, "--prompts", prep_run, "--max-new-tokens", "6",
            "--batch-size", "2", "--seed", "1", "-o", out]
    first = json.loads(ok(*args, "--json").stdout)
    records = read(out)
    assert first["written"] == len(records) == first["prompts"] > 0
    assert {"id", "prompt", "completion", "model", "sampling"} <= set(records[0])
    assert len({r["id"] for r in records}) == len(records)
    # Simulate a run killed mid-write: drop two records and tear the last line.
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:-2]) + text[-2][: len(text[-2]) // 2])
    again = json.loads(ok(*args, "--json").stdout)
    assert again["written"] == 2 and again["skipped_existing"] == len(records) - 2
    assert sorted(r["id"] for r in read(out)) == sorted(r["id"] for r in records)


def test_stdout_num_samples_and_scores(tmp_path, align_run, sft_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "\\n\\nHuman: Hi\\n\\nAssistant:"}\n{"prompt": "Hello"}\n')
    result = ok("generate", "--from", align_run, "--prompts", prompts, "--num-samples", "2",
                "--max-new-tokens", "5", "--score-with", sft_run, "-o", "-")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["id"] for r in records) == ["2-0", "2-1", "a-0", "a-1"]
    for r in records:
        assert len(r["token_logps"]) == len(r["ref_token_logps"]) == r["n_tokens"] >= 1
        assert r["logp"] == pytest.approx(sum(r["token_logps"]))
        assert r["logp"] < 0 and r["ref_logp"] < 0


def test_bad_prompt_file_exits_2_naming_the_line(tmp_path, align_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    result = run_cli("generate", "--from", align_run, "--prompts", bad, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and f"{bad}:2" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
