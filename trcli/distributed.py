"""Data parallelism under `torchrun` / `accelerate launch`: replicated (or, with FSDP, sharded)
model, sharded batches.

Every process holds the whole model (LoRA / QLoRA adapters and their reference, or the full
model). ``train.batch_size`` is the global micro-batch: each rank takes its contiguous slice,
scales its loss by its share, and the gradients of the trainable parameters are summed across
ranks once per optimizer step (after accumulation). Every rank then applies the same clipped
AdamW step and the same reference update to bit-identical inputs, so the replicas stay equal;
:func:`check_replicas` verifies that with a fingerprint exchanged between ranks and stops the
run when they differ. Only rank 0 writes files.

Gradients are reduced by hand rather than through DistributedDataParallel because the policy,
the reference and the starting reference are passes of one module with different adapters
active: DDP would hook every forward, including the reference passes.

With FSDP (``--fsdp`` or accelerate's FSDP config; full fine-tuning only) policy, reference and
starting reference are sharded alike (:func:`shard_model`): FSDP reduce-scatters the gradients,
the reference update is shard-local, and checkpoints gather whole state dicts on rank 0.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from trcli import zero
from trcli.common import _dist, barrier, is_main, log, rank, world_size
from trcli.errors import TrcliError, UsageError

BUCKET = 1 << 24  # elements per all-reduce: bounded extra memory for full fine-tuning


def fsdp_requested(flag: bool) -> bool:
    """``--fsdp``, or a launch with accelerate's FSDP config (recipes/accelerate/fsdp.yaml)."""
    return flag or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


@dataclass(frozen=True)
class Parallel:
    """How the launched processes share the work: FSDP, DeepSpeed (its config), or plain replicas."""

    fsdp: bool = False
    deepspeed: dict | None = None  # the engine's config

    @property
    def zero3(self) -> bool:
        return zero.stage(self.deepspeed) == 3

    @property
    def shards_weights(self) -> bool:
        """Whole models are then built in host memory; sharding moves each rank's part to its device."""
        return self.fsdp or self.zero3


def _processes() -> int:
    """How many processes the launcher started (before the group is joined) or the group holds."""
    return max(int(os.environ.get("WORLD_SIZE", "1")), world_size())


def requested(cfg) -> Parallel:
    """What the flags and the launcher ask for: FSDP (``--fsdp`` or accelerate's FSDP config, full
    fine-tuning only) or DeepSpeed ZeRO (``--deepspeed`` or accelerate's DeepSpeed configs, with the
    engine config that trcli's flags complete). Refusals are raised here (the dry run's plan too)."""
    fsdp, ds = fsdp_requested(cfg.train.fsdp), zero.requested(cfg.train.deepspeed)
    if fsdp and cfg.model.lora:
        raise UsageError("FSDP shards full fine-tuning (--no-lora); LoRA / QLoRA adapters are small and "
                         "replicated: use recipes/accelerate/ddp.yaml or plain torchrun")
    if fsdp and ds:
        raise UsageError("--fsdp and DeepSpeed both requested; choose one")
    if ds and cfg.model.quantize == "4bit":
        raise UsageError("QLoRA (--quantize 4bit) under DeepSpeed is not supported; use DDP "
                         "(recipes/accelerate/ddp.yaml or plain torchrun): the adapters are replicated anyway")
    return Parallel(fsdp=fsdp, deepspeed=zero.engine_config(ds, cfg.train, _processes()) if ds else None)


def setup(cfg) -> Parallel:
    """Join the process group a launcher described (RANK / WORLD_SIZE / MASTER_ADDR in the
    environment): NCCL on CUDA, gloo on CPU. Nothing to do for a single process. Returns how the
    processes share the work (:func:`requested`). Bad settings stop here, before anything is written."""
    asked = requested(cfg)
    fsdp, ds = asked.fsdp, asked.deepspeed
    zero.prepare(ds)  # its config checked by DeepSpeed itself; its log on stderr even when merely installed
    if _processes() == 1:
        if fsdp or ds:
            log(f"{'--fsdp' if fsdp else 'DeepSpeed'}: one process, nothing to shard; training unsharded")
        return Parallel()
    if _dist() is None:
        import torch.distributed as dist

        cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
        if cuda:  # "cuda" (no index) then means this rank's GPU everywhere in the code
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
        how = ", sharding with FSDP" if fsdp else f", DeepSpeed ZeRO-{zero.stage(ds)}" if ds else ""
        log(f"joined the {dist.get_backend()} process group{how}")
    return asked


def is_sharded(tensor_or_module) -> bool:
    """A DTensor (an FSDP-sharded parameter) or a ZeRO-3-partitioned parameter, or a module holding any."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor_or_module, torch.nn.Module):
        return any(is_sharded(p) for p in tensor_or_module.parameters())
    return isinstance(tensor_or_module, DTensor) or zero.is_partitioned(tensor_or_module)


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 over the ranks: each transformer block (the model's ``_no_split_modules``), then the
    root. Gradients are summed, not averaged, across ranks (divide factor 1): each rank's loss
    already carries its share of the global mean, as in the replicated path. Policy, reference and
    starting reference are sharded alike, so the reference update θ_ref ← α·θ + (1-α)·θ_ref is
    shard-local: no parameter is ever gathered for it."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise UsageError(f"FSDP: {type(model).__name__} names no transformer blocks (_no_split_modules)")
    for module in [*blocks, model]:
        fully_shard(module, reshard_after_forward=True)  # the root too: after any pass, only shards remain
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no pre-multiplied sum


def full_state_dict(model: torch.nn.Module, keep: Callable[[str], bool] = lambda name: True) -> dict | None:
    """The whole state dict (the entries ``keep`` selects) of an FSDP-sharded or ZeRO-3-partitioned
    model, on rank 0's CPU (collective: every rank calls)."""
    if any(zero.is_partitioned(p) for p in model.parameters()):
        state = zero.full_state_dict(model, keep)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in state.items() if keep(k)} if is_main() else None


