"""judge: verdict parsing, statistics, matching and pricing (no server, no model)."""

from __future__ import annotations

import base64
import threading
import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from trcli.errors import DataError, UsageError
from trcli.judge import prompts, stats
from trcli.judge.client import (
    BadAnswer,
    Budget,
    BudgetExhausted,
    Scrubber,
    _retry_after,
    answer_text,
    check_base_url,
    clean_usage,
    cost_usd,
    price,
    retry_wait,
)
from trcli.progress import Progress, duration
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
    assert stats.bootstrap_ci([0.0], 100, seed=0) == [0.0, 0.0]  # one item
    assert stats.win_rate([]) is None and stats.bootstrap_ci([], 100, 0) is None


def test_bootstrap_is_scipy_bca():
    """The interval is scipy's BCa interval for the same resamples (the rng seeded the same way),
    computed in batches whatever the number of items."""
    import numpy as np
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    outcomes = rng.choice([0.0, 0.5, 1.0], p=[0.15, 0.05, 0.8], size=300).tolist()  # skewed: BCa != percentile
    expected = bootstrap((np.array(outcomes),), np.mean, n_resamples=999, method="BCa",
                         rng=np.random.default_rng(7)).confidence_interval
    assert stats.bootstrap_ci(outcomes, 999, seed=7) == pytest.approx([expected.low, expected.high])
    percentile = bootstrap((np.array(outcomes),), np.mean, n_resamples=999, method="percentile",
                           rng=np.random.default_rng(7)).confidence_interval
    assert [expected.low, expected.high] != pytest.approx([percentile.low, percentile.high], abs=1e-9)


def test_distinct_and_self_bleu():
    texts = ["the cat sat", "the cat ran"]
    assert stats.distinct(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over six
    assert stats.distinct(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice
    same = ["a b c d e"] * 3
    assert stats.self_bleu(same) == pytest.approx(1.0)
    apart = ["a b c d e", "f g h i j", "k l m n o"]
    assert stats.self_bleu(apart) < 0.01
    assert stats.self_bleu(["only one", "  "]) is None
    assert stats.bleu_signature().startswith("case:mixed|eff:yes|tok:13a|smooth:exp|version:")


def test_self_bleu_is_sacrebleu_sentence_bleu_against_the_others():
    """Each text's term is exactly sacrebleu.sentence_bleu(text, all the others): the figure
    compares with published self-BLEU (the linear-time clipping changes nothing)."""
    import random

    import sacrebleu

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(25)] + ["The", "the", ",", ".", "don't", "(x)"]
    for _ in range(40):
        texts = [" ".join(rng.choices(vocab, k=rng.randint(1, 14))) + rng.choice(["", ".", "!"])
                 for _ in range(rng.randint(2, 7))]
        expected = sum(sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1:]).score
                       for i, t in enumerate(texts)) / len(texts) / 100
        assert stats.self_bleu(texts) == pytest.approx(expected, abs=1e-12), texts


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


def test_prices_and_costs():
    assert price("gpt-4o-mini-2024-07-18") == price("gpt-4o-mini") != price("gpt-4o")
    assert price("llama-3-70b") is None
    assert cost_usd("gpt-4", {"prompt_tokens": 1000, "completion_tokens": 500}) == pytest.approx(0.06)


def test_budget_settles_by_usage_or_reservation():
    budget = Budget(0.10)
    budget.settle(budget.reserve(0.04), 0.01)  # the answer reported its usage
    budget.settle(budget.reserve(0.04), None)  # it did not: the reservation counts
    assert budget.spent == pytest.approx(0.05) and budget.reserved == 0 and budget.in_flight == 0
    with pytest.raises(BudgetExhausted):
        budget.reserve(0.06)  # 0.05 + 0.06 > 0.10 with nothing in flight
    budget.settle(budget.reserve(0.02), 0.04)  # an endpoint reporting twice the worst case...
    assert budget.overrun == pytest.approx(2.0)
    with pytest.raises(BudgetExhausted):
        budget.reserve(0.008)  # ...makes later reservations twice as large: 0.09 + 0.016 > 0.10
    assert Budget(None).reserve(1e9) == 1e9  # no cap


def test_budget_waits_for_requests_in_flight():
    """A reservation that does not fit while others are in flight waits for them to settle instead
    of being refused with budget left; it is refused once nothing is in flight and it still does not fit."""
    budget = Budget(0.10)
    first = budget.reserve(0.06)
    outcomes = []

    def reserve():
        try:
            outcomes.append(budget.reserve(0.06))
        except BudgetExhausted:
            outcomes.append("refused")

    second = threading.Thread(target=reserve)
    second.start()
    time.sleep(0.2)
    assert second.is_alive() and outcomes == []  # 0.06 + 0.06 > 0.10: waiting, not refused
    budget.settle(first, 0.01)  # the first answer cost less than its worst case
    second.join(5)
    assert outcomes == [pytest.approx(0.06)] and budget.in_flight == 1
    third = threading.Thread(target=reserve)
    third.start()
    time.sleep(0.2)
    assert third.is_alive() and len(outcomes) == 1
    budget.settle(outcomes[0], None)  # no usage: 0.01 + 0.06 spent, 0.06 more does not fit
    third.join(5)
    assert outcomes[1] == "refused" and budget.spent == pytest.approx(0.07)


