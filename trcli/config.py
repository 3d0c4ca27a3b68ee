"""The one config schema shared by every stage.

Precedence: schema defaults < ``--config recipe.yaml`` < ``TRCLI_<SECTION>__<KEY>`` environment
variables < command-line flags. Unknown keys and bad values raise :class:`ConfigError`, which the
CLI turns into one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trcli.errors import ConfigError

ENV_PREFIX = "TRCLI_"


def _numeric(annotation: Any) -> bool:
    """An int or float field (optional or not), which a boolean must not fill."""
    import typing

    options = typing.get_args(annotation) or (annotation,)
    return bool(set(options) & {int, float}) and bool not in options


class Section(BaseModel):
    # Floats are finite (--epochs inf, --lr nan are refused, naming the key).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info):  # YAML `batch_size: true` is not 1
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


class ModelConfig(Section):
    name_or_path: str | None = Field(None, description="Base model: hub id or local path.")
    tokenizer: str | None = Field(None, description="Tokenizer path; defaults to the model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights' dtype (adapters train in float32).")
    quantize: Literal["none", "4bit"] = Field("none", description="4bit = QLoRA (NF4 via bitsandbytes).")
    lora: bool = Field(True, description="Train LoRA adapters (false = full fine-tuning).")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA scaling numerator (the update is scaled by lora_alpha / lora_r); "
                                "default 2 x lora_r, the recipes' rule (16 for r 8, 32 for r 16).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    lora_targets: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        description="Module names to adapt (comma-separated on the command line), or all-linear.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward (less memory, ~30% slower).")
    trust_remote_code: bool = Field(False, description="Run a model's own modelling code from the hub.")

    def check_trainable(self) -> None:
        """What training (and its memory plan) refuses: 4-bit weights take no full fine-tuning."""
        if self.quantize == "4bit" and not self.lora:
            raise ConfigError("model.quantize=4bit needs LoRA (QLoRA); drop --no-lora")

    @model_validator(mode="after")
    def _alpha_follows_rank(self) -> "ModelConfig":
        """lora_alpha not given: 2 x lora_r, resolved here once (so `--lora-r 16` trains at alpha 32)."""
        if self.lora_alpha is None:
            self.lora_alpha = 2.0 * self.lora_r
        return self


class DataConfig(Section):
    source: Literal["auto", "jsonl", "json", "csv", "parquet", "hub", "hh", "tldr", "ultrafeedback", "chat"] = Field(
        "auto", description="Input layout; auto: a local file in the format its suffix names (jsonl if none).")
    input: str | None = Field(None, description="Input file or hub dataset id (prep).")
    subset: str | None = Field(None, description="Hub config / HH subset, e.g. harmless-base.")
    split: str | None = Field(None, description="Hub split to read.")
    revision: str | None = Field(None, description="Hub revision.")
    columns: dict[str, str] = Field(
        default_factory=dict, description="Canonical field -> source column, e.g. {prompt: q} (on the command line: "
                                          "prompt=q,chosen=good,rejected=bad)."
    )
    kind: Literal["auto", "paired", "unpaired", "sft"] = Field(
        "auto", description="Record kind to produce: paired preferences, unpaired (KTO) or SFT."
    )
    template: str | None = Field(None, description="Prompt template (tldr), with {subreddit} {title} {post}.")
    test_size: float = Field(0.0, ge=0, lt=1, description="Fraction held out as the test split.")
    seed: int = Field(42, description="Split seed.")
    on_error: Literal["fail", "skip"] = Field("fail", description="A bad row: fail, or skip it and count it.")
    path: str | None = Field(None, description="A prep output directory to train / generate from.")
    max_length: int = Field(512, ge=8, description="Max prompt+completion tokens.")
    max_prompt_length: int | None = Field(
        None, ge=1, description="Cut prompts to this many tokens (from the left) first; default: no separate limit.")
    truncation: Literal["keep_start", "keep_end"] = Field(
        "keep_start", description="Over max_length: keep_start cuts the completion (TRL's default), keep_end the prompt.")
    chat_template: str = Field(
        "auto", description="auto (the tokenizer's, if any), none (plain text) or a Jinja file: how prep renders records.")
    show: int = Field(0, ge=0, description="prep: print N rendered examples (stderr).")


class TrainConfig(Section):
    max_steps: int = Field(-1, description="Optimizer steps; -1 = run `epochs` epochs.")
    epochs: float = Field(1.0, gt=0, description="Epochs over the train split (when max_steps is -1).")
    batch_size: int = Field(4, ge=1, description="Examples (pairs) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description="Decay after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed of the shuffling, dropout and adapter initialisation.")
    logging_steps: int = Field(10, ge=1, description="A metrics line every N optimizer steps.")
    save_steps: int = Field(0, ge=0, description="Checkpoint every N steps; 0 = only at the end.")
    eval_steps: int = Field(0, ge=0, description="sft: evaluate on the test split every N steps (0: at the end).")
    packing: bool = Field(False, description="sft: several examples per row, each attending only to itself.")
    logps_chunk: int = Field(
        256, ge=0, description="Log-probs from hidden states this many positions of logits at a time "
        "(memory ~ chunk x vocabulary, not tokens x vocabulary); 0 = all logits at once.")
    resume: bool = Field(False, description="Continue from the latest checkpoint in the output directory.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list, description="Also log to (repeatable).")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    fsdp: bool = Field(False, description="With full fine-tuning under torchrun: shard the model with FSDP.")
    deepspeed: str | None = Field(None, description="Under torchrun: DeepSpeed ZeRO stage 2 or 3, or a DeepSpeed JSON.")
    dry_run: bool = Field(False, description="Print the memory plan and exit.")
    device_memory: str | None = Field(None, description="With dry_run: the device memory to plan for, e.g. 80GB.")

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _stage_as_text(cls, value):  # `deepspeed: 3` in a recipe
        return str(value) if isinstance(value, int) else value


class AlignConfig(Section):
    method: Literal["dpo", "ipo", "kto", "tr-dpo", "tr-ipo", "tr-kto"] = Field(
        "tr-dpo", description="The loss; tr-* also move the reference during training.")
    update: Literal["soft", "hard", "kl"] = Field("soft", description="TR reference update: soft (mix), hard (copy every tau), "
                                                                     "kl (copy when KL exceeds kl_target).")
    alpha: float | None = Field(None, description="Soft mixing weight α (default 0.6; hard and kl copy: 1).")
    tau: int | None = Field(None, description="Optimizer steps between updates (default: soft 1, hard 512).")
    kl_target: float | None = Field(None, gt=0, description="update=kl: hard update when KL exceeds it.")
    beta: float = Field(0.1, gt=0, description="β of the loss.")
    ref_rank: int | None = Field(None, ge=1, description="Reference adapter rank; default 2x lora_r.")
    ipo_average: bool = Field(True, description="IPO on per-token-averaged log-ratios (IPO paper).")
    kto_desirable_weight: float = Field(1.0, gt=0, description="KTO λ_D.")
    kto_undesirable_weight: float = Field(1.0, gt=0, description="KTO λ_U.")

    @property
    def trust_region(self) -> bool:
        return self.method.startswith("tr-")

    @property
    def loss(self) -> str:
        return self.method.removeprefix("tr-")

    @model_validator(mode="after")
    def _check_update(self) -> "AlignConfig":
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError("align.alpha must be within [0, 1]")
        if self.tau is not None and self.tau < 1:
            raise ValueError("align.tau must be >= 1")
        if self.update == "hard" and self.alpha is not None and self.alpha != 1.0:
            raise ValueError("align.update=hard copies the policy (alpha = 1); drop --alpha or use --update soft")
        if self.update == "kl" and self.trust_region and self.kl_target is None:
            raise ValueError("align.update=kl needs align.kl_target (--kl-target)")
        return self

    def resolved_alpha(self) -> float:
        if self.update in ("hard", "kl"):
            return 1.0
        return 0.6 if self.alpha is None else self.alpha

    def resolved_tau(self) -> int:
        if self.tau is not None:
            return self.tau
        return 1 if self.update == "soft" else 512


class GenerateConfig(Section):
    prompts: str | None = Field(None, description="A prep output dir or a JSONL of {id?, prompt}.")
    split: str = Field("test", description="Split of a prep output (train if it has no test split).")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    max_new_tokens: int = Field(128, ge=1, description="Tokens per completion at most.")
    num_samples: int = Field(1, ge=1, description="Completions per prompt.")
    batch_size: int = Field(8, ge=1, description="Prompts per batch.")
    seed: int = Field(42, description="Sampling seed (per prompt id: resumes are identical).")
    limit: int | None = Field(None, ge=1, description="Only the first N prompts.")
    score_with: str | None = Field(None, description="Run dir or model to score completions against.")
    stop: list[str] = Field(default_factory=list, description="Stop string (repeatable); EOS and the chat template's "
                                                                 "end-of-turn always stop.")
    repetition_penalty: float = Field(1.0, gt=0, description="1.0 = off.")


class JudgeConfig(Section):
    judge: str = Field("gpt-4", description="Model name on an OpenAI-compatible endpoint, rm:PATH or hf:PATH.")
    candidate: str | None = Field(None, description="Candidate generations (JSONL).")
    baseline: str | None = Field(None, description="Baseline generations (JSONL).")
    base_url: str = Field("https://api.openai.com/v1", description="OpenAI-compatible endpoint.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key.")
    task: Literal["hh", "tldr", "generic"] = Field("generic", description="The judge prompt's task.")
    protocol: Literal["pairwise", "hc", "alpacaeval", "arena"] = Field(
        "pairwise", description="pairwise | hc (1-10 ratings per criterion) | alpacaeval (AlpacaEval 2 style) | "
                                "arena (Arena-Hard-Auto style).")
    swap: bool = Field(False, description="Judge both orders.")
    unparseable: Literal["exclude", "tie", "loss"] = Field("exclude", description="What an unreadable verdict counts as.")
    concurrency: int = Field(4, ge=1, description="Requests in flight.")
    timeout: float = Field(60.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(5, ge=0, description="Retries of a failed request.")
    temperature: float = Field(0.0, ge=0, description="Judge sampling temperature.")
    max_tokens: int | None = Field(None, ge=1, description="Default: 256; 4096 for --protocol arena; "
                                                            "--protocol alpacaeval always asks for 1.")
    max_cost_usd: float | None = Field(None, ge=0, description="Stop before spending more.")
    dry_run: bool = Field(False, description="Count the requests, send none.")
    min_win_rate: float | None = Field(None, ge=0, le=1, description="Exit 3 if the win rate is below this.")
    cache_dir: str | None = Field(None, description="Default: ~/.cache/trcli/judge.")
    seed: int = Field(42, description="Seed of which reply is shown first, and of the bootstrap.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for the 95% CI.")
    combine: list[str] = Field(default_factory=list, description="Judge run directories sharing a baseline: "
                                                                  "one Bradley-Terry leaderboard (judge --combine).")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    output: str | None = Field(None, description="Run directory (or file, for generate) to write.")
    from_run: str | None = Field(None, description="A previous stage's run directory.")


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def _env_layers(environ: dict[str, str]) -> list[tuple[str, dict]]:
    """TRCLI_ALIGN__BETA=0.2 -> {'align': {'beta': 0.2}} (values parsed as YAML scalars),
    one layer per variable so that an error names the variable."""
    layers = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ("TRCLI_DEBUG", "TRCLI_CACHE", "TRCLI_VERBOSITY"):
            continue
        raw = environ[name]
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        tree: dict = {}
        origin = f"environment variable {name}"
        _set_dotted(tree, dotted, value, origin)
        layers.append((origin, tree))
    return layers


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        section = ".".join(str(p) for p in first["loc"][:-1])
        allowed = _allowed_keys(section)
        return f"{origin}: unknown key '{key}' (allowed: {', '.join(allowed)})"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{origin}: bad value for '{key}': {msg}"


def _allowed_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in [p for p in section.split(".") if p]:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return sorted(model.model_fields)
        model = field.annotation
    return sorted(model.model_fields)


def read_recipe(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections")
    return data


def load(recipe: str | Path | None = None, flags: dict[str, Any] | None = None,
         environ: dict[str, str] | None = None) -> Config:
    """Resolve the config: defaults < recipe < TRCLI_* environment < flags (dotted keys)."""
    layers: list[tuple[str, dict]] = []
    if recipe is not None:
        layers.append((str(recipe), read_recipe(recipe)))
    layers.extend(_env_layers(dict(os.environ if environ is None else environ)))
    flag_tree: dict = {}
    for dotted, value in (flags or {}).items():
        if value is not None:
            _set_dotted(flag_tree, dotted, value, "flags")
    layers.append(("flags", flag_tree))

    merged: dict = {}
    for origin, tree in layers:
        merged = _merge(merged, tree)
        # Validate each layer as it is added, so an error names where the bad key came from.
        try:
            Config.model_validate(merged)
        except ValidationError as err:
            raise ConfigError(_describe(err, origin)) from None
    return Config.model_validate(merged)


def dump(config: Config) -> dict:
    return json.loads(config.model_dump_json())


def schema() -> dict:
    return Config.model_json_schema()
