"""--protocol alpacaeval / arena and --combine, through the real CLI against the scripted server on
127.0.0.1 (tests/judge_server.py): logprob preferences mapped through the A/B order, the sampled
identifier when no logprobs come back, the length-controlled win rate against a judge that only
likes length, Arena-Hard verdicts in both orders with >> weights, malformed verdicts, the
Bradley-Terry win rate and the leaderboard over several runs; budget and cache as for pairwise.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest
from test_judge import ITEMS, judge_args, worst_case, write_generations
from test_judge_faults import leaks

from conftest import run_cli
from judge_server import ALPACA_MODES, ARENA_JUNK, KEY, USAGE, serve
from trcli.judge import client as client_mod
from trcli.judge import prompts
from trcli.stages.judge import candidate_first

ENV = {"JUDGE_KEY": KEY}
PER_REQUEST = (USAGE["prompt_tokens"] * 0.03 + USAGE["completion_tokens"] * 0.06) / 1000  # gpt-4
# Fewer bootstrap resamples; no SLOW items here, so a timeout that a loaded machine cannot trip
# (judge_args' 0.5 s is for the SLOW items of test_judge.py).
FAST = ("--bootstrap", "200", "--timeout", "30")


@pytest.fixture
def server():
    with serve() as state:
        yield state


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE", 0.01)


def judge(server, tmp_path, items, *extra, name="out", cache="cache", env=ENV, gens="gens"):
    cand, base = write_generations(tmp_path / gens, items)
    return run_cli(*judge_args(server, cand, base, tmp_path / name, tmp_path / cache, *extra), env=env)


def annotations(directory) -> dict[str, dict]:
    return {a["id"]: a for a in map(json.loads, (directory / "annotations.jsonl").read_text().splitlines())}


def test_every_server_mode_is_tested():
    text = open(__file__).read()
    assert all(f'"{mode}"' in text for mode in [*ALPACA_MODES, *ARENA_JUNK])


# ---------------------------------------------------------------- AlpacaEval 2 style

def test_alpacaeval_logprob_preferences_follow_the_order(tmp_path, server):
    """P(GOOD's identifier) = 0.9 from the logprobs (beside other tokens), mapped to the candidate
    through the order shown; a judge always 0.8 on "m" (BIAS) is undone by --swap."""
    items = ITEMS[3:8]  # q0, q1 GOOD candidate; q2, q3 GOOD baseline; q4 BIAS
    res = judge(server, tmp_path, items, "--protocol", "alpacaeval", "--swap", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    body = server["requests"][0]
    assert (body["max_tokens"], body["logprobs"], body["top_logprobs"]) == (1, True, 5)
    assert body["messages"][0]["content"] == prompts.ALPACAEVAL_SYSTEM
    assert r["preference_source"] == {"logprobs": 10, "sampled_token": 0} and "preference_note" not in r
    by_id = annotations(tmp_path / "out")
    for i in range(4):
        a = by_id[f"q{i}"]
        expected = 0.9 if i < 2 else 0.1
        assert a["preference"] == pytest.approx(expected) and a["outcome"] == pytest.approx(expected)
        for j in a["judgments"]:
            cand_first = j["order"][0] == "candidate"
            assert j["source"] == "logprobs"
            assert j["p_output_1"] == pytest.approx(expected if cand_first else 1 - expected)
            assert j["preference"] == pytest.approx(expected)
    bias = by_id["q4"]
    assert [j["p_output_1"] for j in bias["judgments"]] == [pytest.approx(0.8)] * 2
    assert bias["preference"] == pytest.approx(0.5) and bias["result"] == "tie"
    assert r["win_rate"] == pytest.approx((0.9 * 2 + 0.1 * 2 + 0.5) / 5)
    assert (r["wins"], r["losses"], r["ties"]) == (2, 2, 1)
    assert r["position_consistency"] == pytest.approx(4 / 5)
    assert r["protocol_note"] == prompts.PROTOCOL_NOTES["alpacaeval"] and "AlpacaEval 2 style" in r["prompt_source"]
    # One order (no --swap): the seeded order decides which identifier the candidate gets.
    res = judge(server, tmp_path, items, "--protocol", "alpacaeval", *FAST, name="one")
    by_id = annotations(tmp_path / "one")
    for i in range(5):
        (j,) = by_id[f"q{i}"]["judgments"]
        assert (j["order"][0] == "candidate") == candidate_first(42, f"q{i}")
    assert by_id["q4"]["preference"] == pytest.approx(0.8 if candidate_first(42, "q4") else 0.2)


def length_items(n: int = 40) -> tuple[list, float]:
    """The candidate is the baseline plus padding of varying length: longer on every item."""
    items, deltas = [], []
    for i in range(n):
        pad = " and more" * (2 + (i * 7) % 37)
        items.append(("", f"reply {i}{pad}", f"reply {i}"))
        deltas.append(len(pad))
    return items, statistics.stdev(deltas)


def test_length_controlled_win_rate_undoes_a_length_loving_judge(tmp_path, server):
    """A judge that prefers the longer output, and nothing else, on data where the candidate is
    only longer: the raw win rate is near 1, the length-controlled one near 0.5."""
    items, scale = length_items()
    server.update(alpaca="longer", length_scale=scale, length_k=4.0)
    res = judge(server, tmp_path, items, "--protocol", "alpacaeval", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["win_rate"] > 0.9 and r["wins"] == 40
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=0.01)
    assert r["lc_ci95"][0] <= r["lc_win_rate"] <= r["lc_ci95"][1] and r["lc_ci95"][1] < r["win_rate"]
    lc = r["length_control"]
    assert lc["length_slope"] == pytest.approx(4.0, abs=0.05) and lc["length_std_chars"] == pytest.approx(scale)
    assert "instruction-difficulty" in lc["omitted"] and lc["n"] == 40
    assert r["mean_chars"]["candidate"] > r["mean_chars"]["baseline"]
    # A judge that ignores length (GOOD decides): the LC win rate stays with the raw one.
    server["alpaca"] = "logprobs"
    good = [("", f"GOOD reply {i}{pad}", f"plain reply {i}") for i, (_, pad) in
            enumerate((t, c[len(f"reply {i}"):]) for i, (t, c, _) in enumerate(items))]
    r = json.loads(judge(server, tmp_path, good, "--protocol", "alpacaeval", *FAST, name="good", gens="g2").stdout)
    assert r["win_rate"] == pytest.approx(0.9) and r["lc_win_rate"] == pytest.approx(0.9, abs=1e-3)


@pytest.mark.parametrize("mode", ["no_logprobs", "bad_logprobs"])
def test_alpacaeval_falls_back_to_the_sampled_identifier(tmp_path, server, mode):
    """No (usable) logprobs: the sampled identifier gives 0 or 1, and the summary and stderr say so."""
    server["alpaca"] = mode
    res = judge(server, tmp_path, ITEMS[3:7], "--protocol", "alpacaeval", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["preference_source"] == {"logprobs": 0, "sampled_token": 4}
    assert "4 of 4 answers came without usable logprobs" in r["preference_note"]
    assert "without usable logprobs" in res.stderr and res.stderr.count("\n") == 1
    assert r["win_rate"] == 0.5 and (r["wins"], r["losses"]) == (2, 2)
    for a in annotations(tmp_path / "out").values():
        assert a["preference"] in (0.0, 1.0) and a["judgments"][0]["source"] == "sampled_token"


def test_alpacaeval_junk_is_reasked_then_unparseable(tmp_path, server):
    items = [ITEMS[3], ITEMS[8], ITEMS[9]]  # GOOD, JUNK (never an identifier), FIXME (one on the re-ask)
    res = judge(server, tmp_path, items, "--protocol", "alpacaeval", *FAST)
    r = json.loads(res.stdout)
    assert (r["wins"], r["unparseable"], r["reasked"], r["n"]) == (2, 1, 2, 2)
    reask = [b for b in server["requests"] if len(b["messages"]) == 4][0]["messages"]
    assert reask[-1]["content"] == prompts.ALPACAEVAL_REASK and reask[-2]["role"] == "assistant"
    assert {b["max_tokens"] for b in server["requests"]} == {1}


def test_alpacaeval_cache_budget_and_key(tmp_path, server):
    """The budget reserves the one-token answer, a rerun is free, and the key reaches no file."""
    items = [("", f"GOOD reply {i}", f"plain reply {i}") for i in range(20)]
    probe = judge(server, tmp_path, items, "--protocol", "alpacaeval", *FAST, name="probe", cache="probe-cache")
    assert probe.exit_code == 0, probe.stderr
    largest = max(worst_case(size, 1) for size in server["sizes"])
    server["requests"].clear(), server["sizes"].clear(), server["attempts"].clear()
    server["fault"] = "no_usage"  # every request then costs its reservation
    cap = 2.5 * largest
    res = judge(server, tmp_path, items, "--protocol", "alpacaeval", "--max-cost-usd", str(cap), "--concurrency", "1",
                *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["requests_sent"] == 2 and r["not_judged"] == 18
    assert r["spent_usd"] == pytest.approx(sum(worst_case(size, 1) for size in server["sizes"]))
    assert r["spent_usd"] <= cap
    server["fault"] = "echo_key"
    full = judge(server, tmp_path, items, "--protocol", "alpacaeval", *FAST, name="full")
    full = json.loads(full.stdout)
    assert full["requests_sent"] - full["retries"] == 18 and full["cache_hits"] == 2  # the two answered are cached
    dry = judge(server, tmp_path, items, "--protocol", "alpacaeval", "--dry-run")
    assert json.loads(dry.stdout)["requests"] == 0
    again = json.loads(judge(server, tmp_path, items, "--protocol", "alpacaeval", *FAST, name="again").stdout)
    assert again["requests_sent"] == 0 and again["cache_hits"] == 20 and again["win_rate"] == pytest.approx(0.9)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert leaks(path.read_text(errors="replace")) == [], path


def test_alpacaeval_refuses_max_tokens_and_local_judges(tmp_path, server):
    res = judge(server, tmp_path, ITEMS[3:4], "--protocol", "alpacaeval", "--max-tokens", "5")
    assert res.exit_code == 2 and "--max-tokens does not apply to --protocol alpacaeval" in res.stderr
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:4])
    res = run_cli("judge", "--candidate", cand, "--baseline", base, "--judge", "rm:nowhere", "--protocol", "arena",
                  "-o", tmp_path / "rm")
    assert res.exit_code == 2 and "--protocol arena needs a judge on an endpoint" in res.stderr


# ---------------------------------------------------------------- Arena-Hard-Auto style

ARENA_ITEMS = [
    ("", "GREAT reply zero", "plain reply zero"),  # candidate much better in both games: 6 battles won
    ("", "GOOD reply one", "plain reply one"),  # slightly better: 2 won
    ("", "plain reply two", "GOOD reply two"),  # 2 lost
    ("", "plain reply three", "GREAT reply three"),  # 6 lost
    ("", "same reply four", "same reply four"),  # ties: 1 - 1
    ("BIAS", "some reply five", "other reply five"),  # always [[A>B]]: 1 won, 1 lost
    ("JUNK", "GREAT reply six", "plain reply six"),  # malformed twice per game: unparseable
    ("FIXME", "GREAT reply seven", "plain reply seven"),  # malformed, then [[..>>..]] on the re-ask
]


def test_arena_verdicts_both_orders_weights_and_bradley_terry(tmp_path, server):
    res = judge(server, tmp_path, ARENA_ITEMS, "--protocol", "arena", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    first = server["requests"][0]
    assert first["max_tokens"] == 4096 and first["messages"][0]["content"] == prompts.ARENA_SYSTEM
    assert first["messages"][1]["content"].startswith("<|User Prompt|>")
    by_id = annotations(tmp_path / "out")
    for a in by_id.values():  # game 1 shows the baseline as A, game 2 the candidate
        assert [j["order"][0] for j in a["judgments"]] == ["baseline", "candidate"]
    assert [j["verdict"] for j in by_id["q0"]["judgments"]] == ["B>>A", "A>>B"]
    assert [j["verdict"] for j in by_id["q2"]["judgments"]] == ["A>B", "B>A"]
    assert [j["verdict"] for j in by_id["q5"]["judgments"]] == ["A>B", "A>B"]
    battles = {i: by_id[f"q{i}"].get("battles") for i in range(8)}
    assert battles[0] == {"candidate": 6.0, "baseline": 0.0} and battles[3] == {"candidate": 0.0, "baseline": 6.0}
    assert battles[1] == {"candidate": 2.0, "baseline": 0.0} and battles[4] == {"candidate": 1.0, "baseline": 1.0}
    assert battles[5] == {"candidate": 1.0, "baseline": 1.0} and battles[7] == {"candidate": 6.0, "baseline": 0.0}
    assert by_id["q6"]["result"] == "unparseable" and by_id["q6"]["outcome"] is None
    assert [len(j["turns"]) for j in by_id["q7"]["judgments"]] == [2, 2]
    # Hand-computed: battles won 6 + 2 + 0 + 0 + 1 + 1 + 6 = 16 of 16 + (2 + 6 + 1 + 1) = 26.
    assert r["battles"] == {"candidate": 16.0, "baseline": 10.0}
    assert r["win_rate"] == pytest.approx(16 / 26, rel=1e-6)
    assert r["bradley_terry"]["strength_ratio"] == pytest.approx(16 / 10, rel=1e-5)
    assert r["ci95"][0] < r["win_rate"] < r["ci95"][1]
    assert r["verdicts"] == {"candidate>>baseline": 4, "candidate>baseline": 3, "tie": 2, "baseline>candidate": 3,
                             "baseline>>candidate": 2, "unparseable": 2}
    assert (r["wins"], r["losses"], r["ties"], r["unparseable"], r["n"]) == (3, 2, 2, 1, 7)
    assert r["swap"] is True and r["position_consistency"] == pytest.approx(6 / 7)
    assert r["reasked"] == 4 and "Arena-Hard-Auto style" in r["prompt_source"] and "500" in r["protocol_note"]
    reask = [b for b in server["requests"] if len(b["messages"]) == 4][0]["messages"]
    assert reask[-1]["content"] == prompts.ARENA_REASK
    # --unparseable tie: the JUNK item's two games count as ties (one battle each, half to each side).
    tie = json.loads(judge(server, tmp_path, ARENA_ITEMS, "--protocol", "arena", "--unparseable", "tie", *FAST,
                           name="tie").stdout)
    assert tie["requests_sent"] == 0 and tie["battles"] == {"candidate": 17.0, "baseline": 11.0}


@pytest.mark.parametrize("junk", ["no_label", "conflict", "invalid"])
def test_arena_malformed_verdicts_are_reasked_then_unparseable(tmp_path, server, junk):
    server["arena_junk"] = junk
    res = judge(server, tmp_path, [ARENA_ITEMS[0], ARENA_ITEMS[6]], "--protocol", "arena", *FAST)
    r = json.loads(res.stdout)
    assert (r["unparseable"], r["wins"], r["reasked"]) == (1, 1, 2) and len(server["requests"]) == 6
    assert r["verdicts"]["unparseable"] == 2 and r["win_rate"] > 0.999  # separable: large but finite


def test_arena_budget_reserves_its_max_tokens_and_caches(tmp_path, server):
    items = [("", f"GOOD reply {i}", f"plain reply {i}") for i in range(6)]
    probe = judge(server, tmp_path, items, "--protocol", "arena", *FAST, name="probe", cache="probe-cache")
    assert probe.exit_code == 0, probe.stderr
    largest = max(worst_case(size, 4096) for size in server["sizes"])
    server["requests"].clear(), server["sizes"].clear(), server["attempts"].clear()
    server["fault"] = "no_usage"
    cap = 2.5 * largest
    res = judge(server, tmp_path, items, "--protocol", "arena", "--max-cost-usd", str(cap), "--concurrency", "1", *FAST)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["requests_sent"] == 2 and r["not_judged"] == 5  # one item's two games
    assert r["spent_usd"] == pytest.approx(sum(worst_case(size, 4096) for size in server["sizes"]))
    assert r["spent_usd"] <= cap
    server["fault"] = None
    dry = json.loads(judge(server, tmp_path, items, "--protocol", "arena", "--dry-run").stdout)
    assert (dry["requests"], dry["cached"]) == (10, 2)
    full = json.loads(judge(server, tmp_path, items, "--protocol", "arena", *FAST, name="full").stdout)
    assert full["requests_sent"] == 10 and full["cache_hits"] == 2 and full["win_rate"] > 0.999


# ---------------------------------------------------------------- --combine

def test_combine_runs_into_one_leaderboard(tmp_path, server):
    """Three models judged against one baseline: one Bradley-Terry fit, each model's win rate equal
    to its own run's, intervals from one joint bootstrap; mismatched runs are refused."""
    # The baseline has GOOD on items 0 and 4; the server prefers GREAT to GOOD to neither.
    base = [("", "", f"GOOD reply {i}" if i % 4 == 0 else f"plain reply {i}") for i in range(8)]
    models = {
        "great": [f"GREAT reply {i}" for i in range(8)],
        "mixed": [f"GOOD reply {i}" if i % 2 else f"plain reply {i}" for i in range(8)],
        "weak": [f"plain reply {i}" for i in range(8)],
    }
    runs = {}
    baseline_file = None
    for name, completions in models.items():
        items = [(tag, c, b) for (tag, _, b), c in zip(base, completions)]
        cand, baseline_file_ = write_generations(tmp_path / f"gens-{name}", items)
        if baseline_file is None:
            baseline_file = baseline_file_
        res = run_cli(*judge_args(server, cand, baseline_file, tmp_path / name, tmp_path / "cache", "--protocol",
                                  "arena", *FAST), env=ENV)
        assert res.exit_code == 0, res.stderr
        runs[name] = json.loads(res.stdout)
    res = run_cli("judge", "--combine", tmp_path / "great", tmp_path / "mixed", tmp_path / "weak", "--bootstrap", "200",
                  "-o", tmp_path / "board", "--json")
    assert res.exit_code == 0, res.stderr
    board = json.loads(res.stdout)
    rows = board["leaderboard"]
    assert [row["model"].rsplit("/", 1)[-1] for row in rows] == ["great", "mixed", "(baseline)", "weak"]
    for row in rows:
        name = row["model"].rsplit("/", 1)[-1]
        if name in runs:
            assert row["win_rate"] == pytest.approx(runs[name]["win_rate"], rel=1e-5)
            assert row["items"] == 8 and row["ci95"][0] <= row["win_rate"] <= row["ci95"][1]
    assert rows[2]["win_rate"] == 0.5 and board["protocol"] == "arena" and board["items"] == 8
    assert "500" in board["protocol_note"] and "Bradley-Terry" in board["ci_method"]
    saved = json.loads((tmp_path / "board" / "leaderboard.json").read_text())
    assert saved["leaderboard"] == rows
    assert json.loads((tmp_path / "board" / "trcli-run.json").read_text())["status"] == "completed"
    table = run_cli("judge", "--combine", tmp_path / "great", tmp_path / "weak", "--bootstrap", "50")
    assert table.exit_code == 0 and "Bradley-Terry" in table.stdout and "(baseline)" in table.stdout

    # A run against another baseline, or judged another way, is refused.
    other, other_base = write_generations(tmp_path / "gens-other", [("", "x", "y")])
    res = run_cli(*judge_args(server, other, other_base, tmp_path / "other", tmp_path / "cache", "--protocol", "arena",
                              *FAST), env=ENV)
    assert res.exit_code == 0, res.stderr
    res = run_cli("judge", "--combine", tmp_path / "great", tmp_path / "other")
    assert res.exit_code == 2 and "different baselines" in res.stderr
    cand = tmp_path / "gens-mixed" / "cand.jsonl"
    res = run_cli(*judge_args(server, cand, baseline_file, tmp_path / "pairwise", tmp_path / "cache", *FAST), env=ENV)
    assert res.exit_code == 0, res.stderr
    res = run_cli("judge", "--combine", tmp_path / "great", tmp_path / "pairwise")
    assert res.exit_code == 2 and "differ in protocol" in res.stderr
    res = run_cli("judge", "--combine", tmp_path / "great", tmp_path / "great")
    assert res.exit_code == 2 and "same candidate" in res.stderr
    res = run_cli("judge", tmp_path / "great")
    assert res.exit_code == 2 and "only with --combine" in res.stderr


def test_combine_pairwise_runs(tmp_path, server):
    """Other protocols' per-item outcomes are the battles: BT win rates equal the runs' win rates."""
    items = ITEMS[3:7]
    res = judge(server, tmp_path, items, "--swap", *FAST, name="a")
    flipped = [(t, b, c) for t, c, b in items[:1]] + items[1:]
    cand, _ = write_generations(tmp_path / "gens-b", flipped)
    base = tmp_path / "gens" / "base.jsonl"
    res_b = run_cli(*judge_args(server, cand, base, tmp_path / "b", tmp_path / "cache", "--swap", *FAST), env=ENV)
    assert res.exit_code == 0 and res_b.exit_code == 0, res.stderr + res_b.stderr
    board = json.loads(run_cli("judge", "--combine", tmp_path / "a", tmp_path / "b", "--json").stdout)
    rates = {row["model"].rsplit("/", 1)[-1]: row["win_rate"] for row in board["leaderboard"]}
    own = {name: json.loads((tmp_path / name / "summary.json").read_text())["win_rate"] for name in ("a", "b")}
    assert own == {"a": 0.5, "b": 0.375}  # b: its first item is a tie (neither text has GOOD)
    assert rates["a"] == pytest.approx(own["a"], rel=1e-5) and rates["b"] == pytest.approx(own["b"], rel=1e-5)
    assert math.isclose(rates["(baseline)"], 0.5) and board["protocol"] == "pairwise"
