"""judge against a hostile OpenAI-compatible server (tests/judge_server.py), through the real CLI.

Each fault of judge_server.FAULTS is exercised here: the budget holds without usage or with
inflated usage, the key never reaches disk or the terminal, ambiguous verdicts are not guessed at,
junk answers are retried and then stop the run with one line, Retry-After waits are reported as
used, and damaged cache entries are repaired.
"""

from __future__ import annotations

import base64
import json

import pytest
from test_judge import ITEMS, judge_args, worst_case, write_generations

from conftest import run_cli
from judge_server import FAULTS, KEY, USAGE, serve
from trcli.judge import client as client_mod

ENV = {"JUDGE_KEY": KEY, "TRCLI_JUDGE__MAX_TOKENS": "16"}
PER_REQUEST = (USAGE["prompt_tokens"] * 0.03 + USAGE["completion_tokens"] * 0.06) / 1000  # gpt-4
# Fifty items, each won by the candidate.
MANY = [("", f"GOOD reply {i}", f"plain reply {i}") for i in range(50)]


@pytest.fixture
def server():
    with serve() as state:
        yield state


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_BASE", 0.01)


def judge(server, tmp_path, items, *extra, name="out", cache="cache", env=ENV):
    cand, base = write_generations(tmp_path / "gens", items)
    return run_cli(*judge_args(server, cand, base, tmp_path / name, tmp_path / cache, *extra), env=env)


def one_line(res) -> str:
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


def test_every_fault_is_tested():
    text = open(__file__).read()
    assert all(f'"{fault}"' in text for fault in FAULTS)


# ---------------------------------------------------------------- the budget

def test_no_usage_counts_the_reservation(tmp_path, server):
    """Without `usage` every request counts as its worst case, so the cap holds (before: all 50 sent)."""
    server["fault"] = "no_usage"
    cap = 0.05
    res = judge(server, tmp_path, MANY, "--max-cost-usd", str(cap))
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    reserved = [worst_case(size, 16) for size in server["sizes"]]
    assert 1 <= r["requests_sent"] == len(server["requests"]) < 50
    assert r["spent_usd"] == pytest.approx(sum(reserved)) and r["spent_usd"] <= cap
    assert cap - r["spent_usd"] < max(reserved)  # stopped only when another request could not fit
    assert r["not_judged"] == 50 - r["requests_sent"] and "max-cost-usd" in res.stderr


def largest_reservation(server, tmp_path, items) -> float:
    """The dearest worst case among the items' requests, from a run without a cap (then forgotten)."""
    res = judge(server, tmp_path, items, name="probe", cache="probe-cache")
    assert res.exit_code == 0, res.stderr
    largest = max(worst_case(size, 16) for size in server["sizes"])
    for key in ("requests", "sizes"):
        server[key].clear()
    server["attempts"].clear()
    return largest


@pytest.mark.parametrize("concurrency, caps", [(1, 0.5), (4, 1.5), (4, 10)])
def test_inflated_usage_never_passes_the_cap(tmp_path, server, concurrency, caps):
    """An endpoint that bills every request byte as a token and the whole max_tokens (three times a
    chars/3 guess) still cannot take the spend past the cap, at any concurrency (before: 2x the cap
    at concurrency 1, 2.7x at 4). The cap is ``caps`` worst-case requests."""
    cap = caps * largest_reservation(server, tmp_path, MANY)
    server["fault"] = "inflated_usage"
    res = judge(server, tmp_path, MANY, "--max-cost-usd", str(cap), "--concurrency", str(concurrency))
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    billed = sum(worst_case(size, 16) for size in server["sizes"])
    assert r["spent_usd"] == pytest.approx(billed) and billed <= cap
    assert r["requests_sent"] == int(caps) and r["not_judged"] == 50 - int(caps)


def test_waits_for_requests_in_flight_instead_of_dropping(tmp_path, server):
    """Answers cost far less than their worst case: with 16 in flight, an item that does not fit now
    waits for them to settle, and items are left unjudged only when one more could not fit
    (before: items dropped while several requests' worth of budget was left)."""
    largest = largest_reservation(server, tmp_path, MANY)
    cap = 8 * largest
    server["delay"] = 0.05
    # A generous timeout: on a loaded machine 16 connections at once can outlast the suite's 0.5 s
    # (a connect timeout is a request sent that cost nothing, which this accounting test is not about).
    res = judge(server, tmp_path, MANY, "--max-cost-usd", str(cap), "--concurrency", "16", "--timeout", "30")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["spent_usd"] == pytest.approx(r["requests_sent"] * PER_REQUEST) and r["spent_usd"] <= cap
    assert cap - r["spent_usd"] < largest
    assert r["not_judged"] == 50 - r["requests_sent"] > 0


