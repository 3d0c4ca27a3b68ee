"""judge protocols beyond the DPO paper's prompt: AlpacaEval / Arena-Hard prompts and parsers, the
length-controlled GLM and Bradley-Terry fits (no server)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit

from trcli.judge import prompts, ratings

# ---------------------------------------------------------------- prompts and parsers

def test_alpacaeval_prompt_is_the_published_one():
    system, user = prompts.alpacaeval_messages(" Say {hi} ", "first {x}", " second ")
    assert system == {"role": "system", "content": prompts.ALPACAEVAL_SYSTEM}
    assert system["content"].startswith("You are a highly efficient assistant, who evaluates and selects the best")
    text = user["content"]
    assert '    "instruction": """Say {hi}""",\n}' in text  # braces in the texts stay as they are
    assert '        "model_identifier": "m",\n        "output": """first {x}"""' in text
    assert '        "model_identifier": "M",\n        "output": """second"""' in text
    assert text.endswith("(no quotes, no spaces, no new lines, ...): m or M.\n\n## Best Model Identifier")
    assert prompts.ALPACAEVAL_REQUEST == {"max_tokens": 1, "logprobs": True, "top_logprobs": 5}
    assert "AlpacaEval 2 style" in prompts.ALPACAEVAL_SOURCE and "weighted_alpaca_eval_gpt4_turbo" in prompts.ALPACAEVAL_SOURCE


def test_arena_prompt_is_the_published_one():
    system, user = prompts.arena_messages(" Why? ", "because A", "because B ")
    assert system["role"] == "system" and "Begin your evaluation by generating your own answer" in system["content"]
    for label in prompts.ARENA_LABELS:
        assert f"[[{label}]]" in system["content"]
    assert user["content"] == ("<|User Prompt|>\nWhy?\n\n<|The Start of Assistant A's Answer|>\nbecause A\n"
                               "<|The End of Assistant A's Answer|>\n\n<|The Start of Assistant B's Answer|>\n"
                               "because B\n<|The End of Assistant B's Answer|>")
    assert "Arena-Hard-Auto style" in prompts.ARENA_SOURCE


@pytest.mark.parametrize("text, expected", [
    ("My own answer...\n\nMy final verdict is: [[A>>B]]", "A>>B"),
    ("Assistant B is slightly better: [[B>A]]", "B>A"),
    ("tie: [[A=B]]", "A=B"),
    ("[[B>>A]] as I said, [[B>>A]]", "B>>A"),  # the same verdict twice is one verdict
    ("[[A>B]] ... on reflection [[B>A]]", None),  # two different verdicts
    ("My final verdict is [[A>>>B]]", None),  # not one of the five
    ("[[A<B]]", None),
    ("Assistant A is significantly better.", None),  # no label
    ("[[ A>B ]]", None),  # arena-hard-auto's regex takes no spaces
    ("", None),
])
def test_parse_arena(text, expected):
    assert prompts.parse_arena(text) == expected


def top(*pairs) -> dict:
    return {"choices": [{"message": {"content": pairs[0][0] if pairs else ""},
                         "logprobs": {"content": [{"token": pairs[0][0] if pairs else "",
                                                   "top_logprobs": [{"token": t, "logprob": lp} for t, lp in pairs]}]}}]}


def test_identifier_logprobs():
    assert prompts.identifier_logprobs(top(("M", -0.1), ("The", -2.0), ("m", -2.5))) == {"m": -2.5, "M": -0.1}
    assert prompts.identifier_logprobs(top(("m", -0.01), (" M", -4.0))) == {"m": -0.01, "M": -math.inf}  # exact tokens
    assert prompts.identifier_logprobs(top(("The", -0.1), ("**", -1.0))) is None  # neither identifier
    assert prompts.identifier_logprobs(top(("m", "high"))) is None  # malformed: not trusted
    assert prompts.identifier_logprobs(top(("m", float("nan")))) is None
    assert prompts.identifier_logprobs(top(("m", 0.5))) is None  # not a log-probability
    assert prompts.identifier_logprobs(top(("m", True))) is None
    assert prompts.identifier_logprobs({"choices": [{"message": {"content": "m"}}]}) is None  # none sent
    assert prompts.identifier_logprobs({"choices": [{"message": {"content": "m"}, "logprobs": None}]}) is None
    assert prompts.identifier_logprobs({"choices": [{"logprobs": {"content": []}}]}) is None
    assert prompts.parse_identifier(" M\n") == "M" and prompts.parse_identifier("m.") is None
    assert prompts.parse_identifier("Model M") is None


def test_every_protocol_has_a_source_and_a_comparability_note():
    for protocol in ("pairwise", "hc", "alpacaeval", "arena"):
        assert prompts.source(protocol, "hh") and prompts.PROTOCOL_NOTES[protocol]
    assert "805" in prompts.PROTOCOL_NOTES["alpacaeval"] and "instruction-difficulty" in prompts.PROTOCOL_NOTES["alpacaeval"]
    assert "500" in prompts.PROTOCOL_NOTES["arena"] and "gpt-4-0314" in prompts.PROTOCOL_NOTES["arena"]


# ---------------------------------------------------------------- Bradley-Terry

def test_bt_two_models_strength_ratio_is_the_odds():
    """30 battles won, 10 lost: the strength ratio exp(θ_c - θ_b) is the odds 30/10 and the win rate 0.75."""
    theta = ratings.bt_fit(2, [(1, 0)], [[30, 10]], anchor=0)
    assert theta[0] == 0 and math.exp(theta[1]) == pytest.approx(3.0, rel=1e-6)
    # Ties are half a battle won by each side: 6 wins, 2 losses, 4 ties -> odds (6 + 2) / (2 + 2).
    won, lost = ratings.arena_battles([{"winner": "candidate"}] * 6 + [{"winner": "baseline"}] * 2
                                      + [{"winner": "tie"}] * 4)
    assert (won, lost) == (8.0, 4.0)
    assert math.exp(ratings.bt_fit(2, [(1, 0)], [[won, lost]])[1]) == pytest.approx(2.0, rel=1e-6)


def test_bt_three_models_hand_computed():
    """Battles in exact BT proportions for strengths 4 : 2 : 1 (C anchored): the fit returns them."""
    pairs = [(0, 1), (1, 2), (0, 2)]  # A-B, B-C, A-C
    wins = [[40, 20], [40, 20], [48, 12]]  # P(A>B) = 4/6, P(B>C) = 2/3, P(A>C) = 4/5
    theta = ratings.bt_fit(3, pairs, wins, anchor=2)
    assert np.exp(theta) == pytest.approx([4.0, 2.0, 1.0], rel=1e-5)


def test_bt_separable_stays_finite():
    theta = ratings.bt_fit(2, [(1, 0)], [[10, 0]])
    assert math.isfinite(theta[1]) and expit(theta[1]) > 0.999


def test_arena_battles_weights_and_policies():
    games = [{"winner": "candidate", "strong": True}, {"winner": "baseline", "strong": False}]
    assert ratings.arena_battles(games) == (3.0, 1.0)  # [[A>>B]] is three battles
    assert ratings.arena_battles([{"winner": "baseline", "strong": True}, {"winner": "tie"}]) == (0.5, 3.5)
    unanswered = [{"winner": None}, {"winner": "candidate", "strong": False}]
    assert ratings.arena_battles(unanswered, "exclude") == (1.0, 0.0)
    assert ratings.arena_battles(unanswered, "tie") == (1.5, 0.5)
    assert ratings.arena_battles(unanswered, "loss") == (1.0, 1.0)


def test_bt_scores_bootstrap_over_items():
    rng = np.random.default_rng(3)
    table = rng.choice([0.0, 0.5, 1.0, 3.0], size=(60, 1, 2))
    out = ratings.bt_scores(2, [(1, 0)], table, 300, seed=5)
    won, lost = table[:, 0, 0].sum(), table[:, 0, 1].sum()
    assert out["win_rate"][1] == pytest.approx(won / (won + lost), rel=1e-6) and out["win_rate"][0] == 0.5
    lo, hi = out["ci95"][1]
    assert lo < out["win_rate"][1] < hi and out["ci95"][0] == [0.5, 0.5]
    assert ratings.bt_scores(2, [(1, 0)], table, 300, seed=5) == out  # seeded
    assert ratings.bt_scores(2, [(1, 0)], table, 0, seed=5)["ci95"] is None


# ---------------------------------------------------------------- length control

def test_glm_fit_is_the_maximum_likelihood():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 200)
    y = np.clip(expit(0.4 + 1.5 * x) + rng.normal(0, 0.1, 200), 0, 1)  # soft labels

    def nll(beta):
        eta = beta[0] + beta[1] * x
        return float((y * np.logaddexp(0, -eta) + (1 - y) * np.logaddexp(0, eta)).sum())

    reference = minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    assert ratings.fit_glm(x, y) == pytest.approx(tuple(reference), abs=1e-4)


def test_length_controlled_removes_a_pure_length_preference():
    """A judge whose preference is only a function of the length difference, in the GLM's form:
    the candidate is longer on every item, so its raw win rate is high; the LC win rate is 0.5."""
    rng = np.random.default_rng(1)
    deltas = rng.uniform(5, 400, 300)
    std = np.std(deltas, ddof=1)
    preferences = expit(3.0 * np.tanh(deltas / std))
    fit = ratings.length_controlled(deltas, preferences)
    assert preferences.mean() > 0.85
    assert fit["lc_win_rate"] == pytest.approx(0.5, abs=1e-4) and fit["length_slope"] == pytest.approx(3.0, abs=1e-3)
    assert fit["length_std_chars"] == pytest.approx(std)
    lo, hi = ratings.length_controlled_ci(deltas, preferences, 200, seed=0)
    assert lo <= 0.5 <= hi and hi - lo < 0.05


def test_length_controlled_keeps_a_quality_preference():
    """A preference that does not depend on length: the LC win rate is the win rate."""
    rng = np.random.default_rng(2)
    deltas = rng.normal(0, 100, 400)
    preferences = np.full(400, 0.7)
    assert ratings.length_controlled(deltas, preferences)["lc_win_rate"] == pytest.approx(0.7, abs=1e-4)
    same = ratings.length_controlled([12, 12, 12], [1.0, 0.0, 1.0])  # no spread in length: no length term
    assert same["lc_win_rate"] == pytest.approx(2 / 3, abs=1e-4) and same["length_std_chars"] == 0.0
    assert ratings.length_controlled_ci([], [], 100, 0) is None
