"""trcli sweep on the tiny model: the study's bookkeeping (cells, names, skipping, resume, dry run,
the summary) — not its science. Every stage runs for real in child processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ok, run_cli

pytestmark = pytest.mark.slow


def study(tmp_path: Path, sft_run: Path, prep_run: Path, judge_model: Path | None, **grid) -> Path:
    path = tmp_path / "study.yaml"
    body = {
        "from": str(sft_run),
        "set": {"train.max_steps": 2, "train.batch_size": 4, "train.learning_rate": 5e-3, "train.save_steps": 1},
        "grid": grid or {"align.method": ["dpo", "tr-dpo"], "align.alpha": [0.3, 0.7], "align.tau": [1, 2]},
        "generate": {"prompts": str(prep_run), "limit": 3, "max_new_tokens": 6, "score_with": str(sft_run)},
    }
    if judge_model is not None:
        body["judge"] = {"baseline": "from", "judge": f"rm:{judge_model}"}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    from trcli.tiny import build_model

    path = tmp_path_factory.mktemp("rm") / "rm"
    build_model(path, hidden_size=32, layers=2, reward=True, seed=1)
    return path


def test_cells_are_the_grid_without_settings_a_static_method_ignores(tmp_path, sft_run, prep_run):
    from trcli.stages.sweep import cells, load_study

    path = study(tmp_path, sft_run, prep_run, None)
    names = [c["name"] for c in cells(load_study(path), path)]
    # dpo ignores alpha and tau: one cell; tr-dpo: 2 x 2.
    assert names == ["method-dpo", "method-tr-dpo_alpha-0.3_tau-1", "method-tr-dpo_alpha-0.3_tau-2",
                     "method-tr-dpo_alpha-0.7_tau-1", "method-tr-dpo_alpha-0.7_tau-2"]


def test_dry_run_lists_cells_with_their_memory_plans(tmp_path, sft_run, prep_run):
    path = study(tmp_path, sft_run, prep_run, None, **{"align.method": ["dpo", "tr-dpo"], "align.beta": [0.1]})
    out = json.loads(ok("sweep", "-c", path, "-o", tmp_path / "s", "--dry-run", "--json").stdout)
    assert out["cells"] == 2 and all(p["plan"]["plan"]["total"] > 0 for p in out["plans"])
    assert not (tmp_path / "s" / "cells").exists()


def test_sweep_runs_every_cell_judges_it_and_resumes_where_it_stopped(tmp_path, sft_run, prep_run, reward_model):
    path = study(tmp_path, sft_run, prep_run, reward_model, **{"align.method": ["dpo", "tr-dpo"], "align.tau": [1]})
    out = tmp_path / "s"
    cmd = [sys.executable, "-m", "trcli.cli", "sweep", "-c", str(path), "-o", str(out), "--json"]
    # Interrupt the first attempt once the first cell has a checkpoint, then finish with the same command.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(out.glob("cells/*/align/checkpoint-1")):
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    result = json.loads(ok("sweep", "-c", path, "-o", out, "--json").stdout)
    assert result["cells"] == result["completed"] == 2
    for row in result["rows"]:
        cell = out / "cells" / row["cell"]
        assert json.loads((cell / "align" / "trcli-run.json").read_text())["status"] == "completed"
        assert len((cell / "generations.jsonl").read_text().splitlines()) == 3
        assert 0.0 <= row["win_rate"] <= 1.0 and row["kl_from"] is not None and row["loss"] is not None
    assert (out / "baseline.jsonl").is_file() and json.loads((out / "sweep.json").read_text())["cells"] == 2
    assert (out / "report" / "frontier.png").is_file()  # the figure from the same command
    # The sweep's report: the frontier (a point per judged cell) and the page.
    report = json.loads(ok("report", out, "-o", tmp_path / "report", "--json").stdout)
    assert report["cells"] == 2 and (tmp_path / "report" / "frontier.png").stat().st_size > 0
    assert "method-tr-dpo_tau-1" in (tmp_path / "report" / "report.html").read_text()
    # Finished cells are skipped: a rerun trains nothing and writes nothing new.
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/align/policy/*")}
    again = json.loads(ok("sweep", "-c", path, "-o", out, "--json").stdout)
    assert again["rows"] == result["rows"] and again["completed"] == 2
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/align/policy/*")} == before


def test_cells_side_by_side_say_whose_lines_they_are(tmp_path, sft_run, prep_run):
    path = study(tmp_path, sft_run, prep_run, None, **{"align.method": ["dpo", "ipo"]})
    body = yaml.safe_load(path.read_text())
    body["set"]["train.logging_steps"] = 1  # a progress line per step from each cell
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    result = ok("sweep", "-c", path, "-o", tmp_path / "s", "--max-parallel", "2", "--json")
    assert json.loads(result.stdout)["completed"] == 2
    lines = result.stderr.splitlines()
    for cell in ("method-dpo", "method-ipo"):
        steps = [line for line in lines if line.startswith(f"[cell {cell}] trcli align: ")]
        assert [line.split(" steps")[0].rsplit(" ", 1)[-1] for line in steps if ", loss " in line] == ["1/2", "2/2"]
    assert not [line for line in lines if line.startswith("trcli ")], result.stderr  # none without its cell


def test_submitit_launcher_runs_cells_as_jobs(tmp_path, sft_run, prep_run):
    pytest.importorskip("submitit")
    path = study(tmp_path, sft_run, prep_run, None, **{"align.method": ["tr-dpo"], "align.alpha": [0.5]})
    result = json.loads(ok("sweep", "-c", path, "-o", tmp_path / "s", "--launcher", "submitit-local", "--json").stdout)
    assert result["completed"] == 1 and (tmp_path / "s" / "submitit").is_dir()


def test_a_bad_study_is_one_line_exit_2(tmp_path, sft_run):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"from": str(sft_run), "grid": {"align.method": ["nope"]}}))
    result = run_cli("sweep", "-c", path, "-o", tmp_path / "s")
    assert result.exit_code == 2 and "align.method" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    path.write_text(yaml.safe_dump({"from": str(sft_run), "grid": {}, "typo": 1}))
    result = run_cli("sweep", "-c", path, "-o", tmp_path / "s")
    assert result.exit_code == 2 and "typo" in result.stderr


def test_sweep_report_draws_alpha_tau_heatmaps(tmp_path):
    """The heatmap from a sweep's own files (sweep.json and judge summaries as trcli writes them)."""
    from trcli.sweep_report import build

    rows = []
    for alpha in (0.3, 0.7):
        for tau in (1, 8):
            cell = f"method-tr-dpo_alpha-{alpha}_tau-{tau}"
            rows.append({"cell": cell, "method": "tr-dpo", "alpha": alpha, "tau": tau, "beta": 0.1, "status": "completed"})
            summary = tmp_path / "s" / "cells" / cell / "judge" / "summary.json"
            summary.parent.mkdir(parents=True)
            summary.write_text(json.dumps({"win_rate": alpha, "ci95": [alpha - 0.1, alpha + 0.1],
                                           "kl": {"candidate": {"mean": tau / 10}}}))
    rows.append({"cell": "method-dpo", "method": "dpo", "beta": 0.1, "status": "completed"})
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"rows": rows}))
    result = build(tmp_path / "s", tmp_path / "r")
    assert {Path(f).name for f in result["figures"]} == {"frontier.png", "heatmap-tr-dpo.png", "report.html"}
