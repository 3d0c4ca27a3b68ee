"""Shared fixtures: a tiny Pythia-shaped model, sample pairs, and prep / sft runs built once.

Everything is built offline by the tests themselves (trcli.tiny; the real SmolLM2 by trcli.pretrained).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def run_cli(*args: str, env: dict | None = None):
    """Run the real `trcli` app in-process; returns click's Result (exit_code, stdout, stderr)."""
    from trcli.cli import app

    return CliRunner(env=env).invoke(app, [str(a) for a in args], catch_exceptions=False)


def ok(*args: str, env: dict | None = None):
    result = run_cli(*args, env=env)
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from trcli.tiny import build_model

    path = tmp_path_factory.mktemp("tiny") / "model"
    build_model(path, hidden_size=32, layers=2)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """Real SmolLM2-135M-Instruct (float32, ~540 MB) in the shared cache: built once per machine (~1 min)."""
    from trcli.pretrained import smollm2 as build

    return build()


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    from trcli.tiny import write_sample_jsonl

    return write_sample_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", n=24)


@pytest.fixture(scope="session")
def prep_run(tmp_path_factory, pairs_file) -> Path:
    out = tmp_path_factory.mktemp("runs") / "prep"
    ok("prep", "--source", "jsonl", "--input", pairs_file, "--test-size", "0.25", "-o", out)
    return out


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, tiny_model, prep_run) -> Path:
    out = tmp_path_factory.mktemp("runs") / "sft"
    ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "4", "--batch-size", "4",
       "--lr", "3e-3", "--lora-r", "4", "-o", out)
    return out