def test_usage_is_numbers_or_unknown():
    assert clean_usage({"prompt_tokens": 12, "completion_tokens": 2.5, "total_tokens": 15}) == \
        {"prompt_tokens": 12, "completion_tokens": 3}
    for junk in (None, "lots", [], {"prompt_tokens": "ten", "completion_tokens": 1}, {"prompt_tokens": 5},
                 {"prompt_tokens": True, "completion_tokens": 1}, {"prompt_tokens": -1, "completion_tokens": 1},
                 {"prompt_tokens": float("nan"), "completion_tokens": 1}):
        assert clean_usage(junk) == {}, junk


@pytest.mark.parametrize("raw", [[], "text", None, {}, {"choices": []}, {"choices": [[]]}, {"choices": [{}]},
                                 {"choices": [{"message": {"content": [{"type": "text", "text": "A"}]}}]},
                                 {"choices": [{"message": {"content": 7}}]}])
def test_answer_text_rejects_what_is_not_a_chat_completion(raw):
    with pytest.raises(BadAnswer):
        answer_text(raw)


def test_answer_text():
    assert answer_text({"choices": [{"message": {"content": "More helpful: A"}}]}) == "More helpful: A"
    assert answer_text({"choices": [{"message": {"content": None, "refusal": "no"}}]}) == ""  # re-asked


def test_scrubber_removes_the_key_in_any_form():
    key = "sk-proj-Zx81Qa09LmNB72vvTTqpWw"
    auth = f"Bearer {key}"
    scrub = Scrubber(key)
    b64_auth = base64.b64encode(auth.encode()).decode()
    basic = base64.urlsafe_b64encode(f"user:{key}".encode()).decode()
    text = (f"header {auth}; base64 {b64_auth}; basic {basic}; part of it {b64_auth[14:30]}; "
            f"its tail ...{key[-10:]}; another format {key.replace('-', '_')} {key.upper()}; {key[3:].lower()}")
    out = scrub(text)
    assert out.startswith("header Bearer sk-***; base64 QmVhcmVy") and "its tail ...***;" in out
    key_only = [key, b64_auth[10:-2], basic[7:-2]]  # the parts of the base64 forms set by the key alone
    for secret in key_only:
        for i in range(len(secret) - 7):
            assert secret[i:i + 8].lower() not in out.lower(), (secret[i:i + 8], out)
    assert scrub.json({"a": [auth, 1, None], key: {"b": key}}) == {"a": ["Bearer sk-***", 1, None], "sk-***": {"b": "sk-***"}}
    assert scrub("More helpful: A") == "More helpful: A"
    assert Scrubber("EMPTY")("key EMPTY, B is empty, EMPTYING") == "key ***, B is empty, EMPTYING"  # short keys
    assert Scrubber("x")("x marks it") == "x marks it"
    assert Scrubber(None)("key sk-abcdefgh0123456789xyz, masked sk-ab****wxyz; risk-averse, task-specific, sk-learn") == \
        "key sk-***, masked sk-***; risk-averse, task-specific, sk-learn"


@pytest.mark.parametrize("url", ["notaurl", "http://", "ftp://host/v1", "localhost:8000/v1", "http:///v1",
                                 "http://127.0.0.1:99999/v1", " http://host"])
def test_malformed_base_url_is_a_usage_error(url):
    with pytest.raises(UsageError, match="--base-url"):
        check_base_url(url)
    check_base_url("http://127.0.0.1:8000/v1")
    check_base_url("https://api.openai.com/v1")


def test_retry_after():
    assert _retry_after("3") == 3.0 and _retry_after("0") == 0.0 and _retry_after(None) is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < _retry_after(later) <= 30
    assert _retry_after("soon") is None and _retry_after("nan") is None and _retry_after("inf") is None
    assert _retry_after("-5") == 0.0


def test_retry_wait_prefers_retry_after_ms():
    import httpx

    assert retry_wait(httpx.Headers({"retry-after-ms": "250", "retry-after": "3"})) == 0.25
    assert retry_wait(httpx.Headers({"retry-after-ms": "soon", "retry-after": "3"})) == 3.0
    assert retry_wait(httpx.Headers({"retry-after-ms": "-5"})) == 0.0
    assert retry_wait(httpx.Headers({})) is None


def test_progress_plain_lines_at_a_cadence_then_a_final_line(monkeypatch):
    """Not a terminal: a line every PLAIN_EVERY seconds with done / total, rate and ETA, and a last
    line at the end; nothing at all when the work ends before the first line is due."""
    import io

    from trcli import progress as progress_mod

    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 0.1)
    out = io.StringIO()
    with Progress("trcli judge", 4, stream=out) as p:
        for _ in range(2):
            p.advance()
        time.sleep(0.35)
        p.advance(2)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3 and lines[0].startswith("trcli judge: 2/4 items (50%), ") and "items/s, ETA " in lines[0]
    assert lines[-1].startswith("trcli judge: 4/4 items in ") and lines[-1].endswith("items/s")
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 30.0)
    quiet = io.StringIO()
    with Progress("trcli judge", 4, stream=quiet) as p:
        p.advance(4)
    assert quiet.getvalue() == ""
    stopped = io.StringIO()
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 0.05)
    with pytest.raises(RuntimeError):
        with Progress("trcli judge", 4, stream=stopped) as p:
            time.sleep(0.12)
            raise RuntimeError("endpoint gone")
    assert "in " not in stopped.getvalue().splitlines()[-1]  # no final line after an error
    assert duration(5) == "5s" and duration(125) == "2m05s" and duration(3725) == "1h02m05s"


def test_progress_bar_on_a_terminal():
    import io

    out = io.StringIO()
    with Progress("trcli judge", 3, stream=out, tty=True) as p:
        for _ in range(3):
            p.advance()
            time.sleep(0.05)
    text = out.getvalue()
    assert "trcli judge" in text and "3/3" in text and "items/s" in text and "ETA" in text