def load_full_state_dict(model: torch.nn.Module, state: dict) -> None:
    """Inverse of :func:`full_state_dict`: every rank passes the whole dict and keeps its shard."""
    if any(zero.is_partitioned(p) for p in model.parameters()):
        zero.load_full_state_dict(model, state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state for a checkpoint: gathered whole on rank 0 when the model is sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    if any(isinstance(key, int) for key in state.get("state", {})):
        raise UsageError("this checkpoint was written without --fsdp (its optimizer state is per process); "
                         "resume it without --fsdp")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def check_batch_size(batch_size: int, processes: int | None = None) -> None:
    """The global micro-batch splits evenly over the processes (this launch's, or ``processes``)."""
    processes = world_size() if processes is None else processes
    if batch_size % processes:
        raise UsageError(f"--batch-size {batch_size} is the global micro-batch and must divide by the "
                         f"{processes} processes")


def shard(batch: list, weight: Callable[[list], float] = len) -> tuple[list, float]:
    """This rank's slice of a global micro-batch and the factor on its (mean) loss that makes the
    sum over ranks of the gradients the gradient of the global mean. ``weight`` is what the loss
    averages over (examples, or tokens for a token-mean loss)."""
    n, ranks = len(batch), world_size()
    if ranks == 1:
        return batch, 1.0
    bounds = [n * r // ranks for r in range(ranks + 1)]
    mine = batch[bounds[rank()]:bounds[rank() + 1]]
    return mine, (weight(mine) / weight(batch) if mine else 0.0)


def _comm_device() -> torch.device:
    dist = _dist()
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over ranks, in buckets of at most BUCKET elements per dtype. A rank whose
    shard was empty contributes zeros."""
    dist = _dist()
    if dist is None:
        return
    params = [p for p in params if not is_sharded(p)]  # FSDP reduce-scatters sharded gradients itself
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        start = 0
        while start < len(grads):
            size, end = 0, start
            while end < len(grads) and (end == start or size + grads[end].numel() <= BUCKET):
                size += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]]).to(_comm_device())
            dist.all_reduce(flat)
            offset = 0
            for g in grads[start:end]:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (collective: every rank calls)."""
    dist = _dist()
    if dist is None:
        return tensor
    out = tensor.detach().to(_comm_device())
    dist.all_reduce(out)
    return out.to(tensor.device)


def sum_row(row: dict[str, float]) -> dict[str, float]:
    """Each key summed over the ranks that have it (a rank whose shard was empty has none)."""
    dist = _dist()
    if dist is None:
        return dict(row)
    rows: list = [None] * world_size()
    dist.all_gather_object(rows, row)
    return {key: sum(r[key] for r in rows if key in r) for key in dict.fromkeys(k for r in rows for k in r)}


def fingerprint(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One int64 per tensor: the sum of its bits read as integers. Any single changed bit changes
    it, and it costs one pass over the memory on the tensor's own device."""
    out = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        width = next(w for w, dt in ((4, torch.int32), (2, torch.int16), (1, torch.uint8)) if raw.numel() % w == 0)
        as_int = raw.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[width])
        out.append(as_int.sum(dtype=torch.int64).cpu())
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.int64)


def check_replicas(named: list[tuple[str, torch.Tensor]], what: str, announce: bool = False) -> None:
    """Stop (exit 1) unless every rank holds bit-identical ``named`` tensors."""
    dist = _dist()
    if dist is None:
        return
    named = [(n, t) for n, t in named if not is_sharded(t)]  # shards differ by design
    mine = fingerprint([t for _, t in named])
    gathered = [torch.empty_like(mine, device=_comm_device()) for _ in range(world_size())]
    dist.all_gather(gathered, mine.to(_comm_device()))
    for other, theirs in enumerate(gathered):
        differ = (theirs.cpu() != mine).nonzero()
        if differ.numel():
            name = named[int(differ[0])][0]
            raise TrcliError(f"ranks disagree on {what}: '{name}' differs between rank {rank()} and rank {other} "
                             "(replicas must stay bit-identical; is every rank running the same code and data?)")
    if announce:
        digest = hashlib.sha256(mine.numpy().tobytes()).hexdigest()[:16]
        log(f"{what}: {len(named)} tensors identical on all ranks (fingerprint {digest})")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A directory that every rank may write into and that appears whole: rank 0 makes a temporary
    sibling, every rank gets its name, and rank 0 renames it over ``path`` once all have finished."""
    from trcli.runs import atomic_path

    with contextlib.ExitStack() as stack:
        name = [None]
        if is_main():
            tmp = stack.enter_context(atomic_path(path))
            tmp.mkdir()
            name = [str(tmp)]
        dist = _dist()
        if dist is not None:
            dist.broadcast_object_list(name, src=0)
        yield Path(name[0])
        barrier()  # every rank has written before rank 0 publishes


