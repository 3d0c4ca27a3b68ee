"""Where the time of a TR-DPO step goes, on SmolLM2-135M-Instruct and real HH pairs.

    .venv/bin/python benchmarks/profile_step.py [--steps 5] [--logps-chunk 256] [--ops]

Runs `trcli align` (TR-DPO, soft update, alpha 0.6, tau 1; LoRA r=16 / alpha 32 on all linear
layers; 4 pairs a step, max length 512, fp32, CPU) in this process with timers around its parts
and prints each part's share of the step, averaged over the steps after the first (a warm-up)
and before the last (which logs, and so adds a kl/init pass of the starting reference):

    policy forward      the policy pass through the decoder (packed rows, LoRA active)
    policy log-prob head  its completion log-probs from the hidden states (trcli.logps: logits a
                        chunk at a time, and for a frozen projection the Jacobian rows backward uses)
    backward            loss.backward() (the policy's input gradients and LoRA gradients)
    reference pass      the reference adapter's pass, no graph (decoder)
    reference log-prob head  its log-probs from the hidden states
    optimizer step      AdamW over the policy adapter (and gradient clipping)
    reference update    the soft update of the reference adapter (trust_region.update_lora_reference)
    other               packing the batch, the loss, metrics, the scheduler

`--ops` adds torch.profiler's top operators of one step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from align_speed import hh_pairs  # noqa: E402

MAX_LENGTH, BATCH = 512, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps (first and last not counted)")
    ap.add_argument("--logps-chunk", type=int, default=256)
    ap.add_argument("--ops", action="store_true", help="also print torch.profiler's top operators of one step")
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from trcli import batching, logps, trust_region
    from trcli.config import Config
    from trcli.pretrained import smollm2
    from trcli.stages import align
    from trcli.tokens import Encoder

    model_dir = smollm2()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = Encoder(tok, 10 ** 6)
    rows = []
    for r in hh_pairs():
        c, j = encoder(r["prompt"], [r["chosen"], r["rejected"]])
        if len(c.prompt) + max(len(c.completion), len(j.completion)) <= MAX_LENGTH:
            rows.append(r)
        if len(rows) == BATCH * args.steps:
            break
    work = Path(tempfile.mkdtemp(prefix="trcli-profile-"))
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(work / "prep" / "data"))

    spent: dict[str, float] = defaultdict(float)
    per_step: list[dict] = []
    marks: list[float] = []

    def timer(name, fn, split=None):
        def wrapped(*a, **k):
            key = split() if split else name
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - start
        return wrapped

    grad = lambda: torch.is_grad_enabled()
    logps.chunked_logps = timer("", logps.chunked_logps,
                                lambda: "policy log-prob head" if grad() else "reference log-prob head")
    align.token_logps = timer("", align.token_logps, lambda: "policy pass" if grad() else "reference pass")
    torch.Tensor.backward = timer("backward", torch.Tensor.backward)
    for module in (align, trust_region):
        if hasattr(module, "update_lora_reference"):
            module.update_lora_reference = timer("reference update", module.update_lora_reference)
    started = {}
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(lambda opt, a, k: started.update(t=time.perf_counter()))
    register_optimizer_step_post_hook(
        lambda opt, a, k: spent.__setitem__("optimizer step", spent["optimizer step"] + time.perf_counter() - started["t"]))
    fit = align.fit
    profiler = {}

    def timed_fit(cfg, run_dir, model, params, hooks, *a, **k):
        after_step, step_fn = hooks.after_step, hooks.step_fn

        def step(policy, batch, share, logging):
            if args.ops and len(marks) == 2:
                profiler["p"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler["p"].__enter__()
            return step_fn(policy, batch, share, logging)

        def after(step_no, metrics, logging):
            out = after_step(step_no, metrics, logging)
            marks.append(time.perf_counter())
            per_step.append(dict(spent, step=marks[-1] - marks[-2]))
            spent.clear()
            if "p" in profiler and len(marks) == 3:
                profiler["p"].__exit__(None, None, None)
            return out

        hooks.after_step, hooks.step_fn = after, step
        marks.append(time.perf_counter())
        return fit(cfg, run_dir, model, params, hooks, *a, **k)

    align.fit = timed_fit
    batching.set_logps_chunk(args.logps_chunk)
    cfg = Config.model_validate({
        "model": {"name_or_path": str(model_dir), "lora_r": 16, "lora_alpha": 32},
        "data": {"path": str(work / "prep"), "max_length": MAX_LENGTH},
        "train": {"batch_size": BATCH, "learning_rate": 5e-5, "device": "cpu", "logging_steps": 1000,
                  "max_steps": args.steps, "logps_chunk": args.logps_chunk},
        "align": {"method": "tr-dpo", "update": "soft", "alpha": 0.6, "tau": 1, "beta": 0.1},
        "output": str(work / "run"),
    })
    try:
        align.run(cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timed = per_step[1:-1] or per_step
    mean = lambda key: sum(s.get(key, 0.0) for s in timed) / len(timed)
    step = mean("step")
    parts = {
        "policy forward": mean("policy pass") - mean("policy log-prob head"),
        "policy log-prob head": mean("policy log-prob head"),
        "backward": mean("backward"),
        "reference pass": mean("reference pass") - mean("reference log-prob head"),
        "reference log-prob head": mean("reference log-prob head"),
        "optimizer step": mean("optimizer step"),
        "reference update": mean("reference update"),
    }
    parts["other"] = step - sum(parts.values())
    print(f"TR-DPO step on SmolLM2-135M-Instruct, {BATCH} HH pairs, max length {MAX_LENGTH}, logps_chunk "
          f"{args.logps_chunk}, {torch.get_num_threads()} threads; mean of {len(timed)} steps: {step:.2f} s "
          f"(load average {os.getloadavg()[0]:.1f})\n")
    print("| part | s | share |\n| --- | ---: | ---: |")
    for name, value in parts.items():
        print(f"| {name} | {value:.3f} | {value / step:.1%} |")
    if "p" in profiler:
        print("\n" + profiler["p"].key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print("\n" + json.dumps({"step_s": [s["step"] for s in per_step]}))


if __name__ == "__main__":
    main()
