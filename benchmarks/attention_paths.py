"""Packed rows on sdpa (dense mask) against FlexAttention (BlockMask), forward only, on CPU.

    .venv/bin/python benchmarks/attention_paths.py [--batches 3]

SmolLM2-135M-Instruct (LoRA r=16 on all linear layers, as training has it), real HH pairs, 4 pairs
a batch, max length 512, packed as `make_batch` packs them. For each batch: the share of
128 × 128 blocks the BlockMask lets FlexAttention visit (the rest: the upper triangle, other
groups of the row, the other completion), and the time of a reference pass (no_grad:
torch 2.13's flex_attention has no backward on CPU, so training steps cannot take this path here)
on sdpa with the dense additive mask and on transformers' compiled flex_attention (the first
flex pass compiles the kernel and is not counted). Both give the same log-probs (checked).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from align_speed import hh_pairs  # noqa: E402

MAX_LENGTH, BATCH = 512, 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=3)
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trcli.batching import FLEX, block_masks, make_batch, token_logps
    from trcli.pretrained import smollm2
    from trcli.tokens import Encoder

    path = smollm2()
    tok = AutoTokenizer.from_pretrained(str(path))
    encoder = Encoder(tok, MAX_LENGTH)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(path)),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    rows = hh_pairs(BATCH * args.batches * 2)
    batches = []
    for i in range(args.batches):
        items = [encoder(r["prompt"], [r["chosen"], r["rejected"]]) for r in rows[i * BATCH:(i + 1) * BATCH]]
        seqs = [(c.prompt, c.completion) for c, _ in items] + [(r.prompt, r.completion) for _, r in items]
        batches.append(make_batch(model, seqs, 0, "cpu"))
    base = model.get_base_model()

    def timed(batch):
        start = time.perf_counter()
        with torch.no_grad():
            out = token_logps(model, batch)[0]
        return time.perf_counter() - start, out

    results = []
    for batch in batches:
        base.set_attn_implementation("sdpa")
        sdpa_s, sdpa_out = min((timed(batch) for _ in range(2)), key=lambda r: r[0])
        base.set_attn_implementation(FLEX)
        timed(batch)  # compiles the kernel for this shape
        flex_s, flex_out = min((timed(batch) for _ in range(2)), key=lambda r: r[0])
        mask = block_masks(base, batch)
        blocks = mask.to_dense()
        results.append((tuple(batch["input_ids"].shape), float(blocks.float().mean()), sdpa_s, flex_s,
                        float((sdpa_out - flex_out).abs().max())))
    print(f"reference pass (no_grad) on SmolLM2-135M-Instruct + LoRA, {BATCH} HH pairs a batch, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}\n")
    print("| packed rows x width | blocks visited | sdpa s | flex s | max abs diff |\n| --- | ---: | ---: | ---: | ---: |")
    for shape, share, a, b, diff in results:
        print(f"| {shape[0]} x {shape[1]} | {share:.0%} | {a:.2f} | {b:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
