"""A real model, side by side with TRL: SmolLM2-135M-Instruct on real HH pairs (`make bench`).

    .venv/bin/python benchmarks/real_model.py [--out results.json] [--systems a,b,...]

Model: SmolLM2-135M-Instruct (trcli.pretrained.smollm2: Llama, 30 layers, hidden 576, vocabulary
49152, tied embeddings), fp32 on CPU. Data: the first pairs of
../shared/data/hh-rlhf/harmless-base-test.jsonl.gz whose prompt plus either reply fits in 512
tokens (plain text, no chat template, so neither trainer truncates and both see the same ids),
4 pairs a step, LoRA r=16 / alpha 32 / dropout 0 on all linear layers, AdamW lr 5e-5.

    trcli-dpo            trcli DPO (static reference)
    trcli-tr-dpo         trcli TR-DPO, soft update, alpha 0.6, tau 1 (reference adapter rank 32)
    trcli-tr-kto         trcli TR-KTO, hard update, tau 2 (the 4 pairs of a step as 8 labelled examples)
    trl-lora-dpo         TRL 1.16 DPOTrainer, LoRA, vanilla DPO (TRL has no TR update with LoRA)
    trl-lora-dpo-keep    the same with glibc keeping freed memory (MALLOC_MMAP_MAX_=0,
                         MALLOC_TRIM_THRESHOLD_=2147483647), as trcli sets it for itself on CPU:
                         the like-for-like speed comparison
    trcli-tr-dpo-full    trcli TR-DPO with train.logps_chunk 0 (all logits at once), for comparison

The vocabulary sweep runs TR-DPO (chunked and logps_chunk 0) on models of SmolLM2's shape (same
depth and width) with wider vocabularies (random weights, tied, the same token ids), and TRL's
LoRA DPO at the widest, to show where the memory of a step goes as the vocabulary grows
(`@131072`, `@262144`); these runs take 2 steps (memory is what they measure).

TRL is slow here, so the SmolLM2 systems run 4 optimizer steps: the first is a warm-up and s/step
is the mean of steps 2-4 (trcli runs one more, untimed step: its last step logs, which for TR
runs adds a kl/init pass). Each system runs in its own process, once: "peak MiB" is that process's
peak RSS (ru_maxrss: imports, model loading and training), "train peak" the peak RSS of the
training loop alone (Linux VmHWM, reset when training starts). The achieved FLOP/s counts the
FLOPs that the unique tokens need (each shared prompt once, no padding; forward, backward's input
gradients and the reference forward; attention over the (query, key) pairs each token may see;
the output projection at completion positions only), divided by the measured step time, against
the best 4096^3 fp32 matmul on the machine. The 1-minute load average is printed with every run:
the machine may be shared, and other work only ever slows a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from align_speed import hh_pairs, timed_update  # noqa: E402  (the same HH reader)

MAX_LENGTH, BATCH, STEPS, WARMUP = 512, 4, 4, 1
LORA = {"r": 16, "alpha": 32}
LR, BETA, ALPHA = 5e-5, 0.1, 0.6
WIDE = (131072, 262144)
KEEP_FREED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647"}  # trcli's own mallopt
SYSTEMS = ["trcli-dpo", "trcli-tr-dpo", "trcli-tr-kto", "trl-lora-dpo", "trl-lora-dpo-keep", "trcli-tr-dpo-full",
           f"trcli-tr-dpo@{WIDE[0]}", f"trcli-tr-dpo-full@{WIDE[0]}",
           f"trcli-tr-dpo@{WIDE[1]}", f"trcli-tr-dpo-full@{WIDE[1]}", f"trl-lora-dpo@{WIDE[1]}"]
SWEEP_STEPS = 2  # the vocabulary sweep measures memory: one warm-up step and one more


def _steps(system: str) -> int:
    return SWEEP_STEPS if "@" in system else STEPS


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- set-up (parent) ---------------------------------------------------------------------------

def matmul_flops(n: int = 4096, repeats: int = 5) -> float:
    """The machine's fp32 matmul rate: the best of single n³ products into a preallocated result
    (a fresh 64 MB result would time glibc's page faults too)."""
    import torch

    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=c)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def build(work: Path, pairs: int, vocabs: set[int]) -> dict:
    """SmolLM2's folder, the wide-vocabulary models, and the prepared data (trcli's prep layout)."""
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trcli.pretrained import smollm2
    from trcli.tokens import Encoder

    model_dir = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = Encoder(tok, 10 ** 6)
    chosen, stats = [], {"prompt": 0, "chosen": 0, "rejected": 0}
    for r in hh_pairs():  # file order; token ids exactly as trcli and TRL make them
        c, j = encoder(r["prompt"], [r["chosen"], r["rejected"]])
        if len(c.prompt) + max(len(c.completion), len(j.completion)) <= MAX_LENGTH:
            chosen.append(r)
            stats["prompt"] += len(c.prompt)
            stats["chosen"] += len(c.completion)
            stats["rejected"] += len(j.completion)
        if len(chosen) == pairs:
            break
    data_dir = work / "prep"
    DatasetDict({"train": Dataset.from_list(chosen)}).save_to_disk(str(data_dir / "data"))
    models = {"49152": str(model_dir)}
    for vocab in sorted(vocabs & set(WIDE)):
        path = work / f"smollm2-vocab{vocab}"
        config = AutoConfig.from_pretrained(str(model_dir))
        config.vocab_size = vocab
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
        tok.save_pretrained(str(path))
        models[str(vocab)] = str(path)
    config = json.loads((model_dir / "config.json").read_text())
    return {"models": models, "data": str(data_dir), "pairs": len(chosen), "config": config,
            "mean_tokens": {k: v / len(chosen) for k, v in stats.items()}}


