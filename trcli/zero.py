"""DeepSpeed ZeRO-2 / ZeRO-3 (``--deepspeed 2|3|ds_config.json``, or accelerate's DeepSpeed configs).

The training loop stays trcli's (:func:`trcli.training.fit`): the engine takes over backward
(gradient reduction across ranks), clipping and the optimizer step (AdamW with partitioned states).
Accumulation, the learning-rate schedule, logging and the reference update are the same code as
without it, so trcli's flags set batch, accumulation, clipping and precision; a DeepSpeed JSON
contributes its ``zero_optimization`` block (stage, offload, buckets) and must not contradict them.

- ZeRO-2 partitions gradients and optimizer states; weights stay replicated, so the reference
  (adapters, or the frozen copy) is replicated and every rank applies the same update, as under DDP.
- ZeRO-3 partitions the weights too. A full-fine-tuning reference and its starting copy are
  partitioned by the same rule as the policy (:func:`partition_frozen`), so the update
  θ_ref ← α·θ + (1-α)·θ_ref is shard-local: each rank mixes its own slice of each parameter
  (:func:`local`). LoRA factors are gathered in bounded groups of layers for the low-rank update;
  rank 0's result is broadcast and re-partitioned (:func:`gathered`), so it is identical everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
from pathlib import Path

import torch

from trcli.common import is_main
from trcli.errors import UsageError

TAG = "deepspeed"  # checkpoint-N/deepspeed/: the engine's own files (partitioned optimizer states)


def requested(value: str | None) -> dict | None:
    """The DeepSpeed config asked for: ``--deepspeed 2``, ``3`` or a JSON file, else accelerate's
    DeepSpeed launch (its config file, or the zero stage and offload devices of its YAML)."""
    if value in ("2", "3"):
        return {"zero_optimization": {"stage": int(value)}}
    if value and value.isdigit():
        raise UsageError(f"--deepspeed {value}: trcli runs ZeRO stage 2 or 3 (or give a DeepSpeed JSON file)")
    if value:
        return _read_json(Path(value))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        return _read_json(Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]))
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    if stage not in ("2", "3"):
        raise UsageError(f"accelerate's DeepSpeed config: zero_stage must be 2 or 3 (got {stage})")
    zero: dict = {"stage": int(stage)}
    for kind in ("optimizer", "param"):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{kind.upper()}_DEVICE", "none")
        if device != "none":
            zero[f"offload_{kind}"] = {"device": device}
    return {"zero_optimization": zero}


def _read_json(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: not a readable DeepSpeed JSON config ({exc})") from None
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be 2 or 3 (got {stage!r})")
    return config


def stage(config: dict | None) -> int:
    return int(config["zero_optimization"]["stage"]) if config else 0


def engine_config(config: dict, train, world: int) -> dict:
    """The engine's config: the user's, with what trcli's own flags decide filled in. A key the
    user set to something else (not "auto") is an error naming it, not silently overridden."""
    per_rank = max(1, train.batch_size // world)
    ours = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": per_rank * world * train.grad_accum,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in ours.items():
        theirs = config.get(key, "auto")
        if theirs != "auto" and theirs != value:
            raise UsageError(f"DeepSpeed config: {key} is {theirs} but trcli's flags make it {value}; "
                             "set it with trcli's flags or write \"auto\"")
    # The reference update writes the partitions in place; these keep other copies that it would not reach
    # (hpZ's secondary partitions, quantized frozen weights, parameters swapped out to NVMe).
    zero = config["zero_optimization"]
    for key, off in (("zero_hpz_partition_size", 1), ("zero_quantized_weights", False),
                     ("zero_quantized_nontrainable_weights", False)):
        if zero.get(key, off) != off:
            raise UsageError(f"DeepSpeed config: zero_optimization.{key} is not supported (the reference is "
                             "updated in place on the partitions); remove it")
    if zero.get("offload_param", {}).get("device") == "nvme":
        raise UsageError("DeepSpeed config: offload_param to nvme is not supported (the reference is updated in "
                         "place on the partitions); offload to cpu or not at all")
    for key in ("optimizer", "scheduler", "fp16", "bf16"):
        block = config.get(key)
        if block and block != "auto" and (key in ("optimizer", "scheduler") or block.get("enabled") not in (False, "auto")):
            raise UsageError(f"DeepSpeed config: remove '{key}': trcli sets the optimizer (AdamW, --lr), the schedule "
                             "(--lr-scheduler) and the precision (--dtype) itself")
    out = {k: v for k, v in copy.deepcopy(config).items() if k not in ("optimizer", "scheduler", "fp16", "bf16")}
    out.update(ours)
    # trcli's loop owns accumulation: backward only accumulates, step() is the boundary.
    out.update(managed_gradient_accumulation=False, zero_allow_untested_optimizer=True,
               steps_per_print=1 << 62, wall_clock_breakdown=False)
    return out


def _quiet():
    """stdout pointed at stderr: deepspeed logs and prints there (importing, building its ops)."""
    return contextlib.redirect_stdout(sys.stderr)


def import_deepspeed():
    """deepspeed, imported with its log on stderr: trcli's stdout carries results only (--json)."""
    try:
        with _quiet():  # its logger binds to the stdout of import time
            import deepspeed
    except ImportError as exc:
        raise UsageError(f"DeepSpeed could not be imported ({exc}): pip install 'trcli[deepspeed]'") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def _extension_roots() -> list[Path]:
    """Where torch's extension builder keeps its build directories (DeepSpeed's JIT ops among them)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return [Path(os.environ["TORCH_EXTENSIONS_DIR"])]
    from torch.utils.cpp_extension import get_default_build_root

    return [Path(get_default_build_root())]


def _files_held_open() -> set[str] | None:
    """The paths that live processes on this machine hold open (/proc/*/fd), or None without /proc."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held = set()
    for fd_dir in proc.glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    held.add(os.readlink(fd))
        except OSError:  # the process ended, or is another user's
            continue
    return held


def clear_stale_build_locks(roots: list[Path] | None = None) -> list[Path]:
    """Remove build locks that no live build holds, with a warning; return them.

    torch's extension builder (torch.utils.cpp_extension.load, which DeepSpeed uses to compile its
    CPU ops on first use) takes ``<build dir>/lock`` by creating it exclusively and holds it open
    while it compiles; every other process waits, without a word and without a limit, for the file
    to disappear. A build that was killed leaves it behind, and every later DeepSpeed run would
    wait forever. A lock that no process on this machine holds open is such a leftover. (Without
    /proc nothing can be told apart: the lock is named instead, with the fix.)"""
    locks = {}
    for root in roots or _extension_roots():
        for lock in (*root.glob("*/lock"), *root.glob("*/*/lock")):
            with contextlib.suppress(OSError):
                locks[lock] = lock.stat().st_ino
    if not locks:
        return []
    held = _files_held_open()  # after the listing: a lock listed and then taken by a build shows as held
    cleared = []
    for lock, inode in locks.items():
        if held is None:
            print(f"warning: {lock} exists: if no DeepSpeed op is being built right now, a killed build left it "
                  "and the next build will wait for it forever; delete it", file=sys.stderr)
            continue
        if str(lock) in held or os.path.realpath(lock) in held:
            continue  # a build is running: waiting for it is right
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino != inode:  # released and taken anew since it was listed: a live build's
                continue
            os.remove(lock)
            cleared.append(lock)
            print(f"warning: removed {lock}: a killed build of a DeepSpeed op left it, and the op's next build "
                  "would have waited for it forever", file=sys.stderr)
    return cleared


def prepare(config: dict | None) -> None:
    """Before anything is written: with a DeepSpeed config, import deepspeed and let it check the
    config's zero_optimization block and that it lets trcli own accumulation; without one, import an
    installed deepspeed anyway (transformers' save_pretrained would, with its log on stdout), quietly
    ignoring one that does not import."""
    import importlib.util

    if config is None:
        if importlib.util.find_spec("deepspeed") is not None:
            with contextlib.suppress(Exception):
                import_deepspeed()
        return
    deepspeed = import_deepspeed()
    clear_stale_build_locks()  # before any op is built (CPU AdamW for offloaded optimizer states)
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**config["zero_optimization"])
    except ValidationError as exc:  # name the first bad key
        first = exc.errors()[0]
        raise UsageError(f"DeepSpeed config: zero_optimization.{'.'.join(map(str, first['loc']))}: "
                         f"{first['msg']}") from None
    if not hasattr(deepspeed.DeepSpeedEngine, "managed_gradient_accumulation"):
        raise UsageError(f"deepspeed {deepspeed.__version__} does not let trcli's loop own gradient accumulation "
                         "(managed_gradient_accumulation); install deepspeed>=0.19.8")


def adamw(params: list, lr: float, weight_decay: float, config: dict | None):
    """torch's AdamW, or DeepSpeed's CPU AdamW (the same update, run where the offloaded states are)
    when the optimizer states are offloaded: DeepSpeed refuses a torch optimizer there."""
    if not config or config["zero_optimization"].get("offload_optimizer", {}).get("device", "none") == "none":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    with _quiet():  # its first use compiles the op, printing as it goes
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)


def initialize(model: torch.nn.Module, optimizer, make_scheduler, config: dict):
    """The policy's engine: partitions gradients and optimizer states (and, at stage 3, weights)."""
    with _quiet():
        engine, *_ = import_deepspeed().initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler,
                                                   config=config, dist_init_required=False)
    # Skip (and so report) a step with a non-finite gradient norm whatever the weights' dtype: without its
    # own bf16 mode ZeRO-2 would apply a NaN step to bf16 weights.
    if hasattr(engine.optimizer, "check_grad_overflow"):
        engine.optimizer.check_grad_overflow = True
    return engine


def unwrap(model):
    """The model a DeepSpeed engine wraps (anything else as it is)."""
    ds = sys.modules.get("deepspeed")
    return model.module if ds is not None and isinstance(model, ds.DeepSpeedEngine) else model


_ENGINES: list = []  # the frozen models' engines: kept alive with the hooks they put on the models


def partition_frozen(module: torch.nn.Module, config: dict) -> None:
    """ZeRO-3: partition a frozen model (reference, starting reference) exactly as the policy is
    partitioned (a parameter's slice on a rank depends only on its size and the number of ranks),
    and gather it layer by layer in its forward. Nothing stays gathered (persistence threshold 0),
    so the partitions are the only copy and the shard-local update is the whole update."""
    frozen = {k: v for k, v in config.items() if k not in ("gradient_clipping",)}
    frozen["zero_optimization"] = {**config["zero_optimization"], "stage3_param_persistence_threshold": 0}
    frozen["zero_optimization"].pop("offload_optimizer", None)
    with _quiet():
        engine, *_ = import_deepspeed().initialize(model=module, config=frozen, dist_init_required=False)
    engine.eval()
    _ENGINES.append(engine)  # its hooks on ``module`` gather the weights; callers keep using ``module``


def is_partitioned(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "ds_id")


def local(param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a ZeRO-3 parameter (the parameter itself when it is not partitioned)."""
    return param.ds_tensor if is_partitioned(param) else param


def gathered(params: list[torch.Tensor], modify: bool = False):
    """Whole ZeRO-3 parameters inside the block (a no-op for others). With ``modify``, rank 0's
    values are broadcast and re-partitioned on exit: every rank ends with the same weights."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    return import_deepspeed().zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def full_state_dict(module: torch.nn.Module, keep=lambda name: True) -> dict:
    """Whole tensors of a ZeRO-3 module on rank 0's CPU (collective), one submodule at a time."""
    state: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        name = lambda n: f"{prefix}.{n}" if prefix else n
        named = [(name(n), p) for n, p in sub.named_parameters(recurse=False) if keep(name(n))]
        with gathered([p for _, p in named]):
            if is_main():
                state.update({n: p.detach().cpu().clone() for n, p in named})
        if is_main():  # buffers are not partitioned; the persistent ones belong in a state dict
            state.update({name(n): b.detach().cpu().clone() for n, b in sub._buffers.items()
                          if b is not None and n not in sub._non_persistent_buffers_set and keep(name(n))})
    return state


@torch.no_grad()
def load_full_state_dict(module: torch.nn.Module, state: dict) -> None:
    """Inverse of :func:`full_state_dict`: every rank passes the whole dict; one submodule at a time."""
    for prefix, sub in module.named_modules():
        named = [(f"{prefix}.{n}" if prefix else n, p) for n, p in sub.named_parameters(recurse=False)]
        named = [(n, p) for n, p in named if n in state]
        with gathered([p for _, p in named], modify=True):
            for n, p in named:
                p.copy_(state[n])


def save_checkpoint(engine, directory: Path) -> None:
    """The engine's state (every rank writes its partition of the optimizer states)."""
    with _quiet():
        # Only what trains: frozen weights (a LoRA base, the reference) are in the usual folders or the start.
        engine.save_checkpoint(str(directory), tag=TAG, save_latest=False, exclude_frozen_parameters=True)


def load_checkpoint(engine, directory: Path) -> None:
    if not (directory / TAG).is_dir():
        raise UsageError(f"{directory}: written without DeepSpeed (no {TAG}/ folder); resume it without --deepspeed")
    with _quiet():
        path, _ = engine.load_checkpoint(str(directory), tag=TAG, load_optimizer_states=True,
                                         load_lr_scheduler_states=True, load_module_strict=False)
    if path is None:
        raise UsageError(f"{directory / TAG}: DeepSpeed could not read it (was it written by as many processes?)")
