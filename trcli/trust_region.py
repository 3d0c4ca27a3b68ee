"""Reference-policy updates of TR-DPO / TR-IPO / TR-KTO (Gorbatovski et al., arXiv 2404.09656).

Every τ optimizer steps (first at step τ): θ_ref ← α·θ + (1 - α)·θ_ref. With LoRA the update is
applied to the effective weights of each adapted layer, ΔW = s·B·A:

    ΔW_ref ← α·ΔW_θ + (1 - α)·ΔW_ref

which is *not* the average of the A and B factors. The mixture is exactly b·D·a for the stacked
factors b = [B_θ, B_ref], a = [A_θ; A_ref] and a diagonal D of the weights and scalings; a QR of
the stacks and an SVD of the small core, both taken through k×k Gram matrices (k = r_θ + r_ref),
re-factorise it at the reference rank in O((m+n)·k²), every layer's small problem in one batch
(``mix_low_rank``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trcli import zero

POLICY, REFERENCE = "policy", "reference"
CHUNK = 32  # layers mixed in one batch by update_lora_reference


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

    def reference_rank(self, requested: int | None, policy_rank: int) -> int:
        """The reference adapter's rank: ``requested`` (align.ref_rank), else twice the policy's
        under the soft update (a mix of two rank-r deltas has rank up to 2r, so the exact update
        needs room for it), else the policy's."""
        return requested or (2 * policy_rank if self.mode == "soft" else policy_rank)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "kl_running": self.kl_running}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.kl_running = state["kl_running"]


def mix_low_rank(layers: list[tuple], alpha: float, rank: int,
                 out: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                 ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float, float]:
    """Factor α·ΔW_θ + (1-α)·ΔW_ref at ``rank`` for a list of layers, ΔW = s·B·A.

    Each layer is (B_θ, A_θ, s_θ, B_ref, A_ref, s_ref); all have the same policy rank r_θ and
    reference rank r_ref, and ``rank`` ≤ r_θ + r_ref (the update passes r_ref). Returns each layer's new reference factors (B: m×rank, A: rank×n,
    float32 or the inputs' wider dtype) such that s_ref·B·A is the best rank-``rank``
    approximation of its exact mixture (exact when the mixture's rank fits), and the discarded
    and total energies (squared Frobenius norms) summed over the layers. With ``out`` (each
    layer's (B, A) to overwrite, e.g. the reference adapter's own weights) the factors are
    written there and no other m×rank or rank×n tensor is made.

    The mixture is b·D·a for the stacked factors b = [B_θ, B_ref] (m×k), a = [A_θ; A_ref]
    (k×n), k = r_θ + r_ref, and the diagonal D = diag(α·s_θ, …, (1-α)·s_ref, …). With the QR
    decomposition aᵀ = Q_a·R_a (R_a taken as the Cholesky root of the Gram matrix a·aᵀ, which
    is what a QR's R is), b·D·a = P·Q_aᵀ with P = b·D·R_aᵀ (m×k). Q_a has orthonormal columns,
    so the mixture's SVD is P's: the top ``rank`` eigenvectors V of the k×k matrix
    PᵀP = R_a·D·(bᵀb)·D·R_aᵀ give the best approximation P·V·Vᵀ·Q_aᵀ, stored as
    B = b·(D·R_aᵀ·V)/s_ref and A = (R_a⁻¹·V)ᵀ·a; the eigenvalues are the squared singular
    values. (This is a QR of both stacks and an SVD of the core R_b·D·R_aᵀ, computed through
    Gram matrices: only k×k problems meet LAPACK, all layers in one batched call.)

    A reference copied from the policy makes a's rows dependent and a·aᵀ singular: a jitter
    (1e-6 of its mean diagonal) keeps Cholesky defined, and b·D·a = (b·D·R_aᵀ)·(R_a⁻ᵀ·a) holds
    whatever the jitter. a·aᵀ is computed in float32; where its rounding leaves a Gram
    indefinite beyond the jitter (rows that nearly coincide), the batch is redone in float64
    with a jitter of 1e-10. The k×k algebra runs in float64, where R_a⁻¹'s amplification of
    rounding is harmless; the m×k and k×n products run in float32 (a copied reference repeats
    the policy's rows bit for bit, so their cancellation is exact). The discarded energy is the
    sum of the dropped eigenvalues; the total is tr(D·bᵀb·D·a·aᵀ), free of the jitter (zero
    adapters report zero).
    """
    dtype = torch.promote_types(torch.float32, torch.promote_types(layers[0][0].dtype, layers[0][3].dtype))
    bs = [torch.cat([b_pol, b_ref], dim=1).to(dtype) for b_pol, _, _, b_ref, _, _ in layers]
    as_ = [torch.cat([a_pol, a_ref], dim=0).to(dtype) for _, a_pol, _, _, a_ref, _ in layers]
    d = torch.tensor([[alpha * s_pol] * a_pol.shape[0] + [(1 - alpha) * s_ref] * a_ref.shape[0]
                      for _, a_pol, s_pol, _, a_ref, s_ref in layers], dtype=torch.float64, device=bs[0].device)
    gram_b = torch.stack([b.T @ b for b in bs]).double()
    gram_a, r_a = _gram_root(as_, torch.float32, 1e-6)
    if r_a is None:  # float32 rounding made a Gram indefinite beyond the jitter: redo it in float64
        gram_a, r_a = _gram_root(as_, torch.float64, 1e-10)
    if r_a is None:
        raise FloatingPointError("reference update: a Gram matrix of the LoRA A factors is not finite")
    dr = d[:, :, None] * r_a.mT                                     # D·R_aᵀ
    energy, v = torch.linalg.eigh(dr.mT @ gram_b @ dr)              # ascending
    v = v[..., -rank:]
    s_new = torch.tensor([layer[5] for layer in layers], dtype=v.dtype, device=v.device)
    to_b = ((dr @ v) / s_new[:, None, None]).to(dtype)
    to_a = torch.linalg.solve_triangular(r_a, v, upper=True).mT.to(dtype)
    mixed = out or [(b.new_empty(b.shape[0], rank), a.new_empty(rank, a.shape[1])) for b, a in zip(bs, as_)]
    for b, a, x, y, (new_b, new_a) in zip(bs, as_, to_b, to_a, mixed):
        torch.mm(b, x, out=new_b)
        torch.mm(y, a, out=new_a)
    total = float((d[:, :, None] * gram_b * d[:, None, :] * gram_a).sum())  # ‖b·D·a‖² = tr(D·bᵀb·D·a·aᵀ)
    return mixed, float(energy[..., :-rank].clamp_min(0).sum()), total


