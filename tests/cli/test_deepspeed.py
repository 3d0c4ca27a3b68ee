"""DeepSpeed ZeRO-2 / ZeRO-3 in two processes (torchrun, gloo on CPU) trains what one process trains."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from test_distributed import (
    ALIGN,
    adapter,
    deltas,
    full,
    sft_matches_one_process,
    sharded_full_fine_tuning_matches_one_process,
    torchrun,
)

from conftest import metrics, ok, run_cli

pytestmark = pytest.mark.deepspeed


def same_run(one, two, rel=1e-4):
    """Logged losses and gradient norms (the engine's) equal one process's at every step, the step
    with a one-pair micro-batch (one rank's shard empty) included."""
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=rel)
        assert b["loss"] == pytest.approx(a["loss"], rel=rel)


@pytest.mark.parametrize("stage", ["2", "3"])
def test_zero_lora_tr_dpo_matches_one_process_and_resumes_exactly(tmp_path, sft_run, stage):
    args = [*ALIGN, "--from", sft_run, "--save-steps", "2", "--grad-accum", "2"]
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    ok(*args, "-o", one)
    result = torchrun(*args, "--deepspeed", stage, "-o", two)
    assert result.returncode == 0, result.stderr
    assert f"[rank 1/2] joined the gloo process group, DeepSpeed ZeRO-{stage}" in result.stderr

    single, double = adapter(one, "policy"), adapter(two, "policy")
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5)
    for folder in ("reference", "checkpoint-2/reference"):  # as effective weights B·A (factors are not unique)
        single, double = deltas(one / folder), deltas(two / folder)
        assert single.keys() == double.keys()
        for key in single:
            torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5)
    same_run(one, two)
    assert [m["ref_updates"] for m in metrics(two)] == [1, 2, 3]
    start, policy = adapter(sft_run, "adapter"), adapter(two, "policy")
    assert any((policy[k] - start[k]).abs().max() > 1e-4 for k in start)  # training moved it
    assert (two / "checkpoint-2" / "deepspeed").is_dir()  # the engine's own (partitioned) optimizer files

    # Killed after the step-2 checkpoint and resumed: the same end, exactly.
    shutil.copytree(two, cut)
    for name in ("checkpoint-3", "policy", "reference"):
        shutil.rmtree(cut / name)
    result = torchrun(*args, "--deepspeed", stage, "--resume", "-o", cut)
    assert result.returncode == 0, result.stderr
    for folder in ("policy", "reference"):
        a, b = adapter(two, folder), adapter(cut, folder)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    # Both ranks hold the same replicated weights at the end (ZeRO-3's partitions are not compared).
    seen = dict(re.findall(r"\[rank (\d)/2\] the final weights: \d+ tensors identical on all ranks "
                           r"\(fingerprint (\w+)\)", result.stderr))
    assert set(seen) == {"0", "1"} and seen["0"] == seen["1"], result.stderr

    # A checkpoint written without DeepSpeed has no engine files: resuming it under DeepSpeed is refused.
    shutil.rmtree(one / "checkpoint-3")
    result = torchrun(*args, "--deepspeed", stage, "--resume", "-o", one)
    assert result.returncode != 0 and "written without DeepSpeed (no deepspeed/ folder)" in result.stderr


def test_zero3_full_fine_tuning_partitions_the_reference_and_matches_one_process(tmp_path, tiny_model, prep_run):
    args, _, two = sharded_full_fine_tuning_matches_one_process(tmp_path, tiny_model, prep_run, "--deepspeed", "3")
    # A DeepSpeed checkpoint keeps its optimizer state in the engine's files: resuming without it is refused.
    shutil.rmtree(two / "checkpoint-3")
    result = torchrun(*args, "--resume", "-o", two)
    assert result.returncode != 0 and "written under DeepSpeed" in result.stderr


def test_zero3_with_optimizer_and_weights_offloaded_to_cpu_matches_one_process(tmp_path, tiny_model, prep_run):
    # Offloaded optimizer states take DeepSpeed's CPU AdamW (the same update; it refuses torch's there).
    # Its resumed run ends within an ulp of the uninterrupted one, not bit for bit.
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                                        "offload_param": {"device": "cpu"}}}))
    sharded_full_fine_tuning_matches_one_process(tmp_path, tiny_model, prep_run, "--deepspeed", str(config),
                                                 resume_atol=1e-6)


@pytest.mark.parametrize("config, no_lora", [("deepspeed-zero2.yaml", False), ("deepspeed-zero3.yaml", True)])
def test_accelerate_launch_with_the_shipped_deepspeed_configs_trains_sft_like_one_process(tmp_path, tiny_model,
                                                                                        prep_run, config, no_lora):
    sft = ["sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "2", "--batch-size", "4",
           "--lr", "1e-3", "--lora-r", "4", "--device", "cpu", *(["--no-lora"] if no_lora else [])]
    weights = (lambda run: full(run, "weights")) if no_lora else (lambda run: adapter(run, "adapter"))
    stderr = sft_matches_one_process(tmp_path, config, sft, weights, atol=2e-5)
    assert f"DeepSpeed ZeRO-{config[-6]}" in stderr


def test_qlora_and_fsdp_with_deepspeed_are_refused_before_anything_is_written(tmp_path, sft_run):
    env = {"WORLD_SIZE": "2", "RANK": "0", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    result = run_cli(*ALIGN, "--from", sft_run, "--quantize", "4bit", "-o", tmp_path / "x", env=env)
    assert result.exit_code == 2 and "QLoRA (--quantize 4bit) under DeepSpeed is not supported" in result.stderr
    result = run_cli(*ALIGN, "--from", sft_run, "--no-lora", "--fsdp", "--deepspeed", "2", "-o", tmp_path / "y")
    assert result.exit_code == 2 and "--fsdp and DeepSpeed both requested" in result.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_zero3_lora_on_bf16_weights_with_gradient_checkpointing_matches_ddp(tmp_path, sft_run):
    # bf16 frozen weights, fp32 adapters (trcli's precision without DeepSpeed too), checkpointed layers.
    args = [*ALIGN, "--from", sft_run, "--dtype", "bfloat16", "--gradient-checkpointing"]
    ddp, zero3 = torchrun(*args, "-o", tmp_path / "ddp"), torchrun(*args, "--deepspeed", "3", "-o", tmp_path / "z3")
    assert ddp.returncode == 0 and zero3.returncode == 0, ddp.stderr + zero3.stderr
    single, double = adapter(tmp_path / "ddp", "policy"), adapter(tmp_path / "z3", "policy")
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-3, atol=1e-5)
    same_run(tmp_path / "ddp", tmp_path / "z3", rel=1e-3)


def test_with_deepspeed_installed_stdout_still_carries_only_the_result(tmp_path, tiny_model, prep_run):
    # transformers' save_pretrained imports deepspeed whenever it is installed, and deepspeed logs to stdout.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "trcli.cli", "sft", "--model", str(tiny_model), "--from", str(prep_run),
                             "--no-lora", "--max-steps", "1", "--batch-size", "4", "--device", "cpu", "--json",
                             "-o", str(tmp_path / "full")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1 and json.loads(result.stdout)["stage"] == "sft", result.stdout
