"""`trcli report`: PNG plots and one self-contained HTML page from run directories.

Training runs (metrics.jsonl) give one figure per metric family with the steps where a run's
reference moved drawn as vertical marks. Runs share a panel where their values are comparable:
losses of different kinds (SFT's NLL, DPO's, IPO's, KTO's) get a panel each, as does any metric
whose runs lie 10x or more apart; a panel whose positive values still span 10x or more is drawn on
a log scale. Each run keeps its colour in every figure, static-reference methods dashed, and the
legend sits outside the axes. Judge runs (summary.json) give win rate against KL from SFT with 95%
CI bars, each point labelled by its run; toy runs contribute their own figure. The runs table says
each run's method, beta, alpha, tau, learning rate, steps and final KL to the initial reference.
Partial runs (still training, a torn last line, keys a run does not log) are plotted as far as they
go, and every thing left out is named on stderr with the reason.
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


# Loss families: runs whose losses are comparable (a TR method's and its static version's).
FAMILIES = {"sft": "SFT (NLL)", "dpo": "DPO / TR-DPO", "ipo": "IPO / TR-IPO", "kto": "KTO / TR-KTO"}
SPREAD = 10.0  # runs this many times apart get panels of their own; a panel this wide, a log scale


@dataclass
class RunData:
    path: Path
    label: str
    stage: str
    status: str
    rows: list[dict] = field(default_factory=list)
    summary: dict | None = None
    settings: dict = field(default_factory=dict)  # method, beta, alpha, tau, lr, steps (see run_settings)

    @property
    def method(self) -> str | None:
        return self.settings.get("method")

    @property
    def family(self) -> str:
        """The loss family (sft, dpo, ipo, kto), or the stage when the method is unknown."""
        return (self.method or self.stage).removeprefix("tr-")


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
    run = RunData(path, path.name, manifest.get("stage", "?"), "died while running" if state == "died" else state,
                  settings=run_settings(manifest))
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
            run.settings = _candidate_settings(manifest, path) or run.settings
            return run
        skipped.append(f"{path}/summary.json: no win_rate")
        return None
    what = f"a {run.stage} run ({run.status})" if manifest else "not a trcli run"
    skipped.append(f"{path}: {what} with neither metrics.jsonl nor summary.json, nothing to plot")
    return None


def run_settings(manifest: dict) -> dict:
    """What a reader compares runs by, from a run's manifest: method (sft for SFT), beta, alpha and
    tau as the run used them (defaults resolved; None where they do not apply), learning rate and
    steps. Empty for a manifest without a config."""
    config = manifest.get("config") or {}
    stage = manifest.get("stage")
    if not config or stage not in ("sft", "align"):
        return {}
    train = config.get("train") or {}
    final = (manifest.get("outputs") or {}).get("final") or {}
    out = {"method": "sft" if stage == "sft" else None, "beta": None, "alpha": None, "tau": None,
           "lr": train.get("learning_rate"), "steps": final.get("steps")}
    if stage == "align":
        align = config.get("align") or {}
        out.update(method=align.get("method"), beta=align.get("beta"))
        if str(align.get("method", "")).startswith("tr-"):
            try:
                from trcli.config import AlignConfig

                resolved = AlignConfig.model_validate(align)
                out.update(alpha=resolved.resolved_alpha(), tau=resolved.resolved_tau(), update=resolved.update)
            except Exception:  # a manifest of another trcli version: the values as written
                out.update(alpha=align.get("alpha"), tau=align.get("tau"), update=align.get("update"))
    return out


def _find(path: str, bases: list[Path]) -> Path | None:
    """``path`` as written in a manifest: absolute, or relative to the directory the command ran in,
    which was the current one or (likely) an ancestor of the run directory."""
    if Path(path).is_absolute():
        return Path(path) if Path(path).exists() else None
    return next((base / path for base in bases if (base / path).exists()), None)


def _candidate_settings(manifest: dict, run_dir: Path) -> dict:
    """A judge run's candidate policy: the settings of the run its generations came from (their
    ``model`` field names it), when that is a run directory that can be found."""
    candidate = ((manifest.get("config") or {}).get("judge") or {}).get("candidate")
    bases = [Path.cwd(), *run_dir.resolve().parents]
    found = _find(candidate, bases) if candidate else None
    if found is None or not found.is_file():
        return {}
    try:
        with open(found, encoding="utf-8") as fh:
            policy = json.loads(fh.readline()).get("model")
        policy_dir = _find(policy, [base for base in bases if (base / candidate).exists()] or bases)
        policy_manifest = json.loads((policy_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, AttributeError):  # not JSON, no model, not a run directory
        return {}
    return {**run_settings(policy_manifest), "policy": str(policy_dir)}


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


def _spread(values: list[list[float]]) -> float:
    """How far apart groups of values lie (the runs of a metric): the ratio of the largest to the
    smallest median of |v|, zeros left out; 1 when fewer than two groups have a median."""
    medians = []
    for group in values:
        magnitudes = sorted(abs(v) for v in group if v != 0)
        if magnitudes:
            medians.append(magnitudes[len(magnitudes) // 2])
    return max(medians) / min(medians) if len(medians) > 1 else 1.0


def _family_order(family: str) -> tuple:
    return (list(FAMILIES).index(family) if family in FAMILIES else len(FAMILIES), family)


def _panels(key: str, series: list[tuple[RunData, list[tuple[float, float]]]]) -> list[tuple[str, list, bool]]:
    """The panels of one metric as (title, runs' points, log scale). Losses of different kinds (SFT's
    NLL, DPO's, IPO's, KTO's) are never drawn on one axis: a panel per loss family. Any metric whose
    runs lie SPREAD times apart or more goes on a log scale when it is never negative (KL, grad norm),
    else into a panel per loss family; a family panel whose runs still lie that far apart is log-scaled
    if it can be."""
    def log_scale(members) -> bool:
        values = [v for _, pts in members for _, v in pts]
        return min(values) >= 0 and _spread([[v for _, v in pts] for _, pts in members]) >= SPREAD

    families = sorted({run.family for run, _ in series}, key=_family_order)
    apart = _spread([[v for _, v in pts] for _, pts in series]) >= SPREAD
    if len(families) < 2 or (key != "loss" and (not apart or log_scale(series))):
        return [("", series, log_scale(series))]
    panels = []
    for family in families:
        members = [(run, pts) for run, pts in series if run.family == family]
        panels.append((FAMILIES.get(family, family), members, log_scale(members)))
    return panels


def _static(run: RunData) -> bool:
    return run.method in ("dpo", "ipo", "kto")


def _style(run: RunData, colour) -> dict:
    """A run's line: its colour in every figure; static-reference methods (dpo, ipo, kto) dashed."""
    return {"color": colour, "linestyle": "--" if _static(run) else "-", "linewidth": 1.6}


def _colours(runs: list[RunData]) -> dict[str, object]:
    """A colour per run, the same in every figure; a judge run takes its candidate's when that run
    is in the report too. tab10's ten, then tab20's ten lighter ones."""
    plt = _pyplot()
    palette = [plt.get_cmap("tab10")(i) for i in range(10)] + [plt.get_cmap("tab20")(2 * i + 1) for i in range(10)]
    by_path = {str(run.path.resolve()): run.label for run in runs}
    colours: dict[str, object] = {}
    for run in runs:
        policy = run.settings.get("policy")
        own = by_path.get(str(Path(policy).resolve())) if policy else None
        colours[run.label] = colours.get(own) or palette[len(set(map(str, colours.values()))) % len(palette)]
    return colours


def _legend_label(run: RunData) -> str:
    label = run.label + ("" if run.status == "completed" else f" ({run.status})")
    if run.method and run.method != run.label:
        label += f" [{run.method}]"
    return label


def _plain_log_ticks(axis) -> None:
    """Tick labels on a log axis as plain numbers (0.1, 2, 30), not 2×10^0."""
    from matplotlib.ticker import FuncFormatter

    def minor(value: float, _) -> str:  # 2 and 5 of each decade labelled, the others left bare
        leading = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        return f"{value:g}" if leading in (2, 5) else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


MAX_MARKS = 30  # a run whose reference moved more often (soft updates every step) gets no marks


def plot_curve(runs: list[RunData], key: str, title: str, path: Path, skipped: list[str],
               colours: dict | None = None) -> bool:
    """One metric: every run that logs it, in one panel or one per loss family (_panels), the legend
    outside the axes; False if no run logs it."""
    from matplotlib.lines import Line2D

    series = []
    for run in runs:
        points = [(float(r["step"]), _number(r.get(key))) for r in run.rows]
        points = [(s, v) for s, v in points if v is not None]
        if not points:
            skipped.append(f"{run.label}: does not log '{key}', left out of {path.name}")
            continue
        series.append((run, points))
    if not series:
        return False
    colours = colours or _colours(runs)
    panels = _panels(key, series)
    columns = min(len(panels), 2)  # two across at most: the page stays readable at its width
    rows = -(-len(panels) // columns)
    plt = _pyplot()
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns + 3.0, 3.3 * rows + 0.5), squeeze=False,
                             layout="constrained")
    handles, marked = {}, False
    for ax, (name, members, log) in zip(axes.flat, panels):
        for run, points in members:
            line, = ax.plot(*zip(*points), marker="." if len(points) < 20 else None, **_style(run, colours[run.label]))
            label = _legend_label(run)
            marks = reference_updates(run.rows)
            if len(marks) > MAX_MARKS:
                moved = max((_number(r.get("ref_updates")) or 0 for r in run.rows), default=0)
                label += f", reference moved {int(moved)}x"
            else:
                for step in marks:
                    ax.axvline(step, color=line.get_color(), alpha=0.45, linestyle=":", linewidth=1)
                marked = marked or bool(marks)
            handles[label] = line
        if log:
            ax.set_yscale("log")
            _plain_log_ticks(ax.yaxis)
            zeros = any(v == 0 for _, pts in members for _, v in pts)
            name = f"{name or title}, log scale" + ("; zeros not drawn" if zeros else "")
        ax.set_title(name or title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if len(panels) > 1:
        fig.suptitle(title)
    if marked:
        handles["reference update (dotted, the run's colour)"] = Line2D([], [], color="grey", linestyle=":")
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False)
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


