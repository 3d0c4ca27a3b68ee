"""The training loop on a bare module: what it does when the gradient, not the loss, goes bad."""

from __future__ import annotations

import pytest
import torch

from trcli.config import load
from trcli.errors import TrcliError
from trcli.training import Hooks, fit


def test_a_non_finite_gradient_norm_stops_before_the_update(tmp_path):
    model = torch.nn.Linear(3, 1)
    before = [p.detach().clone() for p in model.parameters()]
    # A finite loss (0) whose gradient is not: d sqrt(x)/dx at 0 is infinite.
    hooks = Hooks(step_fn=lambda policy, batch, logging: (torch.sqrt((policy.weight * 0).sum()), {"loss": 0.0}),
                  epoch_batches=lambda epoch: [[1], [2]], save=lambda d: None, load=lambda d: None)
    cfg = load(None, {"train.max_steps": 2, "train.device": "cpu"}, environ={})
    with pytest.raises(TrcliError, match="gradient norm is not finite at step 1; stopped before the update"):
        fit(cfg, tmp_path, model, list(model.parameters()), hooks)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
