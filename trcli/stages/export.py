"""export: a run's policy as an ordinary transformers folder, or its PEFT adapter with a model card.

``trcli export RUN -o DIR`` writes, for an sft or align run,

- a LoRA run: the policy adapter merged into its base (``AutoModelForCausalLM.from_pretrained(DIR)``
  and vLLM load it without peft): safetensors weights in the run's dtype, config, the tokenizer with
  the chat template training used, and a generation config whose ``eos_token_id`` also holds the
  template's end-of-turn token (as ``trcli generate`` stops);
- a QLoRA run: the same, merged into the *dequantized* 4-bit base, the weights the adapter was
  trained against (merging into the original full-precision base would not give the adapter
  model's outputs); said on stderr and in the model card;
- a full fine-tuning run: its weights folder as it is;
- ``--adapter-only``: the PEFT adapter folder as training wrote it.

Each gets a model card (README.md: method, beta, alpha, tau, the data and start hashes of the run and
the runs it came from) and ``trcli-export.json``. DIR is written whole beside itself and renamed
into place; an existing DIR is replaced only when it is an earlier export.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from trcli.config import Config
from trcli.errors import UsageError
from trcli.runs import MANIFEST, atomic_path, clean_staging, now, output_lock, package_versions, read_manifest, upstream

MARKER = "trcli-export.json"


def _config(run: str, up: dict) -> Config:
    from pydantic import ValidationError

    try:
        return Config.model_validate(up["config"])
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UsageError(f"{run}/{MANIFEST}: its config does not validate ({where}: {first['msg']}); "
                         "export it with the trcli version that wrote it") from None


def _check(run: str, up: dict, out: Path, adapter_only: bool) -> str:
    """The kind of export ("merged", "adapter" or "full"), or a usage error."""
    if up["stage"] not in ("sft", "align"):
        raise UsageError(f"{run}: a {up['stage']} run has no policy to export (export sft and align runs)")
    if up["status"] != "completed":
        raise UsageError(f"{run}: that {up['stage']} run did not complete (status {up['status']}); "
                         "finish it first (--resume)")
    kind = "adapter" if adapter_only else "merged" if up.get("adapter") else "full"
    if up.get("adapter") is None and up.get("weights") is None:
        raise UsageError(f"{run}: the manifest names no adapter and no weights")
    if adapter_only and not up.get("adapter"):
        raise UsageError(f"{run}: a full fine-tuning run has no adapter; export it without --adapter-only")
    source = Path(up["adapter"] if kind != "full" else up["weights"])
    if not source.is_dir():
        raise UsageError(f"{run}: {source} is missing (was the run directory moved without it?)")
    run_dir, target = Path(run).resolve(), out.resolve()
    if target == run_dir or run_dir in target.parents or target in run_dir.parents:
        raise UsageError(f"-o {out}: write the export outside the run directory {run}")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise UsageError(f"-o {out}: exists and is not an earlier export (no {MARKER}); choose another directory")
    return kind


# ---------------------------------------------------------------- the model card

def _lineage(run: str) -> list[dict]:
    """This run and those it came from (--from), newest first: stage, path, inputs with hashes."""
    chain, seen, here = [], set(), run
    while here and Path(here).resolve() not in seen and (Path(here) / MANIFEST).is_file():
        seen.add(Path(here).resolve())
        manifest = read_manifest(here)
        chain.append({"stage": manifest.get("stage"), "run": str(here), "inputs": manifest.get("inputs", {})})
        here = manifest.get("config", {}).get("from_run")
    return chain


def describe(cfg: Config, up: dict) -> dict:
    """Method and hyper-parameters as the run resolved them."""
    m = cfg.model
    out: dict = {"method": "sft" if up["stage"] == "sft" else cfg.align.method, "beta": None, "alpha": None, "tau": None}
    if up["stage"] == "align":
        a = cfg.align
        out["beta"] = a.beta
        if a.trust_region and a.resolved_alpha() > 0:
            out.update(update=a.update, alpha=a.resolved_alpha(),
                       tau=a.resolved_tau() if a.update != "kl" else None, kl_target=a.kl_target)
        else:
            out.update(update="none (static reference)", alpha=None, tau=None)
    out["training"] = ("QLoRA (4-bit NF4 base)" if m.quantize == "4bit" else "LoRA") if m.lora else "full fine-tuning"
    if m.lora:  # as the adapter has it (align takes the rank of the adapter it starts from)
        saved = Path(up.get("adapter") or "") / "adapter_config.json"
        lora = json.loads(saved.read_text()) if up.get("adapter") and saved.is_file() else {}
        targets = lora.get("target_modules", m.lora_targets)
        out["lora"] = {"r": lora.get("r", m.lora_r), "alpha": lora.get("lora_alpha", m.lora_alpha),
                       "targets": sorted({t.rsplit(".", 1)[-1] for t in targets})  # leaf names, not every layer's
                       if isinstance(targets, (list, set, tuple)) else [str(targets)]}
    return out


def _card(run: str, up: dict, cfg: Config, kind: str, about: dict, lineage: list[dict]) -> str:
    base = up.get("model") or "?"
    library = "peft" if kind == "adapter" else "transformers"
    lines = ["---", f"library_name: {library}", f"base_model: {json.dumps(base)}",
             f"tags: [trcli, {about['method']}]", "---", "",
             f"# {Path(run).resolve().name}: {about['method']} policy", ""]
    what = {"merged": "the policy adapter merged into its base model: a plain transformers folder (no peft needed)",
            "adapter": "the policy's PEFT (LoRA) adapter, to load on its base model",
            "full": "the fully fine-tuned weights, as the run wrote them"}[kind]
    lines += [f"Exported by trcli {package_versions().get('trcli', '?')} from the {up['stage']} run `{run}`: {what}.", ""]
    if kind == "merged" and cfg.model.quantize == "4bit":
        lines += ["**QLoRA:** the adapter was trained on the 4-bit (NF4) quantized base, so it is merged into the "
                  "dequantized 4-bit base, the weights it was trained against, not into the original "
                  f"full-precision `{base}`.", ""]
    lines += ["| | |", "|---|---|", f"| method | {about['method']} |"]
    for key, label in (("beta", "β"), ("alpha", "α (reference update)"), ("tau", "τ (steps between updates)"),
                       ("update", "reference update"), ("kl_target", "KL target")):
        if key in ("beta", "alpha", "tau") or about.get(key) is not None:
            lines.append(f"| {label} | {'n/a' if about.get(key) is None else about[key]} |")
    lines.append(f"| training | {about['training']} |")
    if "lora" in about:
        lora = about["lora"]
        lines.append(f"| LoRA | r {lora['r']}, alpha {lora['alpha']}, targets {', '.join(lora['targets'])} |")
    lines += [f"| base model | `{base}` |", f"| dtype | {cfg.model.dtype} |", "", "## Data and inputs", ""]
    for link in lineage:
        for name, entry in link["inputs"].items():
            lines.append(f"- {link['stage']} `{name}`: `{entry.get('path')}` {entry.get('hash', '(no hash)')}")
    lines += ["", "## Loading", ""]
    if kind == "adapter":
        lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base)}), "
                  "\"THIS_FOLDER\")", "```"]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"THIS_FOLDER\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")", "```", "",
                  "or `vllm serve THIS_FOLDER`."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writing

def _tokenizer(cfg: Config, up: dict, folder: Path | None):
    """The tokenizer as training used it: the one saved beside the policy (its chat template in
    force), else the base's with the run's --chat-template applied."""
    from trcli.modeling import load_tokenizer
    from trcli.tokens import resolve_chat_template

    if folder is not None and (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(str(folder))
    tokenizer = load_tokenizer(cfg.model.tokenizer or up.get("tokenizer") or up.get("model"))
    resolve_chat_template(tokenizer, cfg.data.chat_template)
    return tokenizer


def _stop_at_end_of_turn(folder: Path, tokenizer) -> None:
    """generation_config.json's eos_token_id holds EOS and the template's end-of-turn token, so a
    server stops where ``trcli generate`` stops."""
    from transformers import GenerationConfig

    from trcli.tokens import end_of_turn_ids

    try:
        gen = GenerationConfig.from_pretrained(str(folder))
    except OSError:
        gen = GenerationConfig()
    eos = gen.eos_token_id
    ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ids += [i for i in end_of_turn_ids(tokenizer) if i not in ids]
    if not ids:
        return
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(str(folder))


def merged_policy(cfg: Config, up: dict, device: torch.device):
    """The policy as one plain model: generate's load_policy (base + adapter, merged); for a QLoRA
    run the 4-bit base is dequantized first and the adapter merged into that."""
    from trcli.modeling import _DTYPES, load_base
    from trcli.stages.generate import load_policy

    if cfg.model.quantize != "4bit":
        return load_policy(cfg, up, device)
    from peft import PeftModel

    base = load_base(cfg.model, device, path=up.get("weights")).dequantize(dtype=_DTYPES[cfg.model.dtype])
    return PeftModel.from_pretrained(base, up["adapter"]).merge_and_unload().eval()


def run(run_dir: str, output: str, adapter_only: bool = False, device: str = "cpu") -> dict:
    run_dir, out = str(Path(run_dir).resolve()), Path(output)
    up = upstream(run_dir)
    kind = _check(run_dir, up, out, adapter_only)
    cfg = _config(run_dir, up)
    about, lineage = describe(cfg, up), _lineage(run_dir)
    dequantized = kind == "merged" and cfg.model.quantize == "4bit"
    # One export into DIR at a time: the lock is a hidden file beside DIR (.DIR.export.lock), since
    # DIR itself is replaced whole; staging folders of a killed export are cleared under it.
    with output_lock(out.parent / f"{out.name}.export", "export", file=True):
        clean_staging(out.parent, only=out.name)
        files = _write(run_dir, up, cfg, kind, about, lineage, out, dequantized, device)
    return {"stage": "export", "kind": kind, "output": str(out), "source": run_dir, "method": about["method"],
            "dequantized_base": dequantized, "files": files}


def _write(run_dir: str, up: dict, cfg: Config, kind: str, about: dict, lineage: list[dict], out: Path,
           dequantized: bool, device: str) -> list[str]:
    from trcli.modeling import pick_device

    with atomic_path(out) as tmp:
        if kind == "merged":
            if dequantized:
                print("trcli export: QLoRA run: merging the adapter into the dequantized 4-bit (NF4) base it was "
                      "trained on, not the original full-precision weights", file=sys.stderr)
            model = merged_policy(cfg, up, pick_device(device))
            model.save_pretrained(str(tmp))
            tokenizer = _tokenizer(cfg, up, Path(up["adapter"]))
            tokenizer.save_pretrained(str(tmp))
            _stop_at_end_of_turn(tmp, tokenizer)
        else:
            source = Path(up["adapter"] if kind == "adapter" else up["weights"])
            shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("README.md", MARKER))
            if kind == "full":
                _stop_at_end_of_turn(tmp, _tokenizer(cfg, up, tmp))
        (tmp / "README.md").write_text(_card(run_dir, up, cfg, kind, about, lineage), encoding="utf-8")
        record = {"kind": kind, "source": str(Path(run_dir).resolve()), "stage": up["stage"],
                  "base_model": up.get("model"), "dequantized_base": dequantized, **about,
                  "inputs": {f"{link['stage']}:{name}": entry for link in lineage
                             for name, entry in link["inputs"].items()},
                  "exported": now(), "versions": package_versions()}
        (tmp / MARKER).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        return sorted(p.name for p in tmp.iterdir())
