"""sft: supervised fine-tuning on prompt -> completion, loss on completion tokens only.

Its adapter (or full weights) is what `align --from` starts the policy and the reference from.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trcli import common, distributed, memory
from trcli.batching import attention_note, collate, make_batch, set_logps_chunk, token_logps
from trcli.config import Config
from trcli.data.records import as_kind, load_prepped
from trcli.errors import UsageError
from trcli.memory import plan_or_none
from trcli.modeling import build_for_training, load_tokenizer, no_dropout, pick_device, trainable_parameters
from trcli.progress import Progress
from trcli.runs import Run, inherit
from trcli.tokens import stage_encoder
from trcli.training import Hooks, check_fresh_start, fit, load_weights, save_weights, shuffled_batches
from trcli.trust_region import POLICY


def run(cfg: Config) -> dict:
    inherit(cfg)
    if (plan := plan_or_none(cfg, "sft")) is not None:
        return {**plan, "attention": attention_note(cfg, packed=cfg.train.packing)}
    if not cfg.output:
        raise UsageError("sft needs --output DIR")
    if not cfg.data.path:
        raise UsageError("sft needs data: --data PREP_DIR or --from a prep run")
    parallel = distributed.setup(cfg)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    set_logps_chunk(cfg.train.logps_chunk)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    data = load_prepped(cfg.data.path)
    encoder = stage_encoder(cfg, tokenizer, "trcli sft")
    enc = lambda rows: [e[0] for r in rows if (e := encoder(r["prompt"], [r["completion"]])) is not None]
    train_rows = enc(as_kind(data["train"], "sft"))
    test_rows = enc(as_kind(data["test"], "sft")) if "test" in data else []
    truncation = encoder.report("trcli sft")
    if not train_rows:
        raise UsageError(f"{cfg.data.path}: every training prompt fills --max-length {cfg.data.max_length}")

    check_fresh_start(cfg)
    run_dir = Run("sft", cfg.output, cfg)
    run_dir.add_input("data", cfg.data.path)
    # Under FSDP / ZeRO-3 the whole model is built in host memory; sharding moves each rank's part to its device.
    model, _ = build_for_training(cfg, torch.device("cpu") if parallel.shards_weights else device, start={},
                                  reference=False)
    if parallel.fsdp:
        distributed.shard_model(model)
    name = "adapter" if cfg.model.lora else "weights"
    parts = {name: (model, POLICY if cfg.model.lora else None)}
    pad = tokenizer.pad_token_id

    # --packing: several examples share a row, each attending only to itself with restarted
    # positions (exact, unlike concatenation packing); otherwise one padded row per example.
    layout = (lambda seqs: make_batch(model, seqs, pad, device)) if cfg.train.packing \
        else (lambda seqs: collate(seqs, pad, device))

    def nll(policy, items) -> tuple[torch.Tensor, int]:
        batch = layout([(e.prompt, e.completion) for e in items])
        logps, mask = token_logps(policy, batch)
        return -logps.sum() / mask.sum(), batch["tokens"]

    def step_fn(policy, items, share, logging):
        loss, tokens = nll(policy, items)
        return loss, {"loss": loss.item(), "tokens": tokens}

    @torch.no_grad()
    def evaluate() -> dict:
        if not test_rows:
            return {}
        bs = cfg.train.batch_size
        losses = []
        # The whole test split, batch by batch: minutes on a large one, so it shows progress too.
        with no_dropout(model), Progress("trcli sft: eval", -(-len(test_rows) // bs), "batches",
                                         enabled=common.is_main()) as progress:
            for i in range(0, len(test_rows), bs):
                loss, tokens = nll(model, test_rows[i:i + bs])
                losses.append(loss.item())
                progress.advance(1, tokens=tokens)
        return {"eval/loss": sum(losses) / len(losses)}

    hooks = Hooks(
        step_fn=step_fn,
        epoch_batches=lambda epoch: shuffled_batches(train_rows, cfg.train.batch_size, cfg.train.seed + epoch),
        save=lambda d: save_weights(d, parts),
        load=lambda d: load_weights(d, parts),
        evaluate=evaluate if test_rows else None,
        loss_weight=lambda items: sum(len(e.completion) for e in items),  # nll is a token mean
        label="trcli sft",
    )
    final = fit(cfg, run_dir.dir, model, trainable_parameters(model), hooks, deepspeed=parallel.deepspeed)
    if test_rows and "eval/loss" not in final:  # not evaluated at the last step (--eval-steps) already
        final.update(evaluate())
    save_weights(run_dir.dir, parts)
    if common.is_main():
        tokenizer.save_pretrained(str(run_dir.dir / name))
    run_dir.finish(**{name: name}, model=cfg.model.name_or_path, tokenizer=cfg.model.tokenizer,
                   data=os.path.abspath(cfg.data.path), metrics="metrics.jsonl", final=final,
                   truncation=truncation)
    common.barrier()  # the other ranks leave once rank 0 has written everything
    if not common.is_main():
        return None  # rank 0 reports for all
    return {"stage": "sft", "output": str(run_dir.dir), name: str(Path(run_dir.dir) / name), **final}


render = memory.render  # the run's (or the dry run's plan's) table
gate = None
