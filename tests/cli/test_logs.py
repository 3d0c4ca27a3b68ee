"""What a person sees on stderr: progress with the ETA in batch logs, no third-party noise, -q / -v."""

import json
import os
import re
import subprocess
import sys
import time

from conftest import ok, run_cli

STEP_LINE = re.compile(r"trcli sft: (\d+)/4 steps \(\d+%\), [\d.]+ s/step, \d+ tokens/s, ETA \S+, loss [\d.]+ "
                       r"grad_norm [\d.]+ lr \S+( eval/loss [\d.]+)?")


def test_sft_logs_steps_and_its_evaluation_with_eta(tmp_path, tiny_model, prep_run, monkeypatch):
    """Not a terminal (nohup): a line per logging step with s/step, tokens/s, ETA and the loss; the
    evaluation over the test split has lines of its own (every 30 s in real runs; at once here)."""
    from trcli import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.05)
    # A tiny model evaluates its test split in milliseconds on a fast machine, before the first
    # plain line is due (work that ends that fast prints nothing): each evaluation batch is made
    # to outlast the cadence, so the lines under test are printed on any machine.
    advance = progress.Progress.advance

    def slow_eval_advance(self, n=1, tokens=0):
        if self.label.endswith(": eval"):
            time.sleep(0.08)
        advance(self, n, tokens)

    monkeypatch.setattr(progress.Progress, "advance", slow_eval_advance)
    result = ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "4", "--batch-size", "1",
                "--logging-steps", "2", "--eval-steps", "4", "-o", tmp_path / "run")
    lines = result.stderr.splitlines()
    logged = [int(m.group(1)) for line in lines if (m := STEP_LINE.fullmatch(line))]
    assert logged == [2, 4], result.stderr
    assert "eval/loss" in lines[[i for i, line in enumerate(lines) if STEP_LINE.fullmatch(line)][-1]]
    evaluation = [line for line in lines if line.startswith("trcli sft: eval: ")]
    started = [line for line in evaluation if not line.startswith("trcli sft: eval: 0/")]
    assert re.fullmatch(r"trcli sft: eval: \d+/(\d+) batches \(\d+%\), [\d.]+ batches/s, \d+ tokens/s, ETA \S+",
                        started[0]), evaluation
    assert re.fullmatch(r"trcli sft: eval: (\d+)/\1 batches in \d+s, [\d.]+ batches/s, \d+ tokens/s", evaluation[-1])
    assert any(re.fullmatch(r"trcli sft: 4/4 steps in \d+s, [\d.]+ s/step, \d+ tokens/s", line) for line in lines)
    assert all(line.startswith("trcli sft") for line in lines), result.stderr
    # The last step was evaluated: the run does not evaluate the test split a second time.
    assert len([line for line in evaluation if " in " in line]) == 1


def test_generate_logs_completions_with_eta(tmp_path, sft_run, monkeypatch):
    from trcli import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.05)
    out = tmp_path / "gens.jsonl"
    result = ok("generate", "--from", sft_run, "--max-new-tokens", "8", "--batch-size", "1", "--limit", "4",
                "-o", out, "--json")
    assert json.loads(result.stdout)["written"] == 4  # stdout: the result only
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("trcli generate: ") for line in lines), result.stderr
    line_re = r"trcli generate: \d/4 completions \(\d+%\), [\d.]+ completions/s(, \d+ tokens/s)?, ETA \S+"
    assert all(re.fullmatch(line_re, line) for line in lines[:-1]), lines
    assert any(" tokens/s, ETA " in line for line in lines)
    assert lines[-1].startswith("trcli generate: 4/4 completions in ")


