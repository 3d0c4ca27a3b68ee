"""The optimizer loop shared by `sft` and `align`: accumulation, clipping, schedule, logging,
checkpoints and exact resume. The stage supplies the loss (``step_fn``) and what to save.

A checkpoint ``checkpoint-N/`` holds the stage's weights (written by ``save``) and
``trainer_state.pt``: optimizer, scheduler, RNG, step and the stage's own state (``extra``).
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trcli import common, distributed, runs, zero
from trcli.config import Config
from trcli.errors import TrcliError, UsageError
from trcli.progress import Progress

STATE = "trainer_state.pt"


@dataclass
class Hooks:
    """What a stage plugs into :func:`fit`."""

    # (policy, micro-batch, its share, logging step?) -> loss, metrics. The policy is the model, or under
    # DeepSpeed its engine: the pass that is differentiated must go through it. The share is this rank's
    # part of the global micro-batch (1 in one process; 0 for a rank that only stands in, see `collective`).
    step_fn: Callable[[Any, Any, float, bool], tuple[torch.Tensor, dict]]
    epoch_batches: Callable[[int], list]                        # the micro-batches of epoch e, in order
    save: Callable[[Path], None]                                # write weights into a directory
    load: Callable[[Path], None]                                # read them back (resume)
    # After each optimizer step (step, its metrics, whether the step is logged): e.g. the reference update.
    after_step: Callable[[int, dict, bool], dict] = lambda step, metrics, logging: {}
    extra_state: Callable[[], dict] = dict
    load_extra_state: Callable[[dict], None] = lambda state: None
    evaluate: Callable[[], dict] | None = None
    # What step_fn's loss averages over, for a micro-batch: examples by default; a token-mean loss
    # counts tokens. Under several processes each rank's loss is weighted by its share of it.
    loss_weight: Callable[[list], float] = len
    # step_fn runs collectives of its own: every rank must run it for every micro-batch, a rank whose
    # shard is empty too (it then runs the whole micro-batch with share 0).
    collective: bool = False
    label: str = "trcli train"  # what its progress lines start with ("trcli sft")


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE).is_file()]
    return max(found)[1] if found else None


def check_fresh_start(cfg: Config) -> None:
    """Take OUTPUT's run lock for the whole run (a second run on it is refused, naming the holder;
    the lock of a dead run is taken over and its unfinished staging directories cleared), then refuse
    to start a run over an earlier run's checkpoints: they would survive next to the new ones, and a
    later --resume would continue whichever is latest. Called before anything is written."""
    if cfg.output is None:
        return
    runs.claim(cfg.output)
    if cfg.train.resume:
        return
    found = latest_checkpoint(Path(cfg.output))
    if found is not None:
        raise UsageError(f"{cfg.output}: holds {found.name} of an earlier run; pass --resume to continue it, "
                         "or choose another --output")


def total_steps(cfg: Config, micro_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, int(cfg.train.epochs * micro_per_epoch) // cfg.train.grad_accum)


def _log(msg: str) -> None:
    common.log(msg)


def _stop_if_disk_full(exc: BaseException, path: Path, run_dir: Path, what: str) -> None:
    """A write that failed for want of space (torch.save says so only cryptically) stops the run
    with one line naming the path and what is intact (exit 1); anything else propagates."""
    if runs.out_of_space(exc, path):
        raise TrcliError(f"{path}: no space left on device while writing {what}; stopped. "
                         f"{runs.intact(run_dir)}") from exc


def no_nan(value: Any) -> Any:
    """``value`` with every non-finite float (a KTO batch without an undesirable example, a grad norm
    DeepSpeed did not compute) as None, so that it is strict JSON (``null``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [no_nan(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """One line of metrics.jsonl: strict JSON, non-finite values as null."""
    return json.dumps(no_nan(row), allow_nan=False) + "\n"


def _mean(values: list[float]) -> float | None:
    """The mean of a logging window's finite values (a step without the metric is left out); None if none."""
    kept = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(kept) / len(kept) if kept else None


class _Sinks:
    """metrics.jsonl plus optional TensorBoard / W&B, whichever are installed."""

    def __init__(self, cfg: Config, run_dir: Path, resume_step: int):
        self.path, self.writers = None, []
        self.last: dict = {}  # the last row kept from before a resume: what the run reports if it logs no more
        if not common.is_main():  # rank 0 writes for all
            return
        self.path, self.run_dir = run_dir / "metrics.jsonl", run_dir
        # On resume, drop lines logged after the checkpoint: they will be logged again (a torn last
        # line, from a kill or a full disk, is dropped with a warning).
        kept = []
        if resume_step:
            kept = [row for row in runs.read_jsonl_repairing(self.path) if row.get("step", 0) <= resume_step]
        runs.write_text(self.path, "".join(json_line(row) for row in kept))
        self.last = dict(kept[-1]) if kept else {}
        self.writers = []
        for name in cfg.train.report_to:
            try:
                if name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    tb = SummaryWriter(str(run_dir / "tensorboard"))
                    self.writers.append(lambda row, tb=tb: [tb.add_scalar(k, v, row["step"]) for k, v in row.items()
                                                           if isinstance(v, (int, float)) and k != "step"])
                else:
                    import wandb

                    wandb.init(project="trcli", dir=str(run_dir), config=cfg.model_dump(), resume="allow")
                    self.writers.append(lambda row: wandb.log(row, step=row["step"]))
            except ImportError:
                _log(f"warning: --report-to {name}: package not installed, skipping")

    def write(self, row: dict) -> None:
        if self.path is None:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json_line(row))
        except OSError as exc:
            _stop_if_disk_full(exc, self.path, self.run_dir, f"step {row['step']}'s metrics")
            raise
        for writer in self.writers:
            writer(row)


def fit(cfg: Config, run_dir: Path, model: torch.nn.Module, params: list[torch.nn.Parameter], hooks: Hooks,
        deepspeed: dict | None = None) -> dict:
    """Train for the configured number of optimizer steps; return the last logged metrics. With a
    DeepSpeed engine config the engine does backward, clipping and the optimizer step (trcli.zero)."""
    from transformers import get_scheduler

    train = cfg.train
    micro_per_epoch = len(hooks.epoch_batches(0))
    if micro_per_epoch == 0:
        raise TrcliError("no training batches")
    steps = total_steps(cfg, micro_per_epoch)
    distributed.check_batch_size(train.batch_size)
    # AdamW and the schedule; under DeepSpeed its engine wraps both and does backward, clipping and the step.
    optimizer = zero.adamw(params, train.learning_rate, train.weight_decay, deepspeed)
    make_scheduler = lambda opt: get_scheduler(train.lr_scheduler, opt, num_warmup_steps=train.warmup_steps,
                                               num_training_steps=steps)
    engine = zero.initialize(model, optimizer, make_scheduler, deepspeed) if deepspeed else None
    optimizer, scheduler = ((engine.optimizer, engine.lr_scheduler) if engine is not None
                            else (optimizer, make_scheduler(optimizer)))
    policy = model if engine is None else engine
    # Passes that are collective (FSDP, ZeRO-3 gathers; ZeRO-2 reduces in backward): every rank runs them.
    collective = hooks.collective or distributed.is_sharded(model) or engine is not None
    start = 0
    checkpoint = latest_checkpoint(run_dir) if train.resume else None
    if train.resume and checkpoint is None:
        _log(f"resume: no checkpoint in {run_dir}, starting from step 0")
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE, weights_only=False)
        hooks.load(checkpoint)
        if engine is not None:
            zero.load_checkpoint(engine, checkpoint)  # optimizer states and schedule, in its own files
        elif state["optimizer"] is None:
            raise UsageError(f"{checkpoint}: written under DeepSpeed; resume it with the same DeepSpeed config")
        else:
            distributed.load_optimizer_state(model, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        hooks.load_extra_state(state["extra"])
        start = state["step"]
        _log(f"resumed from {checkpoint} (step {start} of {steps})")
    sinks = _Sinks(cfg, run_dir, start)
    # Under several processes every rank holds the whole model (LoRA: policy, reference and
    # starting reference are all among these parameters); they must stay bit-identical.
    replicated = list(model.named_parameters())
    distributed.check_replicas(replicated, "the starting weights")

    def save_checkpoint(step: int) -> Path:
        target = run_dir / f"checkpoint-{step}"
        distributed.check_replicas(replicated, f"the weights at step {step}")
        # Collective under FSDP; DeepSpeed writes its own (partitioned) optimizer files instead.
        optimizer_state = distributed.optimizer_state(model, optimizer) if engine is None else None
        with distributed.atomic_dir(target) as tmp:  # every rank may write into tmp; rank 0 renames it
            try:
                if engine is not None:
                    zero.save_checkpoint(engine, tmp)
                hooks.save(tmp)  # sharded weights are gathered on every rank; rank 0 writes
                if common.is_main():
                    torch.save({"step": step, "optimizer": optimizer_state,
                                "scheduler": scheduler.state_dict() if engine is None else None,
                                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
                                "extra": hooks.extra_state()}, tmp / STATE)
            except Exception as exc:  # judged while the partial checkpoint still fills the disk
                _stop_if_disk_full(exc, target, run_dir, "this checkpoint")
                raise
        return target

    epoch_cache: dict[int, list] = {}

    def micro_batch(index: int):
        epoch, within = divmod(index, micro_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = hooks.epoch_batches(epoch)
        return epoch_cache[epoch][within]

    # A bar on a terminal; in a log a line per logging step (and at least every 30 s) with the ETA.
    progress = Progress(hooks.label, steps, "steps", start=start, seconds_per=True) if common.is_main() else None
    window: dict[str, list[float]] = {}
    window_tokens, window_start = 0, time.perf_counter()
    last: dict = sinks.last  # a run resumed after its last logging step reports that step's metrics
    model.train()
    completed = False
    try:
        for step in range(start + 1, steps + 1):
            logging = step % train.logging_steps == 0 or step == steps
            bad = None
            # This rank's part of the step's metrics: each micro-batch's, weighted by the rank's share of it,
            # so that the sum over ranks is what one process would log (token counts are summed as they are).
            sums: dict[str, float] = {}
            for micro in range(train.grad_accum):
                # Each rank takes its slice of the global micro-batch (all of it in one process).
                whole = micro_batch((step - 1) * train.grad_accum + micro)
                batch, share = distributed.shard(whole, hooks.loss_weight)
                stand_in = not batch
                if stand_in:  # a last batch smaller than the number of ranks: this rank adds zeros
                    if not collective:
                        continue
                    # The passes are collective, so this rank still runs one, on the whole batch, counted 0.
                    batch, share = whole, 0.0
                loss, metrics = hooks.step_fn(policy, batch, share, logging)
                if not torch.isfinite(loss):
                    bad = loss.item()
                stop = bad is not None
                if collective:  # backward is collective too: the ranks stop before it together
                    stop = common.any_rank(stop)
                if stop:
                    break
                if engine is not None:  # the engine averages over ranks; each rank's loss carries its share
                    engine.backward(loss * share * common.world_size() / train.grad_accum, scale_wrt_gas=False)
                else:
                    (loss * share / train.grad_accum).backward()
                if stand_in:
                    continue
                sums["tokens"] = sums.get("tokens", 0) + metrics.pop("tokens", 0)
                for key, value in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * share / train.grad_accum
            if common.any_rank(bad is not None):  # all ranks stop together, none waits in a collective
                kept = latest_checkpoint(run_dir)
                raise TrcliError(f"loss is {bad if bad is not None else 'not finite on another rank'} at step {step}; "
                                 f"stopped (last good checkpoint: {kept or 'none'}; try a lower --learning-rate)")
            lr = scheduler.get_last_lr()[0]
            if engine is not None:  # reduce, clip (its gradient_clipping), step, schedule, zero
                skipped = engine.skipped_steps
                engine.step()  # a non-finite gradient makes it skip the step (and the schedule) silently
                finite = engine.skipped_steps == skipped
                grad_norm = engine.get_global_grad_norm() if finite else float("inf")
            else:
                distributed.all_reduce_grads(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                if distributed.is_sharded(grad_norm):
                    grad_norm = grad_norm.full_tensor()
                finite = bool(torch.isfinite(grad_norm))
            if not finite:  # the norm is global: every rank stops here
                kept = latest_checkpoint(run_dir)
                raise TrcliError(f"gradient norm is not finite at step {step}; stopped before the update "
                                 f"(last good checkpoint: {kept or 'none'}; try a lower --learning-rate)")
            grad_norm = float("nan") if grad_norm is None else float(grad_norm)  # None: DeepSpeed told not to compute it
            if engine is None:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            # The step's metrics over all ranks (the same everywhere: a KL-triggered update is decided alike).
            step_metrics = distributed.sum_row(sums)
            step_tokens = step_metrics.pop("tokens", 0)
            window_tokens += step_tokens
            step_metrics["grad_norm"] = grad_norm
            for key, value in step_metrics.items():
                window.setdefault(key, []).append(value)
            extra = hooks.after_step(step, step_metrics, logging)
            if hooks.evaluate is not None and train.eval_steps and step % train.eval_steps == 0:
                extra.update(hooks.evaluate())
            if logging:
                elapsed = time.perf_counter() - window_start
                row = {"step": step, "epoch": round((step * train.grad_accum) / micro_per_epoch, 4), "lr": lr}
                row.update({k: _mean(v) for k, v in window.items() if v})
                row.update(extra)
                row = no_nan(row)
                row["tokens_per_s"] = window_tokens / elapsed if elapsed > 0 else 0.0
                sinks.write(row)
                last = row
                window, window_tokens, window_start = {}, 0, time.perf_counter()
            elif extra:
                last.update(no_nan(extra))
            if progress is not None:
                progress.advance(1, tokens=int(step_tokens))
                if logging:
                    progress.show(_summary(row, lr))
            if train.save_steps and step % train.save_steps == 0 and step != steps:
                save_checkpoint(step)
        completed = True
    finally:
        if progress is not None:
            progress.close(completed)
    save_checkpoint(steps)
    distributed.check_replicas(replicated, "the final weights", announce=True)
    last["steps"] = steps
    return last


def _summary(row: dict, lr: float) -> str:
    """A logging step's loss, grad norm and lr for its progress line (kl/init and eval/loss when logged)."""
    shown = lambda key, digits: "-" if row.get(key) is None else f"{row[key]:.{digits}f}"  # noqa: E731
    text = f"loss {shown('loss', 4)} grad_norm {shown('grad_norm', 3)} lr {lr:.2e}"
    for key in ("kl/init", "eval/loss"):
        if isinstance(row.get(key), (int, float)):
            text += f" {key} {row[key]:.4f}"
    return text


def shuffled_batches(items: list, batch_size: int, seed: int, min_size: int = 1) -> list[list]:
    """One epoch of micro-batches in a seeded order (independent of the global RNG, so a resumed
    run sees the same batches). A last batch smaller than ``min_size`` joins the one before."""
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [[items[i] for i in order[k:k + batch_size]] for k in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_size:
        batches[-2].extend(batches.pop())
    return batches


def save_weights(directory: Path, parts: dict[str, tuple[torch.nn.Module, str | None]]) -> None:
    """Write each part into ``directory/<folder>``: a standard PEFT adapter folder when an adapter
    name is given (``PeftModel.from_pretrained`` loads it), else full HF weights. Rank 0 writes;
    every rank must call it (sharded weights are gathered first)."""
    import shutil

    states = {folder: distributed.full_state_dict(model, keep=_owned_by(adapter))  # collective
              for folder, (model, adapter) in parts.items() if distributed.is_sharded(model)}
    if not common.is_main():
        return
    for folder, (model, adapter) in parts.items():
        # Written whole beside the target, then renamed onto it: a kill or a full disk leaves the
        # staging directory (cleared by the next run on this directory), never a half-written folder.
        target, staging = Path(directory) / folder, Path(directory) / f".{folder}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        if adapter is None:
            model.save_pretrained(str(staging), state_dict=states.get(folder))
        else:
            model.save_pretrained(str(staging), selected_adapters=[adapter], state_dict=states.get(folder))
        shutil.rmtree(target, ignore_errors=True)
        (staging if adapter is None else staging / adapter).rename(target)
        shutil.rmtree(staging, ignore_errors=True)


def _owned_by(adapter: str | None) -> Callable[[str], bool]:
    """The state-dict entries of a part: an adapter's own weights, or everything."""
    return (lambda name: True) if adapter is None else (lambda name: f".{adapter}." in name)


@torch.no_grad()
def load_weights(directory: Path, parts: dict[str, tuple[torch.nn.Module, str | None]]) -> None:
    """Inverse of :func:`save_weights`, in place."""
    from transformers import AutoModelForCausalLM

    for folder, (model, adapter) in parts.items():
        source = Path(directory) / folder
        if adapter is None:
            dtype = next(model.parameters()).dtype
            loaded = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).state_dict()
            if distributed.is_sharded(model):
                distributed.load_full_state_dict(model, loaded)
            else:
                model.load_state_dict(loaded)
            continue
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        owned = [p for name, p in model.named_parameters() if _owned_by(adapter)(name)]
        with zero.gathered(owned, modify=True):  # ZeRO-3: whole while written, then re-partitioned
            set_peft_model_state_dict(model, load_peft_weights(str(source)), adapter_name=adapter)
