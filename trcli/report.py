"""`trcli report`: PNG plots and one self-contained HTML page from run directories.

Training runs (metrics.jsonl) give one plot per curve with every run overlaid and the steps
where a run's reference moved drawn as vertical marks; judge runs (summary.json) give win rate
against KL from SFT with 95% CI bars; toy runs contribute their own figure. Partial runs (still
training, a torn last line, keys a run does not log) are plotted as far as they go, and every
thing left out is named on stderr with the reason.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trcli.errors import UsageError
from trcli.runs import MANIFEST, atomic_path, now, read_jsonl_repairing, status, write_json, write_text

# (metric key in metrics.jsonl, file stem, title): one PNG each.
CURVES = [
    ("loss", "loss", "loss"),
    ("rewards/margins", "reward_margins", "reward margin (chosen - rejected)"),
    ("rewards/accuracies", "reward_accuracies", "reward accuracy"),
    ("kl/ref", "kl_ref", "KL to the current reference"),
    ("kl/init", "kl_init", "KL to the initial reference (SFT)"),
    ("grad_norm", "grad_norm", "gradient norm"),
]


@dataclass
class RunData:
    path: Path
    label: str
    stage: str
    status: str
    rows: list[dict] = field(default_factory=list)
    summary: dict | None = None


def _log(msg: str) -> None:
    print(f"trcli report: {msg}", file=sys.stderr, flush=True)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_metrics(path: Path, skipped: list[str]) -> list[dict]:
    """Rows of metrics.jsonl that parse; a torn or bad line is reported and left out (the file is
    the run's: a reader never repairs it)."""
    rows = read_jsonl_repairing(path, repair=False, warn=skipped.append, strict=False)
    return [row for row in rows if "event" not in row and _number(row.get("step")) is not None]


def load_run(path: Path, skipped: list[str]) -> RunData | None:
    """A training, judge or toy run; None (with the reason in ``skipped``) if nothing to plot."""
    if not path.is_dir():
        raise UsageError(f"{path}: no such run directory")
    manifest: dict = {}
    if (path / MANIFEST).is_file():
        try:
            manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            skipped.append(f"{path / MANIFEST}: not valid JSON (still being written?); reading the run without it")
    state = status(path, manifest)  # "died": the manifest says running but no process holds the run's lock
    run = RunData(path, path.name, manifest.get("stage", "?"), "died while running" if state == "died" else state)
    if (path / "metrics.jsonl").is_file():
        run.rows = read_metrics(path / "metrics.jsonl", skipped)
        if not run.rows:
            skipped.append(f"{path}: metrics.jsonl has no complete logging step yet")
            return None
        return run
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            skipped.append(f"{path}/summary.json: not valid JSON")
            return None
        if run.stage == "toy" or (path / "toy.png").is_file():
            run.stage, run.summary = "toy", summary
            return run
        if _number(summary.get("win_rate")) is not None:
            run.stage, run.summary = "judge", summary
            return run
        skipped.append(f"{path}/summary.json: no win_rate")
        return None
    what = f"a {run.stage} run ({run.status})" if manifest else "not a trcli run"
    skipped.append(f"{path}: {what} with neither metrics.jsonl nor summary.json, nothing to plot")
    return None


def unique_labels(runs: list[RunData]) -> None:
    """Directory names, prefixed by the parent's where two runs share a name."""
    names = [r.path.name for r in runs]
    for run in runs:
        if names.count(run.path.name) > 1:
            run.label = f"{run.path.resolve().parent.name}/{run.path.name}"


def reference_updates(rows: list[dict]) -> list[float]:
    """Logged steps at which the cumulative ``ref_updates`` count went up. With
    logging_steps > 1 the mark sits at the first logged step after the update."""
    marks, last = [], 0.0
    for row in rows:
        count = _number(row.get("ref_updates"))
        if count is not None:
            if count > last:
                marks.append(float(row["step"]))
            last = count
    return marks


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def plot_curve(runs: list[RunData], key: str, title: str, path: Path, skipped: list[str]) -> bool:
    """One metric, every run that logs it overlaid; False if no run does."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    drawn = 0
    for run in runs:
        points = [(float(r["step"]), _number(r.get(key))) for r in run.rows]
        points = [(s, v) for s, v in points if v is not None]
        if not points:
            skipped.append(f"{run.label}: does not log '{key}', left out of {path.name}")
            continue
        line, = ax.plot(*zip(*points), marker="." if len(points) < 20 else None,
                        label=f"{run.label}" + ("" if run.status == "completed" else f" ({run.status})"))
        for i, step in enumerate(reference_updates(run.rows)):
            ax.axvline(step, color=line.get_color(), alpha=0.35, linestyle=":", linewidth=1,
                       label=f"{run.label}: reference update" if i == 0 else None)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def judge_point(summary: dict) -> tuple[float | None, float, tuple[float, float] | None]:
    """(KL of the candidate from SFT, win rate, CI) from a judge summary; KL and CI may be absent.
    `trcli judge` writes summary.kl.candidate.mean (from `generate --score-with`)."""
    kl = (summary.get("kl") or {}).get("candidate") or {}
    kl = kl.get("mean") if isinstance(kl, dict) else None
    ci = summary.get("ci95")
    ci = (float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 \
        and all(_number(c) is not None for c in ci) else None
    return _number(kl), float(summary["win_rate"]), ci


def plot_win_rate(runs: list[RunData], path: Path, skipped: list[str]) -> bool:
    """The paper's quality-vs-KL figure: win rate against KL from SFT, with 95% CI bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    drawn = 0
    for run in runs:
        kl, rate, ci = judge_point(run.summary)
        if kl is None:
            skipped.append(f"{run.label}: judge summary has no KL from SFT, left out of {path.name}")
            continue
        yerr = [[rate - ci[0]], [ci[1] - rate]] if ci else None
        ax.errorbar([kl], [rate], yerr=yerr, fmt="o", capsize=4, label=run.label)
        if ci is None:
            skipped.append(f"{run.label}: judge summary has no ci95, plotted without a bar")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("KL(policy ‖ SFT)")
    ax.set_ylabel("win rate")
    ax.set_title("win rate against KL from SFT (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _run_row(run: RunData) -> str:
    if run.rows:
        what = f"{len(run.rows)} logged steps, last step {int(run.rows[-1]['step'])}"
    elif run.stage == "judge":
        kl, rate, ci = judge_point(run.summary)
        what = f"win rate {rate:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") \
            + (f", KL {kl:.3f}" if kl is not None else "") + (f", n {run.summary['n']}" if "n" in run.summary else "")
    else:
        what = "toy experiment"
    cells = (run.label, run.stage, run.status, what, str(run.path))
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def write_html(path: Path, runs: list[RunData], figures: list[tuple[Path, str]], skipped: list[str]) -> None:
    """One page, images inlined as base64 so it can be mailed or archived on its own."""
    skipped_html = "".join(f"<li>{html.escape(s)}</li>" for s in skipped) or "<li>nothing</li>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trcli report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style>
</head><body>
<h1>trcli report</h1>
<p>Generated {html.escape(now())}.</p>
<h2>Runs</h2>
<table><tr><th>run</th><th>stage</th><th>status</th><th>contents</th><th>path</th></tr>
{''.join(_run_row(r) for r in runs)}
</table>
<h2>Plots</h2>
{''.join(_img(p, title) for p, title in figures)}
<h2>Left out</h2>
<ul>{skipped_html}</ul>
</body></html>
"""
    write_text(path, page)


def build(run_dirs: list[str | Path], output: str | Path) -> dict:
    """Read the runs, write the PNGs and report.html into ``output``; return what was written."""
    output = Path(output)
    skipped: list[str] = []
    runs = [r for r in (load_run(Path(d), skipped) for d in run_dirs) if r is not None]
    if not runs:
        for reason in skipped:
            _log(f"skipped {reason}")
        raise UsageError("nothing to plot in " + ", ".join(str(d) for d in run_dirs))
    unique_labels(runs)
    output.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[Path, str]] = []

    training = [r for r in runs if r.rows]
    for key, stem, title in CURVES if training else []:
        path = output / f"{stem}.png"
        if plot_curve(training, key, title, path, skipped):
            figures.append((path, title))
        else:
            skipped.append(f"plot {stem}.png: no run logs '{key}'")
    judged = [r for r in runs if r.stage == "judge"]
    if judged:
        path = output / "win_rate_vs_kl.png"
        if plot_win_rate(judged, path, skipped):
            figures.append((path, "win rate against KL from SFT"))
        else:
            skipped.append("plot win_rate_vs_kl.png: no judge summary has a KL from SFT")
    for run in runs:
        if run.stage == "toy" and (run.path / "toy.png").is_file():
            path = output / f"toy-{run.label.replace('/', '-')}.png"
            with atomic_path(path) as tmp:
                tmp.write_bytes((run.path / "toy.png").read_bytes())
            figures.append((path, f"{run.label}: toy overoptimization experiment"))

    for reason in skipped:
        _log(f"skipped {reason}")
    write_html(output / "report.html", runs, figures, skipped)
    result = {"html": str(output / "report.html"), "plots": [str(p) for p, _ in figures],
              "runs": [r.label for r in runs], "skipped": skipped}
    write_json(output / "report.json", result)
    return result


def render(result: dict):
    from rich.table import Table

    table = Table(title=f"report: {result['html']}")
    table.add_column("plot")
    for plot in result["plots"]:
        table.add_row(plot)
    if result["skipped"]:
        table.caption = f"{len(result['skipped'])} things left out (see stderr / the page)"
    return table