def test_junk_usage_is_unknown_not_a_crash(tmp_path, server):
    """Non-numeric usage: the answer is used, its cost counted at the reservation."""
    server["fault"] = "junk_usage"
    res = judge(server, tmp_path, ITEMS[3:5], "--max-cost-usd", "1")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert (r["wins"], r["n"]) == (2, 2) and r["tokens"]["total"] == 0
    assert r["spent_usd"] == pytest.approx(sum(worst_case(size, 16) for size in server["sizes"]))


def test_timed_out_request_counts_its_reservation(tmp_path, server):
    """The server may bill a request the client stopped waiting for."""
    server.update(fault="slow", fault_times=1)
    res = judge(server, tmp_path, ITEMS[3:4], "--max-cost-usd", "1")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["retries"] == 1 and r["requests_sent"] == 2 and r["wins"] == 1
    assert r["spent_usd"] == pytest.approx(worst_case(server["sizes"][0], 16) + PER_REQUEST)
    assert "ReadTimeout; retry 1/5" in res.stderr


# ---------------------------------------------------------------- the key

def leaks(text: str) -> list[str]:
    """Runs of 8 characters of the key, or of the key-only part of base64("Bearer KEY"), in text."""
    secrets = [KEY, base64.b64encode(f"Bearer {KEY}".encode()).decode()[10:-2]]
    return [s[i:i + 8] for s in secrets for i in range(len(s) - 7) if s[i:i + 8].lower() in text.lower()]


def test_echoed_key_reaches_no_file_and_no_output(tmp_path, server):
    """A proxy echoing the Authorization header in a 200 answer (raw, base64, with other separators)."""
    server["fault"] = "echo_key"
    res = judge(server, tmp_path, ITEMS[3:7], "--swap")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert (r["wins"], r["losses"], r["unparseable"]) == (2, 2, 0)
    assert server["auth"] == {f"Bearer {KEY}"}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "cache" for p in files)
    for path in files:
        assert leaks(path.read_text(errors="replace")) == [], path
    assert leaks(res.stdout + res.stderr) == []
    raw = json.loads((tmp_path / "out" / "annotations.jsonl").read_text().splitlines()[0])
    assert "(debug: Bearer sk-*** | QmVhcmVyIH***Q== | sk_test_*** | ***)" in raw["judgments"][0]["turns"][0]["raw"]
    # The rerun reads the scrubbed cache: nothing sent, same verdicts.
    again = judge(server, tmp_path, ITEMS[3:7], "--swap", name="again")
    assert json.loads(again.stdout)["requests_sent"] == 0 and json.loads(again.stdout)["wins"] == 2


def test_unauthorized_echo_in_other_formats(tmp_path, server):
    server["fault"] = "unauthorized"
    res = judge(server, tmp_path, ITEMS[3:4])
    assert res.exit_code == 2 and "HTTP 401" in one_line(res)
    assert leaks(res.stderr) == [] and KEY[-4:] not in res.stderr
    assert len(server["requests"]) == 1


# ---------------------------------------------------------------- verdicts

@pytest.mark.parametrize("verdict", ["More helpful: A or B", "More helpful: A and B are equally good",
                                     "A and B are equally good", "More helpful: neither"])
def test_ambiguous_verdicts_are_reasked_then_unparseable(tmp_path, server, verdict):
    server.update(fault="ambiguous", ambiguous=verdict)
    res = judge(server, tmp_path, ITEMS[3:5])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert (r["unparseable"], r["wins"], r["losses"], r["reasked"]) == (2, 0, 0, 2)
    assert len(server["requests"]) == 4  # each question asked, then re-asked once


def test_ambiguous_then_clear_verdict(tmp_path, server):
    server.update(fault="ambiguous", ambiguous="More helpful: A or B", clear_reask=True)
    res = judge(server, tmp_path, ITEMS[3:7])
    r = json.loads(res.stdout)
    assert (r["wins"], r["losses"], r["unparseable"], r["reasked"]) == (2, 2, 0, 4)


# ---------------------------------------------------------------- junk answers

JUNK_FAULTS = ["empty_list", "content_list", "content_int", "not_json", "gzip_junk"]


