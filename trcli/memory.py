"""Memory plan for `sft --dry-run` / `align --dry-run`: estimated peak memory per device.

It reads the model's shape only, never the weights: the model is built from its config on the
meta device (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``: modules and
parameter shapes, no storage) and everything is read from that module tree, so any causal LM
transformers can build plans the same way. The config comes from a local model's config.json,
from the local Hugging Face cache for a hub id, or from a built-in table of the paper's models
so that their hub ids work offline. The shape read is cached per config (:func:`cached_shape`), so
a repeated dry run imports neither transformers nor the training stack. Read from the tree:

- parameters: every parameter once (tied input / output embeddings are one parameter);
- what LoRA adapts: every nn.Linear (and transformers' Conv1D) except the output head, as peft's
  ``all-linear`` does, or the modules named in ``model.lora_targets`` (peft's suffix match);
  that set is also what 4-bit quantisation replaces;
- vocabulary and hidden size (the output head's shape), the decoder layers (the ModuleList of
  blocks), and per block: a gated MLP or not, its norms; intermediate size, heads and head size
  from the (text) config.

The estimate counts what this code keeps alive at the peak of a training step, which is the
start of the policy's backward pass:

- weights: full precision, or 4-bit NF4 with double quantisation for the layers' linear
  weights (0.5 byte + an 8-bit absmax per 64 weights + an fp32 absmax per 256 blocks), the rest
  in fp32 (peft's ``prepare_model_for_kbit_training`` upcasts it);
- the policy's trainable parameters, the reference (an fp32 adapter at ``ref_rank``, or a full
  fp32 copy) and, in Trust Region runs, the starting reference kept for ``kl/init``;
- gradients and AdamW's two moments, in the trainable parameters' dtype (fp32 for adapters);
- activations: counted with torch's saved-tensor hooks, the policy pass keeps about 16
  hidden-size vectors per token per GPT-NeoX layer (17 for full fine-tuning) and 22.5 (26) per
  Llama layer (gated MLP; measured at Llama-3-8B's ratios, intermediate 3.5x hidden and 8 of 32
  KV heads). Other shapes scale that count (:meth:`Shape.saved_per_layer`): the MLP keeps 2
  intermediate-size vectors (4 when gated), attention 4 vectors of the query width (q, k and v
  expanded to all heads, the output), and every norm beyond a block's two hidden-size ones its
  input (again its output for full fine-tuning, unless it is a native LayerNorm). Plus the
  padding mask of scaled-dot-product attention (T per token per layer), and the completion
  logits in fp32: with ``train.logps_chunk`` (default) one chunk of positions at a time, counted
  four times, plus two hidden-size vectors per position (trcli.logps); with ``logps_chunk: 0``
  all positions' logits, alive four times at the start of backward (saved; the softmax of the
  logsumexp backward; the gather backward's scatter; the gradient padded back to the full logits
  by the slice backward).
  Gradient checkpointing keeps one hidden vector per layer plus one layer recomputed.
- a CUDA context row when planning for a GPU (not for ``--device cpu``, nor for ``auto`` on a
  machine without CUDA unless ``--device-memory`` names the device to plan for).

benchmarks/memory_peak.py checks the total against the measured peak RSS of a training step
on CPU (docs/scale.md holds the table).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from trcli.config import Config
from trcli.errors import UsageError

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit code + 8-bit absmax per 64 + fp32 absmax per 256 blocks
# Hidden-size vectors kept per token per layer by the policy pass, measured with saved-tensor hooks on
# GPT-NeoX (plain MLP, intermediate 4x hidden) and Llama (gated MLP, 3.5x) layers, split into a part per
# hidden size and one per intermediate size (see Shape.saved_per_layer): 8 + 2·4 = 16 (full: 17) for
# GPT-NeoX, 8.5 + 4·3.5 = 22.5 (full: 26) for Llama.
SAVED_PER_HIDDEN = {("plain", "lora"): 8, ("plain", "full"): 9, ("gated", "lora"): 8.5, ("gated", "full"): 12}
SAVED_PER_INTERMEDIATE = {"plain": 2, "gated": 4}
LOGIT_COPIES = 4
CUDA_OVERHEAD = GIB  # CUDA context, cuBLAS workspace: not in the allocator's count but on the device
HEADROOM = 0.9       # "fits" leaves 10% of the device for allocator fragmentation


@dataclass(frozen=True)
class Adaptable:
    """A module LoRA can adapt, as the module tree has it."""

    name: str     # qualified name, as peft matches targets against it
    fan_in: int
    fan_out: int
    kind: str     # "linear": adapted by all-linear and quantised by 4-bit; "head": the output layer; "embedding"


@dataclass(frozen=True)
class Norm:
    """A normalisation layer of one decoder block."""

    width: int    # the vectors it normalises, per token (per-head norms: all heads)
    hidden: bool  # over the hidden size (a block's usual two) rather than per head
    keeps_output: bool  # saves its normalised input for its weight's gradient (not torch's native LayerNorm)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a causal LM, read from its module tree built on the meta device."""

    name: str
    source: str
    arch: str           # the config's model_type
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool          # input and output embeddings are one parameter
    gated: bool         # gated MLP (Llama's gate_proj / up_proj) rather than GPT-NeoX's plain one
    total: int          # parameters, each once
    block: int          # parameters of one decoder layer
    modules: tuple[Adaptable, ...]
    norms: tuple[Norm, ...]  # of one decoder layer

    def linears(self) -> list[Adaptable]:
        """What all-linear adapts and 4-bit quantises: every linear layer but the output head."""
        return [m for m in self.modules if m.kind == "linear"]

    def linear_weights(self) -> int:
        return sum(m.fan_in * m.fan_out for m in self.linears())

    def largest_linear(self) -> int:
        return max((m.fan_in * m.fan_out for m in self.linears()), default=0)

    def other_params(self) -> int:
        """Embeddings, output head, norms and biases: what 4-bit leaves unquantised."""
        return self.total - self.linear_weights()

    def params(self) -> int:
        return self.total

    def lora_params(self, rank: int, targets: list[str]) -> int:
        """r·(in + out) per adapted module: all-linear, or peft's match of names (exact or a dotted suffix)."""
        if targets == ["all-linear"]:
            chosen = self.linears()
        else:
            chosen = [m for m in self.modules if any(m.name == t or m.name.endswith("." + t) for t in targets)]
        return rank * sum(m.fan_in + m.fan_out for m in chosen)

    def saved_per_layer(self, lora: bool) -> float:
        """Hidden-size vectors the policy pass keeps per token per layer for backward (see the module docstring)."""
        mlp, mode = "gated" if self.gated else "plain", "lora" if lora else "full"
        h = self.hidden
        count = SAVED_PER_HIDDEN[mlp, mode] * h + SAVED_PER_INTERMEDIATE[mlp] * self.intermediate
        count += 4 * (self.heads * self.head_dim - h)  # q, k, v (expanded to all heads) and the output
        extra = list(self.norms)
        for norm in [n for n in self.norms if n.hidden][:2]:  # the two a block has in the measured models
            extra.remove(norm)
        count += sum(n.width * (2 if n.keeps_output and not lora else 1) for n in extra)
        return count / h


