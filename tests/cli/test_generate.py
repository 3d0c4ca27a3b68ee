"""`trcli generate`: records, resume by id (byte for byte), torn lines, stdout, scoring, the output lock."""

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


def test_generates_one_record_per_prompt_and_resumes(tmp_path, align_run, prep_run, sft_run):
    out = tmp_path / "gens.jsonl"
    args = ["generate", "--from", align_run, "--prompts", prep_run, "--max-new-tokens", "6", "--temperature", "1",
            "--top-p", "0.9", "--batch-size", "2", "--seed", "1", "--score-with", sft_run, "-o", out]
    first = json.loads(ok(*args, "--json").stdout)
    records = read(out)
    assert first["written"] == len(records) == first["prompts"] > 0
    assert {"id", "prompt", "completion", "stop", "model", "sampling"} <= set(records[0])
    assert len({r["id"] for r in records}) == len(records)
    whole = out.read_bytes()
    # A run killed mid-write: the last three records lost (a batch and a half) and the last kept
    # line torn. The re-run regenerates them exactly: the file is the uninterrupted one.
    lines = whole.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])
    again = json.loads(ok(*args, "--json").stdout)
    assert again["written"] == 3 and again["skipped_existing"] == len(records) - 3
    assert out.read_bytes() == whole
    # Everything written: nothing to do, nothing appended.
    assert json.loads(ok(*args, "--json").stdout)["written"] == 0 and out.read_bytes() == whole


def test_stdout_num_samples_and_scores(tmp_path, align_run, sft_run):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "\\n\\nHuman: Hi\\n\\nAssistant:"}\n{"prompt": "Hello"}\n')
    result = ok("generate", "--from", align_run, "--prompts", prompts, "--num-samples", "2",
                "--max-new-tokens", "5", "--score-with", sft_run, "-o", "-")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(r["id"] for r in records) == ["2-0", "2-1", "a-0", "a-1"]
    for r in records:
        assert len(r["token_logps"]) == len(r["ref_token_logps"]) == r["n_tokens"] >= 1
        assert r["stop"] in ("eos", "stop_string", "length")
        if r["stop"] == "length":  # the 5 tokens sampled, no end token that was never generated
            assert r["n_tokens"] == 5
        assert r["logp"] == pytest.approx(sum(r["token_logps"]))
        assert r["logp"] < 0 and r["ref_logp"] < 0


def test_bad_prompt_file_exits_2_naming_the_line(tmp_path, align_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    result = run_cli("generate", "--from", align_run, "--prompts", bad, "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 2 and f"{bad}:2" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_a_second_writer_of_the_same_file_is_refused(tmp_path, align_run):
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Hello"}\n')
    out = tmp_path / "out.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom trcli.runs import output_lock\n"
         f"with output_lock({str(out)!r}, 'generate', file=True):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run_cli("generate", "--from", align_run, "--prompts", prompts, "--max-new-tokens", "2", "-o", out)
        assert result.exit_code == 2 and "in use by trcli generate" in result.stderr
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    ok("generate", "--from", align_run, "--prompts", prompts, "--max-new-tokens", "2", "-o", out)
    assert len(read(out)) == 1
