"""DeepSpeed configs as trcli reads them: the stage asked for, and the engine config its flags decide."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ok, run_cli
from trcli import zero
from trcli.config import load
from trcli.errors import UsageError
from trcli.memory import estimate

pytestmark = pytest.mark.deepspeed


def test_a_stage_a_json_file_or_accelerates_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert zero.requested(None) is None
    assert zero.stage(zero.requested("2")) == 2 and zero.stage(zero.requested("3")) == 3
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    assert zero.requested(str(path))["zero_optimization"]["offload_param"] == {"device": "cpu"}
    # accelerate launch --config_file recipes/accelerate/deepspeed-zero3.yaml exports these:
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
    assert zero.requested(None) == {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))  # a deepspeed_config_file wins
    assert zero.stage(zero.requested(None)) == 3 and "offload_param" in zero.requested(None)["zero_optimization"]
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    with pytest.raises(UsageError, match="zero_stage must be 2 or 3"):
        zero.requested(None)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not a readable DeepSpeed JSON config"),
    ('{"zero_optimization": {"stage": 1}}', "zero_optimization.stage must be 2 or 3 (got 1)"),
])
def test_a_bad_json_file_is_named(tmp_path, text, message):
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(UsageError, match=re.escape(message)) as err:
        zero.requested(str(path))
    assert str(path) in str(err.value)


def test_trcli_flags_fill_the_engine_config_and_a_contradiction_is_refused():
    train = load(None, {"train.batch_size": 8, "train.grad_accum": 2, "train.max_grad_norm": 2.0}, environ={}).train
    base = {"zero_optimization": {"stage": 2, "overlap_comm": True}, "gradient_clipping": "auto", "bf16": {"enabled": False}}
    out = zero.engine_config(base, train, world=2)
    assert out["zero_optimization"] == base["zero_optimization"]
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) == (4, 2, 16)
    assert out["gradient_clipping"] == 2.0 and out["managed_gradient_accumulation"] is False and "bf16" not in out
    with pytest.raises(UsageError, match="gradient_accumulation_steps is 4 but trcli's flags make it 2"):
        zero.engine_config({**base, "gradient_accumulation_steps": 4}, train, world=2)
    for key, block in (("optimizer", {"type": "AdamW"}), ("scheduler", {"type": "WarmupLR"}), ("bf16", {"enabled": True})):
        with pytest.raises(UsageError, match=f"remove '{key}'"):
            zero.engine_config({**base, key: block}, train, world=2)
    # Settings that keep copies of the weights the in-place reference update would not reach.
    for key, value in (("zero_hpz_partition_size", 2), ("zero_quantized_weights", True),
                       ("zero_quantized_nontrainable_weights", True), ("offload_param", {"device": "nvme"})):
        with pytest.raises(UsageError, match=key):
            zero.engine_config({"zero_optimization": {"stage": 3, key: value}}, train, world=2)


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 0}}, "{path}: zero_optimization.stage must be 2 or 3"),
    ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}, "zero_optimization.zero_hpz_partition_size"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, "gradient_clipping is 1.0 but trcli's flags make it 2.0"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": "maybe"}}, "zero_optimization.overlap_comm: Input should be"),
])
def test_cli_refuses_a_bad_deepspeed_json_with_exit_code_2_and_writes_nothing(tmp_path, sft_run, config, message):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps(config))
    result = run_cli("align", "--from", sft_run, "--max-grad-norm", "2", "--deepspeed", str(bad), "-o", tmp_path / "out")
    assert result.exit_code == 2 and message.format(path=bad) in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_memory_plan_partitions_what_each_stage_partitions():
    cfg = {"data.max_length": 1024, "train.device_memory": "80GB", "model.dtype": "bfloat16", "train.batch_size": 8,
           "align.method": "tr-dpo", "model.name_or_path": "EleutherAI/pythia-12b", "model.lora": False,
           "model.gradient_checkpointing": True}
    plans = {stage: estimate(load(None, cfg, environ={}), "align", 8, zero.requested(stage))["plan"]
             for stage in (None, "2", "3")}
    rows = {stage: {r["item"]: r["bytes"] for r in plan["rows"]} for stage, plan in plans.items()}
    master = 4 * plans["3"]["params"]
    # ZeRO-2: gradients, AdamW moments and the fp32 master copy per device are 1/8; weights and references whole.
    assert rows["2"]["gradients"] == -(-rows[None]["gradients"] // 8)
    assert rows["2"]["optimizer (AdamW)"] == -(-2 * rows[None]["optimizer (AdamW)"] // 8)  # fp32 moments, bf16 weights
    assert rows["2"]["fp32 master weights (ZeRO)"] == -(-master // 8)
    assert rows["2"]["reference copy (fp32)"] == rows[None]["reference copy (fp32)"]
    # ZeRO-3: everything is 1/8, plus the blocks gathered for a pass: full TR-DPO of Pythia-12B fits 8 x 80 GB.
    for item in ("weights (bfloat16)", "reference copy (fp32)", "starting reference (fp32)", "gradients"):
        assert rows["3"][item] == -(-rows[None][item] // 8)
    assert "gathered blocks (ZeRO-3, transient)" in rows["3"]
    assert plans[None]["fits"] is False and plans["2"]["fits"] is False and plans["3"]["fits"] is True


def test_dry_run_under_accelerates_deepspeed_launch_plans_partitioned(monkeypatch):
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "WORLD_SIZE": "8"}
    result = ok("align", "--model", "EleutherAI/pythia-12b", "--no-lora", "--dtype", "bfloat16", "--max-length", "1024",
                "--batch-size", "8", "--gradient-checkpointing", "--dry-run", "--device-memory", "80GB", "--json", env=env)
    plan = json.loads(result.stdout)["plan"]
    assert plan["method"] == "tr-dpo" and plan["world_size"] == 8 and plan["fits"] is True
    assert "gathered blocks (ZeRO-3, transient)" in {r["item"] for r in plan["rows"]}


def test_memory_plan_counts_offloaded_states_and_weights_on_the_host():
    cfg = load(None, {"data.max_length": 1024, "model.dtype": "bfloat16", "train.batch_size": 8, "model.lora": False,
                      "model.name_or_path": "EleutherAI/pythia-12b", "model.gradient_checkpointing": True}, environ={})
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}}
    on_device = {r["item"]: r["bytes"] for r in estimate(cfg, "align", 8, zero.requested("3"))["plan"]["rows"]}
    plan = estimate(cfg, "align", 8, offload)["plan"]
    rows = {r["item"]: r for r in plan["rows"]}
    for item in ("optimizer (AdamW)", "fp32 master weights (ZeRO)", "weights (bfloat16)", "reference copy (fp32)"):
        assert rows[item]["bytes"] == 0 and "offloaded to host memory" in rows[item]["note"]
    assert rows["gradients"]["bytes"] == on_device["gradients"]  # gradients stay on the device
    moved = sum(on_device[item] for item in rows if rows[item]["bytes"] == 0 and on_device[item])
    assert plan["total"] == sum(on_device.values()) - moved and moved > 5 * 2**30


def test_dry_run_refuses_what_the_run_would_refuse():
    result = run_cli("align", "--model", "EleutherAI/pythia-12b", "--quantize", "4bit", "--deepspeed", "3", "--dry-run",
                     env={"WORLD_SIZE": "8"})
    assert result.exit_code == 2 and "QLoRA (--quantize 4bit) under DeepSpeed is not supported" in result.stderr
