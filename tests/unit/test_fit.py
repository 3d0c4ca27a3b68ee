"""The training loop on a bare module: what it does when the gradient, not the loss, goes bad."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from trcli.config import load
from trcli.errors import TrcliError
from trcli.training import Hooks, fit


def _bad_gradient_hooks(dtype: torch.dtype) -> Hooks:
    # A finite loss (0) whose gradient is not: d sqrt(x)/dx at 0 is infinite.
    def step_fn(policy, batch, share, logging):
        return torch.sqrt((policy(torch.ones(1, 3, dtype=dtype)) * 0).sum().float()), {"loss": 0.0}

    return Hooks(step_fn=step_fn, epoch_batches=lambda epoch: [[1], [2]], save=lambda d: None, load=lambda d: None)


def _fit(run_dir, dtype, deepspeed=None) -> tuple[str, list[torch.Tensor]]:
    from trcli import zero

    model = torch.nn.Linear(3, 1).to(dtype)
    cfg = load(None, {"train.max_steps": 2, "train.device": "cpu", "train.batch_size": 1}, environ={})
    config = zero.engine_config(zero.requested(deepspeed), cfg.train, 1) if deepspeed else None
    try:
        fit(cfg, run_dir, model, list(model.parameters()), _bad_gradient_hooks(dtype), deepspeed=config)
        return "no error", []
    except TrcliError as err:
        return str(err), [zero.local(p).detach().clone() for p in model.parameters()]


def test_a_non_finite_gradient_norm_stops_before_the_update(tmp_path):
    torch.manual_seed(0)
    before = [p.detach().clone() for p in torch.nn.Linear(3, 1).parameters()]
    torch.manual_seed(0)
    message, after = _fit(tmp_path, torch.float32)
    assert "gradient norm is not finite at step 1; stopped before the update" in message
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def _deepspeed_worker(rank: int, init: str, run_dir: str, stage: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed asks for what a launcher sets
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    torch.manual_seed(0)
    before = [p.detach().clone().reshape(-1) for p in torch.nn.Linear(3, 1).to(torch.bfloat16).parameters()]
    torch.manual_seed(0)
    message, after = _fit(Path(run_dir), torch.bfloat16, stage)
    # ZeRO-3 keeps a partition per rank: with one rank, the whole (flattened, padded) parameter.
    unchanged = all(torch.equal(a, b.reshape(-1)[:a.numel()]) for a, b in zip(before, after))
    torch.save({"message": message, "unchanged": unchanged}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("stage", ["2", "3"])
def test_deepspeed_stops_on_a_non_finite_gradient_of_bf16_weights_instead_of_applying_it(tmp_path, stage):
    # Without DeepSpeed's own bf16 mode (trcli sets the precision) ZeRO-2 would apply the NaN step.
    out = str(tmp_path / "report")
    mp.spawn(_deepspeed_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path), stage, out), nprocs=1)
    report = torch.load(out)
    assert "gradient norm is not finite at step 1; stopped before the update" in report["message"]
    assert report["unchanged"]


def test_metrics_jsonl_is_strict_json_with_null_for_missing_values(tmp_path):
    """A KTO batch without an undesirable example has no rewards/rejected (NaN): a logging window averages the
    steps that have it, and a window where none has it logs null; every line parses as strict JSON."""
    import json
    import math

    rejected = iter([float("nan"), -1.0, float("nan"), float("nan")])  # steps 1-4, logged every 2 steps

    def step_fn(policy, batch, share, logging):
        loss = (policy(torch.ones(1, 3)) ** 2).sum()
        return loss, {"loss": loss.item(), "rewards/rejected": next(rejected)}

    model = torch.nn.Linear(3, 1)
    cfg = load(None, {"train.max_steps": 4, "train.logging_steps": 2, "train.device": "cpu",
                      "train.batch_size": 1}, environ={})
    hooks = Hooks(step_fn=step_fn, epoch_batches=lambda epoch: [[1], [2]], save=lambda d: None, load=lambda d: None)
    final = fit(cfg, tmp_path, model, list(model.parameters()), hooks)

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    rows = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/rejected"] for r in rows] == [-1.0, None]
    assert final["rewards/rejected"] is None and all(math.isfinite(r["loss"]) for r in rows)
