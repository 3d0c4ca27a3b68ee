"""The command line as a citizen of the shell: help, config resolution, exit codes, stdout."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

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


def _hub_env(tmp_path, endpoint: str) -> dict:
    """A fresh process that may go online: the offline switches the tests set are off, an empty HF cache."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    return {**env, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}


class _Dropping:
    """A hub that never answers: every request is read, recorded and its connection closed without a
    response (a retry of huggingface_hub's would show as the same request twice)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.requests: list[bytes] = []
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            conn.settimeout(5)
            try:
                self.requests.append(conn.recv(4096).split(b"\r\n")[0])
            except OSError:
                pass
            conn.close()


@pytest.mark.parametrize("args, kind", [
    (["sft", "--model", "someorg/some-model"], "model"),
    (["prep", "--source", "hub", "--input", "someorg/some-data"], "dataset"),
])
def test_an_unreachable_hub_fails_at_once_naming_the_id(tmp_path, prep_run, args, kind):
    """huggingface_hub retries a failed connection 5 times per file (1 + 2 + 4 + 8 + 8 s): 25-50 s before.
    Now one look and no retries (the requests are counted, not timed: a loaded machine's imports take
    their time)."""
    hub = _Dropping()
    endpoint = hub.url
    if args[0] == "sft":
        args = [*args, "--from", str(prep_run)]
    try:
        run = subprocess.run([sys.executable, "-m", "trcli.cli", *args, "-o", str(tmp_path / "run")],
                             env=_hub_env(tmp_path, endpoint), capture_output=True, text=True, timeout=120)
    finally:
        hub.sock.close()
    assert run.returncode == 2 and run.stdout == "", run.stderr[-2000:]
    [line] = run.stderr.strip().splitlines()
    assert f"cannot load {kind} '{args[2] if kind == 'model' else args[4]}'" in line
    assert f"hub at {endpoint} is unreachable" in line and "HF_HUB_OFFLINE=1" in line and "HF_ENDPOINT" in line
    # One look at the hub, never repeated (huggingface_hub 2.x may also ask /api/agent-harnesses once).
    assert b"HEAD / HTTP/1.1" in hub.requests and len(hub.requests) == len(set(hub.requests)), hub.requests


class _NotFound(http.server.BaseHTTPRequestHandler):
    """A hub that answers, and has nothing."""

    def do_HEAD(self):
        self.server.paths.append(self.path)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


def test_a_reachable_hub_is_asked_as_before(tmp_path, prep_run):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    server.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = subprocess.run([sys.executable, "-m", "trcli.cli", "sft", "--model", "someorg/some-model", "--from",
                              str(prep_run), "-o", str(tmp_path / "run")],
                             env=_hub_env(tmp_path, f"http://127.0.0.1:{server.server_port}"),
                             capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert run.returncode == 2 and "cannot load model 'someorg/some-model'" in run.stderr
    assert "unreachable" not in run.stderr
    assert any(path.startswith("/someorg/some-model/") for path in server.paths), server.paths  # the repo was asked


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
