"""Load the base model (full precision or 4-bit) and attach the policy and reference adapters.

LoRA / QLoRA: one frozen base, a trainable ``policy`` adapter and a frozen fp32 ``reference``
adapter on the same layers. The reference forward is a context (:func:`using_adapter`), not a
second model. Full fine-tuning keeps the reference as a frozen fp32 copy.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from trcli import hub
from trcli.config import Config, ModelConfig
from trcli.errors import UsageError
from trcli.trust_region import POLICY, REFERENCE, copy_adapter, lora_layers, update_lora_reference

INIT = "init"  # a frozen copy of the starting reference, for kl/init in TR runs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={name} but no CUDA device is available")
    if name == "cuda":  # the current GPU, by index: this rank's under torchrun (bitsandbytes' device_map needs one)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def _from_pretrained(load: Callable, name: str, offline_kwargs: dict | None = None, **kwargs):
    """``load(name, **kwargs)``, any failure one line. With the hub unreachable, from the local cache only
    (``local_files_only`` and ``offline_kwargs``; trcli.hub: the hub's retries took ~50 s to fail) or a
    line that says so."""
    offline = hub.unreachable(name)
    if offline:
        kwargs.update(local_files_only=True, **(offline_kwargs or {}))
    try:
        return load(name, **kwargs)
    except Exception as exc:  # OSError offline, ValueError for a wrong directory
        if offline:
            raise UsageError(f"cannot load model '{name}': {offline} and the local cache has no copy: pass a local "
                             "path, or set HF_ENDPOINT=URL for a mirror (HF_HUB_OFFLINE=1 skips the hub)") from None
        hint = "" if Path(name).exists() else " (not a local path)"
        raise UsageError(f"cannot load model '{name}': {exc.__class__.__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]}{hint}") from None


NO_MODEL = "no base model: pass --model (hub id or local path) or --from a run that had one"


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    if not name:
        raise UsageError(NO_MODEL)
    tok = _from_pretrained(AutoTokenizer.from_pretrained, name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(model_cfg: ModelConfig, device: torch.device, path: str | None = None, task: str = "causal"):
    """The base model, frozen or not as the caller decides; 4-bit NF4 when quantize=4bit."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    name = path or model_cfg.name_or_path
    if not name:
        raise UsageError(NO_MODEL)
    kwargs: dict = {"dtype": _DTYPES[model_cfg.dtype], "trust_remote_code": model_cfg.trust_remote_code}
    if model_cfg.quantize == "4bit":
        from transformers import BitsAndBytesConfig

        compute = _DTYPES[model_cfg.dtype] if device.type == "cuda" else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute)
        kwargs["device_map"] = {"": device.index if device.type == "cuda" else "cpu"}
    cls = AutoModelForSequenceClassification if task == "reward" else AutoModelForCausalLM
    # transformers does not pass local_files_only on to its lookup of an adapter in the model's folder
    model = _from_pretrained(cls.from_pretrained, name, {"adapter_kwargs": {"local_files_only": True}}, **kwargs)
    if model_cfg.quantize != "4bit":
        model.to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def lora_config(model_cfg: ModelConfig, rank: int | None = None, alpha: float | None = None):
    from peft import LoraConfig

    targets = model_cfg.lora_targets
    return LoraConfig(
        r=rank or model_cfg.lora_r,
        lora_alpha=alpha or model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )


def attach_policy(base, model_cfg: ModelConfig, start_adapter: str | None):
    """The trainable ``policy`` adapter: a copy of ``start_adapter`` (an SFT run's) or fresh LoRA."""
    from peft import PeftModel, get_peft_model

    if start_adapter:
        return PeftModel.from_pretrained(base, start_adapter, adapter_name=POLICY, is_trainable=True)
    return get_peft_model(base, lora_config(model_cfg), adapter_name=POLICY)


def add_frozen_adapter(model, name: str, model_cfg: ModelConfig, rank: int) -> None:
    """A frozen fp32 adapter on the policy's layers: the reference, set equal to the policy (truncated
    to ``rank`` if that is below the policy's), or INIT, a copy of the starting reference."""
    policy_cfg = model.peft_config[POLICY]
    cfg = copy.deepcopy(policy_cfg)
    cfg.r, cfg.lora_alpha, cfg.inference_mode = rank, rank, True  # scaling 1: ΔW = B·A
    model.add_adapter(name, cfg)
    for module_name, param in model.named_parameters():
        if f".{name}." in module_name:
            param.requires_grad_(False)
            param.data = param.data.float()
    layers = lora_layers(model, name)
    if name == REFERENCE:
        update_lora_reference(layers, 1.0)  # a copy, truncated if --ref-rank is below the policy's rank
    else:
        copy_adapter(layers, name, src=REFERENCE)


@contextmanager
def no_dropout(model):
    """Dropout off for the wrapped forward. Only the dropout modules switch to eval: a whole-model
    eval() makes bitsandbytes repack 4-bit weights for inference on CPU, which then breaks the
    training forward."""
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    try:
        for m in dropouts:
            m.eval()
        yield model
    finally:
        for m in dropouts:
            m.train()


@contextmanager
def using_adapter(model, name: str | None):
    """Run the wrapped forward with adapter ``name`` active (None = the bare base), dropout off,
    without touching requires_grad (peft's set_adapter would)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m in layers:
            if name is None:
                m._disable_adapters = True
            else:
                m._active_adapter = [name]
        with no_dropout(model):
            yield model
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def build_for_training(cfg: Config, device: torch.device, start: dict, reference: bool, ref_rank: int | None = None,
                       keep_init: bool = False):
    """Model (and, for full fine-tuning, a separate frozen reference) ready for a training stage.

    ``start`` is what the upstream run handed over: ``adapter`` (LoRA SFT) or ``weights`` (full).
    Returns (model, reference_model_or_None); in LoRA mode the reference is an adapter of model.
    """
    cfg.model.check_trainable()
    base = load_base(cfg.model, device, path=start.get("weights"))
    if not cfg.model.lora:
        if start.get("adapter"):  # full fine-tuning from a LoRA SFT: start from the merged weights
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, start["adapter"]).merge_and_unload().requires_grad_(True)
        frozen = None
        if reference:
            frozen = copy.deepcopy(base).float().eval().requires_grad_(False)
        return base, frozen
    if cfg.model.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.model.gradient_checkpointing)
    model = attach_policy(base, cfg.model, start.get("adapter"))
    for name, param in model.named_parameters():
        param.requires_grad_(f".{POLICY}." in name)
    if reference:
        policy_rank = model.peft_config[POLICY].r
        add_frozen_adapter(model, REFERENCE, cfg.model, ref_rank or policy_rank)
        if keep_init:
            add_frozen_adapter(model, INIT, cfg.model, min(policy_rank, ref_rank or policy_rank))
    model.base_model.set_adapter(POLICY)  # re-freeze: only the policy trains
    for name, param in model.named_parameters():
        param.requires_grad_(f".{POLICY}." in name)
    return model, None


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
