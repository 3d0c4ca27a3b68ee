"""trcli TR-DPO against TRL's DPOTrainer: wall time, peak memory, achieved FLOP/s.

    .venv/bin/pip install trl            # or: make bench (pip install -e .[bench])
    .venv/bin/python benchmarks/align_speed.py [--pairs 80] [--out results.json]

One invocation runs every system below on the same Pythia-shaped model of about 30M parameters
(GPT-NeoX, hidden 512, 6 layers, random weights, built offline by trcli.tiny and given a
byte-level BPE tokenizer trained on the HH transcripts), one epoch over the same real HH pairs
(the first --pairs rows of ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz whose prompt plus
either reply fits in --max-length tokens, so neither system truncates and both see the same
tokens), 4 pairs a step, fp32, LoRA r=16 / alpha 32 on all linear layers:

    trcli-tr-dpo        trcli TR-DPO, soft update, alpha 0.6, tau 1 (reference adapter rank 32)
    trcli-tr-dpo-plain  the same with the packed fast path switched off (padded rows)
    trcli-dpo           trcli vanilla DPO
    trl-lora-dpo        TRL DPOTrainer, LoRA, vanilla DPO (TRL refuses sync_ref_model with PEFT)
    trl-full-tr-dpo     TRL DPOTrainer, full model, sync_ref_model alpha 0.6 every step (TR-DPO)
    trcli-flops         trcli TR-DPO again under torch's FlopCounterMode (not timed)

TRL runs with gradient checkpointing and bf16 off (its defaults turn both on; on this CPU both
only slow it down), so it is compared at its fastest. Each system runs in its own process: peak
memory is that process's ru_maxrss (os.wait4), and "train s" is the training loop alone (trcli's
fit, TRL's trainer.train()), without imports, model loading or tokenization. The matmul rate is
the best 4096³ fp32 matmul on the same machine. Each system runs --repeats times, round-robin,
and its fastest run is reported with that run's peak memory and the 1-minute load average after
it. Nothing here asserts a time: it measures and prints.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
SHAPE = {"hidden_size": 512, "layers": 6, "heads": 8}
VOCAB = 10240
LORA = {"r": 16, "alpha": 32}
BATCH, LR, BETA, ALPHA = 4, 5e-5, 0.1, 0.6
SYSTEMS = ["trcli-tr-dpo", "trcli-tr-dpo-plain", "trcli-dpo", "trl-lora-dpo", "trl-full-tr-dpo", "trcli-flops"]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- set-up (parent) ---------------------------------------------------------------------------

def timed_update(update, timings: dict):
    """``update`` (a reference update) adding its time to timings["update"] and counting timings["updates"]."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return update(*args, **kwargs)
        finally:
            timings["update"] += time.perf_counter() - start
            timings["updates"] += 1
    return wrapper


