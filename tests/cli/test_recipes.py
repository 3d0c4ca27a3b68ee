"""The paper's recipes are schema-valid, and their memory plans fit the device they name.

(A recipe carries a `# stage:` header line; recipes/toy-overoptimization.yaml belongs to
`trcli toy`, which reads its own keys, and is tested with it.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ok

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
PAPER = [r for r in RECIPES if re.search(r"^# stage: ", r.read_text(), re.M)]


def header(recipe: Path, key: str) -> str:
    return re.search(rf"^# {key}: (\S+)", recipe.read_text(), re.M).group(1)


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.name)
def test_recipe_is_schema_valid(recipe):
    resolved = json.loads(ok("config", "show", "-c", recipe, "--json").stdout)
    assert resolved["model"]["name_or_path"]


def test_the_paper_settings_are_covered():
    names = {p.stem for p in PAPER}
    for size in ("410m", "1.4b", "2.8b", "6.9b", "12b"):
        for data in ("hh", "tldr"):
            assert {f"pythia-{size}-{data}-sft", f"pythia-{size}-{data}-align"} <= names
    assert {"llama-3-8b-ultrachat-sft", "llama-3-8b-ultrafeedback-align"} <= names


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.name)
def test_recipe_states_its_command_and_fits_its_device(recipe):
    text = recipe.read_text()
    stage, device = header(recipe, "stage"), header(recipe, "device-memory")
    assert f"trcli {stage} -c recipes/{recipe.name}" in text  # the header says how to run it
    resolved = json.loads(ok("config", "show", "-c", recipe, "--json").stdout)
    train = resolved["train"]
    assert train["batch_size"] * train["grad_accum"] == 64 and train["epochs"] == 1
    assert train["max_grad_norm"] == 2.0 and train["warmup_steps"] == 100 and resolved["data"]["max_length"] == 1024
    if stage == "align":
        assert resolved["align"]["beta"] == 0.05 and resolved["align"]["alpha"] == 0.6
        if not resolved["model"]["lora"]:
            assert train["learning_rate"] == 1e-6
    plan = json.loads(ok(stage, "-c", recipe, "--dry-run", "--device-memory", device, "--json").stdout)["plan"]
    assert plan["fits"] is True, f"{recipe.name}: {plan['total'] / 2**30:.1f} GiB on {device}"
    peak = re.search(r"^# Expected peak: ([0-9.]+) GiB", text, re.M)
    assert peak and float(peak.group(1)) == pytest.approx(plan["total"] / 2**30, abs=0.05)