def plot_win_rate(runs: list[RunData], path: Path, skipped: list[str], colours: dict | None = None) -> bool:
    """The paper's quality-vs-KL figure: win rate against KL from SFT, with 95% CI bars, each point
    labelled by its run (and its candidate's method when known); static methods as squares."""
    plt = _pyplot()
    colours = colours or _colours(runs)
    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    drawn = []
    for run in runs:
        kl, rate, ci = judge_point(run.summary)
        if kl is None:
            skipped.append(f"{run.label}: judge summary has no KL from SFT, left out of {path.name}")
            continue
        # A BCa interval need not contain the point estimate: a bar never extends below zero length.
        yerr = [[max(0.0, rate - ci[0])], [max(0.0, ci[1] - rate)]] if ci else None
        ax.errorbar([kl], [rate], yerr=yerr, fmt="s" if _static(run) else "o", capsize=4, color=colours[run.label],
                    label=_legend_label(run) + (f" {rate:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")))
        if ci is None:
            skipped.append(f"{run.label}: judge summary has no ci95, plotted without a bar")
        drawn.append((run.label, kl, rate))
    if not drawn:
        plt.close(fig)
        return False
    if min(kl for _, kl, _ in drawn) > 0 and _spread([[kl] for _, kl, _ in drawn]) >= SPREAD:
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
    _label_points(ax, drawn)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("KL(policy ‖ SFT)" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel("win rate against the baseline")
    ax.set_title("win rate against KL from SFT (95% CI)")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    _save(fig, path)
    return True


def _label_points(ax, points: list[tuple[str, float, float]]) -> None:
    """Each point's run name beside it; a name that would overlap one already placed moves down a line."""
    ax.margins(x=0.12)  # room for the names of the outermost points
    ax.autoscale_view()
    scale = 72 / ax.figure.dpi  # display pixels -> points
    placed: list[tuple[float, float, float, float]] = []
    for label, x, y in sorted(points, key=lambda p: (p[1], -p[2])):
        px, py = (v * scale for v in ax.transData.transform((x, y)))
        width, height, dy = 5.0 * len(label), 10.0, 4.0
        box = lambda dy: (px + 6, py + dy, px + 6 + width, py + dy + height)  # noqa: E731
        while any(not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]) for b in placed for a in [box(dy)]):
            dy -= height + 1
        placed.append(box(dy))
        ax.annotate(label, (x, y), fontsize=8, xytext=(6, dy), textcoords="offset points")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _final(run: RunData, key: str) -> float | None:
    """The last logged value of ``key``, or for a judge run the candidate's KL from SFT."""
    for row in reversed(run.rows):
        if (value := _number(row.get(key))) is not None:
            return value
    return None


