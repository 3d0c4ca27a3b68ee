"""The reference update in adapter space: exact mixing, truncation, hard copies, the schedule."""

import pytest
import torch

from trcli.config import AlignConfig
from trcli.trust_region import (
    POLICY,
    REFERENCE,
    Schedule,
    effective_delta,
    lora_layers,
    mix_low_rank,
    update_lora_reference,
)


def _factors(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


def test_mixture_is_exact_at_full_rank():
    bp, ap = _factors(12, 10, 3, 0)
    br, ar = _factors(12, 10, 5, 1)
    [(b, a)], lost, total = mix_low_rank([(bp, ap, 1.0, br, ar, 1.0)], alpha=0.6, rank=8)
    dense = 0.6 * bp @ ap + 0.4 * br @ ar
    assert torch.allclose(b @ a, dense, atol=1e-4)
    assert lost == pytest.approx(0.0, abs=1e-9) and total > 0
    assert b.shape == (12, 8) and a.shape == (8, 10)


def test_mixture_is_not_the_average_of_factors():
    bp, ap = _factors(12, 10, 4, 2)
    br, ar = _factors(12, 10, 4, 3)
    [(b, a)], _, _ = mix_low_rank([(bp, ap, 1.0, br, ar, 1.0)], alpha=0.5, rank=8)
    dense = 0.5 * bp @ ap + 0.5 * br @ ar
    naive = (0.5 * bp + 0.5 * br) @ (0.5 * ap + 0.5 * ar)
    assert torch.allclose(b @ a, dense, atol=1e-4)
    assert (naive - dense).norm() / dense.norm() > 0.3


def test_truncation_keeps_the_best_low_rank_part_and_reports_the_rest():
    bp, ap = _factors(20, 16, 4, 4)
    br, ar = _factors(20, 16, 4, 5)
    [(b, a)], lost, total = mix_low_rank([(bp, ap, 1.0, br, ar, 1.0)], alpha=0.6, rank=4)
    dense = 0.6 * bp @ ap + 0.4 * br @ ar
    s = torch.linalg.svdvals(dense.double())
    assert lost / total == pytest.approx(float((s[4:] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
    assert ((b @ a - dense).norm() ** 2).item() == pytest.approx(lost, rel=1e-3)


def test_soft_recursion_matches_dense_over_many_updates():
    m, n, r = 10, 8, 2
    ref_b, ref_a = torch.zeros(m, 8), torch.zeros(8, n)
    dense = torch.zeros(m, n)
    for k in range(20):
        bp, ap = _factors(m, n, r, 10 + k)
        [(ref_b, ref_a)], _, _ = mix_low_rank([(bp, ap, 1.0, ref_b, ref_a, 1.0)], alpha=0.6, rank=8)  # 8 = min(m, n): full
        dense = 0.6 * bp @ ap + 0.4 * dense
    assert ((ref_b @ ref_a - dense).norm() / dense.norm()).item() < 1e-4


def test_batched_layers_match_one_at_a_time():
    layers = [(*_factors(m, n, 3, 20 + i), 2.0, *_factors(m, n, 6, 40 + i), 0.5) for i, (m, n) in enumerate([(12, 9), (7, 15), (12, 9)])]
    together, lost, total = mix_low_rank(layers, alpha=0.6, rank=6)
    alone = [mix_low_rank([layer], alpha=0.6, rank=6) for layer in layers]
    for (b, a), ([(b1, a1)], _, _), (bp, ap, sp, br, ar, sr) in zip(together, alone, layers):
        assert torch.allclose(b @ a, b1 @ a1, atol=1e-5)
        dense = 0.6 * sp * bp @ ap + 0.4 * sr * br @ ar  # scalings 2.0 and 0.5: s_ref·B·A is the mixture
        tail, _ = _best_tail(dense, 6)  # rank 6 of 9: a real truncation, to the best rank-6 approximation
        assert tail > 0 and ((0.5 * b @ a - dense).norm() ** 2).item() == pytest.approx(tail, rel=1e-3)
    assert lost == pytest.approx(sum(x[1] for x in alone)) and total == pytest.approx(sum(x[2] for x in alone))


def test_reference_copied_from_policy_and_zero_adapters_mix_exactly():
    # A reference that is a copy of the policy makes the stacked factors linearly dependent
    # (singular Gram matrices); the mixture is then the policy itself. A fresh LoRA (B = 0) too.
    bp, ap = _factors(30, 20, 4, 6)
    br, ar = torch.cat([bp, torch.zeros(30, 4)], 1), torch.cat([ap, torch.zeros(4, 20)], 0)
    [(b, a)], lost, _ = mix_low_rank([(bp, ap, 1.0, br, ar, 1.0)], alpha=0.6, rank=8)
    assert ((b @ a - bp @ ap).norm() / (bp @ ap).norm()).item() < 1e-6 and lost < 1e-9
    [(b, a)], lost, total = mix_low_rank([(torch.zeros(30, 4), ap, 1.0, torch.zeros(30, 8), ar, 1.0)], alpha=0.6, rank=8)
    assert torch.equal(b @ a, torch.zeros(30, 20)) and lost == total == 0.0
    zeros = (torch.zeros(30, 4), torch.zeros(4, 20), 2.0, torch.zeros(30, 8), torch.zeros(8, 20), 1.0)  # A = 0 too
    [(b, a)], lost, total = mix_low_rank([zeros], alpha=0.6, rank=8)
    assert torch.equal(b @ a, torch.zeros(30, 20)) and torch.isfinite(a).all() and lost == total == 0.0


def test_nearly_coincident_rows_of_a_fall_back_to_a_float64_gram():
    # 48 rows of A within ~1e-5 of one another: the float32 Gram matrix comes out indefinite beyond
    # the jitter, so the update redoes it in float64; the result is still the best approximation.
    # Which spread defeats float32 depends on the matmul kernel (AVX2 and AVX-512 round apart), so
    # the test takes the first of a few that does on this machine.
    for spread in (1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4096, generator=g)
        a = x + spread * torch.randn(48, 4096, generator=g)
        b = torch.randn(64, 48, generator=g)
        gram32 = (a @ a.T).double()
        shift = 1e-6 * gram32.diagonal().mean() * torch.eye(48, dtype=torch.float64)
        if torch.linalg.cholesky_ex(gram32 + shift).info != 0:  # the float32 route really fails here
            break
    else:
        pytest.fail("no spread made the float32 Gram matrix indefinite on this machine")
    [(new_b, new_a)], lost, total = mix_low_rank([(b[:, :16], a[:16], 1.0, b[:, 16:], a[16:], 1.0)], alpha=0.6, rank=32)
    dense = (0.6 * b[:, :16] @ a[:16] + 0.4 * b[:, 16:] @ a[16:]).double()
    tail, energy = _best_tail(dense, 32)
    # The best rank-32 error, within 1% or float32's floor (1e-8 of the energy) when the tail is below it.
    floor = 1e-8 * energy
    assert ((new_b @ new_a - dense).norm() ** 2).item() == pytest.approx(tail, rel=1e-2, abs=floor)
    assert lost / total == pytest.approx(tail / energy, rel=1e-2, abs=1e-8)


def test_schedule_first_update_at_tau_and_every_tau_after():
    s = Schedule.from_config(AlignConfig(method="tr-dpo", update="hard", tau=3))
    assert [step for step in range(1, 10) if s.due(step)] == [3, 6, 9]
    assert s.alpha == 1.0


def test_static_methods_and_alpha_zero_never_update():
    assert Schedule.from_config(AlignConfig(method="dpo")).mode == "none"
    assert Schedule.from_config(AlignConfig(method="tr-ipo", update="soft", alpha=0.0)).mode == "none"


def test_soft_and_hard_defaults_follow_the_paper():
    soft = AlignConfig(method="tr-dpo", update="soft")
    hard = AlignConfig(method="tr-kto", update="hard")
    assert (soft.resolved_alpha(), soft.resolved_tau()) == (0.6, 1)
    assert (hard.resolved_alpha(), hard.resolved_tau()) == (1.0, 512)


def test_kl_schedule_updates_when_the_running_kl_exceeds_the_target():
    s = Schedule.from_config(AlignConfig(method="tr-dpo", update="kl", kl_target=1.0))
    fired = []
    for step, kl in enumerate([0.5, 0.8, 2.0, 3.0, 3.0, 0.1], start=1):
        if s.due(step, kl):
            fired.append(step)
            s.applied()
    # EMA (decay 0.9): 0.5, 0.53, 0.677, 0.909, 1.118 -> fires at step 5, then restarts.
    assert fired == [5] and s.updates == 1


def _two_adapters(r_ref):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 12))
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), adapter_name=POLICY)
    model.add_adapter(REFERENCE, LoraConfig(r=r_ref, lora_alpha=r_ref, target_modules=["0", "2"]))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _best_tail(dense, rank):
    s = torch.linalg.svdvals(dense.double())
    return float((s[rank:] ** 2).sum()), float((s ** 2).sum())