# --- measuring inside a child ------------------------------------------------------------------

def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) so that it measures from now on (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class StepClock:
    """Wall time of each optimizer step."""

    def __init__(self, steps: int):
        self.marks: list[float] = []
        self.steps = steps

    def start(self):
        _reset_peak()
        self.marks = [time.perf_counter()]

    def tick(self):
        self.marks.append(time.perf_counter())

    def result(self) -> dict:
        steps = [b - a for a, b in zip(self.marks, self.marks[1:])]
        timed = steps[WARMUP:self.steps]
        return {"step_s": steps, "s_per_step": sum(timed) / len(timed), "train_peak_mib": _peak_mib()}


def _flops(setup: dict, vocab: int, batches) -> float:
    """FLOPs the unique tokens of these TR-DPO batches need (see the module docstring)."""
    from trcli.batching import pack

    c = setup["config"]
    hidden, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    heads, kv, head_dim = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    shapes = [(hidden, heads * head_dim), (hidden, kv * head_dim), (hidden, kv * head_dim),
              (heads * head_dim, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    linear = layers * sum(i * o for i, o in shapes)
    lora = lambda r: layers * sum(r * (i + o) for i, o in shapes)
    total = 0.0
    for pairs in batches:
        seqs = [(c_.prompt, c_.completion) for c_, _ in pairs] + [(r.prompt, r.completion) for _, r in pairs]
        batch = pack(seqs, 0, "cpu")
        unique = batch["fed"]
        pairs_seen = int(batch["allowed"].sum()) - (batch["input_ids"].numel() - unique)  # pads see themselves
        targets = int(batch["targets"].numel())
        body = lambda r: 2 * (linear + lora(r)) * unique + 4 * layers * heads * head_dim * pairs_seen
        head = 2 * hidden * vocab * targets
        # policy forward + backward (input gradients: the body once more, attention twice) + reference
        total += body(LORA["r"]) * 2 + 4 * layers * heads * head_dim * pairs_seen + body(2 * LORA["r"])
        total += 3 * head  # policy forward, its Jacobian rows, reference forward
    return total


def run_trcli(system: str, setup: dict, work: Path) -> dict:
    import shutil

    import torch

    from trcli import trust_region
    from trcli.config import Config
    from trcli.stages import align

    name, _, vocab = system.partition("@")
    vocab = vocab or "49152"
    clock, timings = StepClock(_steps(system)), {"update": 0.0, "updates": 0}
    fit, make_batch = align.fit, align.make_batch
    batches_seen, built = [], []

    def recording_make_batch(*args, **kwargs):  # the batches as trcli packs them, for the FLOP count
        batch = make_batch(*args, **kwargs)
        if len(clock.marks) - 1 < clock.steps:
            built.append((len(clock.marks) - 1, batch))
        return batch

    def timed_fit(cfg, run_dir, model, params, hooks, *args, **kwargs):
        step_fn, after_step = hooks.step_fn, hooks.after_step

        def step(policy, batch, share, logging):
            if len(clock.marks) - 1 < clock.steps:
                batches_seen.append(batch)
            return step_fn(policy, batch, share, logging)

        def after(step_no, metrics, logging):
            out = after_step(step_no, metrics, logging)
            clock.tick()
            return out

        hooks.step_fn, hooks.after_step = step, after
        clock.start()
        return fit(cfg, run_dir, model, params, hooks, *args, **kwargs)

    align.fit, align.make_batch = timed_fit, recording_make_batch
    for module in (align, trust_region):  # wherever the stage looks the update up
        for fn in ("update_lora_reference", "update_full_reference"):
            if hasattr(module, fn):
                setattr(module, fn, timed_update(getattr(module, fn), timings))
    kto = name == "trcli-tr-kto"
    cfg = Config.model_validate({
        "model": {"name_or_path": setup["models"][vocab], "lora_r": LORA["r"], "lora_alpha": LORA["alpha"]},
        "data": {"path": setup["data"], "max_length": MAX_LENGTH},
        "train": {"batch_size": 2 * BATCH if kto else BATCH, "learning_rate": LR, "device": "cpu",
                  "logging_steps": 100, "max_steps": clock.steps + 1,
                  "logps_chunk": 0 if name.endswith("-full") else 256},
        "align": ({"method": "tr-kto", "update": "hard", "tau": 2, "beta": BETA} if kto else
                  {"method": "dpo" if name == "trcli-dpo" else "tr-dpo", "update": "soft", "alpha": ALPHA,
                   "tau": 1, "beta": BETA}),
        "output": str(work / system),
    })
    shutil.rmtree(work / system, ignore_errors=True)
    result = align.run(cfg)
    out = clock.result()
    out.update(update_s=timings["update"], updates=timings["updates"], steps=result.get("steps"),
               threads=torch.get_num_threads())
    if name == "trcli-tr-dpo" and not kto:
        timed_batches = batches_seen[WARMUP:clock.steps]
        out["flops_per_step"] = _flops(setup, int(vocab), timed_batches) / len(timed_batches)
        packed = [b for step, b in built if WARMUP <= step < clock.steps and "fed" in b]  # one a step
        out["unique_tokens_per_step"] = sum(b["fed"] for b in packed) / len(timed_batches)
        out["row_slots_per_step"] = sum(b["input_ids"].numel() for b in packed) / len(timed_batches)
    return out


def run_trl(system: str, setup: dict, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from trcli.data.records import load_prepped

    _, _, vocab = system.partition("@")
    path = setup["models"][vocab or "49152"]
    torch.manual_seed(42)
    rows = load_prepped(setup["data"])["train"].to_list()
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    clock = StepClock(_steps(system))

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    args = DPOConfig(
        output_dir=str(work / system), per_device_train_batch_size=BATCH, max_steps=clock.steps,
        learning_rate=LR, lr_scheduler_type="linear", beta=BETA, max_length=MAX_LENGTH,
        gradient_checkpointing=False, bf16=False, use_cpu=True, logging_steps=1, save_strategy="no",
        report_to=[], seed=42, dataloader_num_workers=0, disable_tqdm=True)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), args=args,
                         train_dataset=data, processing_class=AutoTokenizer.from_pretrained(path),
                         peft_config=peft_config, callbacks=[Clock()])
    out = trainer.train()
    result = clock.result()
    result.update(steps=out.global_step, threads=torch.get_num_threads())
    return result


def child(system: str, setup_file: str) -> None:
    setup = json.loads(Path(setup_file).read_text())
    work = Path(setup_file).parent
    result = (run_trl if system.startswith("trl") else run_trcli)(system, setup, work)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(system: str, setup_file: Path) -> dict:
    """Run one system in a fresh process; its own peak RSS comes from wait4's rusage."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", **(KEEP_FREED if system.endswith("-keep") else {}))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, "--child", system, "--setup", str(setup_file)],
                                stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        raise SystemExit(f"{system} failed (exit {code}):\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(process_s=wall, peak_mib=usage.ru_maxrss / 1024, load=os.getloadavg()[0])
    return result


# --- report ------------------------------------------------------------------------------------

def _ratio(value: float, goal: float, better: str) -> str:
    met = value <= goal if better == "lower" else value >= goal
    if met:
        return "met"
    return f"not met (needs {goal / value:.2f}x less)" if better == "lower" else \
        f"not met ({goal / value:.2f}x short)"


def report(setup: dict, r: dict, matmul: float, uptime: tuple[str, str]) -> str:
    c = setup["config"]
    lines = [
        f"date {date.today().isoformat()}; {os.cpu_count()} CPU cores; load before: {uptime[0]}; after: {uptime[1]}",
        f"model: SmolLM2-135M-Instruct ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, vocabulary "
        f"{c['vocab_size']}), fp32; {setup['pairs']} real HH pairs, {BATCH} pairs a step, max length {MAX_LENGTH}, "
        f"LoRA r{LORA['r']} all linear; s/step = mean of steps {WARMUP + 1}-{STEPS} after {WARMUP} warm-up",
        "mean tokens: prompt {prompt:.0f}, chosen {chosen:.0f}, rejected {rejected:.0f}".format(**setup["mean_tokens"]),
        "",
        "| system | vocabulary | s/step | peak MiB | train peak MiB | load avg |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SYSTEMS:
        if name not in r:
            continue
        x = r[name]
        vocab = name.partition("@")[2] or str(c["vocab_size"])
        lines.append(f"| {name.partition('@')[0]} | {vocab} | {x['s_per_step']:.2f} | {x['peak_mib']:.0f} | "
                     f"{x['train_peak_mib'] or float('nan'):.0f} | {x['load']:.1f} |")
    lines += ["", "| goal | measured | |", "| --- | ---: | --- |"]
    tr, trl = r.get("trcli-tr-dpo"), r.get("trl-lora-dpo")
    if tr and trl:
        mem = tr["peak_mib"] / trl["peak_mib"]
        lines.append(f"| TR-DPO peak memory <= 0.7x TRL LoRA DPO (SmolLM2) | {mem:.2f}x | {_ratio(mem, 0.7, 'lower')} |")
        train_mem = tr["train_peak_mib"] / trl["train_peak_mib"]
        lines.append(f"| (training loop alone) | {train_mem:.2f}x | |")
        speed = trl["s_per_step"] / tr["s_per_step"]
        lines.append(f"| TR-DPO speed >= 5x TRL LoRA DPO (SmolLM2) | {speed:.2f}x | {_ratio(speed, 5, 'higher')} |")
        if "trl-lora-dpo-keep" in r:
            keep = r["trl-lora-dpo-keep"]["s_per_step"] / tr["s_per_step"]
            lines.append(f"| (against TRL with the same malloc settings) | {keep:.2f}x | {_ratio(keep, 5, 'higher')} |")
    wide, wide_trl = r.get(f"trcli-tr-dpo@{WIDE[-1]}"), r.get(f"trl-lora-dpo@{WIDE[-1]}")
    if wide and wide_trl:
        mem = wide["peak_mib"] / wide_trl["peak_mib"]
        lines.append(f"| TR-DPO peak memory <= 0.5x TRL LoRA DPO (vocabulary {WIDE[-1]}) | {mem:.2f}x | "
                     f"{_ratio(mem, 0.5, 'lower')} |")
        train_mem = wide["train_peak_mib"] / wide_trl["train_peak_mib"]
        lines.append(f"| (training loop alone) | {train_mem:.2f}x | |")
    if tr and "flops_per_step" in tr:
        achieved = tr["flops_per_step"] / tr["s_per_step"]
        share = achieved / matmul
        lines.append(f"| TR-DPO FLOP/s on unique tokens >= 60% of the matmul peak | {achieved / 1e9:.0f} GFLOP/s "
                     f"of {matmul / 1e9:.0f} = {share:.0%} | {_ratio(share, 0.6, 'higher')} |")
        lines.append(f"| (unique tokens a step / packed row slots) | {tr['unique_tokens_per_step']:.0f} / "
                     f"{tr['row_slots_per_step']:.0f} | |")
    if tr and tr.get("updates"):
        lines.append(f"| reference update, ms (share of a step) | {1000 * tr['update_s'] / tr['updates']:.1f} "
                     f"({tr['update_s'] / tr['updates'] / tr['s_per_step']:.1%}) | |")
    sweep = [(int(v), r.get(f"trcli-tr-dpo@{v}" if v != str(c["vocab_size"]) else "trcli-tr-dpo"),
              r.get(f"trcli-tr-dpo-full@{v}" if v != str(c["vocab_size"]) else "trcli-tr-dpo-full"),
              r.get(f"trl-lora-dpo@{v}" if v != str(c["vocab_size"]) else "trl-lora-dpo"))
             for v in [str(c["vocab_size"]), *map(str, WIDE)]]
    lines += ["", "training-loop peak MiB against vocabulary (TR-DPO chunked / logps_chunk 0 / TRL LoRA DPO):", "",
              "| vocabulary | trcli TR-DPO | trcli TR-DPO, logps_chunk 0 | TRL LoRA DPO |", "| ---: | ---: | ---: | ---: |"]
    cell = lambda x: f"{x['train_peak_mib']:.0f}" if x and x.get("train_peak_mib") else "-"
    for vocab, a, b, t in sweep:
        lines.append(f"| {vocab} | {cell(a)} | {cell(b)} | {cell(t)} |")
    return "\n".join(lines)


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset (all by default)")
    ap.add_argument("--out", help="also write the raw results as JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--setup", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.setup)
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit("TRL is not installed: .venv/bin/pip install trl (or make bench)") from None
    before = _uptime()
    with tempfile.TemporaryDirectory(prefix="trcli-real-") as tmp:
        work = Path(tmp)
        _log(f"{before}\nbuilding the data and the wide-vocabulary models ...")
        systems = args.systems.split(",")
        setup = build(work, BATCH * (STEPS + 1), {int(s.partition("@")[2] or 0) for s in systems})
        setup_file = work / "setup.json"
        setup_file.write_text(json.dumps(setup))
        matmul = matmul_flops()
        results = {}
        for system in systems:
            _log(f"running {system} ...")
            results[system] = spawn(system, setup_file)
            _log(f"  {results[system]}")
        matmul = max(matmul, matmul_flops())
    after = _uptime()
    if args.out:
        Path(args.out).write_text(json.dumps({"setup": setup, "matmul_flops": matmul, "uptime": [before, after],
                                              "results": results}, indent=1))
    print(report(setup, results, matmul, (before, after)))


if __name__ == "__main__":
    main()
