"""align: DPO / IPO / KTO and their Trust Region versions (TR-DPO / TR-IPO / TR-KTO).

Reads top to bottom: inputs from --from / --data, the model with its policy and reference,
the loss of one micro-batch, the reference update after each optimizer step, the loop, outputs.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from trcli import common, distributed, losses, memory, zero
from trcli.batching import attention_note, make_batch, set_logps_chunk, token_logps
from trcli.config import AlignConfig, Config
from trcli.data.records import as_kind, load_prepped
from trcli.errors import UsageError
from trcli.memory import adapter_rank, plan_or_none
from trcli.modeling import INIT, build_for_training, load_tokenizer, pick_device, trainable_parameters, using_adapter
from trcli.runs import Run, inherit
from trcli.tokens import stage_encoder
from trcli.training import Hooks, check_fresh_start, fit, load_weights, save_weights, shuffled_batches
from trcli.trust_region import POLICY, REFERENCE, ReferenceUpdater, Schedule


def run(cfg: Config) -> dict:
    # Inputs: an SFT run hands over its base model, data and adapter (or full weights).
    up = inherit(cfg)
    if (plan := plan_or_none(cfg, "align")) is not None:
        return {**plan, "attention": attention_note(cfg, packed=True)}
    if not cfg.output:
        raise UsageError("align needs --output DIR")
    if not cfg.data.path:
        raise UsageError("align needs data: --data PREP_DIR or --from a run that had data")
    align, kto = cfg.align, cfg.align.loss == "kto"
    if kto and cfg.train.batch_size < 2:
        raise UsageError("KTO estimates its KL baseline from mismatched pairs in a batch: "
                         "--batch-size must be >= 2")
    schedule = Schedule.from_config(align)
    parallel = distributed.setup(cfg)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    set_logps_chunk(cfg.train.logps_chunk)

    # Data: pairs for DPO / IPO; single labelled completions for KTO (pairs are split in two).
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    rows = as_kind(load_prepped(cfg.data.path)["train"], "unpaired" if kto else "paired")
    if kto and len(rows) < 2:
        raise UsageError(f"{cfg.data.path}: KTO needs at least 2 training examples")
    # Token ids as TRL's trainers make them (trcli.tokens); a pair's two replies share one prompt.
    encoder = stage_encoder(cfg, tokenizer, "trcli align")
    if kto:
        items = [(e[0], bool(r["label"])) for r in rows if (e := encoder(r["prompt"], [r["completion"]]))]
    else:
        items = [tuple(e) for r in rows if (e := encoder(r["prompt"], [r["chosen"], r["rejected"]]))]
    truncation_counts = encoder.report("trcli align")
    if len(items) < (2 if kto else 1):
        raise UsageError(f"{cfg.data.path}: too few examples left after truncation at --max-length "
                         f"{cfg.data.max_length}")

    # Model: one base; policy and reference are adapters on it (LoRA / QLoRA), or a frozen
    # fp32 copy for full fine-tuning. Both start from the SFT adapter when there is one.
    start = {"adapter": up.get("adapter"), "weights": up.get("weights")}
    policy_rank = adapter_rank(start["adapter"], cfg.model.lora_r)
    ref_rank = schedule.reference_rank(align.ref_rank, policy_rank)
    check_fresh_start(cfg)
    run_dir = Run("align", cfg.output, cfg)
    run_dir.add_input("data", cfg.data.path)
    run_dir.add_input("start", start["adapter"] or start["weights"])
    # Under FSDP / ZeRO-3 the whole models are built in host memory; sharding moves each rank's part to its device.
    model, frozen = build_for_training(cfg, torch.device("cpu") if parallel.shards_weights else device, start,
                                       reference=True, ref_rank=ref_rank, keep_init=schedule.mode != "none")
    initial = None
    if frozen is not None and schedule.mode != "none":
        import copy

        initial = copy.deepcopy(frozen)
    # Policy, reference and starting reference sharded alike, so that the update is shard-local
    # (under ZeRO-3 the policy is partitioned with its optimizer, in fit).
    frozen_models = [m for m in (frozen, initial) if m is not None]
    if parallel.fsdp:
        for module in [model, *frozen_models]:
            distributed.shard_model(module)
    elif parallel.zero3:
        for module in frozen_models:
            zero.partition_frozen(module, parallel.deepspeed)
    pad = tokenizer.pad_token_id

    # The loss of one micro-batch (module-level steps below) and the reference update after each
    # optimizer step (τ counts optimizer steps).
    ctx = StepContext(align=align, model=model, frozen=frozen, initial=initial, device=device,
                      batch_of=lambda seqs: make_batch(model, seqs, pad, device), moves=schedule.mode != "none")
    updater = ReferenceUpdater(schedule, model, frozen, verify=distributed.check_replicas,
                               warn=lambda text: common.is_main() and print(f"warning: {text}", file=sys.stderr))

    def with_partners(batch: list) -> list:
        # KTO: each example with the completion of the one before it in the micro-batch (the first with the last's).
        return [(example, label, batch[i - 1][0].completion) for i, (example, label) in enumerate(batch)]

    if frozen is None:
        parts = {"policy": (model, POLICY), "reference": (model, REFERENCE)}
    else:
        parts = {"policy": (model, None), "reference": (frozen, None)}
    hooks = Hooks(
        step_fn=functools.partial(kto_step if kto else pair_step, ctx),
        epoch_batches=lambda epoch: [with_partners(b) if kto else b for b in shuffled_batches(
            items, cfg.train.batch_size, cfg.train.seed + epoch, min_size=2 if kto else 1)],
        collective=kto,  # z is summed over the ranks in every micro-batch
        save=lambda d: save_weights(d, parts),
        load=lambda d: load_weights(d, parts),
        after_step=updater.on_step_end,
        extra_state=updater.state_dict,
        load_extra_state=updater.load_state_dict,
        label="trcli align",
    )
    final = fit(cfg, run_dir.dir, model, trainable_parameters(model), hooks, deepspeed=parallel.deepspeed)

    # Outputs: DIR/policy and DIR/reference (PEFT adapter folders, or full weights).
    save_weights(run_dir.dir, parts)
    if common.is_main():
        for folder in parts:
            tokenizer.save_pretrained(str(run_dir.dir / folder))
    handover = {"adapter": "policy"} if frozen is None else {"weights": "policy"}
    run_dir.finish(policy="policy", reference="reference", **handover, model=cfg.model.name_or_path,
                   tokenizer=cfg.model.tokenizer, data=os.path.abspath(cfg.data.path),
                   metrics="metrics.jsonl", final=final, truncation=truncation_counts)
    common.barrier()  # the other ranks leave once rank 0 has written everything
    if not common.is_main():
        return None  # rank 0 reports for all
    return {"stage": "align", "method": align.method, "output": str(run_dir.dir), **final}


# --- One micro-batch's loss: DPO / IPO on pairs, KTO on labelled examples ------------------------


@dataclass
class StepContext:
    """What a step needs besides the policy and its micro-batch. The reference is the ``reference``
    adapter of ``model`` (LoRA: a context, not a second model) or the ``frozen`` copy (full
    fine-tuning); ``initial`` / the ``init`` adapter is the starting reference, for kl/init."""

    align: AlignConfig
    model: Any
    frozen: Any
    initial: Any
    device: torch.device
    batch_of: Callable[[list], dict]  # [(prompt ids, completion ids)] -> a batch (packed when it can be)
    moves: bool  # the reference can leave its start (a TR run): kl/init needs its own pass

    @torch.no_grad()
    def reference_logps(self, batch: dict, which: str = REFERENCE) -> torch.Tensor:
        if losses.is_reference_free(self.align.loss):  # log-ratios against a uniform "reference" of 0
            shape = batch["shape"] if "targets" in batch else batch["loss_mask"][:, batch["first"]:].shape
            return torch.zeros(shape, device=self.device)
        if self.frozen is not None:
            return token_logps(self.frozen if which == REFERENCE else self.initial, batch)[0]
        with using_adapter(self.model, which):
            return token_logps(self.model, batch)[0]


def kl_estimate(pol_tok: torch.Tensor, ref_tok: torch.Tensor) -> float:
    """KL(π‖π_ref) per sequence as the sum over completion tokens of k3 = e^{-d} - 1 + d,
    d = log π - log π_ref (Schulman's estimator: >= 0, 0 iff equal). The completions come from the
    data, not from π, so this is an off-policy approximation; it drives --update kl."""
    d = (pol_tok - ref_tok).detach()
    return (torch.expm1(-d) + d).sum(-1).mean().item()


def kl_metrics(ctx: StepContext, pol_tok, ref_tok, batch, logging: bool) -> dict:
    """kl/ref every step; kl/init (one more reference pass, the starting reference) on logging
    steps only, and only when the reference can have moved away from the start."""
    out = {"kl/ref": kl_estimate(pol_tok, ref_tok)}
    if logging:
        out["kl/init"] = kl_estimate(pol_tok, ctx.reference_logps(batch, INIT)) if ctx.moves else out["kl/ref"]
    return out


def pair_step(ctx: StepContext, policy, pairs, share, logging):
    """DPO / IPO on (chosen, rejected) pairs: one forward over [chosen..., rejected...], the
    reference pass first, without a graph. Packed when the model allows it: each prompt is
    computed once for chosen and rejected."""
    align = ctx.align
    batch = ctx.batch_of([(c.prompt, c.completion) for c, _ in pairs] + [(r.prompt, r.completion) for _, r in pairs])
    ref_tok = ctx.reference_logps(batch)
    pol_tok, mask = token_logps(policy, batch)
    pol, ref, length = pol_tok.sum(-1), ref_tok.sum(-1), mask.sum(-1)
    if align.loss == "ipo" and align.ipo_average:
        pol, ref = pol / length, ref / length
    n = len(pairs)
    per_pair, chosen_r, rejected_r = losses.PAIRWISE[align.loss](pol[:n], pol[n:], ref[:n], ref[n:], align.beta)
    metrics = {
        "loss": per_pair.mean().item(), "tokens": batch["tokens"],
        "rewards/chosen": chosen_r.mean().item(), "rewards/rejected": rejected_r.mean().item(),
        "rewards/margins": (chosen_r - rejected_r).mean().item(),
        "rewards/accuracies": (chosen_r > rejected_r).float().mean().item(),
        "logps/chosen": pol[:n].mean().item(), "logps/rejected": pol[n:].mean().item(),
    }
    metrics.update(kl_metrics(ctx, pol_tok, ref_tok, batch, logging))
    return per_pair.mean(), metrics


def kto_step(ctx: StepContext, policy, examples, share, logging):
    """KTO on (example, label, partner completion): matched (x_i, y_i) rows, then mismatched
    (x_i, y_{i-1}) rows for the KL baseline z (the partner was chosen in the whole micro-batch:
    the same pairs however it is sharded)."""
    align = ctx.align
    matched = [(e.prompt, e.completion) for e, _, _ in examples]
    mismatched = [(e.prompt, partner) for e, _, partner in examples]
    matched_batch, mismatched_batch = ctx.batch_of(matched), ctx.batch_of(mismatched)
    ref_tok = ctx.reference_logps(matched_batch)
    ref_mismatched = ctx.reference_logps(mismatched_batch).sum(-1)
    pol_tok, _ = token_logps(policy, matched_batch)
    pol, ref = pol_tok.sum(-1), ref_tok.sum(-1)
    with torch.no_grad():
        pol_mismatched = token_logps(ctx.model, mismatched_batch)[0].sum(-1)
    # z over the whole micro-batch: the ranks' sums of log-ratios and counts (a stand-in rank's count zero).
    mine = torch.stack([(pol_mismatched - ref_mismatched).double().sum(),
                        torch.tensor(float(len(examples)), dtype=torch.float64, device=ctx.device)])
    total, count = distributed.sum_tensor(mine * float(share > 0))
    z = losses.kto_kl_baseline(total / count)
    labels = torch.tensor([label for _, label, _ in examples], device=ctx.device)
    per_example, good_r, bad_r = losses.kto_loss(
        pol, ref, labels, z, align.beta, align.kto_desirable_weight, align.kto_undesirable_weight)
    reward = align.beta * (pol - ref).detach()
    nan = float("nan")
    metrics = {
        "loss": per_example.mean().item(), "kl/z": z.item(),
        "tokens": matched_batch["tokens"] + mismatched_batch["tokens"],
        "rewards/chosen": good_r.mean().item() if good_r.numel() else nan,
        "rewards/rejected": bad_r.mean().item() if bad_r.numel() else nan,
        "rewards/accuracies": ((reward > 0) == labels).float().mean().item(),
        "logps/chosen": pol[labels].mean().item() if good_r.numel() else nan,
        "logps/rejected": pol[~labels].mean().item() if bad_r.numel() else nan,
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics.update(kl_metrics(ctx, pol_tok, ref_tok, matched_batch, logging))
    return per_example.mean(), metrics


render = memory.render  # the run's (or the dry run's plan's) table
gate = None
