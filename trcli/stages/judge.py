"""judge: win rate of candidate generations over baseline generations.

Reads two `generate` JSONL files, pairs records by id (else by prompt), asks a judge which
response is better and reports the win rate (ties count half) with a bootstrap 95% CI, plus
diversity of each side and KL(π‖π_ref) when the files carry `generate --score-with` scores.

Judges: a model on an OpenAI-compatible endpoint (the DPO paper's GPT-4 prompts for hh / tldr,
or ours), ``rm:PATH`` (a reward model: higher score wins) or ``hf:PATH`` (a local causal LM
given the same pairwise prompt). The A/B order of each item comes from a seeded hash of its id,
so reruns are identical; ``--swap`` asks both orders and counts a disagreement as a tie.

Protocols: ``pairwise`` (the above), ``hc`` (ratings), ``alpacaeval`` (AlpacaEval 2 style: the
preference from the identifier tokens' log-probabilities, and the length-controlled win rate) and
``arena`` (Arena-Hard-Auto style: both orders, 5-way verdicts, Bradley-Terry win rate).
``--combine DIR...`` fits one Bradley-Terry leaderboard over judge runs that share a baseline.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from trcli.config import Config
from trcli.data.files import RowError, read_jsonl
from trcli.data.records import record_id
from trcli.errors import DataError, GateError, UsageError
from trcli.judge import prompts, ratings, stats
from trcli.judge.cache import Cache, request_key
from trcli.judge.client import PRICES, Budget, BudgetExhausted, Client, Reply, check_base_url, cost_usd, price
from trcli.progress import Progress
from trcli.runs import Run, write_json, write_text

CANDIDATE, BASELINE = "candidate", "baseline"
# Per-item outcome for the candidate; unparseable items follow --unparseable.
OUTCOME = {"win": 1.0, "tie": 0.5, "loss": 0.0}
UNPARSEABLE = {"exclude": None, "tie": 0.5, "loss": 0.0}
DEFAULT_MAX_TOKENS = 256
# Arena-Hard-Auto's two games: the baseline shown as A first, then the candidate.
ARENA_ORDERS = (False, True)


@dataclass
class Item:
    id: str
    prompt: str
    candidate: dict
    baseline: dict


# ---------------------------------------------------------------- inputs

def _read(path: str, side: str) -> list[dict]:
    rows, ids = [], set()
    for where, row in read_jsonl(path):
        if isinstance(row, RowError):
            raise DataError(str(row))
        for key in ("prompt", "completion"):
            if not isinstance(row.get(key), str):
                raise DataError(f"{where}: {side} record has no string field '{key}'")
        row["id"] = record_id(row, where)
        if row["id"] in ids:
            raise DataError(f"{where}: duplicate id '{row['id']}' in the {side} file")
        ids.add(row["id"])
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no {side} records")
    return rows


def match(candidates: list[dict], baselines: list[dict]) -> tuple[list[Item], int]:
    """Pair by id; a candidate whose id the baseline lacks takes an unused baseline with the same
    prompt (one whose id no candidate claims). Returns the items and how many candidates found no
    partner."""
    by_id = {b["id"]: b for b in baselines}
    claimed = {c["id"] for c in candidates}
    by_prompt: dict[str, list[dict]] = {}
    for b in baselines:
        if b["id"] not in claimed:
            by_prompt.setdefault(b["prompt"], []).append(b)
    items, unmatched = [], 0
    for c in candidates:
        b = by_id.get(c["id"])
        if b is not None and b["prompt"] != c["prompt"]:
            raise DataError(f"id '{c['id']}' has different prompts in the candidate and baseline files")
        if b is None and by_prompt.get(c["prompt"]):
            b = by_prompt[c["prompt"]].pop(0)
        if b is None:
            unmatched += 1
            continue
        items.append(Item(c["id"], c["prompt"], c, b))
    return items, unmatched


def candidate_first(seed: int, item_id: str) -> bool:
    """The A/B order of an item: a seeded hash of its id, stable across reruns and machines."""
    return hashlib.sha256(f"{seed}:{item_id}".encode()).digest()[0] % 2 == 0


def _backend(spec: str) -> tuple[str, str]:
    for kind in ("rm", "hf"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1:]
    return "api", spec


# ---------------------------------------------------------------- judging with an endpoint

def _turn(reply) -> dict:
    return {"raw": reply.text, "cached": reply.cached, "retries": reply.retries, "usage": reply.usage}


def _ask(client: Client, messages: list[dict], parse, reask: str, extra: dict | None = None):
    """One question, re-asked once (with the bad answer in the conversation) when unparseable.
    ``parse`` takes the Reply; ``extra`` adds request fields (a protocol's max_tokens, logprobs)."""
    extra = extra or {}
    reply = client.complete(messages, **extra)
    turns = [_turn(reply)]
    parsed = parse(reply)
    if parsed is None:
        messages = messages + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": reask}]
        reply = client.complete(messages, **extra)
        turns.append(_turn(reply))
        parsed = parse(reply)
    return parsed, turns


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _orders(cfg: Config, item: Item) -> list[bool]:
    if cfg.judge.protocol == "arena":
        return list(ARENA_ORDERS)
    first = candidate_first(cfg.judge.seed, item.id)
    return [first, not first] if cfg.judge.swap else [first]


def _shown(item: Item, cand_first: bool) -> tuple[str, str]:
    c, b = item.candidate["completion"], item.baseline["completion"]
    return (c, b) if cand_first else (b, c)


def _order(cand_first: bool) -> list[str]:
    return [CANDIDATE, BASELINE] if cand_first else [BASELINE, CANDIDATE]


def _pairwise_text(cfg: Config, item: Item, cand_first: bool) -> str:
    return prompts.pairwise_prompt(cfg.judge.task, item.prompt, *_shown(item, cand_first))


def _questions(cfg: Config, item: Item) -> list[tuple[list[dict], dict]]:
    """The first question(s) asked about an item, as (messages, extra request fields)."""
    protocol = cfg.judge.protocol
    if protocol == "hc":
        return [(_user(prompts.hc_prompt(item.prompt, r["completion"])), {}) for r in (item.candidate, item.baseline)]
    if protocol == "alpacaeval":
        return [(prompts.alpacaeval_messages(item.prompt, *_shown(item, first)), prompts.ALPACAEVAL_REQUEST)
                for first in _orders(cfg, item)]
    if protocol == "arena":
        return [(prompts.arena_messages(item.prompt, *_shown(item, first)), {}) for first in _orders(cfg, item)]
    return [(_user(_pairwise_text(cfg, item, first)), {}) for first in _orders(cfg, item)]


def _winner(verdict: str | None, cand_first: bool) -> str | None:
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    return CANDIDATE if (verdict == "A") == cand_first else BASELINE


def _combine(judgments: list[dict]) -> str:
    """win / loss / tie / unparseable for the candidate; orders that disagree make a tie, and an
    order the judge never answered is left out."""
    winners = {j["winner"] for j in judgments if j["winner"] is not None}
    if not winners:
        return "unparseable"
    if len(winners) > 1 or winners == {"tie"}:
        return "tie"
    return "win" if winners == {CANDIDATE} else "loss"


def _judge_pairwise(cfg: Config, client: Client, item: Item) -> dict:
    parse = lambda reply: prompts.parse_pairwise(cfg.judge.task, reply.text)  # noqa: E731
    reask = prompts.reask(cfg.judge.task, "pairwise")
    judgments = []
    for cand_first, (messages, extra) in zip(_orders(cfg, item), _questions(cfg, item)):
        verdict, turns = _ask(client, messages, parse, reask, extra)
        judgments.append({"order": _order(cand_first), "verdict": verdict, "winner": _winner(verdict, cand_first),
                          "turns": turns})
    return {"result": _combine(judgments), "judgments": judgments}


def _identifier_preference(reply: Reply) -> dict | None:
    """P(output_1 is better) from one AlpacaEval answer: P("m") / (P("m") + P("M")) from the first
    token's log-probabilities, else the sampled identifier (1 for "m", 0 for "M"), else None."""
    logps = prompts.identifier_logprobs(reply.raw)
    if logps is not None:
        top = max(logps.values())  # finite: identifier_logprobs gives at least one
        m, big_m = (math.exp(logps[t] - top) for t in prompts.ALPACAEVAL_IDS)
        shown = {t: (v if v > float("-inf") else None) for t, v in logps.items()}  # JSON has no -inf
        return {"p_output_1": m / (m + big_m), "source": "logprobs", "logprobs": shown}
    token = prompts.parse_identifier(reply.text)
    if token is None:
        return None
    return {"p_output_1": 1.0 if token == "m" else 0.0, "source": "sampled_token"}


def _side(preference: float) -> str:
    return CANDIDATE if preference > 0.5 else BASELINE if preference < 0.5 else "tie"


def _judge_alpacaeval(cfg: Config, client: Client, item: Item) -> dict:
    judgments = []
    for cand_first, (messages, extra) in zip(_orders(cfg, item), _questions(cfg, item)):
        found, turns = _ask(client, messages, _identifier_preference, prompts.ALPACAEVAL_REASK, extra)
        judgment = {"order": _order(cand_first), "preference": None, "winner": None, "turns": turns}
        if found is not None:
            p = found.pop("p_output_1")
            preference = p if cand_first else 1.0 - p  # "m" names whichever side was shown first
            judgment.update(found, p_output_1=p, preference=preference, winner=_side(preference))
        judgments.append(judgment)
    answered = [j["preference"] for j in judgments if j["preference"] is not None]
    if not answered:
        return {"result": "unparseable", "judgments": judgments}
    preference = sum(answered) / len(answered)
    return {"result": {CANDIDATE: "win", BASELINE: "loss", "tie": "tie"}[_side(preference)],
            "preference": preference, "judgments": judgments}


ARENA_SIDES = {"A>>B": ("A", True), "A>B": ("A", False), "A=B": ("tie", False), "B>A": ("B", False),
               "B>>A": ("B", True)}


def _judge_arena(cfg: Config, client: Client, item: Item) -> dict:
    judgments = []
    for cand_first, (messages, extra) in zip(_orders(cfg, item), _questions(cfg, item)):
        label, turns = _ask(client, messages, lambda reply: prompts.parse_arena(reply.text), prompts.ARENA_REASK, extra)
        winner, strong = None, False
        if label is not None:
            shown, strong = ARENA_SIDES[label]
            winner = "tie" if shown == "tie" else CANDIDATE if (shown == "A") == cand_first else BASELINE
        judgments.append({"order": _order(cand_first), "verdict": label, "winner": winner, "strong": strong,
                          "turns": turns})
    won, lost = ratings.arena_battles(judgments, "exclude")
    if not any(j["winner"] for j in judgments):
        result = "unparseable"
    else:
        result = "win" if won > lost else "loss" if won < lost else "tie"
    return {"result": result, "judgments": judgments}


def _judge_hc(cfg: Config, client: Client, item: Item) -> dict:
    reask = prompts.reask(cfg.judge.task, "hc")
    scores, judgments = {}, []
    for side, (messages, extra) in zip((CANDIDATE, BASELINE), _questions(cfg, item)):
        scores[side], turns = _ask(client, messages, lambda reply: prompts.parse_hc(reply.text), reask, extra)
        judgments.append({"rated": side, "scores": scores[side], "turns": turns})
    if scores[CANDIDATE] is None or scores[BASELINE] is None:
        return {"result": "unparseable", "judgments": judgments}
    diff = sum(scores[CANDIDATE].values()) - sum(scores[BASELINE].values())
    result = "win" if diff > 0 else "loss" if diff < 0 else "tie"
    return {"result": result, "scores": scores, "judgments": judgments}


def _client(cfg: Config, key: str | None) -> Client:
    j = cfg.judge
    return Client(j.base_url, j.judge, key, Cache(j.cache_dir), timeout=j.timeout, max_retries=j.max_retries,
                  temperature=j.temperature, max_tokens=max_tokens(cfg), budget=Budget(j.max_cost_usd),
                  concurrency=j.concurrency)


def max_tokens(cfg: Config) -> int:
    """judge.max_tokens, or the protocol's default: Arena-Hard-Auto's 4096 (the judge writes its own
    answer before the verdict), else 256. AlpacaEval asks for one token whatever this is."""
    if cfg.judge.max_tokens is not None:
        return cfg.judge.max_tokens
    return prompts.ARENA_MAX_TOKENS if cfg.judge.protocol == "arena" else DEFAULT_MAX_TOKENS


def _judge_api(cfg: Config, items: list[Item]) -> tuple[list[dict], Client]:
    j = cfg.judge
    key = os.environ.get(j.api_key_env) or None
    if key is None and "api.openai.com" in j.base_url:
        raise UsageError(f"no API key: set ${j.api_key_env} (or name another variable with --api-key-env)")
    client = _client(cfg, key)
    one = {"hc": _judge_hc, "alpacaeval": _judge_alpacaeval, "arena": _judge_arena}.get(j.protocol, _judge_pairwise)

    def task(item: Item) -> dict:
        try:
            return one(cfg, client, item)
        except BudgetExhausted:  # answers already cached stay cached; a rerun with more budget resumes
            return {"result": "not_judged"}

    pool = ThreadPoolExecutor(max_workers=j.concurrency)
    try:
        futures = [pool.submit(task, item) for item in items]
        with Progress("trcli judge", len(items)) as progress:
            for future in as_completed(futures):
                future.result()  # the first error stops the run
                progress.advance()
        annotations = [f.result() for f in futures]
    finally:  # after an error (a 401, retries run out) the items not yet started are not asked
        pool.shutdown(wait=True, cancel_futures=True)
        client.close()
    _report_damaged(client)
    return annotations, client


def _report_damaged(client: Client, dry_run: bool = False) -> None:
    n = len(client.cache.damaged)
    if n:
        then = "counted as requests" if dry_run else "asked again and rewritten"
        print(f"trcli judge: warning: {n} damaged cache entr{'y' if n == 1 else 'ies'} under {client.cache.dir} "
              f"(cut short, or not a chat completion) ignored: {then}", file=sys.stderr)


# ---------------------------------------------------------------- local judges

def _judge_rm(cfg: Config, path: str, items: list[Item]) -> list[dict]:
    from trcli.judge.local import RewardJudge
    from trcli.modeling import pick_device

    rm = RewardJudge(path, pick_device(cfg.train.device))
    prompts_ = [i.prompt for i in items]
    with Progress("trcli judge", 2 * len(items), "completions") as progress:
        cand = rm.scores(prompts_, [i.candidate["completion"] for i in items], progress.advance)
        base = rm.scores(prompts_, [i.baseline["completion"] for i in items], progress.advance)
    return [{"result": "win" if c > b else "loss" if c < b else "tie", "scores": {CANDIDATE: c, BASELINE: b}}
            for c, b in zip(cand, base)]


def _judge_hf(cfg: Config, path: str, items: list[Item]) -> list[dict]:
    from trcli.judge.local import LMJudge
    from trcli.modeling import pick_device

    lm = LMJudge(path, pick_device(cfg.train.device), cfg.judge.task)
    annotations = []
    with Progress("trcli judge", len(items)) as progress:
        for item in items:
            judgments = []
            for cand_first in _orders(cfg, item):
                gap = lm.logit_gap(_pairwise_text(cfg, item, cand_first))
                verdict = "A" if gap > 0 else "B" if gap < 0 else "tie"
                judgments.append({"order": [CANDIDATE, BASELINE] if cand_first else [BASELINE, CANDIDATE],
                                  "verdict": verdict, "winner": _winner(verdict, cand_first), "logp_a_minus_b": gap})
            annotations.append({"result": _combine(judgments), "judgments": judgments})
            progress.advance()
    return annotations


# ---------------------------------------------------------------- summary

def _turns(annotations: list[dict]) -> list[dict]:
    return [t for a in annotations for j in a.get("judgments", []) for t in j.get("turns", [])]


def _criteria(cfg: Config, annotations: list[dict]) -> dict:
    """hc: per-criterion means of each side and the paired difference with its bootstrap CI."""
    rated = [a["scores"] for a in annotations if a["result"] in OUTCOME]
    out = {}
    for criterion in prompts.CRITERIA:
        cand = [s[CANDIDATE][criterion] for s in rated]
        base = [s[BASELINE][criterion] for s in rated]
        diffs = [c - b for c, b in zip(cand, base)]
        out[criterion] = {
            CANDIDATE: stats.win_rate(cand), BASELINE: stats.win_rate(base),  # plain means
            "diff": stats.win_rate(diffs), "diff_ci95": stats.bootstrap_ci(diffs, cfg.judge.bootstrap, cfg.judge.seed),
        }
    return out


def _chars(record: dict) -> int:
    """A completion's length in characters, as the judge is shown it (alpaca_eval counts characters)."""
    return len(record["completion"].strip())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _alpacaeval_summary(cfg: Config, items: list[Item], annotations: list[dict]) -> dict:
    """Where the preferences came from, and the length-controlled win rate with its interval."""
    j = cfg.judge
    scored = [(i, a) for i, a in zip(items, annotations) if a["outcome"] is not None]
    deltas = [_chars(i.candidate) - _chars(i.baseline) for i, _ in scored]
    preferences = [a["outcome"] for _, a in scored]
    sources = Counter(x.get("source") for a in annotations for x in a.get("judgments", []) if x.get("source"))
    out: dict = {
        "preference_source": {"logprobs": sources["logprobs"], "sampled_token": sources["sampled_token"]},
        "mean_chars": {CANDIDATE: _mean([_chars(i.candidate) for i in items]),
                       BASELINE: _mean([_chars(i.baseline) for i in items])},
        "lc_win_rate": None, "lc_ci95": None,
    }
    if sources["sampled_token"]:
        out["preference_note"] = (
            f"{sources['sampled_token']} of {sum(sources.values())} answers came without usable logprobs for the "
            f"identifiers: their preference is the sampled identifier, 0 or 1 (a discrete preference), not the "
            f"logprob-weighted one")
    if preferences:
        fit = ratings.length_controlled(deltas, preferences)
        out["lc_win_rate"] = fit.pop("lc_win_rate")
        out["lc_ci95"] = ratings.length_controlled_ci(deltas, preferences, j.bootstrap, j.seed)
        out["length_control"] = {
            **fit,
            "model": "logit P(candidate preferred) = intercept + length_slope * tanh((chars_candidate - "
                     "chars_baseline) / length_std_chars); LC win rate = sigmoid(intercept), the length term set to 0",
            "omitted": "the instruction-difficulty term of the published GLM (it needs many models per instruction)",
            "ci_method": "percentile bootstrap over items, length scale and GLM refitted per resample",
        }
    return out


def _perspective(game: dict) -> str:
    """An Arena-Hard game's verdict from the candidate's side."""
    winner = game.get("winner")
    if winner is None:
        return "unparseable"
    if winner == "tie":
        return "tie"
    loser = BASELINE if winner == CANDIDATE else CANDIDATE
    return f"{winner}{'>>' if game.get('strong') else '>'}{loser}"


def _arena_summary(cfg: Config, annotations: list[dict]) -> dict:
    """Arena-Hard scoring: the verdicts, the weighted battles, and the Bradley-Terry win rate of the
    candidate against the anchored baseline with its bootstrap interval over items."""
    j = cfg.judge
    kept = [a["battles"] for a in annotations if a["outcome"] is not None]
    counts = Counter(_perspective(g) for a in annotations for g in a.get("judgments", []))
    labels = [f"{CANDIDATE}>>{BASELINE}", f"{CANDIDATE}>{BASELINE}", "tie", f"{BASELINE}>{CANDIDATE}",
              f"{BASELINE}>>{CANDIDATE}", "unparseable"]
    out: dict = {
        "verdicts": {label: counts[label] for label in labels},
        "battles": {side: sum(b[side] for b in kept) for side in (CANDIDATE, BASELINE)},
        "strong_weight": ratings.STRONG_WEIGHT,
        "ci_method": "percentile bootstrap over items (both games of an item together), Bradley-Terry refitted "
                     "per resample",
        "bradley_terry": None,
    }
    if kept:
        bt = ratings.bt_scores(2, [(1, 0)], [[[b[CANDIDATE], b[BASELINE]]] for b in kept], j.bootstrap, j.seed)
        theta = bt["theta"][1]
        out.update(win_rate=bt["win_rate"][1], ci95=bt["ci95"][1] if bt["ci95"] else None,
                   bradley_terry={"anchor": BASELINE, "theta": theta, "strength_ratio": math.exp(theta)})
    return out


def summarize(cfg: Config, items: list[Item], annotations: list[dict], unmatched: int,
              client: Client | None) -> dict:
    j = cfg.judge
    counts = Counter(a["result"] for a in annotations)
    outcomes = [a["outcome"] for a in annotations if a["outcome"] is not None]
    both = [a for a in annotations if len([x for x in a.get("judgments", []) if x.get("winner")]) == 2]
    turns = _turns(annotations)
    usage = {k: sum(t["usage"].get(k, 0) or 0 for t in turns) for k in ("prompt_tokens", "completion_tokens")}
    both_orders = j.swap or j.protocol == "arena"
    result = {
        "judge": j.judge, "task": j.task, "protocol": j.protocol, "swap": both_orders,
        "prompt_source": prompts.source(j.protocol, j.task),
        "protocol_note": prompts.PROTOCOL_NOTES[j.protocol],
        "win_rate": stats.win_rate(outcomes),
        "ci95": stats.bootstrap_ci(outcomes, j.bootstrap, j.seed),
        "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
        "unparseable": counts["unparseable"], "unparseable_policy": j.unparseable,
        "n": len(outcomes), "items": len(items), "unmatched": unmatched, "not_judged": counts["not_judged"],
        "identical": identical(items), "ci_method": "BCa bootstrap (scipy.stats.bootstrap)",
        # Share of items judged in both orders where both orders picked the same response.
        "position_consistency": (sum(len({x["winner"] for x in a["judgments"]}) == 1 for a in both) / len(both)
                                 if both_orders and both else None),
    }
    if j.protocol == "alpacaeval":
        result.update(_alpacaeval_summary(cfg, items, annotations))
    elif j.protocol == "arena":
        result.update(_arena_summary(cfg, annotations))
    if client is not None:
        judgments = [x for a in annotations for x in a.get("judgments", [])]
        result.update({
            "tokens": {**usage, "total": usage["prompt_tokens"] + usage["completion_tokens"]},
            "cost_usd": cost_usd(j.judge, usage), "spent_usd": client.budget.spent if price(j.judge) else None,
            "requests_sent": client.sent, "cache_hits": sum(t["cached"] for t in turns),
            "retries": sum(t["retries"] for t in turns), "reasked": sum(len(x["turns"]) == 2 for x in judgments),
        })
    if j.protocol == "hc":
        result["criteria"] = _criteria(cfg, annotations)
    sides = {CANDIDATE: [i.candidate for i in items], BASELINE: [i.baseline for i in items]}
    result["diversity"] = {side: stats.diversity([r["completion"] for r in recs], j.seed) for side, recs in sides.items()}
    result["self_bleu_signature"] = f"sacrebleu sentence BLEU / 100, {stats.bleu_signature()}"
    kls = {side: stats.kl(recs) for side, recs in sides.items()}
    if any(kls.values()):
        result["kl"] = kls
    return result


def identical(items: list[Item]) -> int:
    """Items whose candidate and baseline completions are the same text (as the judge is shown them)."""
    return sum(i.candidate["completion"].strip() == i.baseline["completion"].strip() for i in items)


def _warn_identical(items: list[Item]) -> None:
    """One line when all or most pairs compare a text with itself: the same file twice, or the same
    model and seed on both sides. Such items can only come out as ties or as the judge's position bias."""
    same = identical(items)
    if same * 2 > len(items):
        which = "every item" if same == len(items) else f"{same} of {len(items)} items"
        print(f"trcli judge: warning: candidate and baseline completions are identical on {which} "
              f"(the same generations on both sides?); those items measure only the judge's position bias",
              file=sys.stderr)


def _dry_run(cfg: Config, kind: str, items: list[Item], unmatched: int) -> dict:
    """How many requests a real run would send: cached answers are free; re-asks cannot be known."""
    j = cfg.judge
    bodies = {}
    if kind == "api":
        client = _client(cfg, None)  # builds request bodies and reads the cache; sends nothing
        for item in items:
            for messages, extra in _questions(cfg, item):
                body = client.body(messages, **extra)
                bodies[request_key(body)] = body
        cached = sum(client.cached(body) is not None for body in bodies.values())
        client.close()
        _report_damaged(client, dry_run=True)
    else:
        cached = 0
    return {"dry_run": True, "judge": j.judge, "items": len(items), "unmatched": unmatched,
            "requests": len(bodies) - cached, "cached": cached}


# ---------------------------------------------------------------- the stage

def run(cfg: Config) -> dict:
    j = cfg.judge
    if j.combine:
        from trcli.judge import leaderboard

        return leaderboard.run(cfg)
    if not j.candidate or not j.baseline:
        raise UsageError("judge needs --candidate FILE.jsonl and --baseline FILE.jsonl (from `trcli generate`)")
    kind, path = _backend(j.judge)
    if j.protocol != "pairwise" and kind != "api":
        raise UsageError(f"--protocol {j.protocol} needs a judge on an endpoint, not {kind}:PATH")
    if j.protocol == "hc" and j.swap:
        raise UsageError("--swap applies to pairwise judging; --protocol hc rates each response on its own")
    if j.protocol == "alpacaeval" and j.max_tokens is not None:
        raise UsageError("--max-tokens does not apply to --protocol alpacaeval: it asks for one token (the identifier)")
    if j.max_cost_usd is not None and kind == "api" and price(j.judge) is None:
        raise UsageError(f"--max-cost-usd: no price known for model '{j.judge}' (known: {', '.join(PRICES)})")
    if kind == "api":
        check_base_url(j.base_url)
    items, unmatched = match(_read(j.candidate, CANDIDATE), _read(j.baseline, BASELINE))
    if not items:
        raise DataError(f"no candidate record in {j.candidate} matches a baseline record (by id or prompt)")
    if unmatched:
        print(f"trcli judge: warning: {unmatched} candidate record(s) have no baseline and are skipped", file=sys.stderr)
    _warn_identical(items)
    if j.dry_run:
        return _dry_run(cfg, kind, items, unmatched)
    if not cfg.output:
        raise UsageError("judge needs --output DIR for annotations.jsonl and summary.json")

    run_ = Run("judge", cfg.output, cfg)
    run_.add_input("candidate", j.candidate)
    run_.add_input("baseline", j.baseline)
    client = None
    if kind == "rm":
        annotations = _judge_rm(cfg, path, items)
    elif kind == "hf":
        annotations = _judge_hf(cfg, path, items)
    else:
        annotations, client = _judge_api(cfg, items)
    for item, a in zip(items, annotations):
        a.update({"id": item.id, "baseline_id": item.baseline["id"], "outcome": _outcome(cfg, a)})
    result = summarize(cfg, items, annotations, unmatched, client)
    if result.get("preference_note"):
        print(f"trcli judge: warning: {result['preference_note']}", file=sys.stderr)
    if result["not_judged"]:
        print(f"trcli judge: warning: stopped before exceeding --max-cost-usd {j.max_cost_usd}; "
              f"{result['not_judged']} item(s) not judged (rerun with a larger budget to finish)", file=sys.stderr)
    out = Path(cfg.output)
    if client is not None:  # answers were scrubbed as they came; what is written is scrubbed again, whole
        annotations, result = client.scrub.json(annotations), client.scrub.json(result)
    # Written whole and atomically, never appended to: a killed run leaves the previous file (or none)
    # and its answers in the cache, never a torn line.
    write_text(out / "annotations.jsonl", "".join(json.dumps(_ordered(a)) + "\n" for a in annotations))
    result["output"] = str(out)
    write_json(out / "summary.json", result)
    run_.finish(annotations="annotations.jsonl", summary="summary.json", win_rate=result["win_rate"], n=result["n"])
    return result


def _outcome(cfg: Config, a: dict) -> float | None:
    """The item's value in the win rate: 1 / 0.5 / 0 for a win / tie / loss, AlpacaEval's soft
    preference, or for Arena-Hard the share of its weighted battles the candidate won (its battles
    are kept too, for the Bradley-Terry fit); unparseable items per --unparseable."""
    policy = cfg.judge.unparseable
    if a["result"] == "not_judged":
        return None
    if cfg.judge.protocol == "arena":
        won, lost = ratings.arena_battles(a["judgments"], policy)
        a["battles"] = {CANDIDATE: won, BASELINE: lost}
        return won / (won + lost) if won + lost else None
    if a["result"] == "unparseable":
        return UNPARSEABLE[policy]
    if "preference" in a:
        return a["preference"]
    return OUTCOME[a["result"]]


def _ordered(a: dict) -> dict:
    """id first, for people reading the file."""
    head = {k: a[k] for k in ("id", "baseline_id", "result", "outcome")}
    return {**head, **{k: v for k, v in a.items() if k not in head}}


def render(result: dict):
    from rich.console import Group
    from rich.table import Table

    if result.get("dry_run"):
        table = Table(title="judge --dry-run", show_header=False)
        for key in ("judge", "items", "requests", "cached"):
            table.add_row(key, str(result[key]))
        return table
    if "leaderboard" in result:
        from trcli.judge import leaderboard

        return leaderboard.render(result)
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    interval = lambda ci: f"(95% CI {fmt(ci[0]) if ci else '-'} - {fmt(ci[1]) if ci else '-'})"  # noqa: E731
    what = [result["judge"], result["task"], result["protocol"]] if result["protocol"] == "pairwise" else \
        [result["judge"], result["protocol"]]  # --task picks the pairwise prompt only
    main = Table(title=" · ".join(what), show_header=False)
    main.add_row("win rate", f"{fmt(result['win_rate'])}  {interval(result['ci95'])}")
    if result["protocol"] == "alpacaeval":
        main.add_row("length-controlled win rate", f"{fmt(result['lc_win_rate'])}  {interval(result['lc_ci95'])}")
        source = result["preference_source"]
        main.add_row("preference from logprobs / sampled token", f"{source['logprobs']} / {source['sampled_token']}")
    if result["protocol"] == "arena":
        battles = result["battles"]
        main.add_row("battles won (candidate / baseline)", f"{battles[CANDIDATE]:g} / {battles[BASELINE]:g}")
        main.add_row("verdicts", ", ".join(f"{k} {v}" for k, v in result["verdicts"].items()))
    main.add_row("wins / losses / ties", f"{result['wins']} / {result['losses']} / {result['ties']}")
    main.add_row("unparseable", f"{result['unparseable']} ({result['unparseable_policy']})")
    main.add_row("n", f"{result['n']} of {result['items']} items")
    if result["swap"]:
        main.add_row("position consistency", fmt(result["position_consistency"]))
    if "tokens" in result:
        main.add_row("tokens", f"{result['tokens']['total']:,}")
        main.add_row("cost (USD)", fmt(result["cost_usd"], ".4f"))
        main.add_row("requests sent / cache hits / retries",
                     f"{result['requests_sent']} / {result['cache_hits']} / {result['retries']}")
    sides = Table("", CANDIDATE, BASELINE)
    for key in ("distinct_1", "distinct_2", "self_bleu", "mean_words"):
        sides.add_row(key, *(fmt(result["diversity"][s][key]) for s in (CANDIDATE, BASELINE)))
    for key in ("mean", "per_token"):
        if "kl" in result:
            sides.add_row(f"KL {key}", *(fmt((result["kl"][s] or {}).get(key)) for s in (CANDIDATE, BASELINE)))
    for criterion, row in result.get("criteria", {}).items():
        sides.add_row(criterion, fmt(row[CANDIDATE], ".2f"), f"{fmt(row[BASELINE], '.2f')}  (diff {fmt(row['diff'], '+.2f')})")
    return Group(main, sides)


def gate(cfg: Config, result: dict) -> None:
    target = cfg.judge.min_win_rate
    if target is None or result.get("dry_run"):
        return
    rate = result["win_rate"]
    if rate is None or rate < target:
        shown = "n/a (nothing judged)" if rate is None else f"{rate:.3f}"
        raise GateError(f"win rate {shown} is below --min-win-rate {target}")
