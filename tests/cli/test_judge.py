"""judge against a real OpenAI-compatible HTTP server on 127.0.0.1, run through the real CLI.

The server (tests/judge_server.py) scripts its verdicts from the texts it is shown: it prefers the
response containing GOOD whichever position it is in, always answers "A" for BIAS items (so --swap
turns them into ties), answers junk for JUNK items, junk then a valid answer for FIXME items, and
fails the first attempt of RATE (429 + Retry-After: 0), FAIL (500) and SLOW (reply after the client
timeout) items. Its hostile modes are exercised in test_judge_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from judge_server import KEY, TIMEOUT, serve
from trcli.judge import client as client_mod
from trcli.judge.prompts import CRITERIA
from trcli.stages.judge import candidate_first

# (prompt tag, candidate completion, baseline completion) for ten items.
ITEMS = [
    ("RATE", "GOOD reply zero", "plain reply zero"),
    ("FAIL", "GOOD reply one", "plain reply one"),
    ("SLOW", "GOOD reply two", "plain reply two"),
    ("", "GOOD reply three", "plain reply three"),
    ("", "GOOD reply four", "plain reply four"),
    ("", "plain reply five", "GOOD reply five"),
    ("", "plain reply six", "GOOD reply six"),
    ("BIAS", "some reply seven", "other reply seven"),
    ("JUNK", "GOOD reply eight", "plain reply eight"),
    ("FIXME", "GOOD reply nine", "plain reply nine"),
]


@pytest.fixture
def server():
    with serve() as state:
        yield state


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE", 0.01)


def write_generations(directory: Path, items=ITEMS, scores: bool = False) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cand, base = directory / "cand.jsonl", directory / "base.jsonl"
    with open(cand, "w") as c, open(base, "w") as b:
        for i, (tag, good, other) in enumerate(items):
            prompt = f"\n\nHuman: question {i} {tag}\n\nAssistant:"
            rec = {"id": f"q{i}", "prompt": prompt, "model": "x", "sampling": {}, "sample": 0}
            extra = {"logp": -10.0 - i, "ref_logp": -12.0 - i, "n_tokens": 4} if scores else {}
            c.write(json.dumps({**rec, "completion": " " + good, **extra}) + "\n")
            b.write(json.dumps({**rec, "completion": " " + other}) + "\n")
    return cand, base


def judge_args(server, cand, base, out, cache, *extra):
    return ["judge", "--candidate", cand, "--baseline", base, "--judge", "gpt-4", "--base-url", server["url"],
            "--api-key-env", "JUDGE_KEY", "--task", "hh", "--timeout", str(TIMEOUT), "--cache-dir", cache,
            "-o", out, "--json", *extra]


def test_swap_win_rate_retries_cache_and_key(tmp_path, server):
    cand, base = write_generations(tmp_path / "gens", scores=True)
    out, cache = tmp_path / "judged", tmp_path / "cache"
    env = {"JUDGE_KEY": KEY}

    dry = run_cli(*judge_args(server, cand, base, out, cache, "--swap", "--dry-run"), env=env)
    assert dry.exit_code == 0, dry.stderr
    assert json.loads(dry.stdout)["requests"] == 20 and server["requests"] == []

    res = run_cli(*judge_args(server, cand, base, out, cache, "--swap", "--concurrency", "3"), env=env)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    # 6 wins (items 0-4 and 9 after its re-ask), 2 losses, 1 tie (BIAS: the orders disagree),
    # 1 unparseable (JUNK, excluded): (6 + 0.5) / 9.
    assert (r["wins"], r["losses"], r["ties"], r["unparseable"], r["n"]) == (6, 2, 1, 1, 9)
    assert r["win_rate"] == pytest.approx(6.5 / 9)
    assert r["ci95"][0] <= r["win_rate"] <= r["ci95"][1]
    assert r["position_consistency"] == pytest.approx(8 / 9)
    # 20 first questions, 2 re-asks each for JUNK (both fail) and FIXME, one retry per order
    # for RATE, FAIL and SLOW.
    assert r["retries"] == 6 and r["reasked"] == 4
    assert r["requests_sent"] == len(server["requests"]) == 30
    assert r["tokens"] == {"prompt_tokens": 2400, "completion_tokens": 240, "total": 2640}
    assert r["cost_usd"] == pytest.approx(24 * (100 * 0.03 + 10 * 0.06) / 1000)
    assert server["auth"] == {f"Bearer {KEY}"}
    assert r["kl"]["candidate"]["mean"] == pytest.approx(2.0) and r["kl"]["baseline"] is None

    annotations = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    by_id = {a["id"]: a for a in annotations}
    assert by_id["q7"]["result"] == "tie" and {j["verdict"] for j in by_id["q7"]["judgments"]} == {"A"}
    assert [len(j["turns"]) for j in by_id["q8"]["judgments"]] == [2, 2]
    assert [t["retries"] for j in by_id["q0"]["judgments"] for t in j["turns"]] == [1, 1]
    first = [j["order"][0] == "candidate" for j in by_id["q3"]["judgments"]]
    assert first == [candidate_first(42, "q3"), not candidate_first(42, "q3")]
    assert json.loads((out / "summary.json").read_text())["win_rate"] == r["win_rate"]
    assert json.loads((out / "trcli-run.json").read_text())["status"] == "completed"

    # Rerun with another unparseable policy: every answer comes from the cache.
    sent = len(server["requests"])
    again = run_cli(*judge_args(server, cand, base, tmp_path / "again", cache, "--swap", "--unparseable", "loss"),
                    env=env)
    assert again.exit_code == 0, again.stderr
    r2 = json.loads(again.stdout)
    assert len(server["requests"]) == sent and r2["requests_sent"] == 0 and r2["cache_hits"] == 24
    assert r2["win_rate"] == pytest.approx(6.5 / 10) and r2["n"] == 10
    dry = run_cli(*judge_args(server, cand, base, out, cache, "--swap", "--dry-run"), env=env)
    assert json.loads(dry.stdout)["requests"] == 0

    # The key was sent, and is nowhere on disk or in any output.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY not in path.read_text(errors="replace"), path
    for result in (res, again, dry):
        assert KEY not in result.stdout + result.stderr


def test_gate_exit_3_and_table(tmp_path, server):
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:7])  # 2 wins, 2 losses
    cache = tmp_path / "cache"
    env = {"JUDGE_KEY": KEY}
    failed = run_cli(*judge_args(server, cand, base, tmp_path / "a", cache, "--min-win-rate", "0.6"), env=env)
    assert failed.exit_code == 3
    assert json.loads(failed.stdout)["win_rate"] == 0.5
    assert "win rate 0.500 is below --min-win-rate 0.6" in failed.stderr
    args = judge_args(server, cand, base, tmp_path / "b", cache, "--min-win-rate", "0.5")
    passed = run_cli(*[a for a in args if a != "--json"], env=env)
    assert passed.exit_code == 0, passed.stderr
    assert "win rate" in passed.stdout and "0.500" in passed.stdout and "distinct_1" in passed.stdout


def test_unauthorized_is_one_line_without_the_key(tmp_path, server):
    server["status"] = 401
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:4])
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out", tmp_path / "cache"), env={"JUDGE_KEY": KEY})
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and "HTTP 401" in res.stderr
    assert KEY not in res.stderr and KEY[-4:] not in res.stderr and "provided: sk-***" in res.stderr
    assert len(server["requests"]) == 1  # a 401 is not retried


def test_retries_exhausted_exit_1(tmp_path, server):
    server["status"] = 503
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:4])
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out", tmp_path / "cache", "--max-retries", "2"),
                  env={"JUDGE_KEY": KEY})
    assert res.exit_code == 1 and "HTTP 503 after 2 retries" in res.stderr
    assert len(server["requests"]) == 3


def worst_case(size: int, max_tokens: int) -> float:
    """gpt-4's price of a request body of ``size`` bytes, each counted as a prompt token, plus
    max_tokens of answer: what the client reserves before sending it."""
    return (size * 0.03 + max_tokens * 0.06) / 1000


def test_max_cost_stops_then_resumes(tmp_path, server):
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:7])
    cache = tmp_path / "cache"
    env = {"JUDGE_KEY": KEY, "TRCLI_JUDGE__MAX_TOKENS": "16"}
    probe = run_cli(*judge_args(server, cand, base, tmp_path / "probe", tmp_path / "probe-cache"), env=env)
    assert probe.exit_code == 0, probe.stderr
    reserve = max(worst_case(size, 16) for size in server["sizes"])
    server["requests"].clear()
    server["attempts"].clear()
    per_request = (100 * 0.03 + 10 * 0.06) / 1000
    budget = reserve + 1.5 * per_request  # room for two requests, each reserving its worst case in turn
    res = run_cli(*judge_args(server, cand, base, tmp_path / "a", cache, "--concurrency", "1",
                              "--max-cost-usd", str(budget)), env=env)
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["requests_sent"] == 2 and r["not_judged"] == 2
    assert r["spent_usd"] == pytest.approx(2 * per_request) and "max-cost-usd" in res.stderr
    first = len(server["requests"])
    res = run_cli(*judge_args(server, cand, base, tmp_path / "b", cache, "--max-cost-usd", "1"), env=env)
    r = json.loads(res.stdout)
    assert r["not_judged"] == 0 and r["n"] == 4 and r["win_rate"] == 0.5
    assert r["requests_sent"] == 4 - first and len(server["requests"]) == 4  # nothing asked twice


def test_hc_ratings(tmp_path, server):
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:7] + ITEMS[8:9])
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out", tmp_path / "cache", "--protocol", "hc"),
                  env={"JUDGE_KEY": KEY})
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    # Items 3, 4 and the JUNK one (rated after its re-asks) have the GOOD candidate: 3 wins, 2 losses.
    assert (r["wins"], r["losses"], r["unparseable"], r["reasked"]) == (3, 2, 0, 2)
    assert r["win_rate"] == pytest.approx(0.6) and len(server["requests"]) == 12
    for criterion in CRITERIA:
        row = r["criteria"][criterion]
        assert (row["candidate"], row["baseline"]) == (pytest.approx(6.8), pytest.approx(6.2))
        assert row["diff"] == pytest.approx(0.6)
    assert "ours" in r["prompt_source"]


def test_identical_pairs_are_warned_about(tmp_path, server):
    """The same generations on both sides: one warning line before anything is sent (also with
    --dry-run), and the count in the summary; a minority of identical pairs says nothing."""
    same = [("", f"same reply {i}", f"same reply {i}") for i in range(4)]
    cand, base = write_generations(tmp_path / "gens", same)
    env = {"JUDGE_KEY": KEY}
    dry = run_cli(*judge_args(server, cand, base, tmp_path / "out", tmp_path / "cache", "--dry-run"), env=env)
    assert dry.exit_code == 0 and dry.stderr.count("\n") == 1
    assert "identical on every item" in dry.stderr and "warning" in dry.stderr
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out", tmp_path / "cache"), env=env)
    assert res.exit_code == 0 and res.stderr.count("\n") == 1 and "identical on every item" in res.stderr
    assert json.loads(res.stdout)["identical"] == 4
    most = same[:3] + [ITEMS[3]]
    cand, base = write_generations(tmp_path / "gens2", most)
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out2", tmp_path / "cache"), env=env)
    assert "identical on 3 of 4 items" in res.stderr
    few = same[:1] + ITEMS[3:6]
    cand, base = write_generations(tmp_path / "gens3", few)
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out3", tmp_path / "cache"), env=env)
    assert res.exit_code == 0 and res.stderr == "" and json.loads(res.stdout)["identical"] == 1


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, server, monkeypatch):
    """Under nohup (stderr a file): a plain line at a steady cadence with done / total, items/s and
    the ETA, and one at the end; stdout holds the result only. (30 s in real runs; 0.1 s here.)"""
    from trcli import progress

    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.1)
    server["delay"] = 0.05
    items = [("", f"GOOD reply {i}", f"plain reply {i}") for i in range(12)]
    cand, base = write_generations(tmp_path / "gens", items)
    res = run_cli(*judge_args(server, cand, base, tmp_path / "out", tmp_path / "cache", "--concurrency", "1"),
                  env={"JUDGE_KEY": KEY})
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["wins"] == 12
    lines = res.stderr.splitlines()
    assert len(lines) >= 3 and all(line.startswith("trcli judge: ") for line in lines)
    assert all(" items (" in line and "items/s, ETA " in line for line in lines[:-1])
    done = [int(line.split(": ")[1].split("/")[0]) for line in lines]
    assert done == sorted(done) and lines[-1].startswith("trcli judge: 12/12 items in ")
