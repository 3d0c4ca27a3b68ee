"""The soft reference update alone: milliseconds per update on align_speed.py's model shape.

    .venv/bin/python benchmarks/ref_update.py [--hidden 512] [--layers 6] [--rank 16] [--ref-rank 32]

Builds the Pythia-shaped model of align_speed.py (GPT-NeoX, random weights, LoRA on every linear
layer: 4 per block), gives the policy and reference adapters random B factors (a fresh LoRA has
B = 0, which would make the update trivial), and times trcli.trust_region.update_lora_reference
at alpha 0.6: --repeats rounds of --per-round updates, reporting the fastest and the median round.
Also prints torch's profiler breakdown of one round (which kernels the time goes to). The share
of a training step is measured in context by align_speed.py; this isolates the update so that a
change to it can be compared quickly. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ref-rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from torch.profiler import profile

    from trcli.config import load
    from trcli.modeling import build_for_training
    from trcli.tiny import build_model
    from trcli.trust_region import lora_layers, update_lora_reference

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        build_model(tmp, hidden_size=args.hidden, layers=args.layers, heads=8, vocab_size=10000)
        cfg = load(None, {"model.name_or_path": tmp, "model.lora_r": args.rank, "model.lora_alpha": 2 * args.rank,
                          "train.device": "cpu", "align.method": "tr-dpo", "align.update": "soft"}, environ={})
        model, _ = build_for_training(cfg, torch.device("cpu"), {}, reference=True, ref_rank=args.ref_rank)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    layers = lora_layers(model)
    update_lora_reference(layers, 0.6)  # warm-up
    rounds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.per_round):
            update_lora_reference(layers, 0.6)
        rounds.append(1000 * (time.perf_counter() - start) / args.per_round)
    print(f"{len(layers)} adapted layers, policy rank {args.rank}, reference rank {args.ref_rank}, "
          f"{args.threads} threads")
    print(f"reference update: best {min(rounds):.2f} ms, median {statistics.median(rounds):.2f} ms")
    with profile() as prof:
        for _ in range(args.per_round):
            update_lora_reference(layers, 0.6)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
