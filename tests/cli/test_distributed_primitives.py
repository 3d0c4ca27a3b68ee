"""trcli.distributed in a real two-process gloo group (torch.multiprocessing, no launcher)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed


def _worker(rank: int, init: str, out: str) -> None:
    from trcli import common, distributed
    from trcli.errors import TrcliError

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    report = {}
    # Shards: contiguous slices whose shares add up to one, an empty slice when the batch is short.
    report["shards"] = [distributed.shard(list(range(n))) for n in (4, 3, 1)]
    # Gradients are summed over ranks, bucket boundaries included; a missing gradient counts as 0.
    distributed.BUCKET = 3
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad = torch.tensor([1.0, 2.0]) * (rank + 1)
    params[1].grad = torch.full((2, 2), 10.0 * (rank + 1))
    if rank == 0:
        params[2].grad = torch.tensor([5.0])
    distributed.all_reduce_grads(params)
    report["grads"] = [p.grad.tolist() for p in params]
    # Equal tensors pass; one flipped bit on one rank stops both.
    same = [("a", torch.arange(6.0)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    distributed.check_replicas(same, "equal tensors")
    differ = [("a", torch.arange(6.0)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    if rank == 1:
        differ[1][1].view(torch.int16)[2] ^= 1  # the lowest mantissa bit of one element
    try:
        distributed.check_replicas(differ, "the reference")
        report["error"] = None
    except TrcliError as err:
        report["error"] = str(err)
    report["any"] = [common.any_rank(rank == 1), common.any_rank(False)]
    report["row"] = distributed.sum_row({"loss": 0.25 * (rank + 1), "tokens": 10} if rank else {"tokens": 10})
    # The truncation warning is printed by rank 0 only (every rank counts the same examples).
    import contextlib
    import io

    from trcli.tokens import Encoder

    encoder = Encoder.__new__(Encoder)  # counts as a run's encoding left them; no tokenizer needed to report
    encoder.max_length, encoder.truncation = 64, "keep_start"
    encoder.counts = {"sequences": 10, "truncated": 3, "dropped": 2, "short": 1, "prompt_cut": 0}
    with contextlib.redirect_stderr(io.StringIO()) as err:
        report["truncation"] = encoder.report("trcli align")
    report["truncation_warning"] = err.getvalue()
    torch.save(report, f"{out}.{rank}")
    dist.destroy_process_group()


def test_shards_gradient_sum_and_replica_check_across_two_ranks(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "report")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(init, out), nprocs=2, join=True)
    r0, r1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")

    assert r0["shards"] == [([0, 1], 0.5), ([0], 1 / 3), ([], 0.0)]
    assert r1["shards"] == [([2, 3], 0.5), ([1, 2], 2 / 3), ([0], 1.0)]
    expected = [[3.0, 6.0], [[30.0, 30.0], [30.0, 30.0]], [5.0]]
    assert r0["grads"] == expected and r1["grads"] == expected
    for report in (r0, r1):
        assert report["error"] is not None and "the reference" in report["error"] and "'b'" in report["error"]
        assert report["row"] == {"tokens": 20, "loss": 0.5}  # a key only one rank has is that rank's
        assert report["any"] == [True, False]  # a non-finite loss on one rank stops every rank
        assert report["truncation"]["dropped"] == 2
    assert "dropped 2 of 10 sequences" in r0["truncation_warning"] and r1["truncation_warning"] == ""