def hh_pairs(limit: int | None = None) -> list[dict]:
    """HH rows split into {prompt, chosen, rejected} by trcli's own HH parser."""
    from trcli.data.hh import split_transcripts
    from trcli.data.records import Drop

    rows = []
    with gzip.open(DATA, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            raw = json.loads(line)
            try:
                prompt, chosen, rejected = split_transcripts(raw["chosen"], raw["rejected"])
            except Drop:
                continue
            if chosen.strip() and rejected.strip():
                rows.append({"id": f"hh-{n}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
            if limit and len(rows) >= limit:
                break
    return rows


def build(work: Path, pairs: int, max_length: int) -> dict:
    """The model directory (model + tokenizer trained on HH) and the prepared data."""
    import torch
    from datasets import Dataset, DatasetDict
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from trcli.tiny import build_model

    model_dir = work / "model"
    build_model(model_dir, hidden_size=SHAPE["hidden_size"], layers=SHAPE["layers"], heads=SHAPE["heads"])
    everything = hh_pairs()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Same special tokens, same ids (0, 1) as trcli.tiny's tokenizer, so the model's config holds.
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((r["prompt"] + r["chosen"] + r["rejected"] for r in everything), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|padding|>", unk_token="<|endoftext|>")
    fast.save_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    torch.manual_seed(0)
    model.resize_token_embeddings(len(fast), mean_resizing=False)
    model.save_pretrained(str(model_dir))
    params = sum(p.numel() for p in model.parameters())

    length = lambda text: len(fast(text, add_special_tokens=False)["input_ids"])
    chosen = []
    for r in everything:  # file order; +1 for the EOS trcli and TRL append
        p = length(r["prompt"])
        if p + max(length(r["chosen"]), length(r["rejected"])) + 1 <= max_length:
            chosen.append(r)
        if len(chosen) == pairs:
            break
    data_dir = work / "prep"
    DatasetDict({"train": Dataset.from_list(chosen)}).save_to_disk(str(data_dir / "data"))
    stats = {k: sum(length(r[k]) for r in chosen) / len(chosen) for k in ("prompt", "chosen", "rejected")}
    return {"model": str(model_dir), "data": str(data_dir), "params": params, "pairs": len(chosen),
            "mean_tokens": stats}


def matmul_flops(n: int = 4096, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate: the best of single n³ products (a disturbed one is slower)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def padding_stats(setup: dict, max_length: int) -> dict:
    """Tokens the forward computes per epoch: padded rows (plain) against packed rows."""
    from trcli.batching import collate, pack
    from trcli.data.records import load_prepped
    from trcli.modeling import load_tokenizer
    from trcli.training import shuffled_batches

    tok = load_tokenizer(setup["model"])
    rows = load_prepped(setup["data"])["train"].to_list()
    from trcli.tokens import Encoder

    encoder = Encoder(tok, max_length)
    items = [e for r in rows if (e := encoder(r["prompt"], [r["chosen"], r["rejected"]]))]
    out = {"real": 0, "padded": 0, "packed": 0, "packed_fed": 0}
    for batch in shuffled_batches(items, BATCH, 42):
        seqs = [(c.prompt, c.completion) for c, _ in batch] + [(r.prompt, r.completion) for _, r in batch]
        plain, packed = collate(seqs, 1, "cpu"), pack(seqs, 1, "cpu")
        out["real"] += plain["tokens"]
        out["padded"] += plain["input_ids"].numel()
        out["packed"] += packed["input_ids"].numel()
        out["packed_fed"] += packed["fed"]
    return out


# --- the systems (one child process each) ------------------------------------------------------

def run_trcli(system: str, setup: dict, work: Path, max_length: int) -> dict:
    import torch

    from trcli import batching, training, trust_region
    from trcli.config import Config
    from trcli.stages import align

    if system == "trcli-tr-dpo-plain":
        batching.supports_packing = lambda model: False  # the padded path, for comparison
    timings = {"fit": 0.0, "update": 0.0, "updates": 0}
    fit = training.fit

    def timed_fit(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fit(*args, **kwargs)
        finally:
            timings["fit"] += time.perf_counter() - start

    # The update is looked up in trust_region (ReferenceUpdater) at every step.
    align.fit = timed_fit
    trust_region.update_lora_reference = timed_update(trust_region.update_lora_reference, timings)
    cfg = Config.model_validate({
        "model": {"name_or_path": setup["model"], "lora_r": LORA["r"], "lora_alpha": LORA["alpha"]},
        "data": {"path": setup["data"], "max_length": max_length},
        "train": {"batch_size": BATCH, "learning_rate": LR, "device": "cpu", "logging_steps": 10},
        "align": {"method": "dpo" if system == "trcli-dpo" else "tr-dpo", "update": "soft", "alpha": ALPHA,
                  "tau": 1, "beta": BETA},
        "output": str(work / system),
    })
    shutil.rmtree(work / system, ignore_errors=True)  # every repeat is a fresh run, not a resume
    if system == "trcli-flops":
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            result = align.run(cfg)
        return {"flops": counter.get_total_flops(), "steps": result["steps"]}
    result = align.run(cfg)
    metrics = [json.loads(line) for line in (work / system / "metrics.jsonl").read_text().splitlines()]
    return {"train_s": timings["fit"], "update_s": timings["update"], "updates": timings["updates"],
            "steps": result["steps"], "loss": metrics[-1]["loss"], "threads": torch.get_num_threads()}


def run_trl(system: str, setup: dict, work: Path, max_length: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from trcli.data.records import load_prepped

    torch.manual_seed(42)
    rows = load_prepped(setup["data"])["train"].to_list()
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    lora = system == "trl-lora-dpo"
    args = DPOConfig(
        output_dir=str(work / system), per_device_train_batch_size=BATCH, num_train_epochs=1,
        learning_rate=LR, lr_scheduler_type="linear", beta=BETA, max_length=max_length,
        gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=10, save_strategy="no",
        report_to=[], seed=42, dataloader_num_workers=0, disable_tqdm=True,
        sync_ref_model=not lora, ref_model_mixup_alpha=ALPHA, ref_model_sync_steps=1,
    )
    peft_config = (LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                              target_modules="all-linear", task_type="CAUSAL_LM") if lora else None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32), args=args,
                         train_dataset=data, processing_class=AutoTokenizer.from_pretrained(setup["model"]),
                         peft_config=peft_config)
    start = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - start
    return {"train_s": train_s, "steps": out.global_step, "loss": out.training_loss,
            "threads": torch.get_num_threads()}


def child(system: str, setup_file: str, max_length: int) -> None:
    setup = json.loads(Path(setup_file).read_text())
    work = Path(setup_file).parent
    result = (run_trl if system.startswith("trl") else run_trcli)(system, setup, work, max_length)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(system: str, setup_file: Path, max_length: int) -> dict:
    """Run one system in a fresh process; its own peak RSS comes from wait4's rusage."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", system, "--setup", str(setup_file),
                                 "--max-length", str(max_length)], stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{system} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    # ru_maxrss is in KiB on Linux. The load average shows whether other work shared the cores.
    result.update(process_s=wall, peak_mib=usage.ru_maxrss / 1024, load=os.getloadavg()[0])
    return result


# --- report ------------------------------------------------------------------------------------

def report(setup: dict, results: dict, matmul: float, pads: dict) -> str:
    r = results
    tr, plain, dpo = r["trcli-tr-dpo"], r["trcli-tr-dpo-plain"], r["trcli-dpo"]
    trl, trl_full = r["trl-lora-dpo"], r["trl-full-tr-dpo"]
    step = lambda x: x["train_s"] / x["steps"]
    achieved = r["trcli-flops"]["flops"] / tr["train_s"]
    lines = [
        f"model: GPT-NeoX {SHAPE['layers']} layers, hidden {SHAPE['hidden_size']}, {setup['params'] / 1e6:.1f}M "
        f"parameters; {setup['pairs']} HH pairs, batch {BATCH}, {tr['steps']} steps, {tr['threads']} threads",
        "mean tokens: prompt {prompt:.0f}, chosen {chosen:.0f}, rejected {rejected:.0f}".format(**setup["mean_tokens"]),
        f"tokens per epoch and pass: real {pads['real']}, padded rows {pads['padded']} "
        f"({1 - pads['real'] / pads['padded']:.0%} padding), packed rows {pads['packed']} "
        f"(prompts shared: {pads['packed_fed']} fed, {1 - pads['packed'] / pads['padded']:.0%} fewer than padded)",
        "",
        "| system | train s | s/step | peak MiB | process s | final loss | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SYSTEMS[:-1]:
        x = r[name]
        lines.append(f"| {name} | {x['train_s']:.1f} | {step(x):.2f} | {x['peak_mib']:.0f} | "
                     f"{x['process_s']:.1f} | {x['loss']:.4f} | {x['load']:.1f} |")
    ratios = [
        ("speed-up, trcli TR-DPO vs TRL LoRA DPO (goal >= 1.25x)", trl["train_s"] / tr["train_s"], "x"),
        ("speed-up, trcli TR-DPO vs TRL full-model TR-DPO", trl_full["train_s"] / tr["train_s"], "x"),
        ("speed-up, packed vs padded (trcli TR-DPO)", plain["train_s"] / tr["train_s"], "x"),
        ("time, trcli TR-DPO / trcli DPO", tr["train_s"] / dpo["train_s"], "x"),
        ("peak memory, trcli TR-DPO / trcli DPO (goal <= 1.05)", tr["peak_mib"] / dpo["peak_mib"], "x"),
        ("peak memory, trcli TR-DPO / TRL full-model TR-DPO (goal <= 0.7)", tr["peak_mib"] / trl_full["peak_mib"], "x"),
        ("peak memory, trcli TR-DPO / TRL LoRA DPO", tr["peak_mib"] / trl["peak_mib"], "x"),
        ("reference update share of step time at tau=1 (goal < 2%)", 100 * tr["update_s"] / tr["train_s"], "%"),
        ("reference update per step, ms", 1000 * tr["update_s"] / max(1, tr["updates"]), ""),
        ("matmul 4096^3 fp32 (best), GFLOP/s", matmul / 1e9, ""),
        ("trcli TR-DPO executed FLOPs (FlopCounterMode), GFLOP", r["trcli-flops"]["flops"] / 1e9, ""),
        ("trcli TR-DPO achieved, GFLOP/s", achieved / 1e9, ""),
        ("trcli TR-DPO achieved / matmul", 100 * achieved / matmul, "%"),
    ]
    lines += ["", "| measure | value |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2f}{unit} |" for name, value, unit in ratios]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=80)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset (all by default)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per system; the fastest is reported")
    ap.add_argument("--out", help="also write the raw results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.setup, args.max_length)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: .venv/bin/pip install trl (or make bench)") from None
    with tempfile.TemporaryDirectory(prefix="trcli-bench-") as tmp:
        work = Path(tmp)
        _log("building the model, tokenizer and data ...")
        setup = build(work, args.pairs, args.max_length)
        setup_file = work / "setup.json"
        setup_file.write_text(json.dumps(setup))
        pads = padding_stats(setup, args.max_length)
        matmul = 0.0
        # Round-robin repeats, keeping each system's fastest run: other work on the machine
        # only ever slows a run down, so the minimum is the least disturbed measurement.
        results = {}
        for repeat in range(args.repeats):
            matmul = max(matmul, matmul_flops())  # the least disturbed rate, like the times
            for system in args.systems.split(","):
                if system == "trcli-flops" and system in results:
                    continue  # a count, not a time: once is enough
                _log(f"running {system} ({repeat + 1}/{args.repeats}) ...")
                result = spawn(system, setup_file, args.max_length)
                _log(f"  {result}")
                if system not in results or result.get("train_s", 0) < results[system].get("train_s", 0):
                    results[system] = result
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": setup, "padding": pads, "matmul_flops": matmul,
                                              "results": results}, indent=1))
    if set(SYSTEMS) <= set(results):
        print(report(setup, results, matmul, pads))
    else:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