@pytest.mark.parametrize("alpha, r_ref", [(0.6, 8), (1.0, 2)])  # soft, truncated; hard into a smaller reference
def test_update_on_peft_layers_is_the_best_approximation_of_the_dense_mixture(alpha, r_ref):
    model = _two_adapters(r_ref)
    layers = lora_layers(model)
    assert len(layers) == 2
    with torch.no_grad():
        expected = [alpha * effective_delta(m, POLICY) + (1 - alpha) * effective_delta(m, REFERENCE) for m in layers]
        lost = update_lora_reference(layers, alpha)
        tails = [_best_tail(dense, r_ref) for dense in expected]
        for m, dense, (tail, _) in zip(layers, expected, tails):
            assert tail > 0  # the rank truncation is real: min(m, n) = 10 > r_ref
            assert ((effective_delta(m, REFERENCE) - dense).norm() ** 2).item() == pytest.approx(tail, rel=1e-3)
    assert lost == pytest.approx(sum(t for t, _ in tails) / sum(e for _, e in tails), rel=1e-4)


def test_layers_beyond_one_chunk_are_all_updated(monkeypatch):
    import trcli.trust_region as tr

    monkeypatch.setattr(tr, "CHUNK", 1)  # two layers: two batches
    model = _two_adapters(r_ref=8)
    layers = lora_layers(model)
    with torch.no_grad():
        expected = [0.6 * effective_delta(m, POLICY) + 0.4 * effective_delta(m, REFERENCE) for m in layers]
        lost = update_lora_reference(layers, 0.6)
        tails = [_best_tail(dense, 8) for dense in expected]
        for m, dense, (tail, _) in zip(layers, expected, tails):
            assert ((effective_delta(m, REFERENCE) - dense).norm() ** 2).item() == pytest.approx(tail, rel=1e-3)
    assert lost == pytest.approx(sum(t for t, _ in tails) / sum(e for _, e in tails), rel=1e-4)
