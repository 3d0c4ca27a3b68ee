"""The memory plan: shapes counted exactly (any causal LM, read from its meta-device module tree), the
paper's headline cases, the CLI table and JSON, and the plan against a real run's measured peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# --- Any causal LM transformers knows: the shape comes from the model built on the meta device ---

def _tiny_config(kind: str):
    from transformers import Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, Qwen2Config

    if kind == "gemma3":  # Gemma 3's real vocabulary: 16.8M parameters, nearly all of them the tied embedding
        return Gemma3TextConfig(vocab_size=262144, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=16, intermediate_size=128, sliding_window=16)
    if kind == "llama":  # SmolLM2-shaped: tied embeddings, 3 KV heads of 9
        return LlamaConfig(vocab_size=1000, hidden_size=72, num_hidden_layers=3, num_attention_heads=9,
                           num_key_value_heads=3, intermediate_size=192, tie_word_embeddings=True)
    if kind == "qwen2":  # biases on q, k, v
        return Qwen2Config(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=160, tie_word_embeddings=True)
    return GPTNeoXConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, rotary_pct=0.25, tie_word_embeddings=False)


@pytest.mark.parametrize("kind", ["gemma3", "llama", "qwen2", "gpt_neox"])
def test_any_causal_lm_plans_and_counts_what_transformers_and_peft_build(tmp_path, kind):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _tiny_config(kind)
    config.save_pretrained(tmp_path)
    plan = json.loads(ok("align", "--model", tmp_path, "--dry-run", "--json").stdout)["plan"]
    assert plan["shape_from"] == str(tmp_path / "config.json")
    rows = {r["item"]: r["bytes"] for r in plan["rows"]}

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # each Parameter once
    assert plan["params"] == params and rows["weights (float32)"] == 4 * params
    if config.tie_word_embeddings:  # the state dict names the shared embedding twice; the plan counts it once
        doubled = sum(t.numel() for t in model.state_dict().values())
        assert doubled - params == config.vocab_size * config.hidden_size
    shape = model_shape(str(tmp_path))
    assert (shape.vocab, shape.hidden, shape.layers) == (config.vocab_size, config.hidden_size,
                                                         config.num_hidden_layers)
    assert shape.tied == config.tie_word_embeddings and shape.gated == (kind != "gpt_neox")

    linear = sum(m.in_features * m.out_features for m in model.modules()  # what 4-bit quantises (below)
                 if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert shape.lora_params(8, ["all-linear"]) == trainable
    assert rows["policy adapter (fp32)"] == 4 * trainable and rows["reference adapter (fp32)"] == 2 * 4 * trainable
    # The logits term uses the output head's vocabulary, one chunk of positions (train.logps_chunk,
    # 256) four times in fp32: Gemma 3's 262k dominates its activations.
    tokens = plan["sequences_per_device"] * plan["max_length"]
    logits = min(256, tokens) * 4 * config.vocab_size * 4
    assert logits < plan["activations"]["no_checkpointing"] < logits + 2**30
    # The 4-bit plan quantises exactly the linear layers all-linear adapts.
    qlora = estimate(load(None, {"model.name_or_path": str(tmp_path), "model.quantize": "4bit"}, environ={}),
                     "sft")["plan"]
    nf4 = {r["item"]: r["bytes"] for r in qlora["rows"]}["weights (4-bit NF4)"]
    assert nf4 == int(linear * 0.5 + linear / 64 + linear * 4 / (64 * 256)) + (params - linear) * 4


def test_named_lora_targets_match_peft_on_gemma3(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = _tiny_config("gemma3")
    config.save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    for targets in (["q_proj", "v_proj"], ["down_proj"], ["self_attn.o_proj", "gate_proj"]):
        peft = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules=targets))
        assert shape.lora_params(4, targets) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
    # Gemma 3's extra norms (after attention and MLP, per-head q / k) keep their inputs too.
    llama_like = 8.5 + 4 * 128 / 64
    assert shape.saved_per_layer(lora=True) == pytest.approx(llama_like + (2 * 64 + 4 * 16 + 1 * 16) / 64)


def test_a_multimodal_config_plans_its_text_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3Config

    text = _tiny_config("gemma3").to_dict()
    config = Gemma3Config(text_config=text, mm_tokens_per_image=4,
                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=28, patch_size=14))
    config.save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    model = AutoModelForCausalLM.from_config(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.hidden, shape.vocab) == (2, 64, text["vocab_size"])  # the decoder's, not the vision tower's
    peft = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    assert shape.lora_params(8, ["all-linear"]) == sum(p.numel() for p in peft.parameters() if p.requires_grad)


def test_a_config_transformers_cannot_build_as_a_causal_lm_is_a_usage_error(tmp_path):
    from transformers import ViTConfig

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    result = run_cli("align", "--model", tmp_path, "--dry-run")
    assert result.exit_code == 2 and "cannot build a causal LM" in result.stderr and "vit" in result.stderr


def test_cuda_context_only_when_planning_for_a_gpu(tmp_path):
    _tiny_config("llama").save_pretrained(tmp_path)
    items = lambda *flags: {r["item"] for r in json.loads(
        ok("sft", "--model", tmp_path, "--dry-run", "--json", *flags).stdout)["plan"]["rows"]}
    assert "CUDA context and workspace" not in items("--device", "cpu")
    assert "CUDA context and workspace" in items("--device", "cuda")
    # auto: the device the run would take; --device-memory names a device to plan for (a GPU).
    assert ("CUDA context and workspace" in items()) == torch.cuda.is_available()
    assert "CUDA context and workspace" in items("--device-memory", "24GB")
    assert "CUDA context and workspace" not in items("--device", "cpu", "--device-memory", "24GB")


# --- A dry run answers fast: the shape is built once per config, then read from the cache ---

_DRY_RUN = r"""
import json, sys
from trcli.cli import main

