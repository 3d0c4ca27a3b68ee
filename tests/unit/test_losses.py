"""Losses against hand-computed numbers (each formula evaluated by hand below)."""

import math

import pytest
import torch

from trcli.losses import dpo_loss, ipo_loss, kto_kl_baseline, kto_loss

PC, PR = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
RC, RR = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.5])


def test_dpo_matches_hand_computed_values():
    # h = (PC - RC) - (PR - RR) = [1 - (-0.5), 0.5 - 0.5] = [1.5, 0.0]
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    expected = [math.log1p(math.exp(-0.15)), math.log(2)]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.05], abs=1e-6)
    assert rejected.tolist() == pytest.approx([-0.05, 0.05], abs=1e-6)


def test_ipo_matches_hand_computed_values():
    # (h - 1/(2β))² with β = 0.5: h - 1 = [0.5, -1.0]
    losses, _, _ = ipo_loss(PC, PR, RC, RR, beta=0.5)
    assert losses.tolist() == pytest.approx([0.25, 1.0], abs=1e-6)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_policy_equal_reference_gives_the_known_constants(beta):
    x = torch.tensor([-3.0, -7.0, -1.5])
    assert dpo_loss(x, x - 1, x, x - 1, beta)[0].tolist() == pytest.approx([math.log(2)] * 3)
    assert ipo_loss(x, x - 1, x, x - 1, beta)[0].tolist() == pytest.approx([1 / (4 * beta ** 2)] * 3)
    z = kto_kl_baseline((x - x).mean())
    assert kto_loss(x, x, torch.tensor([True, False, True]), z, beta)[0].tolist() == pytest.approx([0.5] * 3)


def test_kto_matches_hand_computed_values():
    policy, ref = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -4.0])  # r = [1, -1]
    z = kto_kl_baseline((torch.tensor([-6.0, -8.0]) - torch.tensor([-6.5, -8.5])).mean())  # mean 0.5
    assert z.item() == pytest.approx(0.5)
    losses, good, bad = kto_loss(policy, ref, torch.tensor([True, False]), z, beta=2.0,
                                 desirable_weight=1.0, undesirable_weight=3.0)
    sig = lambda v: 1 / (1 + math.exp(-v))
    assert losses.tolist() == pytest.approx([1 - sig(2 * (1 - 0.5)), 3 * (1 - sig(2 * (0.5 + 1)))], abs=1e-6)
    assert good.tolist() == pytest.approx([2.0]) and bad.tolist() == pytest.approx([-2.0])


def test_kto_baseline_is_clamped_at_zero_and_has_no_gradient():
    policy = torch.tensor([-9.0, -9.0], requires_grad=True)
    z = kto_kl_baseline((policy - torch.tensor([-5.0, -5.0])).mean())
    assert z.item() == 0.0 and not z.requires_grad


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-5.0], requires_grad=True), torch.tensor([-5.0], requires_grad=True)
    dpo_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0]), 0.1)[0].sum().backward()
    assert pc.grad.item() == pytest.approx(-0.05) and pr.grad.item() == pytest.approx(0.05)
