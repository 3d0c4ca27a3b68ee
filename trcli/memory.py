"""Memory plan for `sft --dry-run` / `align --dry-run`: estimated peak memory per device.

It reads the model's shape only (config.json of a local model, or a built-in table of the paper's
models so that hub ids work offline), never the weights. The estimate counts what this code
keeps alive at the peak of a training step, which is the start of the policy's backward pass:

- weights: full precision, or 4-bit NF4 with double quantisation for the layers' linear
  weights (0.5 byte + an 8-bit absmax per 64 weights + an fp32 absmax per 256 blocks), the rest
  in fp32 (peft's ``prepare_model_for_kbit_training`` upcasts it);
- the policy's trainable parameters, the reference (an fp32 adapter at ``ref_rank``, or a full
  fp32 copy) and, in Trust Region runs, the starting reference kept for ``kl/init``;
- gradients and AdamW's two moments, in the trainable parameters' dtype (fp32 for adapters);
- activations: counted with torch's saved-tensor hooks, the policy pass keeps about 16
  hidden-size vectors per token per GPT-NeoX layer (17 for full fine-tuning) and 22.5 (26) per
  Llama layer (gated MLP; measured at Llama-3-8B's ratios, intermediate 3.5x hidden and 8 of 32
  KV heads), the padding mask of scaled-dot-product attention (T per token per layer), and the completion logits in fp32; at the start of backward the logits
  are alive four times (saved; the softmax of the logsumexp backward; the gather backward's
  scatter; the gradient padded back to the full logits by the slice backward).
  Gradient checkpointing keeps one hidden vector per layer plus one layer recomputed.

benchmarks/memory_peak.py checks the total against the measured peak RSS of a training step
on CPU (docs/scale.md holds the table).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from trcli.config import Config
from trcli.errors import UsageError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax per 64 + fp32 absmax per 256 blocks
# Hidden-size vectors kept per token per layer by the policy pass (see the docstring).
SAVED_PER_LAYER = {("gpt_neox", "lora"): 16, ("gpt_neox", "full"): 17, ("llama", "lora"): 22.5, ("llama", "full"): 26}
LOGIT_COPIES = 4
CUDA_OVERHEAD = GIB  # CUDA context, cuBLAS workspace: not in the allocator's count but on the device
HEADROOM = 0.9       # "fits" leaves 10% of the device for allocator fragmentation


@dataclass
class Shape:
    """What the estimate needs of a decoder-only transformer."""

    name: str
    source: str
    arch: str           # gpt_neox (Pythia) or llama (gated MLP, grouped KV heads)
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    kv_heads: int | None = None
    tied: bool = False

    def linears(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one block, name -> (in, out), as peft's target names."""
        h, i = self.hidden, self.intermediate
        if self.arch == "gpt_neox":
            return {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)}
        kv = h // self.heads * (self.kv_heads or self.heads)
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_weights(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, output head, norms and (GPT-NeoX) biases: what 4-bit leaves unquantised."""
        h = self.hidden
        embeddings = self.vocab * h * (1 if self.tied else 2)
        if self.arch == "gpt_neox":
            per_layer = sum(out for _, out in self.linears().values()) + 4 * h  # biases, two LayerNorms
            return embeddings + self.layers * per_layer + 2 * h
        return embeddings + self.layers * 2 * h + h  # RMSNorm weights

    def params(self) -> int:
        return self.linear_weights() + self.other_params()

    def lora_params(self, rank: int, targets: list[str]) -> int:
        chosen = self.linears() if targets == ["all-linear"] else {
            name: dims for name, dims in self.linears().items() if name in targets}
        return self.layers * rank * sum(a + b for a, b in chosen.values())


def _pythia(name: str, hidden: int, layers: int, heads: int, vocab: int) -> Shape:
    return Shape(name, "built-in table", "gpt_neox", hidden, layers, heads, 4 * hidden, vocab)


# Shapes from the models' config.json on the hub (Pythia: EleutherAI/pythia-*; Llama-3-8B: meta-llama).
BUILTIN = {
    "pythia-14m": _pythia("pythia-14m", 128, 6, 4, 50304),
    "pythia-70m": _pythia("pythia-70m", 512, 6, 8, 50304),
    "pythia-160m": _pythia("pythia-160m", 768, 12, 12, 50304),
    "pythia-410m": _pythia("pythia-410m", 1024, 24, 16, 50304),
    "pythia-1.4b": _pythia("pythia-1.4b", 2048, 24, 16, 50304),
    "pythia-2.8b": _pythia("pythia-2.8b", 2560, 32, 32, 50304),
    "pythia-6.9b": _pythia("pythia-6.9b", 4096, 32, 32, 50432),
    "pythia-12b": _pythia("pythia-12b", 5120, 36, 40, 50688),
    "llama-3-8b": Shape("llama-3-8b", "built-in table", "llama", 4096, 32, 32, 14336, 128256, kv_heads=8),
}


def model_shape(name: str | None) -> Shape:
    """The shape of a local model (its config.json) or of a known hub id (the built-in table)."""
    if not name:
        raise UsageError("--dry-run needs a model: --model (hub id or local path) or --from a run")
    if Path(name).exists():
        file = Path(name) / "config.json"
        if not file.is_file():
            raise UsageError(f"{name}: no config.json to read the model's shape from")
        return _from_config(json.loads(file.read_text()), name, str(file))
    key = name.lower().rsplit("/", 1)[-1].removesuffix("-deduped")
    if re.fullmatch(r"(meta-)?llama-3(\.\d)?-8b(-instruct)?", key):
        return BUILTIN["llama-3-8b"]
    if key in BUILTIN:
        return BUILTIN[key]
    known = ", ".join(BUILTIN)
    raise UsageError(f"--dry-run: '{name}' is not a local path and not in the built-in table ({known}); "
                     "pass a local copy of the model (only its config.json is read)")


def _from_config(cfg: dict, name: str, source: str) -> Shape:
    kind = cfg.get("model_type")
    try:
        common = dict(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                      intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                      tied=bool(cfg.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise UsageError(f"{source}: no '{exc.args[0]}': cannot estimate memory for model_type {kind}") from None
    if kind == "gpt_neox":
        return Shape(name, source, "gpt_neox", **common)
    if kind in ("llama", "mistral", "qwen2"):
        return Shape(name, source, "llama", kv_heads=cfg.get("num_key_value_heads"), **common)
    raise UsageError(f"{source}: the memory plan knows GPT-NeoX (Pythia) and Llama-shaped models, "
                     f"not model_type '{kind}'")


def parse_size(text: str) -> int:
    """'80GB' -> bytes. GB and GiB both mean 2^30 here: an "80GB" GPU holds 80 GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?)?\s*", text.lower())
    if not m:
        raise UsageError(f"--device-memory: cannot read '{text}' (expected e.g. 80GB, 24GiB, 16000MB)")
    unit = (m.group(2) or "g")[0]
    return int(float(m.group(1)) * {"k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}[unit])


def _upstream_rank(cfg: Config) -> int:
    """The LoRA rank align will really use: the SFT adapter's, when --from hands one over."""
    if cfg.from_run:
        from trcli.runs import upstream

        adapter = upstream(cfg.from_run).get("adapter")
        if adapter and (Path(adapter) / "adapter_config.json").is_file():
            return json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
    return cfg.model.lora_r


def estimate(cfg: Config, stage: str, world_size: int = 1, deepspeed: dict | None = None) -> dict:
    """The memory plan: rows of (item, bytes, note) and the peak, per device (``deepspeed``: its config)."""
    from trcli import zero
    from trcli.trust_region import Schedule

    shape = model_shape(cfg.model.name_or_path)
    m, t, align = cfg.model, cfg.train, cfg.align
    if m.quantize == "4bit" and not m.lora:
        raise UsageError("model.quantize=4bit needs LoRA (QLoRA); drop --no-lora")
    if t.batch_size % world_size:
        raise UsageError(f"--batch-size {t.batch_size} is the global micro-batch; it must divide by the "
                         f"{world_size} processes")
    dtype = DTYPE_BYTES[m.dtype]
    schedule = Schedule.from_config(align) if stage == "align" else Schedule()
    pairs = stage == "align" and align.loss != "kto"
    seqs = (t.batch_size // world_size) * (2 if pairs else 1)
    length = cfg.data.max_length
    rows: list[tuple[str, int, str]] = []

    # Weights.
    if m.quantize == "4bit":
        quantised = int(shape.linear_weights() * NF4_BYTES)
        rows.append(("weights (4-bit NF4)", quantised + shape.other_params() * 4,
                     f"{shape.linear_weights() / 1e9:.2f}B linear weights at {NF4_BYTES:.3f} B/param incl. "
                     f"double-quant; {shape.other_params() / 1e9:.2f}B embeddings/norms in fp32"))
        biggest = max(a * b for a, b in shape.linears().values())
        rows.append(("dequantised layer (transient)", biggest * dtype, "largest linear weight, dequantised per matmul"))
    else:
        rows.append((f"weights ({m.dtype})", shape.params() * dtype, f"{shape.params() / 1e9:.2f}B parameters"))

    # Trainable parameters, the reference and the kept starting reference.
    if m.lora:
        rank = _upstream_rank(cfg) if stage == "align" else m.lora_r
        trainable = shape.lora_params(rank, m.lora_targets)
        grad_bytes = 4
        rows.append(("policy adapter (fp32)", trainable * 4, f"rank {rank}, {trainable / 1e6:.1f}M parameters"))
        if stage == "align":
            ref_rank = align.ref_rank or (2 * rank if schedule.mode == "soft" else rank)
            rows.append(("reference adapter (fp32)", shape.lora_params(ref_rank, m.lora_targets) * 4,
                         f"rank {ref_rank}"))
            if schedule.mode != "none":
                rows.append(("starting reference (fp32)", trainable * 4, "kept for kl/init"))
    else:
        trainable, grad_bytes = shape.params(), dtype
        if stage == "align":
            rows.append(("reference copy (fp32)", shape.params() * 4, "full frozen copy"))
            if schedule.mode != "none":
                rows.append(("starting reference (fp32)", shape.params() * 4, "kept for kl/init"))
    zero_stage = zero.stage(deepspeed) if world_size > 1 else 0
    rows.append(("gradients", trainable * grad_bytes, ""))
    # AdamW's moments: in the weights' dtype, or fp32 under ZeRO (it steps its fp32 master partitions).
    rows.append(("optimizer (AdamW)", 2 * trainable * (4 if zero_stage else grad_bytes),
                 "two moments per trainable parameter"))
    if zero_stage == 2 or (zero_stage == 3 and grad_bytes != 4):  # ZeRO-3 steps fp32 weights in place
        rows.append(("fp32 master weights (ZeRO)", trainable * 4, "DeepSpeed's copy of the trainable weights"))
    split = lambda row, how: (row[0], -(-row[1] // world_size), f"{row[2]}; 1/{world_size} per device ({how})".lstrip("; "))
    if zero_stage == 2:  # gradients and optimizer states partitioned, weights replicated
        rows = [split(row, "ZeRO-2") if row[0] in ("gradients", "optimizer (AdamW)", "fp32 master weights (ZeRO)")
                else row for row in rows]
    sharding = "FSDP" if t.fsdp and not m.lora and world_size > 1 else "ZeRO-3" if zero_stage == 3 else None
    if sharding:
        # Every full-size row above is sharded over the processes; a pass gathers one transformer
        # block at a time (and prefetches the next).
        rows = [split(row, sharding) for row in rows]
        block = (shape.params() - shape.other_params()) // max(1, shape.layers)
        rows.append((f"gathered blocks ({sharding}, transient)", 2 * block * 4, "one block and the prefetched next, fp32"))
    if zero_stage:  # DeepSpeed's offload moves optimizer states (and, at ZeRO-3, weights) to host memory
        offload = {kind: deepspeed["zero_optimization"].get(f"offload_{kind}", {}).get("device", "none") != "none"
                   for kind in ("optimizer", "param")}
        moved = lambda item: ((offload["optimizer"] and item in ("optimizer (AdamW)", "fp32 master weights (ZeRO)"))
                              or (offload["param"] and zero_stage == 3
                                  and item.startswith(("weights", "policy adapter", "reference", "starting reference"))))
        rows = [(item, 0, f"{note}; {gib(size)} offloaded to host memory") if moved(item) else (item, size, note)
                for item, size, note in rows]

    # Activations of the policy pass, with and without gradient checkpointing.
    tokens = seqs * length
    per_layer = int(SAVED_PER_LAYER[shape.arch, "lora" if m.lora else "full"] * shape.hidden * dtype) + length * dtype
    logits = LOGIT_COPIES * shape.vocab * 4
    full_act = tokens * (shape.layers * per_layer + logits)
    ckpt_act = tokens * (shape.layers * shape.hidden * dtype + per_layer + logits)
    shape_note = f"{seqs} seqs x {length} tokens"
    chosen = ckpt_act if m.gradient_checkpointing else full_act
    rows.append((f"activations ({'with' if m.gradient_checkpointing else 'no'} checkpointing)", chosen, shape_note))
    other = full_act if m.gradient_checkpointing else ckpt_act
    if t.device != "cpu":
        rows.append(("CUDA context and workspace", CUDA_OVERHEAD, "approximate"))
    total = sum(b for _, b, _ in rows)

    device_bytes = parse_size(t.device_memory) if t.device_memory else _local_device_memory(t.device)
    return {
        "stage": stage,
        "plan": {
            "model": shape.name, "shape_from": shape.source, "params": shape.params(),
            "method": align.method if stage == "align" else "sft",
            "mode": "qlora" if m.quantize == "4bit" else ("lora" if m.lora else "full"),
            "dtype": m.dtype, "world_size": world_size, "sequences_per_device": seqs, "max_length": length,
            "rows": [{"item": i, "bytes": b, "note": n} for i, b, n in rows],
            "gradient_checkpointing": m.gradient_checkpointing,
            "activations": {"checkpointing": ckpt_act, "no_checkpointing": full_act},
            "other_setting_total": total - chosen + other,
            "total": total,
            "device_memory": device_bytes,
            "fits": None if device_bytes is None else total <= HEADROOM * device_bytes,
        },
    }


def _local_device_memory(device: str) -> int | None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def plan_or_none(cfg: Config, stage: str) -> dict | None:
    """The memory plan when --dry-run was asked for, else None."""
    if not cfg.train.dry_run:
        return None
    from trcli import distributed

    # --fsdp / --deepspeed, or launched with accelerate's fsdp.yaml / deepspeed-zero*.yaml; refused as the run would be
    parallel = distributed.requested(cfg)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fsdp": parallel.fsdp})})
    return estimate(cfg, stage, int(os.environ.get("WORLD_SIZE", "1")), parallel.deepspeed)


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def render(result: dict):
    """`render` of the sft and align stages: the memory plan of a dry run, else a short summary
    of the finished run (its scalar results)."""
    from rich.console import Group
    from rich.table import Table

    if "plan" not in result:
        table = Table(title=f"{result['stage']} finished", show_header=False)
        for key, value in result.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            if key != "stage" and isinstance(value, (str, int)):
                table.add_row(key, str(value))
        return table
    plan = result["plan"]
    table = Table(title=f"memory plan per device: {plan['model']} ({plan['params'] / 1e9:.2f}B, {plan['mode']}, "
                        f"{plan['method']}, {plan['dtype']}, {plan['world_size']} process(es))")
    table.add_column("item")
    table.add_column("size", justify="right")
    table.add_column("note")
    for row in plan["rows"]:
        table.add_row(row["item"], gib(row["bytes"]), row["note"])
    table.add_row("total (peak)", gib(plan["total"]), "")
    other = "without" if plan["gradient_checkpointing"] else "with"
    lines = [table, f"{other} gradient checkpointing the peak would be {gib(plan['other_setting_total'])}"]
    if plan["device_memory"] is None:
        lines.append("device memory unknown: pass --device-memory, e.g. 80GB")
    else:
        verdict = "fits" if plan["fits"] else "does NOT fit"
        lines.append(f"{verdict} a device of {gib(plan['device_memory'])} "
                     f"(needs {gib(plan['total'])}; {int(HEADROOM * 100)}% of the device is usable)")
    return Group(*lines)