def test_prep_logs_rows_read_and_records_tokenized(tmp_path, tiny_model, monkeypatch):
    """Not a terminal: reading a large input (how many rows is not known ahead: a count and a rate) and
    tokenizing it for the length report (done / total, ETA) print lines, each with a last one."""
    from trcli import progress
    from trcli.tiny import write_sample_jsonl

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.05)
    advance = progress.Progress.advance

    def slow_advance(self, n=1, tokens=0):  # 60 rows outlast the cadence on any machine
        time.sleep(0.004)
        advance(self, n, tokens)

    monkeypatch.setattr(progress.Progress, "advance", slow_advance)
    pairs = write_sample_jsonl(tmp_path / "pairs.jsonl", n=60)
    result = ok("prep", "--input", pairs, "--model", tiny_model, "-o", tmp_path / "prep", "--json")
    records = json.loads(result.stdout)["rows_out"]  # stdout: the result only
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(("trcli prep: read: ", "trcli prep: tokenize: ")) for line in lines), lines
    read = [line for line in lines if line.startswith("trcli prep: read: ")]
    assert all(re.fullmatch(r"trcli prep: read: \d+ rows, [\d.]+ rows/s", line) for line in read[:-1]) and read[:-1]
    assert re.fullmatch(r"trcli prep: read: 60 rows in \d+s, [\d.]+ rows/s", read[-1])
    tokenized = [line for line in lines if line.startswith("trcli prep: tokenize: ")]
    assert tokenized[:-1] and all(re.fullmatch(
        rf"trcli prep: tokenize: \d+/{records} records \(\d+%\), [\d.]+ records/s, \d+ tokens/s, ETA \S+", line)
        for line in tokenized[:-1]), tokenized
    assert re.fullmatch(rf"trcli prep: tokenize: {records}/{records} records in \d+s, [\d.]+ records/s, \d+ tokens/s",
                        tokenized[-1])
    assert lines.index(read[-1]) < lines.index(tokenized[0])


def test_quiet_is_errors_only_and_excludes_verbose(tmp_path, sft_run, prep_run):
    args = ["align", "--from", sft_run, "--max-steps", "2", "--batch-size", "4", "--logging-steps", "1"]
    quiet = ok("-q", *args, "-o", tmp_path / "run", "--json")
    assert quiet.stderr == "" and json.loads(quiet.stdout)["steps"] == 2
    failed = run_cli("-q", *args, "-o", tmp_path / "run", "--json")  # the same output again: refused
    assert failed.exit_code == 2 and failed.stderr.startswith("trcli align: error: ")
    assert len(failed.stderr.splitlines()) == 1
    both = run_cli("-q", "-v", "config", "show")
    assert both.exit_code == 2 and "-q and -v" in both.stderr


def test_a_batch_log_has_progress_and_no_third_party_noise(tmp_path, prep_run):
    """`trcli ... > log 2>&1` in a fresh process (DeepSpeed and transformers imported for the first
    time): tiny writes one line, sft only its own progress lines; nothing from the libraries."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRCLI_DEBUG", "TRCLI_VERBOSITY")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "trcli.cli", *map(str, args)],  # noqa: E731
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                       timeout=900)
    model = tmp_path / "model"
    tiny = run("tiny", model)
    assert tiny.returncode == 0 and tiny.stdout == f"wrote tiny model to {model}\n", tiny.stdout
    sft = run("sft", "--model", model, "--from", prep_run, "--max-steps", "4", "--batch-size", "4",
              "--logging-steps", "2", "-o", tmp_path / "sft", "--json")
    assert sft.returncode == 0, sft.stdout
    lines = sft.stdout.splitlines()
    assert json.loads(lines[-1])["steps"] == 4
    for noise in ("WARNING", "Warning", "accelerator", "%|", "Writing model shards", "Traceback"):
        assert noise not in sft.stdout, sft.stdout
    # Progress lines only: one per logging step (and one every 30 s on a slow machine), then the last one.
    assert all(line.startswith("trcli sft: ") for line in lines[:-1]), sft.stdout
    logged = [line.split(" steps")[0] for line in lines[:-1] if ", loss " in line]
    assert logged == ["trcli sft: 2/4", "trcli sft: 4/4"] and lines[-2].startswith("trcli sft: 4/4 steps in ")
