"""`trcli align` end to end on a tiny model: invariants that a wrong implementation fails."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import metrics, ok, run_cli
from trcli.trust_region import POLICY, REFERENCE, effective_delta, lora_layers

COMMON = ["--max-steps", "3", "--batch-size", "4", "--lr", "5e-3", "--logging-steps", "1", "--seed", "3"]


def align(out: Path, sft_run: Path, *extra: str):
    return ok("align", "--from", sft_run, *COMMON, *extra, "-o", out)


def adapter(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "adapter_model.safetensors"))


@pytest.mark.parametrize("method,expected", [("dpo", math.log(2)), ("ipo", 1 / (4 * 0.5 ** 2)), ("kto", 0.5)])
def test_first_step_loss_with_policy_equal_to_reference(tmp_path, sft_run, method, expected):
    align(tmp_path / method, sft_run, "--method", f"tr-{method}", "--beta", "0.5", "--max-steps", "1")
    assert metrics(tmp_path / method)[0]["loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_tau_beyond_the_run_and_alpha_zero_reproduce_the_static_method_bit_for_bit(tmp_path, sft_run, method):
    align(tmp_path / "static", sft_run, "--method", method)
    align(tmp_path / "late", sft_run, "--method", f"tr-{method}", "--update", "hard", "--tau", "100")
    align(tmp_path / "zero", sft_run, "--method", f"tr-{method}", "--update", "soft", "--alpha", "0")
    static = adapter(tmp_path / "static", "policy")
    for other in ("late", "zero"):
        moved = adapter(tmp_path / other, "policy")
        assert all(torch.equal(static[k], moved[k]) for k in static)
        assert [m["loss"] for m in metrics(tmp_path / other)] == [m["loss"] for m in metrics(tmp_path / "static")]
    # ...and the policy did move, so the comparison above is not vacuous.
    start = adapter(sft_run, "adapter")
    assert any(not torch.equal(start[k], static[k]) for k in static)


def _deltas(run: Path, base: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "policy", adapter_name=POLICY)
    model.load_adapter(run / "reference", adapter_name=REFERENCE)
    layers = lora_layers(model)
    return {name: (effective_delta(m, POLICY), effective_delta(m, REFERENCE))
            for name, m in model.named_modules() if any(m is layer for layer in layers)}


def test_hard_update_copies_the_policy_into_the_reference(tmp_path, sft_run, tiny_model):
    align(tmp_path / "hard", sft_run, "--method", "tr-dpo", "--update", "hard", "--tau", "3")
    rows = metrics(tmp_path / "hard")
    assert [r["ref_updates"] for r in rows] == [0, 0, 1]
    deltas = _deltas(tmp_path / "hard", tiny_model)
    assert deltas and all(torch.allclose(p, r, atol=1e-7) for p, r in deltas.values())
    assert any(p.abs().max() > 0 for p, _ in deltas.values())


def test_soft_update_tracks_the_dense_recursion(tmp_path, sft_run, tiny_model):
    """ΔW_ref after 2 soft updates (α=0.6, τ=1) at full reference rank equals the dense
    recursion computed from the saved checkpoints' policies."""
    align(tmp_path / "soft", sft_run, "--method", "tr-dpo", "--update", "soft", "--alpha", "0.6",
          "--ref-rank", "128", "--max-steps", "2", "--save-steps", "1")
    step1 = _deltas(tmp_path / "soft" / "checkpoint-1", tiny_model)
    step2 = _deltas(tmp_path / "soft" / "checkpoint-2", tiny_model)
    # The reference starts equal to the SFT adapter, which is the policy at step 0.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), sft_run / "adapter",
                                    adapter_name=POLICY)
    init = {name: effective_delta(m, POLICY) for name, m in sft.named_modules()
            if getattr(m, "lora_A", None) is not None and POLICY in m.lora_A}
    for name, (pol2, ref2) in step2.items():
        pol1, ref1 = step1[name]
        expect1 = 0.6 * pol1 + 0.4 * init[name]
        expect2 = 0.6 * pol2 + 0.4 * expect1
        assert torch.allclose(ref1, expect1, rtol=1e-4, atol=1e-6)
        assert (ref2 - expect2).norm() <= 1e-4 * expect2.norm() + 1e-7
    assert [r["ref_updates"] for r in metrics(tmp_path / "soft")] == [1, 2]