def _gram_root(stacks: list[torch.Tensor], dtype: torch.dtype, jitter: float):
    """(G, R): the Gram matrices a·aᵀ computed in ``dtype`` (as float64) and upper Cholesky roots R
    with RᵀR = G + jitter·mean(diag G)·I, or R = None when one is not positive definite. The
    floor of the jitter keeps R⁻¹ finite in float32 even for an all-zero a."""
    gram = torch.stack([a @ a.T for a in (a.to(dtype) for a in stacks)]).double()
    shift = jitter * gram.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-30
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    root, info = torch.linalg.cholesky_ex(gram + shift[:, None, None] * eye, upper=True)
    return gram, (None if info.any() else root)


def lora_layers(model, dst: str = REFERENCE) -> list:
    """Every LoRA layer of ``model`` that holds both the policy adapter and adapter ``dst``."""
    return [module for module in model.modules()
            if (lora_a := getattr(module, "lora_A", None)) is not None and POLICY in lora_a and dst in lora_a]


def effective_delta(module, adapter: str) -> torch.Tensor:
    """ΔW = s·B·A of one adapter on one layer (for tests and diagnostics)."""
    b = module.lora_B[adapter].weight.float()
    a = module.lora_A[adapter].weight.float()
    return module.scaling[adapter] * (b @ a)


@torch.no_grad()
def copy_adapter(layers: list, dst: str, src: str = POLICY) -> None:
    """Copy adapter ``src`` into ``dst`` factor by factor: s_dst·B_dst·A_dst = s_src·B_src·A_src
    exactly when ``dst``'s rank holds ``src``'s used directions (the first min of the two ranks;
    a hard update copies the policy into a reference of rank ≥ the policy's)."""
    for module in layers:
        a_src, b_src = module.lora_A[src].weight, module.lora_B[src].weight
        a_dst, b_dst = module.lora_A[dst].weight, module.lora_B[dst].weight
        r = min(a_src.shape[0], a_dst.shape[0])
        a_dst.zero_()
        b_dst.zero_()  # extra directions of a larger adapter are zero
        a_dst[:r].copy_(a_src[:r])
        b_dst[:, :r].copy_(b_src[:, :r] * (module.scaling[src] / module.scaling[dst]))


@torch.no_grad()
def update_lora_reference(layers: list, alpha: float) -> float:
    """Apply ΔW_ref ← α·ΔW_θ + (1-α)·ΔW_ref on every layer of ``lora_layers(model)``, in place.

    Returns the fraction of the mixture's energy discarded by the rank truncation (0 when the
    reference rank holds the mixture exactly, as for a hard update into rank ≥ policy rank).
    Layers go in batches of CHUNK: one LAPACK call per batch, at most CHUNK layers' stacked copies
    (and, under ZeRO-3, gathered factors) alive at once; rank 0's reference is what every rank keeps.
    """
    discarded = total = 0.0
    for start in range(0, len(layers), CHUNK):
        chunk = layers[start:start + CHUNK]
        factors = lambda name: [m.lora_B[name].weight for m in chunk] + [m.lora_A[name].weight for m in chunk]
        with zero.gathered(factors(POLICY)), zero.gathered(factors(REFERENCE), modify=True):
            lost, energy = _update_chunk(chunk, alpha)
        discarded += lost
        total += energy
    return discarded / total if total > 0 else 0.0


