"""`trcli toy`: the overoptimization experiment, exact by enumeration, on the shipped recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import ok, run_cli

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "toy-overoptimization.yaml"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("toy") / "run"
    result = json.loads(ok("toy", "--config", RECIPE, "--output", out, "--json").stdout)
    return out, result


def curves(out: Path) -> dict[str, list[dict]]:
    by_method: dict[str, list[dict]] = {}
    for line in (out / "curves.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_method.setdefault(row["method"], []).append(row)
    return by_method


def test_probabilities_are_exact_and_every_method_starts_from_the_same_sft_model(toy_run):
    out, _ = toy_run
    runs = curves(out)
    assert set(runs) == {"dpo", "ipo", "tr-dpo-soft", "tr-dpo-hard", "tr-ipo-soft", "tr-ipo-hard"}
    starts = {m: rows[0] for m, rows in runs.items()}
    for rows in runs.values():
        for row in rows:  # chosen, rejected and never-seen strings partition the whole space
            assert row["p_chosen"] + row["p_rejected"] + row["p_ood"] == pytest.approx(1.0, abs=1e-5)
            assert row["kl_init"] >= -1e-6
        assert rows[0]["kl_init"] == pytest.approx(0.0, abs=1e-6)
        assert rows[0]["p_chosen"] == starts["dpo"]["p_chosen"]
    # SFT put most of the mass on the data's support, but not all of it.
    assert 0.0 < starts["dpo"]["p_ood"] < 0.2


def test_reference_updates_follow_the_schedule(toy_run):
    out, _ = toy_run
    cfg = yaml.safe_load(RECIPE.read_text())["toy"]
    last = {m: rows[-1] for m, rows in curves(out).items()}
    assert last["dpo"]["ref_updates"] == 0 and last["ipo"]["ref_updates"] == 0
    taus = {m["name"]: m.get("tau", 1) for m in cfg["methods"]}
    assert last["tr-dpo-soft"]["ref_updates"] == cfg["steps"]
    for hard in ("tr-dpo-hard", "tr-ipo-hard"):
        assert last[hard]["ref_updates"] == cfg["steps"] // taus[hard]


# What the experiment shows, split by how far it holds. docs/toy.md has the table over seeds 0-15
# of the shipped recipe; the first two tests assert only what held on all 16 seeds, and run on a
# second seed as well (10, the one seed where TR-DPO does worse than DPO) so a seed-lucky claim fails.

@pytest.fixture(scope="module")
def toy_run_seed10(tmp_path_factory) -> dict:
    body = yaml.safe_load(RECIPE.read_text())
    body["toy"]["seed"] = 10
    recipe = tmp_path_factory.mktemp("toy10") / "seed10.yaml"
    recipe.write_text(yaml.safe_dump(body))
    return json.loads(ok("toy", "--config", recipe, "--output", recipe.parent / "run", "--json").stdout)


@pytest.mark.parametrize("which", ["shipped", "seed10"])
def test_static_dpo_moves_mass_out_of_distribution(request, which):
    """Static DPO drives the rejected strings to ~0 and ends with more mass on never-seen strings
    than the SFT start had (16 of 16 seeds; its P(chosen) rises, it does not dip)."""
    result = request.getfixturevalue("toy_run")[1] if which == "shipped" else request.getfixturevalue("toy_run_seed10")
    dpo = result["methods"]["dpo"]
    assert dpo["p_rejected"] < 0.01
    assert dpo["p_ood"] > dpo["start_p_ood"]


@pytest.mark.parametrize("which", ["shipped", "seed10"])
def test_trust_region_ipo_never_ends_worse_than_static_ipo(request, which):
    """TR-IPO (soft and hard) ends with at least static IPO's P(chosen) and at most its OOD mass
    (16 of 16 seeds; often by far more, see the pinned seed below)."""
    result = request.getfixturevalue("toy_run")[1] if which == "shipped" else request.getfixturevalue("toy_run_seed10")
    m = result["methods"]
    for tr in ("tr-ipo-soft", "tr-ipo-hard"):
        assert m[tr]["p_chosen"] >= m["ipo"]["p_chosen"] - 0.01
        assert m[tr]["p_ood"] <= m["ipo"]["p_ood"] + 0.01


def test_shipped_seed_shows_the_papers_claim_for_dpo_and_ipo(toy_run):
    """The shipped run (seed 15, chosen to illustrate), pinned as measured, NOT a claim about every
    seed: TR-DPO soft and
    hard end with more P(chosen) and less OOD mass than static DPO (15 of 16 seeds; seed 10 is the
    exception), and static IPO's P(chosen) collapses onto never-seen strings while TR-IPO keeps it
    (the collapse happens on 4 of 16 seeds: 0, 7, 10, 15). A change here must be written up in
    docs/toy.md."""
    _, result = toy_run
    m = result["methods"]
    for tr in ("tr-dpo-soft", "tr-dpo-hard"):
        assert m[tr]["p_chosen"] > m["dpo"]["p_chosen"] + 0.02
        assert m[tr]["p_ood"] < m["dpo"]["p_ood"] - 0.02
    assert m["ipo"]["min_p_chosen"] < 0.5 * m["ipo"]["start_p_chosen"]
    assert m["ipo"]["p_ood"] > 0.5
    for tr in ("tr-ipo-soft", "tr-ipo-hard"):
        assert m[tr]["p_chosen"] > m["ipo"]["p_chosen"] + 0.5
        assert m[tr]["p_ood"] < m["ipo"]["p_ood"] - 0.5


def test_seed10_is_the_counterexample_for_dpo(toy_run_seed10):
    """Pinned as measured, so docs/toy.md stays true: on seed 10 both TR-DPO runs end with less
    P(chosen) and more OOD mass than static DPO."""
    m = toy_run_seed10["methods"]
    for tr in ("tr-dpo-soft", "tr-dpo-hard"):
        assert m[tr]["p_chosen"] < m["dpo"]["p_chosen"]
        assert m[tr]["p_ood"] > m["dpo"]["p_ood"]


def test_outputs_csv_png_and_manifest(toy_run):
    out, _ = toy_run
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert len(rows) == len((out / "curves.jsonl").read_text().splitlines())
    assert (out / "toy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "trcli-run.json").read_text())
    assert manifest["stage"] == "toy" and manifest["status"] == "completed"
    assert manifest["config"]["pairs"] == 8


def test_a_hard_update_later_than_the_run_is_static_dpo_exactly(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"toy": {"steps": 20, "sft_steps": 20, "logging_steps": 4, "methods": [
        {"name": "dpo", "loss": "dpo"}, {"name": "late", "loss": "dpo", "update": "hard", "tau": 1000},
        {"name": "soft", "loss": "dpo", "update": "soft", "alpha": 0.6}]}}))
    ok("toy", "-c", recipe, "-o", tmp_path / "out", "--json")
    runs = curves(tmp_path / "out")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "method"} for r in rows]  # noqa: E731
    assert strip(runs["late"]) == strip(runs["dpo"])
    assert strip(runs["soft"]) != strip(runs["dpo"])  # ...and the reference update does matter


def test_a_method_beta_overrides_the_toy_beta(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"toy": {"steps": 20, "sft_steps": 20, "logging_steps": 4, "beta": 1.0, "methods": [
        {"name": "inherits", "loss": "dpo"}, {"name": "same", "loss": "dpo", "beta": 1.0},
        {"name": "other", "loss": "dpo", "beta": 0.1}]}}))
    ok("toy", "-c", recipe, "-o", tmp_path / "out", "--json")
    runs = curves(tmp_path / "out")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "method"} for r in rows]  # noqa: E731
    assert strip(runs["inherits"]) == strip(runs["same"])
    assert strip(runs["other"]) != strip(runs["same"])


def test_near_miss_pairs_differ_in_one_symbol():
    from trcli.toy import ToyConfig, make_task

    task = make_task(ToyConfig(pairs=8))
    for c, r in zip(task.chosen.tolist(), task.rejected.tolist()):
        assert int((task.space[c] != task.space[r]).sum()) == 1
    assert len(set(task.chosen.tolist()) | set(task.rejected.tolist())) == 16
    assert int(task.ood.sum()) == 64 - 16


@pytest.mark.parametrize("body,needle", [
    ({"toy": {"bogus": 1}}, "unknown key 'toy.bogus'"),
    ({"toy": {"methods": [{"name": "x", "loss": "kto"}]}}, "'toy.methods.0.loss'"),
    ({"toy": {"pairs": 40}}, "'toy'"),
    ({"toy": {"methods": [{"name": "x", "loss": "dpo", "beta": 0}]}}, "'toy.methods.0.beta'"),
])
def test_bad_toy_config_exits_2_with_one_line(tmp_path, body, needle):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(body))
    result = run_cli("toy", "-c", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.stderr
    assert needle in result.stderr and str(recipe) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_shows_an_example():
    assert "Example: trcli toy" in ok("toy", "--help").stdout
