"""``trcli judge --combine DIR...``: one Bradley-Terry leaderboard over judge runs that share a
baseline (several models, each judged against the same baseline generations: Arena-Hard's setup).

Each run contributes its items' battles: an Arena-Hard run its weighted battles per item (a strong
verdict counts 3, a tie half to each side), any other protocol its per-item outcome (a win 1, a
tie half, AlpacaEval's soft preference). The baseline is anchored (θ = 0) and each model's score
is its predicted win rate against it, with a percentile bootstrap interval in which the baseline's
prompts are resampled jointly across runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from trcli.config import Config
from trcli.data.files import RowError, read_jsonl
from trcli.errors import DataError, UsageError
from trcli.judge import prompts, ratings
from trcli.runs import Run, read_manifest, status, write_json

CANDIDATE, BASELINE = "candidate", "baseline"
# What runs must have in common to share one leaderboard: summary keys.
SETUP = ("protocol", "judge", "prompt_source", "swap", "unparseable_policy")
BT_NOTE = ("Every model is judged against the same baseline only, so each model's Bradley-Terry score equals its "
           "own battles' win rate against the baseline; the fit puts them on one scale and the bootstrap resamples "
           "the baseline's prompts jointly across runs, so the intervals are those of one leaderboard.")


def _load(directory: str) -> dict:
    path = Path(directory)
    manifest = read_manifest(path)
    if manifest.get("stage") != "judge":
        raise UsageError(f"{directory}: a {manifest.get('stage')} run, not a judge run")
    state = status(path, manifest)
    if state != "completed":
        raise UsageError(f"{directory}: the judge run is {state}, not completed")
    if not (path / "summary.json").is_file() or not (path / "annotations.jsonl").is_file():
        raise UsageError(f"{directory}: no summary.json and annotations.jsonl (a judge run, not a --combine output?)")
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path / 'summary.json'}:{exc.lineno}: not valid JSON") from None
    annotations = []
    for _where, row in read_jsonl(path / "annotations.jsonl"):
        if isinstance(row, RowError):
            raise DataError(str(row))
        annotations.append(row)
    inputs = manifest.get("inputs", {})
    identity = {side: (inputs.get(side) or {}).get("hash") or (inputs.get(side) or {}).get("path")
                for side in (CANDIDATE, BASELINE)}
    return {"dir": directory, "summary": summary, "annotations": annotations, "identity": identity,
            "paths": {side: (inputs.get(side) or {}).get("path") for side in (CANDIDATE, BASELINE)}}


def _battles(run: dict) -> dict[str, tuple[float, float]]:
    """baseline id -> (battles won by the candidate, by the baseline) of one run's items."""
    arena = run["summary"].get("protocol") == "arena"
    out = {}
    for a in run["annotations"]:
        if a.get("outcome") is None:
            continue
        if arena:
            won, lost = a["battles"][CANDIDATE], a["battles"][BASELINE]
        else:
            won, lost = a["outcome"], 1.0 - a["outcome"]
        out[str(a["baseline_id"])] = (float(won), float(lost))
    return out


def combine(directories: list[str], resamples: int, seed: int) -> dict:
    runs = [_load(d) for d in directories]
    first = runs[0]
    for run in runs[1:]:
        for key in SETUP:
            if run["summary"].get(key) != first["summary"].get(key):
                raise UsageError(f"--combine: {run['dir']} and {first['dir']} differ in {key} "
                                 f"({run['summary'].get(key)!r} vs {first['summary'].get(key)!r}): one leaderboard "
                                 f"needs one judging setup")
        if run["identity"][BASELINE] != first["identity"][BASELINE]:
            raise UsageError(f"--combine: {run['dir']} and {first['dir']} have different baselines "
                             f"({run['paths'][BASELINE]} vs {first['paths'][BASELINE]}); a leaderboard needs one baseline")
    seen: dict = {}
    for run in runs:
        if run["identity"][CANDIDATE] in seen:
            raise UsageError(f"--combine: {seen[run['identity'][CANDIDATE]]} and {run['dir']} judged the same "
                             f"candidate generations (one model, one row)")
        seen[run["identity"][CANDIDATE]] = run["dir"]

    battles = [_battles(run) for run in runs]
    ids = sorted({i for b in battles for i in b})
    if not ids:
        raise DataError("--combine: no judged item in any run")
    table = [[list(b.get(i, (0.0, 0.0))) for b in battles] for i in ids]
    pairs = [(r + 1, 0) for r in range(len(runs))]
    fit = ratings.bt_scores(len(runs) + 1, pairs, table, resamples, seed, anchor=0)

    rows = [{"model": "(baseline)", "generations": first["paths"][BASELINE], "win_rate": 0.5,
             "ci95": [0.5, 0.5] if fit["ci95"] else None, "theta": 0.0, "items": len(ids), "battles": None}]
    for r, run in enumerate(runs, start=1):
        won = sum(w for w, _ in battles[r - 1].values())
        lost = sum(lo for _, lo in battles[r - 1].values())
        rows.append({"model": run["dir"], "generations": run["paths"][CANDIDATE], "win_rate": fit["win_rate"][r],
                     "ci95": fit["ci95"][r] if fit["ci95"] else None, "theta": fit["theta"][r],
                     "items": len(battles[r - 1]), "battles": {"won": won, "lost": lost}})
    rows.sort(key=lambda row: -row["win_rate"])
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    summary = first["summary"]
    return {
        "leaderboard": rows, "baseline": first["paths"][BASELINE], "runs": len(runs), "items": len(ids),
        **{key: summary.get(key) for key in SETUP},
        "ci_method": f"percentile bootstrap over the baseline's items ({resamples} resamples, seeded), resampled "
                     f"jointly across runs, Bradley-Terry refitted per resample",
        "bt_note": BT_NOTE,
        "protocol_note": prompts.PROTOCOL_NOTES.get(summary.get("protocol"), ""),
    }


def run(cfg: Config) -> dict:
    j = cfg.judge
    if j.candidate or j.baseline:
        raise UsageError("--combine takes judge run directories, not --candidate / --baseline")
    result = combine(list(j.combine), j.bootstrap, j.seed)
    if cfg.output:
        run_ = Run("judge", cfg.output, cfg)
        for k, directory in enumerate(j.combine):
            run_.add_input(f"run{k}", Path(directory) / "summary.json")
        result["output"] = str(cfg.output)
        write_json(Path(cfg.output) / "leaderboard.json", result)
        run_.finish(leaderboard="leaderboard.json")
    return result


def render(result: dict):
    from rich.table import Table

    fmt = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    table = Table("rank", "model", "win rate vs baseline", "95% CI", "items",
                  title=f"{result['judge']} · {result['protocol']} · Bradley-Terry, baseline {result['baseline']}")
    for row in result["leaderboard"]:
        ci = row["ci95"]
        table.add_row(str(row["rank"]), row["model"], fmt(row["win_rate"]),
                      f"{fmt(ci[0])} - {fmt(ci[1])}" if ci else "-", str(row["items"]))
    return table