def _cell(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _run_row(run: RunData) -> str:
    if run.rows:
        what = f"{len(run.rows)} logged steps, last step {int(run.rows[-1]['step'])}"
    elif run.stage == "judge":
        kl, rate, ci = judge_point(run.summary)
        what = f"win rate {rate:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") \
            + (f", KL {kl:.3f}" if kl is not None else "") + (f", n {run.summary['n']}" if "n" in run.summary else "")
    else:
        what = "toy experiment"
    info = run.settings
    steps = info.get("steps") or (int(run.rows[-1]["step"]) if run.rows else None)
    kl_init = _final(run, "kl/init") if run.rows else None
    cells = [(run.label, ""), (run.stage, ""), (info.get("method") or "–", ""), (_cell(info.get("beta")), "n"),
             (_cell(info.get("alpha")), "n"), (_cell(info.get("tau")), "n"), (_cell(info.get("lr"), 2), "n"),
             (_cell(steps), "n"), (_cell(kl_init, 4), "n"), (what, ""), (run.status, ""), (str(run.path), "p")]
    return "<tr>" + "".join(f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"
                            for text, cls in cells) + "</tr>"


def write_html(path: Path, runs: list[RunData], figures: list[tuple[Path, str]], skipped: list[str]) -> None:
    """One page, images inlined as base64 so it can be mailed or archived on its own."""
    skipped_html = "".join(f"<li>{html.escape(s)}</li>" for s in skipped) or "<li>nothing</li>"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trcli report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;font-size:14px}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}th{{background:#f3f3f3}}td.n{{text-align:right;
font-variant-numeric:tabular-nums}}td.p{{color:#666;font-size:12px}}img{{max-width:100%}}figure{{margin:1.5em 0}}
figcaption{{color:#555;font-size:13px}}</style>
</head><body>
<h1>trcli report</h1>
<p>Generated {html.escape(now())}.</p>
<h2>Runs</h2>
<p>Methods drawn dashed use a static reference; solid lines are the trust-region methods (and SFT). α and τ
are the reference update's mixing weight and period (TR methods only); kl/init is the last logged KL to the
initial (SFT) reference. A judge run shows its candidate policy's settings.</p>
<table><tr><th>run</th><th>stage</th><th>method</th><th>β</th><th>α</th><th>τ</th><th>lr</th><th>steps</th>
<th>kl/init</th><th>contents</th><th>status</th><th>path</th></tr>
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

    colours = _colours(runs)  # a run keeps its colour in every figure
    judged = [r for r in runs if r.stage == "judge"]
    if judged:  # the headline figure first
        path = output / "win_rate_vs_kl.png"
        if plot_win_rate(judged, path, skipped, colours):
            figures.append((path, "win rate against KL from SFT"))
        else:
            skipped.append("plot win_rate_vs_kl.png: no judge summary has a KL from SFT")
    training = [r for r in runs if r.rows]
    for key, stem, title in CURVES if training else []:
        path = output / f"{stem}.png"
        if plot_curve(training, key, title, path, skipped, colours):
            figures.append((path, title))
        else:
            skipped.append(f"plot {stem}.png: no run logs '{key}'")
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