def test_gradients_reach_only_the_policy_adapter(sft_run):
    from trcli.config import load
    from trcli.modeling import build_for_training, trainable_parameters

    cfg = load(None, {"model.name_or_path": json.loads((sft_run / "trcli-run.json").read_text())["config"]["model"]["name_or_path"]})
    model, frozen = build_for_training(cfg, torch.device("cpu"), {"adapter": str(sft_run / "adapter")},
                                       reference=True, ref_rank=8, keep_init=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen is None and names and all(f".{POLICY}." in n for n in names)
    assert len(trainable_parameters(model)) == len(names)
    ids = torch.randint(0, 100, (2, 6))
    model(input_ids=ids).logits.sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (f".{POLICY}." in n), n


@pytest.mark.parametrize("ref_rank", [2, 16])  # below and above the SFT adapter's rank
def test_the_starting_reference_for_kl_init_is_the_reference_as_built(sft_run, ref_rank):
    from trcli.config import load
    from trcli.modeling import INIT, build_for_training

    cfg = load(None, {"model.name_or_path": json.loads((sft_run / "trcli-run.json").read_text())["config"]["model"]["name_or_path"]})
    model, _ = build_for_training(cfg, torch.device("cpu"), {"adapter": str(sft_run / "adapter")},
                                  reference=True, ref_rank=ref_rank, keep_init=True)
    layers = lora_layers(model, INIT)
    assert layers
    for m in layers:
        reference = effective_delta(m, REFERENCE)
        assert torch.equal(effective_delta(m, INIT), reference)
        exact = torch.allclose(reference, effective_delta(m, POLICY), atol=1e-6)
        assert exact == (ref_rank >= m.lora_A[POLICY].weight.shape[0])  # a rank-2 reference is truncated


def test_outputs_are_standard_peft_folders_and_the_manifest_chains(tmp_path, sft_run):
    out = tmp_path / "run"
    result = align(out, sft_run, "--method", "tr-ipo", "--json")
    summary = json.loads(result.stdout)
    assert summary["method"] == "tr-ipo" and summary["steps"] == 3
    manifest = json.loads((out / "trcli-run.json").read_text())
    assert manifest["status"] == "completed" and manifest["outputs"]["adapter"] == "policy"
    assert manifest["config"]["align"]["method"] == "tr-ipo"
    assert manifest["inputs"]["data"]["hash"].startswith("sha256:")
    for folder in ("policy", "reference", "checkpoint-3/policy", "checkpoint-3/reference"):
        assert (out / folder / "adapter_config.json").is_file()
    row = metrics(out)[-1]
    for key in ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "kl/ref", "kl/init", "grad_norm", "ref_updates",
                "ref_truncation", "tokens_per_s", "lr"):
        assert key in row, key


@pytest.mark.parametrize("flags,needle", [
    (["--method", "tr-dpo", "--update", "hard", "--alpha", "0.5"], "alpha"),
    (["--method", "tr-dpo", "--alpha", "1.5"], "alpha"),
    (["--method", "tr-dpo", "--tau", "0"], "tau"),
    (["--method", "kto", "--batch-size", "1"], "batch-size"),
    (["--method", "tr-dpo", "--update", "kl"], "kl_target"),
    (["--method", "sppo"], "align.method"),
])
def test_nonsense_combinations_exit_2_with_one_line(tmp_path, sft_run, flags, needle):
    result = run_cli("align", "--from", sft_run, *flags, "-o", tmp_path / "x")
    assert result.exit_code == 2
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_kl_update_fires_when_the_kl_estimate_exceeds_the_target(tmp_path, sft_run):
    align(tmp_path / "kl", sft_run, "--method", "tr-dpo", "--update", "kl", "--kl-target", "1e-6",
          "--lr", "2e-2", "--max-steps", "4")
    rows = metrics(tmp_path / "kl")
    assert rows[-1]["ref_updates"] >= 1


