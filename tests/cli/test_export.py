"""`trcli export` on the tiny models the tests build: the exported folder loads with plain
transformers (no peft) and gives the adapter model's logits within 1e-4, for an sft run, an align
run and a QLoRA run (merged into the dequantized 4-bit base); --adapter-only and full fine-tuning
runs; bad input is one line, exit 2."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ok, run_cli

TOL = 1e-4


@pytest.fixture(scope="module")
def align_run(tmp_path_factory, sft_run) -> Path:
    out = tmp_path_factory.mktemp("runs") / "align"
    ok("align", "--from", sft_run, "--max-steps", "2", "--batch-size", "4", "--lr", "5e-3", "--beta", "0.2",
       "--alpha", "0.5", "--tau", "2", "-o", out)
    return out


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model, prep_run) -> Path:
    out = tmp_path_factory.mktemp("runs") / "qlora"
    ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "3", "--batch-size", "4", "--lr", "1e-2",
       "--lora-r", "4", "--quantize", "4bit", "-o", out)
    return out


def ids() -> torch.Tensor:
    return torch.randint(3, 200, (3, 17), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model.eval()(input_ids=ids()).logits.float()


def plain(folder: Path):
    """The export as vLLM or any transformers user loads it: no peft involved."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def adapter_model(base: Path, adapter: Path, quantized: bool = False):
    """The run's policy as training had it: the base (4-bit NF4 for QLoRA) with the unmerged adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": "cpu"}
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), **kwargs), str(adapter))


def export(run: Path, out: Path, *extra: str) -> dict:
    return json.loads(ok("export", run, "-o", out, "--json", *extra).stdout)


def check_plain_folder(folder: Path) -> None:
    from safetensors import safe_open

    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "trcli-export.json"} <= names
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert not [k for k in weights.keys() if "lora" in k or "base_layer" in k]
    assert not list(folder.parent.glob(f".{folder.name}.*"))  # no staging folder left


def test_sft_run_merged_equals_the_adapter_model(tmp_path, sft_run, tiny_model):
    result = export(sft_run, tmp_path / "model")
    out = tmp_path / "model"
    assert result["kind"] == "merged" and result["method"] == "sft" and not result["dequantized_base"]
    check_plain_folder(out)
    expected = logits(adapter_model(tiny_model, sft_run / "adapter"))
    assert (logits(plain(out)) - expected).abs().max() < TOL
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("hello world")["input_ids"] == AutoTokenizer.from_pretrained(str(tiny_model))("hello world")["input_ids"]
    assert tokenizer.eos_token_id in [GenerationConfig.from_pretrained(str(out)).eos_token_id]
    card = (out / "README.md").read_text()
    manifest = json.loads((sft_run / "trcli-run.json").read_text())
    assert "| method | sft |" in card and "| β | n/a |" in card and "| α (reference update) | n/a |" in card
    assert manifest["inputs"]["data"]["hash"] in card and "library_name: transformers" in card


def test_align_run_merged_with_its_card_and_replaced_by_a_new_export(tmp_path, align_run, sft_run, tiny_model):
    out = tmp_path / "tr-dpo"
    export(align_run, out)
    check_plain_folder(out)
    expected = logits(adapter_model(tiny_model, align_run / "policy"))
    got = logits(plain(out))
    assert (got - expected).abs().max() < TOL
    assert (got - logits(adapter_model(tiny_model, sft_run / "adapter"))).abs().max() > 10 * TOL  # align moved it
    card = (out / "README.md").read_text()
    for row in ("| method | tr-dpo |", "| β | 0.2 |", "| α (reference update) | 0.5 |", "| τ (steps between updates) | 2 |",
                "| reference update | soft |", "| LoRA | r 4,"):
        assert row in card, row
    align_inputs = json.loads((align_run / "trcli-run.json").read_text())["inputs"]
    sft_inputs = json.loads((sft_run / "trcli-run.json").read_text())["inputs"]
    for entry in (align_inputs["data"], align_inputs["start"], sft_inputs["data"]):
        assert entry["hash"] in card
    record = json.loads((out / "trcli-export.json").read_text())
    assert record["beta"] == 0.2 and record["alpha"] == 0.5 and record["tau"] == 2 and record["kind"] == "merged"
    # An earlier export is replaced whole; the adapter-only export of the same run loads with peft.
    (out / "stale.txt").write_text("from before")
    export(align_run, out, "--adapter-only")
    assert not (out / "stale.txt").exists() and (out / "adapter_config.json").is_file()
    assert "library_name: peft" in (out / "README.md").read_text()
    assert (logits(adapter_model(tiny_model, out)) - expected).abs().max() == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (align_run / "policy" / name).read_bytes()


def test_qlora_run_merges_into_the_dequantized_base(tmp_path, qlora_run, tiny_model):
    out = tmp_path / "qlora"
    res = ok("export", qlora_run, "-o", out, "--json")
    assert json.loads(res.stdout)["dequantized_base"] is True
    assert res.stderr.count("\n") == 1 and "dequantized 4-bit (NF4) base" in res.stderr
    assert "**QLoRA:**" in (out / "README.md").read_text() and "dequantized 4-bit base" in (out / "README.md").read_text()
    check_plain_folder(out)
    expected = logits(adapter_model(tiny_model, qlora_run / "adapter", quantized=True))
    assert (logits(plain(out)) - expected).abs().max() < TOL
    # Merging into the original full-precision base would not give the adapter model's outputs.
    assert (logits(adapter_model(tiny_model, qlora_run / "adapter")) - expected).abs().max() > 100 * TOL


def test_full_fine_tuning_run_exports_its_weights_as_they_are(tmp_path, tiny_model, prep_run):
    run = tmp_path / "full"
    ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "2", "--batch-size", "4", "--no-lora", "-o", run)
    out = tmp_path / "out"
    assert export(run, out)["kind"] == "full"
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out / "model.safetensors") == digest(run / "weights" / "model.safetensors")
    assert "full fine-tuning" in (out / "README.md").read_text()
    assert (logits(plain(out)) - logits(plain(run / "weights"))).abs().max() == 0
    res = run_cli("export", run, "-o", tmp_path / "x", "--adapter-only")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no adapter" in res.stderr


def test_bad_input_is_one_line_exit_2(tmp_path, sft_run, prep_run):
    def refused(*args, says):
        res = run_cli("export", *args)
        assert res.exit_code == 2 and res.stdout == "", res.stderr
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr and says in res.stderr, res.stderr

    refused(tmp_path, "-o", tmp_path / "a", says="not a trcli run directory")
    refused(prep_run, "-o", tmp_path / "a", says="has no policy to export")
    refused(sft_run, "-o", sft_run / "export", says="outside the run directory")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    refused(sft_run, "-o", taken, says="not an earlier export")
    assert (taken / "notes.txt").read_text() == "mine"
    failed = tmp_path / "failed"
    shutil.copytree(sft_run, failed)
    manifest = json.loads((failed / "trcli-run.json").read_text())
    (failed / "trcli-run.json").write_text(json.dumps({**manifest, "status": "failed"}))
    refused(failed, "-o", tmp_path / "a", says="did not complete")
    assert not (tmp_path / "a").exists()


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|padding|>\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def test_chat_template_and_end_of_turn_are_carried(tmp_path, sft_run):
    """The tokenizer saved beside the policy (with the template training used) goes into the export,
    and generation_config.json's eos_token_id also holds the template's end-of-turn token, so a
    server stops where `trcli generate` stops. Without a saved tokenizer, the base's gets the run's
    --chat-template file."""
    from transformers import AutoTokenizer, GenerationConfig

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    tokenizer = AutoTokenizer.from_pretrained(str(run / "adapter"))
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(str(run / "adapter"))
    export(run, tmp_path / "a")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "a")).chat_template == TEMPLATE
    end_of_turn = tokenizer.convert_tokens_to_ids("<|padding|>")
    assert GenerationConfig.from_pretrained(str(tmp_path / "a")).eos_token_id == [tokenizer.eos_token_id, end_of_turn]

    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (run / "adapter" / name).unlink(missing_ok=True)
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    manifest = json.loads((run / "trcli-run.json").read_text())
    manifest["config"]["data"]["chat_template"] = str(tmp_path / "template.jinja")
    (run / "trcli-run.json").write_text(json.dumps(manifest))
    export(run, tmp_path / "b")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "b")).chat_template == TEMPLATE
