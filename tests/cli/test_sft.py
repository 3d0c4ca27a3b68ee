"""`trcli sft`: completion-only loss, eval loss, resume, and the hand-over to align."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import metrics, ok, run_cli


def test_sft_learns_and_reports_eval_loss(tmp_path, tiny_model, prep_run):
    out = tmp_path / "sft"
    ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "6", "--batch-size", "6", "--lr", "1e-2",
       "--logging-steps", "1", "--eval-steps", "3", "-o", out)
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]
    manifest = json.loads((out / "trcli-run.json").read_text())
    assert manifest["outputs"]["adapter"] == "adapter" and (out / "adapter" / "adapter_config.json").is_file()


def test_loss_ignores_prompt_tokens(tiny_model):
    """Changing the prompt's *labels* cannot matter: the loss is the completion's NLL only, so it
    equals a hand computation over completion positions."""
    from transformers import AutoModelForCausalLM

    from trcli.batching import collate, token_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompt, completion = [5, 6, 7, 8], [9, 10, 11]
    batch = collate([(prompt, completion)], pad_id=1, device="cpu")
    logps, mask = token_logps(model, batch)
    logits = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
    expected = sum(logits[3 + i, completion[i]].item() for i in range(3))
    assert int(mask.sum()) == 3 and logps.sum().item() == pytest.approx(expected, abs=1e-5)


def test_resume_continues_exactly(tmp_path, tiny_model, prep_run):
    args = ["sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "4", "--save-steps", "2",
            "--batch-size", "4", "--lr", "1e-2", "--logging-steps", "1"]
    ok(*args, "-o", tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    for name in ("checkpoint-4", "adapter"):  # as if killed right after the step-2 checkpoint
        shutil.rmtree(tmp_path / "cut" / name)
    ok(*args, "--resume", "-o", tmp_path / "cut")
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in metrics(tmp_path / "cut")] == [r["loss"] for r in metrics(tmp_path / "full")]

    # Without --resume, a run directory holding checkpoints is refused before anything is written.
    before = {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file()}
    result = run_cli(*args, "-o", tmp_path / "cut")
    assert result.exit_code == 2 and "checkpoint-4 of an earlier run" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (tmp_path / "cut").rglob("*") if p.is_file()} == before


def test_packing_gives_the_same_training_as_padded_rows(tmp_path, tiny_model, prep_run):
    args = ["sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "2", "--batch-size", "6",
            "--lr", "1e-2", "--logging-steps", "1"]
    ok(*args, "-o", tmp_path / "padded")
    ok(*args, "--packing", "-o", tmp_path / "packed")
    padded, packed = metrics(tmp_path / "padded"), metrics(tmp_path / "packed")
    assert [r["loss"] for r in packed] == pytest.approx([r["loss"] for r in padded], abs=1e-5)
    a = load_file(str(tmp_path / "padded" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_qlora_sft_with_eval_keeps_training(tmp_path, tiny_model, prep_run):
    out = tmp_path / "q"
    ok("sft", "--model", tiny_model, "--from", prep_run, "--quantize", "4bit", "--max-steps", "4",
       "--batch-size", "4", "--lr", "1e-2", "--logging-steps", "1", "--eval-steps", "2", "-o", out)
    rows = metrics(out)
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4] and len(rows) == 4