def test_non_finite_loss_stops_with_exit_1(tmp_path, sft_run):
    result = run_cli("align", "--from", sft_run, "--method", "tr-ipo", "--beta", "1e-30", "--max-steps", "2",
                     "-o", tmp_path / "nan")
    assert result.exit_code == 1
    assert "loss is" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, sft_run):
    args = ["--from", str(sft_run), "--method", "tr-dpo", "--update", "soft", "--max-steps", "8",
            "--save-steps", "2", "--batch-size", "4", "--lr", "5e-3", "--logging-steps", "1", "--seed", "5"]
    align_cmd = [sys.executable, "-m", "trcli.cli", "align", *args]
    ok("align", *args, "-o", tmp_path / "full")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*align_cmd, "-o", str(killed)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-4").exists() and not (killed / "policy").exists()
    ok("align", *args, "--resume", "-o", killed)
    for name in ("policy", "reference"):
        a, b = adapter(tmp_path / "full", name), adapter(killed, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert [m["loss"] for m in metrics(killed)] == [m["loss"] for m in metrics(tmp_path / "full")]


def test_qlora_trains_adapters_on_a_4bit_base(tmp_path, sft_run, tiny_model):
    import bitsandbytes as bnb

    from trcli.config import load
    from trcli.modeling import build_for_training

    cfg = load(None, {"model.name_or_path": str(tiny_model), "model.quantize": "4bit"})
    model, _ = build_for_training(cfg, torch.device("cpu"), {}, reference=True, ref_rank=4)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) >= 8
    align(tmp_path / "q", sft_run, "--method", "tr-dpo", "--update", "hard", "--tau", "2", "--max-steps", "2",
          "--quantize", "4bit")
    deltas = _deltas(tmp_path / "q", tiny_model)
    assert all(torch.allclose(p, r, atol=1e-7) for p, r in deltas.values())
    assert metrics(tmp_path / "q")[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_full_fine_tuning_mixes_a_frozen_reference_copy(tmp_path, sft_run):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    align(out, sft_run, "--no-lora", "--method", "tr-dpo", "--update", "soft", "--alpha", "0.5",
          "--max-steps", "1", "--lr", "1e-3")
    start = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1" / "policy")  # shapes only
    policy = dict(AutoModelForCausalLM.from_pretrained(out / "policy").named_parameters())
    reference = dict(AutoModelForCausalLM.from_pretrained(out / "reference").named_parameters())
    manifest = json.loads((out / "trcli-run.json").read_text())
    assert manifest["outputs"]["weights"] == "policy"
    # The start is the SFT adapter merged into the base: reference = 0.5 policy + 0.5 start.
    from peft import PeftModel

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        manifest["config"]["model"]["name_or_path"]), sft_run / "adapter").merge_and_unload()
    init = dict(merged.named_parameters())
    moved = 0
    for name, p in policy.items():
        assert torch.allclose(reference[name], 0.5 * p + 0.5 * init[name], atol=1e-6), name
        moved += not torch.equal(p, init[name])
    assert moved > 0 and start is not None


def test_ref_truncation_reports_the_largest_share_discarded_since_the_last_logged_step(tmp_path, sft_run):
    # Reference rank 1 below a higher-rank mixture: every soft update truncates, and each one above 5%
    # prints its share on stderr. Logged every 2 steps, the metric is the larger of each window's two.
    result = ok("align", "--from", sft_run, *COMMON, "--method", "tr-dpo", "--update", "soft", "--ref-rank", "1",
                "--max-steps", "4", "--logging-steps", "2", "-o", tmp_path / "run")
    shares = [float(x) / 100 for x in re.findall(r"discarded ([\d.]+)% of the mixture", result.stderr)]
    assert len(shares) == 4, result.stderr
    logged = [row["ref_truncation"] for row in metrics(tmp_path / "run")]
    assert logged == pytest.approx([max(shares[:2]), max(shares[2:])], abs=6e-4)  # stderr rounds to 0.1%
    assert shares[0] > shares[1] or shares[2] > shares[3]  # the last update alone would read lower
