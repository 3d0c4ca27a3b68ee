"""The reference update in adapter space: exact mixing, truncation, hard copies, the schedule."""

import pytest
import torch

from trcli.config import AlignConfig
from trcli.trust_region import Schedule, mix_low_rank


def _factors(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)


def test_mixture_is_exact_at_full_rank():
    bp, ap = _factors(12, 10, 3, 0)
    br, ar = _factors(12, 10, 5, 1)
    b, a, lost, total = mix_low_rank(bp, ap, br, ar, alpha=0.6, rank=8)
    dense = 0.6 * bp @ ap + 0.4 * br @ ar
    assert torch.allclose(b @ a, dense, atol=1e-4)
    assert lost == pytest.approx(0.0, abs=1e-9) and total > 0
    assert b.shape == (12, 8) and a.shape == (8, 10)


def test_mixture_is_not_the_average_of_factors():
    bp, ap = _factors(12, 10, 4, 2)
    br, ar = _factors(12, 10, 4, 3)
    b, a, _, _ = mix_low_rank(bp, ap, br, ar, alpha=0.5, rank=8)
    dense = 0.5 * bp @ ap + 0.5 * br @ ar
    naive = (0.5 * bp + 0.5 * br) @ (0.5 * ap + 0.5 * ar)
    assert torch.allclose(b @ a, dense, atol=1e-4)
    assert (naive - dense).norm() / dense.norm() > 0.3


def test_truncation_keeps_the_best_low_rank_part_and_reports_the_rest():
    bp, ap = _factors(20, 16, 4, 4)
    br, ar = _factors(20, 16, 4, 5)
    b, a, lost, total = mix_low_rank(bp, ap, br, ar, alpha=0.6, rank=4)
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
        ref_b, ref_a, _, _ = mix_low_rank(bp, ap, ref_b, ref_a, alpha=0.6, rank=8)  # 8 = min(m, n): full
        dense = 0.6 * bp @ ap + 0.4 * dense
    assert ((ref_b @ ref_a - dense).norm() / dense.norm()).item() < 1e-4


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
