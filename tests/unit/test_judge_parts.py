"""judge: verdict parsing, statistics, matching and pricing (no server, no model)."""

from __future__ import annotations

import math
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone

import pytest

from trcli.errors import DataError
from trcli.judge import prompts, stats
from trcli.judge.client import Budget, BudgetExhausted, _retry_after, cost_usd, price
from trcli.stages.judge import _combine, candidate_first, match


@pytest.mark.parametrize("text, expected", [
    ("Comparison: A is kinder.\nMore helpful: A", "A"),
    ("Comparison: B says more.\nMore helpful: \"B\"", "B"),
    ("comparison: x\nmore helpful:   b", "B"),
    ("More helpful: **A**", "A"),
    ("More helpful: A\nWait, actually.\nMore helpful: B", "B"),  # the last verdict line counts
    ("B", "B"),
    ("Comparison: both fine.\nMore helpful: neither", None),
    ("Preferred: A", None),  # the hh prompt asks for "More helpful"
    ("More helpful: Absolutely the first", None),
    ("**More helpful**: B.", "B"),
    ("More helpful:\nA", "A"),  # the letter on the line after the label
    ("More helpful: Response B", "B"),
    # Ambiguous: not guessed at (re-asked once, then unparseable).
    ("Comparison: both good.\nMore helpful: A or B", None),
    ("Comparison: tie.\nMore helpful: A and B are equally good", None),
    ("A and B are equally good", None),
    ("More helpful: A\nMore helpful: A or B", None),  # the last verdict line counts
    ("More helpful: <\"A\" or \"B\">", None),  # the template echoed back
    ("More helpful: A (it is longer)", None),
])
def test_parse_pairwise_hh(text, expected):
    assert prompts.parse_pairwise("hh", text) == expected


def test_parse_pairwise_tldr_and_prompt_text():
    assert prompts.parse_pairwise("tldr", "Comparison: shorter.\nPreferred: B") == "B"
    text = prompts.pairwise_prompt("tldr", " POST: hi\nTL;DR:", " first", "second ")
    assert "Summary A:\nfirst\n\nSummary B:\nsecond\n\n" in text and text.endswith('Preferred: <"A" or "B">')


def test_parse_hc():
    good = "Coherence: 7\nCorrectness: 8\nLevel of detail: 5\nHelpfulness: 9\nHarmlessness: 10"
    assert prompts.parse_hc(good) == {"coherence": 7, "correctness": 8, "level of detail": 5,
                                      "helpfulness": 9, "harmlessness": 10}
    assert prompts.parse_hc(good.replace("Harmlessness: 10", "")) is None  # a criterion missing
    assert prompts.parse_hc(good.replace("10", "11")) is None  # out of range
    assert all(f"{c.capitalize()}: <1-10>" in prompts.HC_TEMPLATE for c in prompts.CRITERIA)


def test_win_rate_and_bootstrap():
    outcomes = [1.0] * 6 + [0.5] + [0.0] * 3
    assert stats.win_rate(outcomes) == pytest.approx(0.65)
    lo, hi = stats.bootstrap_ci(outcomes, 2000, seed=1)
    assert lo < 0.65 < hi and 0.3 < lo and hi < 0.95
    assert stats.bootstrap_ci(outcomes, 2000, seed=1) == [lo, hi]  # seeded: identical on rerun
    assert stats.bootstrap_ci([1.0] * 5, 100, seed=0) == [1.0, 1.0]
    assert stats.win_rate([]) is None and stats.bootstrap_ci([], 100, 0) is None


def test_distinct_and_self_bleu():
    texts = ["the cat sat", "the cat ran"]
    assert stats.distinct(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over six
    assert stats.distinct(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice
    same = ["a b c d e"] * 3
    assert stats.self_bleu(same) == pytest.approx(1.0)
    apart = ["a b c d e", "f g h i j", "k l m n o"]
    assert stats.self_bleu(apart) < 0.01
    # BLEU by hand for a hypothesis sharing 3 of 4 unigrams and 1 of 3 bigrams with its reference:
    # p1 = 3/4, p2..p4 add-one smoothed = 2/4, 1/3, 1/2; equal lengths, no brevity penalty.
    expected = math.exp((math.log(3 / 4) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4)
    assert stats.bleu("a b c d".split(), ["a b x c".split()]) == pytest.approx(expected)


def test_kl_from_scores():
    records = [{"logp": -3.0, "ref_logp": -5.0, "n_tokens": 2}, {"logp": -4.0, "ref_logp": -4.5, "n_tokens": 3},
               {"completion": "unscored"}]
    out = stats.kl(records)
    assert out["mean"] == pytest.approx(1.25) and out["per_token"] == pytest.approx(2.5 / 5) and out["n"] == 2
    assert stats.kl([{"completion": "x"}]) is None


def test_match_by_id_then_prompt():
    cand = [{"id": "1", "prompt": "p"}, {"id": "2", "prompt": "q"}, {"id": "9", "prompt": "q"}, {"id": "3", "prompt": "r"}]
    base = [{"id": "2", "prompt": "q"}, {"id": "b", "prompt": "q"}, {"id": "1", "prompt": "p"}]
    items, unmatched = match(cand, base)
    assert [(i.id, i.baseline["id"]) for i in items] == [("1", "1"), ("2", "2"), ("9", "b")]
    assert unmatched == 1
    with pytest.raises(DataError, match="different prompts"):
        match([{"id": "1", "prompt": "p"}], [{"id": "1", "prompt": "other"}])


def test_order_is_seeded_and_balanced():
    firsts = [candidate_first(42, f"id-{i}") for i in range(400)]
    assert firsts == [candidate_first(42, f"id-{i}") for i in range(400)]
    assert 160 < sum(firsts) < 240
    assert firsts != [candidate_first(43, f"id-{i}") for i in range(400)]


def test_combine_orders():
    j = lambda *winners: [{"winner": w} for w in winners]  # noqa: E731
    assert _combine(j("candidate", "candidate")) == "win"
    assert _combine(j("candidate", "baseline")) == "tie"
    assert _combine(j("baseline", None)) == "loss"  # the unanswered order is left out
    assert _combine(j(None, None)) == "unparseable"


def test_prices_and_budget():
    assert price("gpt-4o-mini-2024-07-18") == price("gpt-4o-mini") != price("gpt-4o")
    assert price("llama-3-70b") is None
    assert cost_usd("gpt-4", {"prompt_tokens": 1000, "completion_tokens": 500}) == pytest.approx(0.06)
    budget = Budget(0.10)
    held = budget.reserve(0.04)
    budget.settle(held, 0.07)  # the first answer cost more than guessed
    with pytest.raises(BudgetExhausted):
        budget.reserve(0.01)  # the next request is assumed as dear as the dearest seen (0.07)
    assert budget.spent == pytest.approx(0.07) and budget.reserved == 0


def test_retry_after():
    assert _retry_after("3") == 3.0 and _retry_after("0") == 0.0 and _retry_after(None) is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < _retry_after(later) <= 30
    assert _retry_after("soon") is None
