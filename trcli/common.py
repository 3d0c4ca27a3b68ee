"""Process facts every module may ask, with no project imports (nanochat's common.py idea): which
rank this is, how many there are, whether this one speaks, and a line on stderr naming the rank.

A leaf: importing it imports neither torch nor any trcli module, so that runs, zero and distributed
can all use it without importing each other, and commands that never start a process group
(config show, report) do not import torch. A process group can only exist once torch.distributed
was imported, so until then there is one process.
"""

from __future__ import annotations

import sys


def _dist():
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def is_main() -> bool:
    return rank() == 0


def log(msg: str) -> None:
    """A line on stderr, saying which rank speaks when there are several."""
    prefix = f"[rank {rank()}/{world_size()}] " if world_size() > 1 else ""
    print(prefix + msg, file=sys.stderr, flush=True)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any."""
    dist = _dist()
    if dist is None:
        return flag
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()
