"""The memory plan: shapes counted exactly, the paper's headline cases, the CLI table and JSON."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ok, run_cli
from trcli.config import load
from trcli.errors import UsageError
from trcli.memory import BUILTIN, GIB, estimate, model_shape, parse_size


def _meta_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["pythia-410m", "pythia-12b", "llama-3-8b"])
def test_builtin_shapes_count_the_parameters_transformers_builds(name):
    from transformers import GPTNeoXConfig, LlamaConfig

    s = BUILTIN[name]
    if s.arch == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                               num_attention_heads=s.heads, intermediate_size=s.intermediate, tie_word_embeddings=False)
    else:
        config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                             num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                             intermediate_size=s.intermediate, tie_word_embeddings=False)
    assert s.params() == _meta_params(config)
    # The published sizes, as a sanity check on the table itself.
    assert round(s.params() / 1e9, 2) == {"pythia-410m": 0.41, "pythia-12b": 11.85, "llama-3-8b": 8.03}[name]


def test_local_model_shape_and_lora_count_match_the_real_model(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = model_shape(str(tiny_model))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert shape.source.endswith("config.json") and shape.params() == sum(p.numel() for p in model.parameters())
    for targets in (["all-linear"], ["query_key_value", "dense_4h_to_h"]):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                              LoraConfig(r=8, target_modules="all-linear" if targets == ["all-linear"] else targets))
        trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
        assert shape.lora_params(8, targets) == trainable


def _plan(**flags) -> dict:
    base = {"data.max_length": 1024, "train.batch_size": 4, "train.device_memory": "80GB", "model.dtype": "bfloat16",
            "align.method": "tr-dpo", "model.name_or_path": "EleutherAI/pythia-12b", "model.lora_r": 16}
    return estimate(load(None, {**base, **flags}, environ={}), "align")["plan"]


def test_pythia_12b_qlora_tr_dpo_fits_80gb_and_full_fine_tuning_does_not():
    qlora = _plan(**{"model.quantize": "4bit", "model.gradient_checkpointing": True})
    full = _plan(**{"model.lora": False, "model.gradient_checkpointing": True})
    assert qlora["fits"] is True and qlora["total"] < 40 * GIB
    assert full["fits"] is False
    rows = {r["item"]: r["bytes"] for r in full["rows"]}
    # Full fine-tuning keeps the reference and the starting reference as fp32 copies: 4 bytes each per parameter.
    assert rows["reference copy (fp32)"] == rows["starting reference (fp32)"] == 4 * full["params"]
    assert rows["optimizer (AdamW)"] == 2 * rows["gradients"] == 2 * 2 * full["params"]
    # NF4 with double quantisation: ~0.516 bytes per quantised weight, the rest in fp32.
    weights = {r["item"]: r["bytes"] for r in qlora["rows"]}["weights (4-bit NF4)"]
    assert 6.3e9 < weights < 8.2e9


def test_fsdp_shards_full_fine_tuning_across_the_processes():
    flags = {"model.lora": False, "model.gradient_checkpointing": True, "train.batch_size": 8}
    cfg = {"data.max_length": 1024, "train.device_memory": "80GB", "model.dtype": "bfloat16",
           "align.method": "tr-dpo", "model.name_or_path": "EleutherAI/pythia-12b", **flags}
    replicated = estimate(load(None, cfg, environ={}), "align", world_size=8)["plan"]
    sharded = estimate(load(None, {**cfg, "train.fsdp": True}, environ={}), "align", world_size=8)["plan"]
    before, after = ({r["item"]: r["bytes"] for r in p["rows"]} for p in (replicated, sharded))
    for item in ("weights (bfloat16)", "reference copy (fp32)", "starting reference (fp32)", "gradients",
                 "optimizer (AdamW)"):
        assert after[item] == -(-before[item] // 8)
    assert after["gathered blocks (FSDP, transient)"] == pytest.approx(2 * 4 * 12 * 5120 ** 2, rel=0.01)  # 2 fp32 blocks
    # Full TR-DPO of Pythia-12B with its fp32 reference copies: no single 80 GB GPU, but 8 with FSDP.
    assert replicated["fits"] is False and sharded["fits"] is True


def test_plan_reacts_to_the_settings_that_change_memory():
    soft = _plan(**{"model.quantize": "4bit"})
    rows = {r["item"]: r["bytes"] for r in soft["rows"]}
    assert rows["reference adapter (fp32)"] == 2 * rows["policy adapter (fp32)"]  # soft: reference at 2x rank
    static = {r["item"] for r in _plan(**{"model.quantize": "4bit", "align.method": "dpo"})["rows"]}
    assert "starting reference (fp32)" not in static  # no kl/init copy when the reference never moves
    assert soft["activations"]["checkpointing"] < soft["activations"]["no_checkpointing"] / 5
    kto = _plan(**{"model.quantize": "4bit", "align.method": "tr-kto"})
    assert kto["sequences_per_device"] == 4 and soft["sequences_per_device"] == 8  # pairs: chosen + rejected
    assert _plan(**{"data.max_length": 2048, "model.quantize": "4bit"})["activations"]["no_checkpointing"] > \
        2 * soft["activations"]["no_checkpointing"]  # attention's mask grows with the square


def test_parse_size():
    assert parse_size("80GB") == parse_size("80GiB") == parse_size("80g") == 80 * GIB
    assert parse_size("16000MB") == 16000 << 20 and parse_size("1.5TB") == int(1.5 * (1 << 40))
    with pytest.raises(UsageError):
        parse_size("lots")


def test_unknown_hub_model_is_a_usage_error_naming_the_way_out():
    result = run_cli("align", "--model", "someone/unknown-7b", "--dry-run")
    assert result.exit_code == 2 and "built-in table" in result.stderr and "config.json" in result.stderr


def test_cli_dry_run_prints_the_table_and_json_without_loading_weights(tmp_path):
    table = ok("align", "--model", "EleutherAI/pythia-12b", "--quantize", "4bit", "--dtype", "bfloat16",
               "--max-length", "1024", "--batch-size", "4", "--lora-r", "16", "--gradient-checkpointing",
               "--dry-run", "--device-memory", "80GB")
    assert "optimizer (AdamW)" in table.stdout and "fits a device of 80.00 GiB" in table.stdout
    full = ok("align", "--model", "EleutherAI/pythia-12b", "--no-lora", "--dtype", "bfloat16", "--max-length", "1024",
              "--dry-run", "--device-memory", "80GB", "--json")
    plan = json.loads(full.stdout)["plan"]
    assert plan["fits"] is False and plan["mode"] == "full"
    # Under `accelerate launch --config_file recipes/accelerate/fsdp.yaml` the plan is the sharded one.
    env = {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}
    sharded = json.loads(ok("align", "--model", "EleutherAI/pythia-12b", "--no-lora", "--dtype", "bfloat16",
                            "--max-length", "1024", "--batch-size", "8", "--gradient-checkpointing", "--dry-run",
                            "--device-memory", "80GB", "--json", env=env).stdout)["plan"]
    assert sharded["fits"] is True and "gathered blocks (FSDP, transient)" in {r["item"] for r in sharded["rows"]}
    sft = json.loads(ok("sft", "--model", "EleutherAI/pythia-410m", "--dry-run", "--json").stdout)["plan"]
    assert {r["item"] for r in sft["rows"]}.isdisjoint({"reference adapter (fp32)", "starting reference (fp32)"})
    assert not list(tmp_path.iterdir())  # nothing written
