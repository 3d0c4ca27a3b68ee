"""`trcli report SWEEP_DIR`: a sweep's figures — the quality-vs-KL frontier, α × τ heatmaps, a ranked table.

Reads DIR/sweep.json (what `trcli sweep` wrote) and each cell's judge summary; writes frontier.png,
one heatmap PNG per TR method whose cells vary α and τ, and one self-contained report.html.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from trcli.errors import UsageError
from trcli.report import _img, _pyplot, _save, judge_point
from trcli.runs import now, write_text


def _rows(root: Path) -> list[dict]:
    try:
        rows = json.loads((root / "sweep.json").read_text(encoding="utf-8"))["rows"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"{root}: no readable sweep.json (run `trcli sweep` first)") from None
    for row in rows:
        summary = root / "cells" / row["cell"] / "judge" / "summary.json"
        row["point"] = judge_point(json.loads(summary.read_text(encoding="utf-8"))) if summary.is_file() else None
    return rows


def plot_frontier(rows: list[dict], path: Path) -> bool:
    """Win rate against KL(π‖π_sft), one point per cell with its 95% CI; static methods as squares,
    TR methods as circles, each point labelled by its cell."""
    points = [r for r in rows if r["point"] is not None and r["point"][0] is not None]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    for static in (True, False):
        group = [r for r in points if r["method"].startswith("tr-") != static]
        if not group:
            continue
        kl = [r["point"][0] for r in group]
        rate = [r["point"][1] for r in group]
        # A BCa interval need not contain the point estimate: a bar never extends below zero length.
        err = [[max(0.0, r["point"][1] - r["point"][2][0]) if r["point"][2] else 0 for r in group],
               [max(0.0, r["point"][2][1] - r["point"][1]) if r["point"][2] else 0 for r in group]]
        ax.errorbar(kl, rate, yerr=err, fmt="s" if static else "o", capsize=3,
                    label="static reference" if static else "trust region (moving reference)")
        for r in group:
            ax.annotate(r["cell"], (r["point"][0], r["point"][1]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("KL(policy ‖ SFT) of the generations")
    ax.set_ylabel("win rate against the baseline")
    ax.set_title("quality against KL from SFT, per cell (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)
    return True


def plot_heatmaps(rows: list[dict], out: Path) -> list[tuple[Path, str]]:
    """Win rate over α × τ for each TR method that varies both."""
    made = []
    for method in sorted({r["method"] for r in rows if r["method"].startswith("tr-")}):
        cells = [r for r in rows if r["method"] == method and "alpha" in r and "tau" in r and r["point"]]
        alphas = sorted({r["alpha"] for r in cells})
        taus = sorted({r["tau"] for r in cells})
        if len(alphas) < 2 and len(taus) < 2:
            continue
        grid = [[next((r["point"][1] for r in cells if r["alpha"] == a and r["tau"] == t), float("nan"))
                 for t in taus] for a in alphas]
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(1.4 * len(taus) + 3, 1.0 * len(alphas) + 2), constrained_layout=True)
        image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(taus)), [str(t) for t in taus])
        ax.set_yticks(range(len(alphas)), [str(a) for a in alphas])
        ax.set_xlabel("τ (steps between updates)")
        ax.set_ylabel("α")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                if value == value:
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
        fig.colorbar(image, ax=ax, label="win rate")
        ax.set_title(f"{method}: win rate over α × τ")
        path = out / f"heatmap-{method}.png"
        _save(fig, path)
        made.append((path, f"{method}: win rate over α × τ"))
    return made


def _table(rows: list[dict]) -> str:
    columns = ["cell", "method", "alpha", "tau", "beta", "loss", "kl/init", "win_rate", "kl_from", "status"]
    fmt = lambda v: "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def build(root: str | Path, output: str | Path) -> dict:
    root, out = Path(root), Path(output)
    rows = _rows(root)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if plot_frontier(rows, out / "frontier.png"):
        figures.append((out / "frontier.png", "win rate against KL from SFT, per cell"))
    figures += plot_heatmaps(rows, out)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>trcli sweep report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}img{{max-width:100%}}</style></head><body>
<h1>trcli sweep: {html.escape(str(root))}</h1><p>Generated {html.escape(now())}. Cells ranked by win rate.</p>
{_table(rows)}
{''.join(_img(p, title) for p, title in figures)}
</body></html>
"""
    write_text(out / "report.html", page)
    return {"sweep": str(root), "output": str(out), "cells": len(rows),
            "figures": [str(p) for p, _ in figures] + [str(out / "report.html")]}


def render(result: dict) -> str:
    return "\n".join([f"sweep report for {result['sweep']} ({result['cells']} cells):", *result["figures"]])