@pytest.mark.parametrize("fault", JUNK_FAULTS)
def test_junk_answer_is_retried(tmp_path, server, fault):
    server.update(fault=fault, fault_times=1)
    res = judge(server, tmp_path, ITEMS[3:5])
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert (r["wins"], r["retries"], r["requests_sent"]) == (2, 2, 4)
    assert "HTTP 200 with" in res.stderr or "Content-Encoding" in res.stderr


@pytest.mark.parametrize("fault", JUNK_FAULTS)
def test_persistent_junk_stops_with_one_line(tmp_path, server, fault):
    server["fault"] = fault
    res = judge(server, tmp_path, ITEMS[3:4], "--max-retries", "2")
    assert res.exit_code == 1
    lines = res.stderr.splitlines()
    assert len(lines) == 3 and "Traceback" not in res.stderr  # two retry notes, one error
    assert lines[-1].startswith("trcli judge: error: judge endpoint") and "after 2 retries" in lines[-1]
    assert len(server["requests"]) == 3
    assert not list((tmp_path / "cache").rglob("*.json"))  # junk is never cached


# ---------------------------------------------------------------- retries and the URL

def test_retry_after_message_states_the_wait_used(tmp_path, server, monkeypatch):
    monkeypatch.setattr(client_mod, "BACKOFF_MAX", 0.2)
    server.update(fault="retry_after", retry_after="30", fault_times=1)
    res = judge(server, tmp_path, ITEMS[3:4])
    assert res.exit_code == 0, res.stderr
    assert "HTTP 429; retry 1/5 in 0.2s (Retry-After 30s, capped at 0.2s)" in res.stderr
    assert "30.0s" not in res.stderr
    server.update(retry_after="0", attempts={})
    res = judge(server, tmp_path, ITEMS[3:4], cache="cache2")
    assert "HTTP 429; retry 1/5 in 0.0s (Retry-After 0s)" in res.stderr


@pytest.mark.parametrize("url", ["notaurl", "ftp://127.0.0.1/v1", "http://"])
def test_malformed_base_url_is_exit_2_at_once(tmp_path, url):
    cand, base = write_generations(tmp_path / "gens", ITEMS[3:4])
    args = judge_args({"url": url}, cand, base, tmp_path / "out", tmp_path / "cache")
    res = run_cli(*args, env=ENV)
    assert res.exit_code == 2 and "--base-url" in one_line(res) and "retry" not in res.stderr
    assert not (tmp_path / "out").exists()
    dry = run_cli(*args, "--dry-run", env=ENV)
    assert dry.exit_code == 2 and "--base-url" in one_line(dry)


# ---------------------------------------------------------------- damaged files

def test_damaged_cache_entries_are_said_reasked_and_rewritten(tmp_path, server):
    """A cache entry cut short (torn write) or holding junk is a miss: said in one line, counted by
    --dry-run, asked again and rewritten whole."""
    first = judge(server, tmp_path, ITEMS[3:7])
    assert first.exit_code == 0, first.stderr
    entries = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(entries) == 4
    entries[0].write_bytes(entries[0].read_bytes()[:-40])  # torn
    entries[1].write_text("[]")  # valid JSON, not an entry
    entries[2].write_text(json.dumps({"request": {}, "response": {"choices": [{"message": {"content": [1]}}]}}))
    dry = judge(server, tmp_path, ITEMS[3:7], "--dry-run")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["requests"] == 3
    assert "3 damaged cache entries" in one_line(dry) and "counted as requests" in dry.stderr
    sent = len(server["requests"])
    res = judge(server, tmp_path, ITEMS[3:7], name="again")
    assert res.exit_code == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["requests_sent"] == 3 == len(server["requests"]) - sent and r["cache_hits"] == 1
    assert (r["wins"], r["losses"]) == (2, 2)
    assert "3 damaged cache entries" in one_line(res) and "rewritten" in res.stderr
    for entry in entries:
        assert json.loads(entry.read_text())["response"]["choices"][0]["message"]["content"].startswith("Comparison")
    clean = judge(server, tmp_path, ITEMS[3:7], name="third")
    assert clean.stderr == "" and json.loads(clean.stdout)["requests_sent"] == 0


def test_torn_annotations_from_an_earlier_run_are_replaced_whole(tmp_path, server):
    """judge never appends to annotations.jsonl: it writes the file whole (atomically), so a torn
    file left in the output directory (by a killed copy of another tool) is simply replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "annotations.jsonl").write_text('{"id": "q0", "result": "loss"}\n{"id": "q1", "res')
    res = judge(server, tmp_path, ITEMS[3:5])
    assert res.exit_code == 0, res.stderr
    lines = (out / "annotations.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["q0", "q1"]
