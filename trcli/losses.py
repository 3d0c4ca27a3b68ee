"""DPO, IPO and KTO losses: pure functions of sequence log-probabilities.

Inputs are per-example log-probabilities log π(y|x) summed over completion tokens (or, for IPO
with ``average=True``, divided by the completion length first). Every function returns
``(losses, chosen_rewards, rejected_rewards)`` per example; rewards are β·(log π - log π_ref),
detached, as TRL and the DPO paper report them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float):
    """DPO (Rafailov et al. 2023, eq. 7): -log σ(β·h), with the implicit-reward margin

        h = [log π(y_w|x) - log π_ref(y_w|x)] - [log π(y_l|x) - log π_ref(y_l|x)].

    At π = π_ref, h = 0 and the loss is ln 2.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float):
    """IPO (Azar et al. 2023, eq. 17 with τ = β): (h - 1/(2β))², h as in :func:`dpo_loss`.

    At π = π_ref the loss is 1/(4β²). Whether h uses summed or per-token-averaged log-ratios is
    decided by the caller (see ``align.ipo_average``).
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def kto_kl_baseline(mean_log_ratio: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z = max(0, mean(log π(y'|x) - log π_ref(y'|x))) from the mean over the
    mismatched (x, y') pairs of the batch (Ethayarajh et al. 2024, eq. 8 estimator), with no gradient."""
    return mean_log_ratio.float().clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8), per example with r = log π(y|x) - log π_ref(y|x):

        desirable:   λ_D · (1 - σ(β (r - z)))
        undesirable: λ_U · (1 - σ(β (z - r)))

    ``kl`` is z from :func:`kto_kl_baseline`. At π = π_ref (r = z = 0) every loss is λ/2.
    Returns (losses, rewards of desirable examples, rewards of undesirable examples).
    """
    ratio = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))),
    )
    rewards = beta * ratio.detach()
    return losses, rewards[desirable], rewards[~desirable]


# The pairwise losses by name, and which losses need no reference pass (torchtune's
# ``is_reference_free``): none of the paper's do; SimPO or ORPO would, and align then skips the
# reference forward for them with no branch in its loop.
PAIRWISE = {"dpo": dpo_loss, "ipo": ipo_loss}
REFERENCE_FREE: frozenset[str] = frozenset()


def is_reference_free(loss: str) -> bool:
    return loss in REFERENCE_FREE
