"""Measured peak memory of a TR-DPO training step on CPU against trcli's memory plan.

    .venv/bin/python benchmarks/memory_peak.py            # all cases, prints a Markdown table

Each case runs in a fresh process on a Pythia-shaped model with random weights (the real Pythia
shapes, so the vocabulary and layer widths are the real ones), built with trcli's own
`build_for_training`, and performs two optimizer steps of TR-DPO exactly as `align` does:
reference pass, policy pass, the kl/init pass of a logging step, backward, clipping, AdamW, the
soft reference update. Every sequence is max_length tokens (16 prompt tokens), the plan's worst
case.

What is measured: the kernel's peak resident set size (VmHWM) during the second step, minus the
resident size before the model was built (Python, torch and its libraries). The peak is reset
after the first step through /proc/self/clear_refs, so the transient of loading the weights and
the first step's lazy allocation of AdamW's moments do not count twice. glibc is told to serve
every allocation above 64 KiB with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the
kernel and the peak RSS tracks the peak of live tensors rather than the allocator's history.
tracemalloc does not see torch's allocations, and torch keeps no allocator statistics on CPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [  # (model, lora?, gradient checkpointing?, pairs per step, max_length)
    ("pythia-14m", True, False, 2, 512),
    ("pythia-70m", True, False, 2, 512),
    ("pythia-160m", True, False, 2, 512),
    ("pythia-70m", False, False, 2, 512),
    ("pythia-160m", True, True, 2, 512),
]


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(model_dir: str, lora: bool, checkpointing: bool, pairs: int, length: int) -> None:
    import torch

    from trcli import losses
    from trcli.batching import collate, token_logps
    from trcli.config import load
    from trcli.memory import estimate
    from trcli.modeling import INIT, build_for_training, trainable_parameters, using_adapter
    from trcli.trust_region import REFERENCE, lora_layers, update_full_reference, update_lora_reference

    torch.set_num_threads(2)
    flags = {"model.name_or_path": model_dir, "model.lora": lora, "model.gradient_checkpointing": checkpointing,
             "train.batch_size": pairs, "data.max_length": length, "train.device": "cpu",
             "align.method": "tr-dpo", "align.update": "soft", "model.lora_r": 8}
    cfg = load(None, flags, environ={})
    baseline = _kib("VmRSS")
    model, frozen = build_for_training(cfg, torch.device("cpu"), {}, reference=True, ref_rank=16, keep_init=True)
    initial = None if frozen is None else __import__("copy").deepcopy(frozen)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    prompt = 16

    def reference(batch, which):
        with torch.no_grad():
            if frozen is not None:
                return token_logps(frozen if which == REFERENCE else initial, batch)[0]
            with using_adapter(model, which):
                return token_logps(model, batch)[0]

    def step():
        rows = [(torch.randint(0, 50000, (prompt,), generator=gen).tolist(),
                 torch.randint(0, 50000, (length - prompt,), generator=gen).tolist()) for _ in range(2 * pairs)]
        batch = collate(rows, 1, "cpu")
        ref = reference(batch, REFERENCE).sum(-1)
        pol_tok, _ = token_logps(model, batch)
        reference(batch, INIT)  # the kl/init pass of a logging step, while the graph is alive
        pol = pol_tok.sum(-1)
        loss = losses.dpo_loss(pol[:pairs], pol[pairs:], ref[:pairs], ref[pairs:], 0.05)[0].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if frozen is not None:
            update_full_reference(model, frozen, 0.6)
        else:
            update_lora_reference(lora_layers(model), 0.6)

    model.train()
    step()
    Path("/proc/self/clear_refs").write_text("5")
    step()
    measured = _kib("VmHWM") - baseline
    plan = estimate(cfg, "align")["plan"]
    print(json.dumps({"measured": measured, "estimated": plan["total"], "params": plan["params"]}))


def main() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from trcli.memory import BUILTIN

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, lora, ckpt, pairs, length in CASES:
            shape = BUILTIN[name]
            model_dir = Path(tmp) / name
            if not model_dir.exists():
                config = GPTNeoXConfig(vocab_size=shape.vocab, hidden_size=shape.hidden,
                                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                                       intermediate_size=shape.intermediate, max_position_embeddings=2048,
                                       rotary_pct=0.25, tie_word_embeddings=False)
                GPTNeoXForCausalLM(config).save_pretrained(str(model_dir))
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
            out = subprocess.run([sys.executable, __file__, "--child", str(model_dir), str(lora), str(ckpt),
                                  str(pairs), str(length)], env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            error = result["estimated"] / result["measured"] - 1
            rows.append(f"| {name} ({result['params'] / 1e6:.0f}M) | {'LoRA r=8' if lora else 'full'} "
                        f"| {'yes' if ckpt else 'no'} | {pairs} x 2 x {length} | {result['measured'] / 2**20:,.0f} "
                        f"| {result['estimated'] / 2**20:,.0f} | {error:+.0%} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("| model | training | grad. ckpt | sequences | measured peak (MiB) | plan (MiB) | plan error |")
    print("|---|---|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3] == "True", sys.argv[4] == "True", int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()
