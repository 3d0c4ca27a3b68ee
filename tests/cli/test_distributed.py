"""Two processes (torchrun, gloo on CPU) train what one process trains on the same global batch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import metrics, ok

pytestmark = pytest.mark.distributed

RECIPES = Path(__file__).parents[2] / "recipes" / "accelerate"
ALIGN = ["align", "--method", "tr-dpo", "--update", "soft", "--alpha", "0.6", "--max-steps", "3",
         "--batch-size", "4", "--lr", "5e-3", "--logging-steps", "1", "--seed", "3", "--device", "cpu"]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "trcli.cli", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=900)


def adapter(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "adapter_model.safetensors"))


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(folder / "adapter_model.safetensors"))
    scaling = (lambda c: c["lora_alpha"] / c["r"])(json.loads((folder / "adapter_config.json").read_text()))
    return {key[:-len("lora_A.weight")]: scaling * weights[key.replace("lora_A", "lora_B")] @ weights[key]
            for key in weights if key.endswith("lora_A.weight")}


def test_two_ranks_end_with_the_policy_and_reference_of_one_process(tmp_path, sft_run):
    one, two = tmp_path / "one", tmp_path / "two"
    ok(*ALIGN, "--from", sft_run, "-o", one)
    result = torchrun(*ALIGN, "--from", sft_run, "--json", "-o", two)
    assert result.returncode == 0, result.stderr

    single, double = adapter(one, "policy"), adapter(two, "policy")
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-6)
    # The reference is compared as effective weights B·A: its factors are one factorisation of the
    # mixture among many (directions the mixture does not use may differ between runs).
    single, double = deltas(one / "reference"), deltas(two / "reference")
    assert single.keys() == double.keys()
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-6)
    # The comparison is not vacuous: training moved the policy away from the SFT adapter, and the
    # soft updates moved the reference.
    start, policy = adapter(sft_run, "adapter"), adapter(two, "policy")
    assert any((policy[k] - start[k]).abs().max() > 1e-4 for k in start)
    assert [m["ref_updates"] for m in metrics(two)] == [1, 2, 3]
    # The logged loss is the mean over both ranks' shards, i.e. the one-process loss.
    for a, b in zip(metrics(one), metrics(two)):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)

    # Both ranks hold the same weights, reference included: each announces its fingerprint.
    seen = dict(re.findall(r"\[rank (\d)/2\] the final weights: \d+ tensors identical on all ranks "
                           r"\(fingerprint (\w+)\)", result.stderr))
    assert set(seen) == {"0", "1"} and seen["0"] == seen["1"], result.stderr
    # Only rank 0 reports and writes: one result on stdout, one row per step, one manifest.
    assert len([line for line in result.stdout.splitlines() if line.startswith("{")]) == 1
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 3
    assert [m["step"] for m in metrics(two)] == [1, 2, 3]
    assert json.loads((two / "trcli-run.json").read_text())["status"] == "completed"


def accelerate(config: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(RECIPES / config), "--num_processes", "2", "--main_process_port", "0",
                           "-m", "trcli.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=900)


def test_accelerate_launch_with_the_shipped_ddp_config_trains_sft_like_one_process(tmp_path, tiny_model, prep_run):
    sft = ["sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "2", "--batch-size", "4",
           "--lr", "3e-3", "--lora-r", "4", "--device", "cpu"]
    sft_matches_one_process(tmp_path, "ddp.yaml", sft, lambda run: adapter(run, "adapter"), atol=1e-6)


def sft_matches_one_process(tmp_path: Path, config: str, sft: list, weights, atol: float) -> str:
    """Run ``sft`` in one process and under accelerate with ``config``; the results must match."""
    ok(*sft, "-o", tmp_path / "one")
    result = accelerate(config, *sft, "-o", tmp_path / "two")
    assert result.returncode == 0, result.stderr
    assert "[rank 1/2] joined the gloo process group" in result.stderr
    single, double = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=atol)
    # The logged loss is one process's token mean, although the ranks' shards hold different token counts.
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    return result.stderr


def full(run: Path, folder: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / folder / "model.safetensors"))


def sharded_full_fine_tuning_matches_one_process(tmp_path: Path, tiny_model, prep_run, *shard: str,
                                                 resume_atol: float = 0.0):
    """Full-fine-tuning TR-DPO sharded with ``shard`` (--fsdp, --deepspeed 3) in two processes ends with
    the policy, reference and step-2 checkpoint of one process, the same losses and gradient norms; killed
    after the step-2 checkpoint and resumed, it ends where it ended (bit for bit unless ``resume_atol``).
    Returns (args, one, two)."""
    args = ["align", "--model", tiny_model, "--from", prep_run, "--no-lora", "--method", "tr-dpo", "--update", "soft",
            "--max-steps", "3", "--save-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--logging-steps", "1",
            "--seed", "3", "--device", "cpu"]
    one, two, cut = tmp_path / "one", tmp_path / "two", tmp_path / "cut"
    ok(*args, "-o", one)
    result = torchrun(*args, *shard, "-o", two)
    assert result.returncode == 0, result.stderr
    for folder in ("policy", "reference", "checkpoint-2/policy", "checkpoint-2/reference"):
        single, double = full(one, folder), full(two, folder)
        assert single.keys() == double.keys()
        for key in single:
            torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=2e-5)
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    # Not vacuous: the soft updates moved the (sharded) reference away from the starting weights.
    start = {k: v for k, v in load_file(str(Path(tiny_model) / "model.safetensors")).items()}
    reference = full(two, "reference")
    assert any((reference[k] - start[k]).abs().max() > 1e-5 for k in start if k in reference)

    shutil.copytree(two, cut)
    for name in ("checkpoint-3", "policy", "reference"):
        shutil.rmtree(cut / name)
    result = torchrun(*args, *shard, "--resume", "-o", cut)
    assert result.returncode == 0, result.stderr
    for folder in ("policy", "reference"):
        a, b = full(two, folder), full(cut, folder)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=resume_atol)
    return args, one, two


def test_fsdp_full_fine_tuning_matches_one_process_and_resumes_exactly(tmp_path, tiny_model, prep_run):
    args, one, _ = sharded_full_fine_tuning_matches_one_process(tmp_path, tiny_model, prep_run, "--fsdp")
    # A one-process checkpoint keeps its optimizer state per process: resuming it sharded is refused.
    shutil.rmtree(one / "checkpoint-3")
    result = torchrun(*args, "--fsdp", "--resume", "-o", one)
    assert result.returncode != 0 and "trcli align: error: this checkpoint was written without --fsdp" in result.stderr


def test_accelerate_fsdp_config_shards_full_fine_tuning_and_refuses_lora(tmp_path, tiny_model, prep_run, sft_run):
    sft = ["sft", "--model", tiny_model, "--from", prep_run, "--no-lora", "--max-steps", "2", "--batch-size", "4",
           "--lr", "1e-3", "--device", "cpu"]
    stderr = sft_matches_one_process(tmp_path, "fsdp.yaml", sft, lambda run: full(run, "weights"), atol=2e-5)
    assert "[rank 1/2] joined the gloo process group, sharding with FSDP" in stderr

    result = accelerate("fsdp.yaml", *ALIGN, "--from", sft_run, "-o", tmp_path / "x")  # LoRA
    assert result.returncode != 0 and "FSDP shards full fine-tuning (--no-lora)" in result.stderr
    assert not (tmp_path / "x").exists()

def test_two_ranks_train_tr_kto_like_one_process_with_the_baseline_of_the_whole_batch(tmp_path, sft_run):
    # KTO's KL baseline z is a mean over the micro-batch's mismatched pairs: summed over the ranks, with
    # the pairs chosen in the whole micro-batch, it is one process's z, and so is everything else.
    args = [*ALIGN, "--from", sft_run, "--method", "tr-kto", "--grad-accum", "2"]
    ok(*args, "-o", tmp_path / "one")
    result = torchrun(*args, "-o", tmp_path / "two")
    assert result.returncode == 0, result.stderr
    single, double = adapter(tmp_path / "one", "policy"), adapter(tmp_path / "two", "policy")
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        # z is a small difference of large log-probabilities, computed in float32 in differently packed rows.
        assert b["kl/z"] == pytest.approx(a["kl/z"], abs=1e-5)