def _linear_dims(module) -> tuple[int, int] | None:
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2's: weight is (in, out)
        return tuple(module.weight.shape)
    return None


def _int(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def read_shape(config, name: str, source: str, trust_remote_code: bool = False) -> Shape:
    """Build the model of ``config`` on the meta device (no weights) and read its shape from the module tree."""
    import torch
    from transformers import AutoModelForCausalLM

    kind = getattr(config, "model_type", None) or type(config).__name__
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(config), trust_remote_code=trust_remote_code)
    except Exception as exc:  # ValueError: no causal LM for this config class; anything from a model's __init__
        first = (str(exc).splitlines() or [""])[0][:200]
        raise UsageError(f"{source}: cannot build a causal LM of model_type '{kind}' from its config "
                         f"({exc.__class__.__name__}: {first})") from None
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise UsageError(f"{source}: model_type '{kind}' has no output head to read the vocabulary from")
    vocab, hidden = head.weight.shape[:2]

    modules = []
    for qualified, module in model.named_modules():
        dims = _linear_dims(module)
        if module is head:
            modules.append(Adaptable(qualified, dims[0] if dims else hidden, dims[1] if dims else vocab, "head"))
        elif dims:
            modules.append(Adaptable(qualified, *dims, "linear"))
        elif isinstance(module, torch.nn.Embedding):
            modules.append(Adaptable(qualified, module.num_embeddings, module.embedding_dim, "embedding"))

    # The decoder layers: the ModuleList of blocks, the text config's length if several (multimodal models).
    text = config.get_text_config()
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and any(True for _ in m.parameters())]
    if not lists:
        raise UsageError(f"{source}: model_type '{kind}' has no list of decoder layers in its module tree")
    want = _int(text, "num_hidden_layers")
    size = lambda m: sum(p.numel() for p in m.parameters())
    blocks = max(lists, key=lambda m: (len(m) == want, size(m)))
    first = blocks[0]

    heads = _int(text, "num_attention_heads") or 1
    head_dim = _int(text, "head_dim") or hidden // heads
    kv_heads = _int(text, "num_key_value_heads") or heads
    block_linears = [(n, d) for n, m in first.named_modules() if (d := _linear_dims(m))]
    intermediate = _int(text, "intermediate_size", "n_inner", "ffn_dim") or max(
        (d[0] for _, d in block_linears if d[1] == hidden), default=4 * hidden)
    parent = lambda n: n.rpartition(".")[0]
    ups = [n for n, (i, o) in block_linears if i == hidden and o == intermediate]
    gated = (any(i == hidden and o == 2 * intermediate for _, (i, o) in block_linears)
             or len(ups) != len({parent(n) for n in ups}))  # gate and up projection side by side
    norms = []
    for qualified, module in first.named_modules():
        if "norm" not in type(module).__name__.lower() or any(True for _ in module.children()):
            continue
        weight = getattr(module, "weight", None)
        width = weight.numel() if isinstance(weight, torch.Tensor) else hidden
        over_hidden = width == hidden
        if not over_hidden:  # per head (Gemma 3's, Qwen 3's q_norm / k_norm): the query's or the key's heads
            key = qualified.rpartition(".")[2].lower().startswith("k")
            width = (kv_heads if key else heads) * head_dim
        norms.append(Norm(width, over_hidden,
                          isinstance(weight, torch.Tensor) and not isinstance(module, torch.nn.LayerNorm)))
    return Shape(
        name=name, source=source, arch=kind, hidden=hidden, layers=len(blocks), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab,
        tied=embeddings is not None and getattr(embeddings, "weight", None) is head.weight, gated=gated,
        total=sum(p.numel() for p in model.parameters()),  # each Parameter once: tied ones are one
        block=size(blocks) // len(blocks), modules=tuple(modules), norms=tuple(norms))


def _pythia(hidden: int, layers: int, heads: int, vocab: int) -> dict:
    return dict(model_type="gpt_neox", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * hidden, vocab_size=vocab, rotary_pct=0.25, tie_word_embeddings=False)


# The paper's models, from their config.json on the hub (EleutherAI/pythia-*; meta-llama/Meta-Llama-3-8B).
BUILTIN_CONFIGS = {
    "pythia-14m": _pythia(128, 6, 4, 50304),
    "pythia-70m": _pythia(512, 6, 8, 50304),
    "pythia-160m": _pythia(768, 12, 12, 50304),
    "pythia-410m": _pythia(1024, 24, 16, 50304),
    "pythia-1.4b": _pythia(2048, 24, 16, 50304),
    "pythia-2.8b": _pythia(2560, 32, 32, 50304),
    "pythia-6.9b": _pythia(4096, 32, 32, 50432),
    "pythia-12b": _pythia(5120, 36, 40, 50688),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}


class _Builtin(Mapping):
    """name -> Shape of the built-in table, each read from its meta model on first use."""

    def __init__(self):
        self._shapes: dict[str, Shape] = {}

    def __getitem__(self, name: str) -> Shape:
        if name not in self._shapes:
            def config():
                from transformers import AutoConfig

                spec = dict(BUILTIN_CONFIGS[name])
                return AutoConfig.for_model(spec.pop("model_type"), **spec)

            key = json.dumps(BUILTIN_CONFIGS[name], sort_keys=True).encode()
            self._shapes[name] = cached_shape(key, config, name, "built-in table")
        return self._shapes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(BUILTIN_CONFIGS)

    def __len__(self) -> int:
        return len(BUILTIN_CONFIGS)


BUILTIN = _Builtin()


def model_shape(name: str | None, trust_remote_code: bool = False) -> Shape:
    """The shape of a local model (its config.json), of a hub id in the local cache or in the built-in table."""
    if not name:
        raise UsageError("--dry-run needs a model: --model (hub id or local path) or --from a run")
    if Path(name).exists():
        file = Path(name) / "config.json"
        if not file.is_file():
            raise UsageError(f"{name}: no config.json to read the model's shape from")

        def config():
            from transformers import AutoConfig

            try:
                return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
            except Exception as exc:  # an unknown model_type, custom code not trusted, a broken file
                first = (str(exc).splitlines() or [""])[0][:200]
                raise UsageError(f"{file}: cannot read the config ({exc.__class__.__name__}: {first})") from None

        return cached_shape(file.read_bytes(), config, name, str(file), trust_remote_code)
    key = name.lower().rsplit("/", 1)[-1].removesuffix("-deduped")
    if re.fullmatch(r"(meta-)?llama-3(\.\d)?-8b(-instruct)?", key):
        key = "llama-3-8b"
    if key in BUILTIN:
        return BUILTIN[key]
    known = ", ".join(BUILTIN)
    unknown = UsageError(f"--dry-run: '{name}' is not a local path, not in the local Hugging Face cache and not in "
                         f"the built-in table ({known}); pass a local copy of the model (only its config.json is read)")
    from huggingface_hub import try_to_load_from_cache

    try:  # a hub id already downloaded: its config.json from the local cache, no network
        file = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id
        file = None
    if not isinstance(file, str):
        raise unknown

    def config():
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
        except Exception:
            raise unknown from None

    return cached_shape(Path(file).read_bytes(), config, name, f"{name} (local Hugging Face cache)", trust_remote_code)


def cached_shape(config_bytes: bytes, config: Callable, name: str, source: str,
                 trust_remote_code: bool = False) -> Shape:
    """read_shape of ``config()``, built once per config: building the meta model imports transformers'
    modeling code (3-5 s on 2 cores), the shape it yields is a small JSON file under $TRCLI_CACHE/shapes
    (as trcli.pretrained: ~/.cache/trcli by default). The key is the config's bytes, transformers' version
    (it builds the model) and this module's source (it reads the tree). Custom code is never cached: it can
    change beside an unchanged config.json."""
    if trust_remote_code:
        return read_shape(config(), name, source, trust_remote_code)
    digest = hashlib.sha256(config_bytes)
    digest.update(metadata.version("transformers").encode())
    digest.update(Path(__file__).read_bytes())
    root = Path(os.environ.get("TRCLI_CACHE") or Path.home() / ".cache" / "trcli").expanduser()
    file = root / "shapes" / f"{digest.hexdigest()[:32]}.json"
    try:
        fields = json.loads(file.read_text())
        return Shape(name=name, source=source, **{**fields, "modules": tuple(Adaptable(**m) for m in fields["modules"]),
                                                  "norms": tuple(Norm(**n) for n in fields["norms"])})
    except (OSError, ValueError, TypeError, KeyError):  # not cached yet, or a damaged entry: build it again
        pass
    shape = read_shape(config(), name, source)
    fields = {k: v for k, v in dataclasses.asdict(shape).items() if k not in ("name", "source")}
    try:  # written whole or not at all; a read-only cache only costs the next run the build
        file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=file.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(fields, tmp)
        os.replace(tmp.name, file)
    except OSError:
        pass
    return shape


def parse_size(text: str) -> int:
    """'80GB' -> bytes. GB and GiB both mean 2^30 here: an "80GB" GPU holds 80 GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?)?\s*", text.lower())
    if not m:
        raise UsageError(f"--device-memory: cannot read '{text}' (expected e.g. 80GB, 24GiB, 16000MB)")
    unit = (m.group(2) or "g")[0]
    return int(float(m.group(1)) * {"k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}[unit])


def adapter_rank(adapter: str | None, default: int) -> int:
    """The rank of a PEFT adapter folder (an SFT run's, which align's policy continues), else ``default``."""
    if adapter and (Path(adapter) / "adapter_config.json").is_file():
        return json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
    return default


def _upstream_rank(cfg: Config) -> int:
    """The LoRA rank align will really use: the SFT adapter's, when --from hands one over."""
    if cfg.from_run:
        from trcli.runs import upstream

        return adapter_rank(upstream(cfg.from_run).get("adapter"), cfg.model.lora_r)
    return cfg.model.lora_r


def estimate(cfg: Config, stage: str, world_size: int = 1, deepspeed: dict | None = None) -> dict:
    """The memory plan: rows of (item, bytes, note) and the peak, per device (``deepspeed``: its config)."""
    from trcli import distributed, zero
    from trcli.trust_region import Schedule

    shape = model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code)
    m, t, align = cfg.model, cfg.train, cfg.align
    m.check_trainable()
    distributed.check_batch_size(t.batch_size, world_size)
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
        rows.append(("dequantised layer (transient)", shape.largest_linear() * dtype,
                     "largest linear weight, dequantised per matmul"))
    else:
        rows.append((f"weights ({m.dtype})", shape.params() * dtype, f"{shape.params() / 1e9:.2f}B parameters"))

    # Trainable parameters, the reference and the kept starting reference.
    if m.lora:
        rank = _upstream_rank(cfg) if stage == "align" else m.lora_r
        trainable = shape.lora_params(rank, m.lora_targets)
        grad_bytes = 4
        rows.append(("policy adapter (fp32)", trainable * 4, f"rank {rank}, {trainable / 1e6:.1f}M parameters"))
        if stage == "align":
            ref_rank = schedule.reference_rank(align.ref_rank, rank)
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
        rows.append((f"gathered blocks ({sharding}, transient)", 2 * shape.block * 4,
                     "one block and the prefetched next, fp32"))
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
    per_layer = int(shape.saved_per_layer(m.lora) * shape.hidden * dtype) + length * dtype
    if t.logps_chunk:  # trcli.logps: one chunk's fp32 logits alive at a time, plus a hidden-size vector
        # per position (the final hidden state, and a frozen head's per-position gradient J_t)
        logits = LOGIT_COPIES * min(t.logps_chunk, tokens) * shape.vocab * 4 + tokens * 2 * shape.hidden * 4
    else:  # all positions' logits at once
        logits = LOGIT_COPIES * tokens * shape.vocab * 4
    full_act = tokens * shape.layers * per_layer + logits
    ckpt_act = tokens * (shape.layers * shape.hidden * dtype + per_layer) + logits
    shape_note = f"{seqs} seqs x {length} tokens"
    if t.logps_chunk:
        shape_note += f"; logits {min(t.logps_chunk, tokens)} positions at a time"
    chosen = ckpt_act if m.gradient_checkpointing else full_act
    rows.append((f"activations ({'with' if m.gradient_checkpointing else 'no'} checkpointing)", chosen, shape_note))
    other = full_act if m.gradient_checkpointing else ckpt_act
    device = _planned_device(t)
    if device == "cuda":
        rows.append(("CUDA context and workspace", CUDA_OVERHEAD, "approximate"))
    total = sum(b for _, b, _ in rows)

    device_bytes = parse_size(t.device_memory) if t.device_memory else _local_device_memory(t.device)
    return {
        "stage": stage,
        "plan": {
            "model": shape.name, "shape_from": shape.source, "params": shape.params(),
            "method": align.method if stage == "align" else "sft",
            "mode": "qlora" if m.quantize == "4bit" else ("lora" if m.lora else "full"),
            "dtype": m.dtype, "device": device, "world_size": world_size, "sequences_per_device": seqs,
            "max_length": length,
            "rows": [{"item": i, "bytes": b, "note": n} for i, b, n in rows],
            "gradient_checkpointing": m.gradient_checkpointing,
            "activations": {"checkpointing": ckpt_act, "no_checkpointing": full_act},
            "other_setting_total": total - chosen + other,
            "total": total,
            "device_memory": device_bytes,
            "fits": None if device_bytes is None else total <= HEADROOM * device_bytes,
        },
    }


def _planned_device(train) -> str:
    """The device the plan is for, "cpu" or "cuda". ``auto`` is what the run would pick (CUDA if this machine has
    it), unless --device-memory names a device to plan for: then a GPU, as on the recipes' "80GB"."""
    if train.device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() or train.device_memory else "cpu"
    return "cpu" if train.device == "cpu" else "cuda"


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
