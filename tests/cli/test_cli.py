"""The command line as a citizen of the shell: help, config resolution, exit codes, stdout."""

import json

import pytest
import yaml

from conftest import ok, run_cli

STAGES = ["prep", "sft", "align", "generate", "judge"]


def test_top_level_help_lists_the_five_stages():
    out = ok("--help").stdout
    assert all(stage in out for stage in STAGES)


@pytest.mark.parametrize("command", [[s] for s in STAGES] + [["config", "show"], ["config", "schema"], ["tiny"]])
def test_every_help_shows_a_real_example(command):
    out = ok(*command, "--help").stdout
    assert "Example: trcli " + command[0] in out


def test_config_show_json_is_pure_json_on_stdout():
    data = json.loads(ok("config", "show", "--json").stdout)
    assert set(data) >= {"model", "data", "train", "align", "generate", "judge"}
    assert data["align"]["method"] == "tr-dpo"


def test_precedence_defaults_recipe_environment_flags(tmp_path):
    from trcli.config import load

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"align": {"beta": 0.2, "tau": 7}, "train": {"seed": 1}}))
    env = {"TRCLI_ALIGN__BETA": "0.3", "TRCLI_TRAIN__SEED": "2"}
    cfg = load(recipe, {"train.seed": 3}, environ=env)
    assert (cfg.align.tau, cfg.align.beta, cfg.train.seed) == (7, 0.3, 3)
    assert load(None, {}, environ={}).align.beta == 0.1
    shown = yaml.safe_load(ok("config", "show", "-c", recipe, env=env).stdout)
    assert shown["align"] == {**shown["align"], "beta": 0.3, "tau": 7} and shown["train"]["seed"] == 2


@pytest.mark.parametrize("recipe,needle", [
    ({"align": {"bogus": 1}}, "unknown key 'align.bogus'"),
    ({"trian": {"seed": 1}}, "unknown key 'trian'"),
    ({"train": {"batch_size": 0}}, "'train.batch_size'"),
    ({"align": {"method": "ppo"}}, "'align.method'"),
])
def test_bad_recipe_exits_2_naming_the_key(tmp_path, recipe, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("align", "--config", path)
    assert result.exit_code == 2
    assert needle in result.stderr and str(path) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_bad_environment_variable_is_named():
    result = run_cli("config", "show", env={"TRCLI_ALIGN__BETA": "lots"})
    assert result.exit_code == 2 and "TRCLI_ALIGN__BETA" in result.stderr


def test_unreadable_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("align:\n  beta: [1,\n")
    result = run_cli("config", "show", "-c", path)
    assert result.exit_code == 2 and f"{path}:" in result.stderr


def test_schema_is_json_schema():
    schema = json.loads(ok("config", "schema").stdout)
    assert "align" in schema["properties"] and schema.get("additionalProperties") is False


def test_offline_hub_model_is_a_clear_error(tmp_path, prep_run):
    result = run_cli("sft", "--model", "EleutherAI/pythia-410m", "--from", prep_run, "-o", tmp_path / "s",
                     env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 2 and "cannot load model 'EleutherAI/pythia-410m'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_lora_alpha_defaults_to_twice_the_rank(tmp_path, tiny_model, prep_run):
    """`--lora-r 16` trains at alpha 32, as the recipes do; an explicit alpha (flag or recipe) is kept."""
    from trcli.config import load

    assert load(None, {}, environ={}).model.lora_alpha == 16.0
    assert load(None, {"model.lora_r": 16}, environ={}).model.lora_alpha == 32.0
    assert load(None, {"model.lora_r": 16, "model.lora_alpha": 8}, environ={}).model.lora_alpha == 8.0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"lora_r": 4}}))
    assert yaml.safe_load(ok("config", "show", "-c", recipe).stdout)["model"]["lora_alpha"] == 8.0
    assert "2 x lora_r" in json.loads(ok("config", "schema").stdout)["$defs"]["ModelConfig"]["properties"][
        "lora_alpha"]["description"]
    ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "1", "--lora-r", "2", "-o", tmp_path / "s")
    adapter = json.loads((tmp_path / "s" / "adapter" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (2, 4.0)
