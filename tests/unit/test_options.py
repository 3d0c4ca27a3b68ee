"""Command-line options built from the config schema: --help shows defaults, choices and the schema's
description; only what the user typed reaches the config (so a recipe is not overridden by a default)."""

from __future__ import annotations

from typing import Any

import typer
import yaml
from typer.testing import CliRunner

from conftest import ok
from trcli import options
from trcli.config import Config, load
from trcli.options import Flag


def _app(*flags: Flag):
    app = typer.Typer(add_completion=False, rich_markup_mode=None)

    @app.command()
    @options.command(*flags)
    def show(ctx: typer.Context, **kw: Any):
        print(yaml.safe_dump(options.given(ctx, kw)))

    @app.command()
    def other():  # two commands, so the app takes a command name
        pass

    return app


def given(app, *args: str) -> dict:
    result = CliRunner().invoke(app, ["show", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_only_flags_typed_reach_the_config():
    app = _app(Flag("align.beta"), Flag("align.method"), Flag("model.lora", ("--lora/--no-lora",)),
               Flag("model.lora_targets", parse=options.comma_list), Flag("generate.stop", ("--stop",), repeat=True))
    assert given(app) == {}
    assert given(app, "--beta", "0.1") == {"align.beta": 0.1}  # typed, even at the default's value
    assert given(app, "--no-lora", "--lora-targets", "q_proj, v_proj", "--stop", "a", "--stop", "b") == {
        "model.lora": False, "model.lora_targets": ["q_proj", "v_proj"], "generate.stop": ["a", "b"]}


def test_a_recipe_value_survives_flags_left_at_their_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("align:\n  beta: 0.3\n")
    app = _app(Flag("align.beta"), Flag("align.tau"))
    assert load(recipe, given(app, "--tau", "4")).align.beta == 0.3


def test_help_shows_each_default_choices_and_the_schema_description():
    out = ok("align", "--help").stdout
    assert "--method [dpo|ipo|kto|tr-dpo|tr-ipo|tr-kto]" in out and "[default: tr-dpo]" in out
    assert "--update [soft|hard|kl]" in out and "--lr-scheduler [constant|linear|cosine]" in out
    assert "[default: 5e-05]" in out and "[default: 0.1]" in out  # learning rate, beta
    described = " ".join(out.split())
    for key in ("beta", "ref_rank", "tau"):
        assert " ".join(Config.model_fields["align"].annotation.model_fields[key].description.split()) in described
    assert "--judge" in ok("judge", "--help").stdout and "[pairwise|hc|alpacaeval|arena]" in ok("judge", "--help").stdout


def test_every_schema_key_has_a_description():
    from pydantic import BaseModel

    for name, section in Config.model_fields.items():
        if isinstance(section.annotation, type) and issubclass(section.annotation, BaseModel):
            missing = [k for k, f in section.annotation.model_fields.items() if not f.description]
            assert not missing, f"{name}: {missing}"