def _update_chunk(layers: list, alpha: float) -> tuple[float, float]:
    def ranks(module):
        return module.lora_A[POLICY].weight.shape[0], module.lora_A[REFERENCE].weight.shape[0]

    if alpha == 1.0:
        copied = [module for module in layers if ranks(module)[1] >= ranks(module)[0]]
        copy_adapter(copied, REFERENCE)
        layers = [module for module in layers if ranks(module)[1] < ranks(module)[0]]
    groups: dict[tuple[int, int], list] = {}  # layers by (policy rank, reference rank)
    for module in layers:
        groups.setdefault(ranks(module), []).append(module)
    discarded = total = 0.0
    for (_, r_ref), modules in groups.items():
        refs = [(m.lora_B[REFERENCE].weight, m.lora_A[REFERENCE].weight) for m in modules]
        _, lost, energy = mix_low_rank(
            [(m.lora_B[POLICY].weight, m.lora_A[POLICY].weight, m.scaling[POLICY], b, a, m.scaling[REFERENCE])
             for m, (b, a) in zip(modules, refs)], alpha, r_ref, out=refs)  # the stacks are copies: safe
        discarded += lost
        total += energy
    return discarded, total


@torch.no_grad()
def update_full_reference(policy: torch.nn.Module, reference: torch.nn.Module, alpha: float) -> float:
    """Full fine-tuning: θ_ref ← α·θ + (1-α)·θ_ref parameter by parameter, in fp32. Shard-local
    under FSDP and ZeRO-3 (reference and policy are sharded alike): nothing is gathered."""
    for p_ref, p_pol in zip(reference.parameters(), policy.parameters(), strict=True):
        p_ref, p_pol = zero.local(p_ref), zero.local(p_pol)  # ZeRO-3: this rank's slices, partitioned alike
        if alpha == 1.0:
            p_ref.copy_(p_pol)
        else:
            p_ref.copy_((alpha * p_pol.float() + (1 - alpha) * p_ref.float()).to(p_ref.dtype))
    return 0.0


class ReferenceUpdater:
    """The moving reference of a TR run, as one small object (in the spirit of TRL's
    ``SyncRefModelCallback.on_step_end``): when it moves (:class:`Schedule`), how (LoRA: the
    ``reference`` adapter of ``model`` mixed exactly; full fine-tuning: the ``frozen`` copy), what
    the rank truncation discarded since the last logged step, and its checkpoint state.

    ``verify(parameters, what)`` checks the replicas after an update (several processes);
    ``warn(text)`` reports an update that discarded more than 5% of the mixture's energy.
    """

    WARN_ABOVE = 0.05

    def __init__(self, schedule: Schedule, model, frozen=None, verify=lambda params, what: None,
                 warn=lambda text: None):
        self.schedule, self.model, self.frozen = schedule, model, frozen
        self.verify, self.warn = verify, warn
        self.layers = lora_layers(model) if frozen is None else []
        self.parameters = (list(frozen.named_parameters()) if frozen is not None
                           else [(n, p) for n, p in model.named_parameters() if f".{REFERENCE}." in n])
        # The largest share discarded by an update since the last logged step (the last update's
        # when none happened in between).
        self.last, self.window = 0.0, None

    @property
    def moves(self) -> bool:
        return self.schedule.mode != "none"

    def on_step_end(self, step: int, metrics: dict, logging: bool) -> dict:
        """After optimizer step ``step``: update the reference if due; the metrics it adds."""
        if self.schedule.due(step, metrics.get("kl/ref")):
            if self.frozen is not None:
                lost = update_full_reference(self.model, self.frozen, self.schedule.alpha)
            else:
                lost = update_lora_reference(self.layers, self.schedule.alpha)
            self.schedule.applied()
            self.verify(self.parameters, f"the reference after update {self.schedule.updates}")
            if lost > self.WARN_ABOVE:
                self.warn(f"step {step}: reference rank truncation discarded {lost:.1%} of the mixture's "
                          "energy; raise --ref-rank")
            self.last, self.window = lost, max(lost, self.window or 0.0)
        out = {"ref_updates": self.schedule.updates,
               "ref_truncation": self.last if self.window is None else self.window}
        if logging:
            self.window = None
        return out

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "truncation": {"last": self.last, "window": self.window}}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.last, self.window = state["truncation"]["last"], state["truncation"]["window"]
