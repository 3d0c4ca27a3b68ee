"""`trcli report` on fixture runs written here: full, partial (running, torn line, missing keys),
judge summaries with and without KL, and a toy run."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from conftest import ok, run_cli
from trcli.report import judge_point, reference_updates

PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
        "logps/rejected", "kl/ref", "kl/init", "grad_norm", "ref_truncation", "tokens_per_s", "lr"]


def manifest(run: Path, stage: str, status: str) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "trcli-run.json").write_text(json.dumps({"stage": stage, "status": status, "config": {}}))


def training_run(run: Path, steps: int, status: str = "completed", drop=(), tau: int | None = None,
                 torn: bool = False) -> None:
    manifest(run, "align", status)
    lines = []
    for step in range(1, steps + 1):
        row = {"step": step, **{k: 0.7 - 0.01 * step + 0.1 * i for i, k in enumerate(KEYS)}}
        row["ref_updates"] = step // tau if tau else 0
        lines.append(json.dumps({k: v for k, v in row.items() if k not in drop}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"step": %d, "loss": 0.' % (steps + 1)  # the writer was mid-line
    (run / "metrics.jsonl").write_text(text)


def judge_run(run: Path, summary: dict) -> None:
    manifest(run, "judge", "completed")
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    paths = {name: tmp_path / "runs" / name for name in ("dpo", "tr-dpo", "partial", "j-dpo", "j-tr", "j-nokl")}
    training_run(paths["dpo"], 30)
    training_run(paths["tr-dpo"], 30, tau=8)
    training_run(paths["partial"], 3, status="running", drop=("kl/init", "grad_norm"), torn=True)
    judge_run(paths["j-dpo"], {"win_rate": 0.55, "ci95": [0.5, 0.6], "n": 200, "kl": {"candidate": {"mean": 12.0}}})
    judge_run(paths["j-tr"], {"win_rate": 0.62, "ci95": [0.57, 0.67], "n": 200, "kl": {"candidate": {"mean": 20.5, "per_token": 0.4}}})
    judge_run(paths["j-nokl"], {"win_rate": 0.4})
    return paths


def test_report_renders_every_plot_and_embeds_them_in_one_page(tmp_path, runs):
    out = tmp_path / "report"
    result = ok("report", *runs.values(), "-o", out, "--json")
    data = json.loads(result.stdout)
    names = sorted(Path(p).name for p in data["plots"])
    assert names == sorted(["loss.png", "reward_margins.png", "reward_accuracies.png", "kl_ref.png",
                            "kl_init.png", "grad_norm.png", "win_rate_vs_kl.png"])
    page = (out / "report.html").read_text()
    embedded = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]
    assert len(embedded) == len(names)
    for path in data["plots"]:
        blob = Path(path).read_bytes()
        assert blob[:8] == PNG and len(blob) > 5000
        assert blob in embedded  # the page carries the very same images, no external file needed
    assert "<img" in page and 'src="' + str(out) not in page
    assert data["runs"] == ["dpo", "tr-dpo", "partial", "j-dpo", "j-tr", "j-nokl"]


def test_partial_runs_are_plotted_and_what_was_left_out_is_said(tmp_path, runs):
    result = ok("report", runs["partial"], runs["dpo"], runs["j-nokl"], runs["j-dpo"], "-o", tmp_path / "r")
    err = result.stderr
    assert "metrics.jsonl:4: not valid JSON" in err  # the torn last line of the running run
    assert "partial: does not log 'kl/init'" in err and "partial: does not log 'grad_norm'" in err
    assert "j-nokl: judge summary has no KL from SFT" in err
    assert "Traceback" not in err
    page = (tmp_path / "r" / "report.html").read_text()
    assert "running" in page and "3 logged steps, last step 3" in page
    assert "win rate 0.550 [0.500, 0.600], KL 12.000, n 200" in page


def test_a_lone_running_run_with_few_lines_still_gives_curves(tmp_path):
    training_run(tmp_path / "run", 1, status="running", drop=("kl/ref", "kl/init", "grad_norm"))
    data = json.loads(ok("report", tmp_path / "run", "-o", tmp_path / "r", "--json").stdout)
    assert sorted(Path(p).name for p in data["plots"]) == ["loss.png", "reward_accuracies.png", "reward_margins.png"]
    assert any("no run logs 'kl/ref'" in s for s in data["skipped"])


def test_reference_update_marks_are_where_the_count_rises():
    rows = [{"step": s, "ref_updates": n} for s, n in [(2, 0), (4, 0), (6, 1), (8, 1), (10, 3), (12, 3)]]
    assert reference_updates(rows) == [6.0, 10.0]
    assert reference_updates([{"step": 5, "ref_updates": 2}, {"step": 10}]) == [5.0]  # first row already moved
    assert reference_updates([{"step": 1, "loss": 0.5}]) == []


@pytest.mark.parametrize("summary,expected", [
    ({"win_rate": 0.6, "ci95": [0.5, 0.7], "kl": {"candidate": {"mean": 3.0}}}, (3.0, 0.6, (0.5, 0.7))),
    ({"win_rate": 0.6, "kl": {"candidate": {"mean": 4.0}, "baseline": {"mean": 1.0}}, "ci95": [0.5]}, (4.0, 0.6, None)),
    ({"win_rate": 0.6, "kl": {"candidate": None, "baseline": {"mean": 1.0}}}, (None, 0.6, None)),
    ({"win_rate": 0.6}, (None, 0.6, None)),
])
def test_judge_summaries_missing_fields_are_tolerated(summary, expected):
    assert judge_point(summary) == expected


def test_toy_run_figure_is_included(tmp_path):
    run = tmp_path / "toy"
    manifest(run, "toy", "completed")
    training_png = tmp_path / "seed"
    training_run(training_png, 5)
    ok("report", training_png, "-o", tmp_path / "seedreport")  # any real PNG will do as the toy's figure
    (run / "toy.png").write_bytes((tmp_path / "seedreport" / "loss.png").read_bytes())
    (run / "summary.json").write_text(json.dumps({"methods": {}}))
    data = json.loads(ok("report", run, "-o", tmp_path / "r", "--json").stdout)
    assert [Path(p).name for p in data["plots"]] == ["toy-toy.png"]
    assert (tmp_path / "r" / "toy-toy.png").read_bytes() == (run / "toy.png").read_bytes()


def test_nothing_to_plot_and_missing_paths_exit_2(tmp_path):
    manifest(tmp_path / "empty", "align", "running")
    result = run_cli("report", tmp_path / "empty", "-o", tmp_path / "r")
    assert result.exit_code == 2 and "nothing to plot" in result.stderr
    assert "neither metrics.jsonl nor summary.json" in result.stderr
    assert not (tmp_path / "r" / "report.html").exists()
    result = run_cli("report", tmp_path / "nope", "-o", tmp_path / "r")
    assert result.exit_code == 2 and "nope: no such run directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_shows_an_example():
    assert "Example: trcli report" in ok("report", "--help").stdout


def aligned(run: Path, method: str, loss: float, kl: float, steps: int = 10, **align) -> None:
    """A run as `trcli align` / `sft` writes it: the manifest's config and final steps, metrics at a level."""
    stage = "sft" if method == "sft" else "align"
    run.mkdir(parents=True)
    config = {"train": {"learning_rate": 5e-6}, **({"align": {"method": method, "beta": 0.1, **align}}
                                                  if stage == "align" else {})}
    (run / "trcli-run.json").write_text(json.dumps({"stage": stage, "status": "completed", "config": config,
                                                    "outputs": {"final": {"steps": steps}}}))
    rows = [{"step": s, "loss": loss * (1 - 0.02 * s)} for s in range(1, steps + 1)]
    for row in rows if stage == "align" else []:  # SFT logs its loss only
        s = row["step"]
        row.update({"kl/init": kl * s / steps, "rewards/margins": kl * (s - 3),
                    "ref_updates": s if "tr-" in method else 0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def captured_figures(monkeypatch) -> dict[str, object]:
    from trcli import report

    figures = {}

    def keep(fig, path):  # written as trcli does, and kept open to be inspected
        figures[path.name] = fig
        fig.savefig(path, format="png")

    monkeypatch.setattr(report, "_save", keep)
    return figures


def test_losses_of_different_kinds_get_panels_and_far_apart_runs_a_log_scale(tmp_path, monkeypatch):
    """SFT's NLL ~2.6, DPO's 0.69 and IPO's 25 are never on one axis; KL 100x apart goes on a log scale;
    a metric with negative values 10x apart gets a panel per loss family; legends sit outside the axes."""
    aligned(tmp_path / "sft", "sft", 2.6, 0)
    aligned(tmp_path / "dpo", "dpo", 0.69, 20.0)
    aligned(tmp_path / "tr-dpo", "tr-dpo", 0.69, 2.0, update="soft")
    aligned(tmp_path / "ipo", "ipo", 25.0, 0.2)
    figures = captured_figures(monkeypatch)
    ok("report", *(tmp_path / n for n in ("sft", "dpo", "tr-dpo", "ipo")), "-o", tmp_path / "r")
    titles = lambda fig: [ax.get_title() for ax in fig.axes if ax.get_visible()]  # noqa: E731
    loss = figures["loss.png"]
    assert titles(loss) == ["SFT (NLL)", "DPO / TR-DPO", "IPO / TR-IPO"]
    curves = lambda ax: [line for line in ax.get_lines() if line.get_linestyle() != ":"]  # noqa: E731  (not marks)
    assert [len(curves(ax)) for ax in loss.axes if ax.get_visible()] == [1, 2, 1]
    assert sum(line.get_linestyle() == ":" for line in loss.axes[1].get_lines()) == 10  # tr-dpo's updates
    kl = figures["kl_init.png"]
    assert len(titles(kl)) == 1 and kl.axes[0].get_yscale() == "log" and "log scale" in titles(kl)[0]
    assert titles(figures["reward_margins.png"]) == ["DPO / TR-DPO", "IPO / TR-IPO"]
    for fig in figures.values():
        fig.canvas.draw()
        legend = fig.legends[0].get_window_extent()
        assert all(legend.x0 >= ax.get_window_extent().x1 for ax in fig.axes if ax.get_visible())
    styles = sorted(line.get_linestyle() for ax in loss.axes for line in curves(ax))
    assert styles == ["-", "-", "--", "--"]  # dpo and ipo dashed: a static reference


def test_runs_table_and_win_rate_points_say_method_beta_alpha_tau_lr_steps_kl(tmp_path):
    """The table's settings come from each run's manifest (TR defaults resolved); a judge run shows its
    candidate's, found through its generations' `model`; a CI that excludes the estimate still plots."""
    aligned(tmp_path / "tr-dpo", "tr-dpo", 0.69, 2.0, update="hard", tau=64)
    aligned(tmp_path / "dpo", "dpo", 0.69, 8.0)
    gens = tmp_path / "gens.jsonl"
    gens.write_text(json.dumps({"id": "0", "completion": "x", "model": str(tmp_path / "tr-dpo")}) + "\n")
    judge = tmp_path / "j-tr-dpo"
    judge.mkdir()
    (judge / "trcli-run.json").write_text(json.dumps({"stage": "judge", "status": "completed",
                                                      "config": {"judge": {"candidate": str(gens)}}}))
    (judge / "summary.json").write_text(json.dumps({"win_rate": 0.6, "ci95": [0.61, 0.7], "n": 50,
                                                    "kl": {"candidate": {"mean": 2.0}}}))
    data = json.loads(ok("report", tmp_path / "tr-dpo", tmp_path / "dpo", judge, "-o", tmp_path / "r", "--json").stdout)
    assert [Path(p).name for p in data["plots"]][0] == "win_rate_vs_kl.png"
    page = (tmp_path / "r" / "report.html").read_text()
    def cells(run: str) -> list[str]:
        return re.findall(r"<td[^>]*>([^<]*)</td>", re.search(rf"<tr><td>{run}</td>.*?</tr>", page).group(0))

    assert cells("tr-dpo")[:9] == ["tr-dpo", "align", "tr-dpo", "0.1", "1", "64", "5e-06", "10", "2"]
    assert cells("dpo")[:9] == ["dpo", "align", "dpo", "0.1", "–", "–", "5e-06", "10", "8"]
    assert cells("j-tr-dpo")[:8] == ["j-tr-dpo", "judge", "tr-dpo", "0.1", "1", "64", "5e-06", "10"]
