"""judge: win rate of candidate generations over baseline generations.

Reads two `generate` JSONL files, pairs records by id (else by prompt), asks a judge which
response is better and reports the win rate (ties count half) with a bootstrap 95% CI, plus
diversity of each side and KL(π‖π_ref) when the files carry `generate --score-with` scores.

Judges: a model on an OpenAI-compatible endpoint (the DPO paper's GPT-4 prompts for hh / tldr,
or ours), ``rm:PATH`` (a reward model: higher score wins) or ``hf:PATH`` (a local causal LM
given the same pairwise prompt). The A/B order of each item comes from a seeded hash of its id,
so reruns are identical; ``--swap`` asks both orders and counts a disagreement as a tie.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from trcli.config import Config
from trcli.data.files import RowError, read_jsonl
from trcli.errors import DataError, GateError, UsageError
from trcli.judge import prompts, stats
from trcli.judge.cache import Cache, request_key
from trcli.judge.client import PRICES, Budget, BudgetExhausted, Client, check_base_url, cost_usd, price
from trcli.judge.progress import Progress
from trcli.runs import Run, write_json, write_text

CANDIDATE, BASELINE = "candidate", "baseline"
# Per-item outcome for the candidate; unparseable items follow --unparseable.
OUTCOME = {"win": 1.0, "tie": 0.5, "loss": 0.0}
UNPARSEABLE = {"exclude": None, "tie": 0.5, "loss": 0.0}


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
        row["id"] = str(row.get("id", where.rsplit(":", 1)[1]))
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


def _ask(client: Client, content: str, parse, reask: str):
    """One question, re-asked once (with the bad answer in the conversation) when unparseable."""
    messages = [{"role": "user", "content": content}]
    reply = client.complete(messages)
    turns = [_turn(reply)]
    parsed = parse(reply.text)
    if parsed is None:
        messages += [{"role": "assistant", "content": reply.text}, {"role": "user", "content": reask}]
        reply = client.complete(messages)
        turns.append(_turn(reply))
        parsed = parse(reply.text)
    return parsed, turns


def _orders(cfg: Config, item: Item) -> list[bool]:
    first = candidate_first(cfg.judge.seed, item.id)
    return [first, not first] if cfg.judge.swap else [first]


def _pairwise_text(cfg: Config, item: Item, cand_first: bool) -> str:
    c, b = item.candidate["completion"], item.baseline["completion"]
    a, b = (c, b) if cand_first else (b, c)
    return prompts.pairwise_prompt(cfg.judge.task, item.prompt, a, b)


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
    parse = lambda text: prompts.parse_pairwise(cfg.judge.task, text)  # noqa: E731
    reask = prompts.reask(cfg.judge.task, "pairwise")
    judgments = []
    for cand_first in _orders(cfg, item):
        verdict, turns = _ask(client, _pairwise_text(cfg, item, cand_first), parse, reask)
        judgments.append({"order": [CANDIDATE, BASELINE] if cand_first else [BASELINE, CANDIDATE],
                          "verdict": verdict, "winner": _winner(verdict, cand_first), "turns": turns})
    return {"result": _combine(judgments), "judgments": judgments}


def _judge_hc(cfg: Config, client: Client, item: Item) -> dict:
    reask = prompts.reask(cfg.judge.task, "hc")
    scores, judgments = {}, []
    for side in (CANDIDATE, BASELINE):
        text = prompts.hc_prompt(item.prompt, getattr(item, side)["completion"])
        scores[side], turns = _ask(client, text, prompts.parse_hc, reask)
        judgments.append({"rated": side, "scores": scores[side], "turns": turns})
    if scores[CANDIDATE] is None or scores[BASELINE] is None:
        return {"result": "unparseable", "judgments": judgments}
    diff = sum(scores[CANDIDATE].values()) - sum(scores[BASELINE].values())
    result = "win" if diff > 0 else "loss" if diff < 0 else "tie"
    return {"result": result, "scores": scores, "judgments": judgments}


def _client(cfg: Config, key: str | None) -> Client:
    j = cfg.judge
    return Client(j.base_url, j.judge, key, Cache(j.cache_dir), timeout=j.timeout, max_retries=j.max_retries,
                  temperature=j.temperature, max_tokens=j.max_tokens, budget=Budget(j.max_cost_usd),
                  concurrency=j.concurrency)


def _judge_api(cfg: Config, items: list[Item]) -> tuple[list[dict], Client]:
    j = cfg.judge
    key = os.environ.get(j.api_key_env) or None
    if key is None and "api.openai.com" in j.base_url:
        raise UsageError(f"no API key: set ${j.api_key_env} (or name another variable with --api-key-env)")
    client = _client(cfg, key)
    one = _judge_hc if j.protocol == "hc" else _judge_pairwise

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


def summarize(cfg: Config, items: list[Item], annotations: list[dict], unmatched: int,
              client: Client | None) -> dict:
    j = cfg.judge
    counts = Counter(a["result"] for a in annotations)
    outcomes = [a["outcome"] for a in annotations if a["outcome"] is not None]
    both = [a for a in annotations if len([x for x in a.get("judgments", []) if x.get("winner")]) == 2]
    turns = _turns(annotations)
    usage = {k: sum(t["usage"].get(k, 0) or 0 for t in turns) for k in ("prompt_tokens", "completion_tokens")}
    result = {
        "judge": j.judge, "task": j.task, "protocol": j.protocol, "swap": j.swap,
        "prompt_source": prompts.HC_SOURCE if j.protocol == "hc" else prompts.PAIRWISE[j.task].source,
        "win_rate": stats.win_rate(outcomes),
        "ci95": stats.bootstrap_ci(outcomes, j.bootstrap, j.seed),
        "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
        "unparseable": counts["unparseable"], "unparseable_policy": j.unparseable,
        "n": len(outcomes), "items": len(items), "unmatched": unmatched, "not_judged": counts["not_judged"],
        "identical": identical(items), "ci_method": "BCa bootstrap (scipy.stats.bootstrap)",
        # Share of items judged in both orders where both orders picked the same response.
        "position_consistency": (sum(len({x["winner"] for x in a["judgments"]}) == 1 for a in both) / len(both)
                                 if j.swap and both else None),
    }
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
            if j.protocol == "hc":
                texts = [prompts.hc_prompt(item.prompt, r["completion"]) for r in (item.candidate, item.baseline)]
            else:
                texts = [_pairwise_text(cfg, item, first) for first in _orders(cfg, item)]
            for text in texts:
                body = client.body([{"role": "user", "content": text}])
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
    if not j.candidate or not j.baseline:
        raise UsageError("judge needs --candidate FILE.jsonl and --baseline FILE.jsonl (from `trcli generate`)")
    kind, path = _backend(j.judge)
    if j.protocol == "hc" and kind != "api":
        raise UsageError(f"--protocol hc needs a judge on an endpoint, not {kind}:PATH")
    if j.protocol == "hc" and j.swap:
        raise UsageError("--swap applies to pairwise judging; --protocol hc rates each response on its own")
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
        outcome = OUTCOME.get(a["result"], UNPARSEABLE[j.unparseable] if a["result"] == "unparseable" else None)
        a.update({"id": item.id, "baseline_id": item.baseline["id"], "outcome": outcome})
    result = summarize(cfg, items, annotations, unmatched, client)
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
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    main = Table(title=f"{result['judge']} · {result['task']} · {result['protocol']}", show_header=False)
    ci = result["ci95"]
    main.add_row("win rate", f"{fmt(result['win_rate'])}  (95% CI {fmt(ci[0]) if ci else '-'} - {fmt(ci[1]) if ci else '-'})")
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
