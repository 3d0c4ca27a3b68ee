"""Reference-policy updates of TR-DPO / TR-IPO / TR-KTO (Gorbatovski et al., arXiv 2404.09656).

Every τ optimizer steps (first at step τ): θ_ref ← α·θ + (1 - α)·θ_ref. With LoRA the update is
applied to the effective weights of each adapted layer, ΔW = s·B·A:

    ΔW_ref ← α·ΔW_θ + (1 - α)·ΔW_ref

which is *not* the average of the A and B factors. The mixture is exactly the product of the
stacked factors [√α·s_θB_θ, √(1-α)·s_refB_ref] · [√α·A_θ; √(1-α)·A_ref]; a QR of each stack and
an SVD of the small core re-factorise it at the reference rank in O((m+n)·r²).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

POLICY, REFERENCE = "policy", "reference"


@dataclass
class Schedule:
    """When the reference moves. ``mode`` is none (static), soft, hard or kl."""

    mode: str = "none"
    alpha: float = 0.0
    tau: int = 1
    kl_target: float | None = None
    kl_decay: float = 0.9
    updates: int = 0
    kl_running: float | None = None

    @classmethod
    def from_config(cls, align) -> "Schedule":
        if not align.trust_region:
            return cls()
        alpha = align.resolved_alpha()
        if alpha == 0.0:  # α = 0 is the static method, exactly: never touch the reference.
            return cls()
        return cls(mode=align.update, alpha=alpha, tau=align.resolved_tau(), kl_target=align.kl_target)

    def due(self, step: int, kl_estimate: float | None = None) -> bool:
        """Called after optimizer step ``step`` (1-based) with that step's KL(π‖π_ref) estimate."""
        if self.mode == "none":
            return False
        if self.mode == "kl":
            if kl_estimate is not None:
                self.kl_running = (kl_estimate if self.kl_running is None
                                   else self.kl_decay * self.kl_running + (1 - self.kl_decay) * kl_estimate)
            return self.kl_running is not None and self.kl_running > self.kl_target
        return step % self.tau == 0

    def applied(self) -> None:
        self.updates += 1
        if self.mode == "kl":
            self.kl_running = None  # π_ref = π now: the estimate restarts from zero.

    def state_dict(self) -> dict:
        return {"updates": self.updates, "kl_running": self.kl_running}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.kl_running = state["kl_running"]


def mix_low_rank(b_pol: torch.Tensor, a_pol: torch.Tensor, b_ref: torch.Tensor, a_ref: torch.Tensor,
                 alpha: float, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Factor α·B_θA_θ + (1-α)·B_refA_ref as B·A with ``rank`` columns (B: m×rank, A: rank×n).

    Returns (B, A, discarded energy, total energy), energies as squared Frobenius norms; the
    result is the best rank-``rank`` approximation of the exact mixture (exact when its rank
    fits). Inputs carry their LoRA scaling already (b = s·B).
    """
    dtype = b_pol.dtype
    b = torch.cat([math.sqrt(alpha) * b_pol, math.sqrt(1 - alpha) * b_ref], dim=1).float()
    a = torch.cat([math.sqrt(alpha) * a_pol, math.sqrt(1 - alpha) * a_ref], dim=0).float()
    q_b, r_b = torch.linalg.qr(b)          # b = Q_b R_b,   Q_b: m×k
    q_a, r_a = torch.linalg.qr(a.T)        # aᵀ = Q_a R_a,  Q_a: n×k
    core = (r_b @ r_a.T).double()          # mixture = Q_b · core · Q_aᵀ, core: k×k
    u, s, vh = torch.linalg.svd(core)
    keep = min(rank, s.numel())
    total = float((s ** 2).sum())
    discarded = float((s[keep:] ** 2).sum())
    root = s[:keep].sqrt()
    new_b = q_b @ (u[:, :keep] * root).to(q_b.dtype)
    new_a = ((root[:, None] * vh[:keep]).to(q_a.dtype)) @ q_a.T
    if keep < rank:  # the reference adapter keeps its shape; unused directions are zero.
        new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], rank - keep)], dim=1)
        new_a = torch.cat([new_a, new_a.new_zeros(rank - keep, new_a.shape[1])], dim=0)
    return new_b.to(dtype), new_a.to(dtype), discarded, total


def lora_layers(model):
    """(name, module) for every layer holding both a policy and a reference LoRA adapter."""
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and POLICY in lora_a and REFERENCE in lora_a:
            yield name, module


def effective_delta(module, adapter: str) -> torch.Tensor:
    """ΔW = s·B·A of one adapter on one layer (for tests and diagnostics)."""
    b = module.lora_B[adapter].weight.float()
    a = module.lora_A[adapter].weight.float()
    return module.scaling[adapter] * (b @ a)


@torch.no_grad()
def update_lora_reference(model, alpha: float) -> float:
    """Apply ΔW_ref ← α·ΔW_θ + (1-α)·ΔW_ref on every adapted layer, in place.

    Returns the fraction of the mixture's energy discarded by the rank truncation (0 when the
    reference rank holds the mixture exactly, as for a hard update into rank ≥ policy rank).
    """
    discarded = total = 0.0
    for _, module in lora_layers(model):
        a_pol, b_pol = module.lora_A[POLICY].weight, module.lora_B[POLICY].weight
        a_ref, b_ref = module.lora_A[REFERENCE].weight, module.lora_B[REFERENCE].weight
        s_pol, s_ref = module.scaling[POLICY], module.scaling[REFERENCE]
        r_pol, r_ref = a_pol.shape[0], a_ref.shape[0]
        if alpha == 1.0 and r_ref >= r_pol:
            # Hard update: copy, exactly. Extra reference directions are zeroed.
            a_ref.zero_()
            b_ref.zero_()
            a_ref[:r_pol].copy_(a_pol)
            b_ref[:, :r_pol].copy_(b_pol * (s_pol / s_ref))
            continue
        new_b, new_a, lost, energy = mix_low_rank(
            s_pol * b_pol.float(), a_pol.float(), s_ref * b_ref.float(), a_ref.float(), alpha, r_ref)
        b_ref.copy_(new_b / s_ref)
        a_ref.copy_(new_a)
        discarded += lost
        total += energy
    return discarded / total if total > 0 else 0.0


@torch.no_grad()
def update_full_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> float:
    """Full fine-tuning: θ_ref ← α·θ + (1-α)·θ_ref parameter by parameter, in fp32."""
    for p_ref, p_pol in zip(reference.parameters(), policy.parameters()):
        if alpha == 1.0:
            p_ref.copy_(p_pol)
        else:
            p_ref.copy_((alpha * p_pol.float() + (1 - alpha) * p_ref.float()).to(p_ref.dtype))
    return 0.0