sys.argv = ["trcli", *sys.argv[1:]]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
heavy = [m for m in ("transformers", "peft", "datasets", "deepspeed", "accelerate") if m in sys.modules]
print(json.dumps(heavy), file=sys.stderr)
"""


def test_a_repeated_dry_run_reads_the_cached_shape_without_importing_the_stack(tmp_path):
    from transformers import AutoConfig

    _tiny_config("llama").save_pretrained(tmp_path / "model")
    env = dict(os.environ, TRCLI_CACHE=str(tmp_path / "cache"))

    def dry_run(*flags: str) -> tuple[dict, list[str]]:
        args = ["align", "--model", str(tmp_path / "model"), "--device", "cpu", "--dry-run", "--json", *flags]
        run = subprocess.run([sys.executable, "-c", _DRY_RUN, *args], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout)["plan"], json.loads(run.stderr.strip().splitlines()[-1])

    first, built_with = dry_run()
    assert "transformers" in built_with and [f.suffix for f in (tmp_path / "cache" / "shapes").iterdir()] == [".json"]
    again, imported = dry_run()
    assert again == first and imported == []
    assert dry_run("--quantize", "4bit", "--lora-targets", "q_proj,v_proj")[1] == []  # every plan from the one shape
    # The key is the config's content: one more layer is a new shape, not the cached one.
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    deeper, _ = dry_run()
    assert deeper["params"] == _meta_params(AutoConfig.from_pretrained(tmp_path / "model"))
    assert deeper["params"] > first["params"] and len(list((tmp_path / "cache" / "shapes").iterdir())) == 2


# --- The plan against the measured peak of a real `trcli align` run on CPU ---

_MEASURE = r"""
import json, re, sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import trcli.modeling as modeling


def kib(field):
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


state = {"steps": 0}
load_base = modeling.load_base


def measured_load_base(*args, **kwargs):  # resident before the model: Python, torch, tokenizer, data
    state.setdefault("before", kib("VmRSS"))
    return load_base(*args, **kwargs)


def after_step(optimizer, args, kwargs):  # count from the second step: not the load, not AdamW's lazy state
    state["steps"] += 1
    if state["steps"] == 1:
        Path("/proc/self/clear_refs").write_text("5")


modeling.load_base = measured_load_base
register_optimizer_step_post_hook(after_step)
torch.set_num_threads(2)
from trcli.cli import main

sys.argv = ["trcli", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exc:
    assert not exc.code, exc.code
print(json.dumps({"peak": kib("VmHWM") - state["before"], "steps": state["steps"]}))
"""


def measured_peak_and_plan(model_dir: Path, tmp: Path, *flags: str) -> tuple[int, dict]:
    """Peak RSS of a real `trcli align` (LoRA TR-DPO on CPU, every step a logging step with its kl/init pass)
    during its second optimizer step, minus what was resident before the model was loaded, and the plan of
    the same command. As benchmarks/memory_peak.py: glibc serves allocations above 64 KiB with mmap, so
    freed tensors go back to the kernel and the peak RSS tracks the peak of live tensors. Every sequence
    fills --max-length (a one-line prompt, completions of 400 words), the plan's worst case."""
    import random

    rng = random.Random(0)
    words = "the a of to and in is it that was for on are with as his they be at one have this from or had".split()
    text = lambda: " ".join(rng.choice(words) for _ in range(400))
    pairs = tmp / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}: go on.", "chosen": text(), "rejected": text()})
                             + "\n" for i in range(8)))
    ok("prep", "--source", "jsonl", "--input", pairs, "-o", tmp / "prep")
    args = ["align", "--model", str(model_dir), "--data", str(tmp / "prep"), "--device", "cpu", *flags]
    plan = json.loads(ok(*args, "--dry-run", "--json").stdout)["plan"]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    run = subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(
        [*args, "--max-steps", "2", "--logging-steps", "1", "-o", str(tmp / "run"), "--json"])],
        env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2
    return result["peak"], plan


@pytest.mark.slow
def test_plan_bounds_a_real_smollm2_align_step(smollm2, tmp_path):
    """Within 15% of the measured peak (torch 2.13, logits 256 positions at a time: plan 2,099 MiB,
    peak 2,298 MiB, -8.7%; with all logits at once the plan was 2,670 MiB against 2,278, +17%)."""
    peak, plan = measured_peak_and_plan(smollm2, tmp_path, "--batch-size", "2", "--max-length", "256")
    assert plan["params"] == 134515008 and plan["device"] == "cpu"  # SmolLM2-135M, tied embeddings once
    print(f"SmolLM2-135M LoRA TR-DPO, 2 pairs x 256 tokens: plan {plan['total'] / 2**20:,.0f} MiB, "
          f"measured peak {peak / 2**20:,.0f} MiB ({plan['total'] / peak - 1:+.1%})")
    assert -0.15 <= plan["total"] / peak - 1 <= 0.15, (plan["total"] / 2**20, peak / 2**20)
