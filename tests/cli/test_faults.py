"""Faults a run must refuse or survive (issue 13), with real processes and real file systems:
two runs on one output, torn JSONL, bad configs and outputs, a full and a read-only disk,
SIGTERM / SIGINT / SIGKILL and resume, a DeepSpeed build lock left by a killed build."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import metrics, ok, run_cli
from trcli import runs

TRCLI = [sys.executable, "-m", "trcli.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TRAIN = ["--batch-size", "4", "--lr", "5e-3", "--logging-steps", "1"]


def spawn(*args) -> subprocess.Popen:
    # SIGINT as a terminal sends it: a job started in the background by a script (CI) ignores it.
    return subprocess.Popen([*TRCLI, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(ready, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before it was ready:\n{proc.communicate()[1]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def errors(stderr: str, stage: str) -> list[str]:
    """trcli's own error lines (a library may log other lines on stderr, and trcli its progress lines,
    'trcli align: 3/8 steps ...')."""
    assert "Traceback" not in stderr, stderr
    progress = re.compile(rf"trcli {stage}: (\S+ )?\d+/\d+ ")
    return [line for line in stderr.splitlines() if line.startswith(f"trcli {stage}: ") and not progress.match(line)]


def staging(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith(".") and p.is_dir())


def manifest(run: Path) -> dict:
    return json.loads((run / runs.MANIFEST).read_text())


# --- concurrent runs on one output -------------------------------------------------------------

def test_a_second_run_on_a_busy_directory_is_refused_and_the_first_finishes_alone(tmp_path, sft_run):
    out = tmp_path / "same"
    args = ["align", "--from", sft_run, "--max-steps", "6", "--save-steps", "2", *TRAIN]
    first = spawn(*args, "--seed", "1", "-o", out)
    wait_for(lambda: (out / runs.MANIFEST).exists(), first)
    os.kill(first.pid, signal.SIGSTOP)  # the first run is alive and holds the lock, mid-run
    try:
        second = subprocess.run([*TRCLI, *map(str, args), "--seed", "2", "-o", str(out)],
                                capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    [line] = errors(second.stderr, "align")
    assert f"is in use by trcli align (pid {first.pid} on {socket.gethostname()}" in line and str(out) in line
    assert first.wait(timeout=300) == 0, first.communicate()[1]
    # One run's directory: its seed, its steps once each, its weights; no trace of the second.
    assert manifest(out)["status"] == "completed" and manifest(out)["config"]["train"]["seed"] == 1
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "metrics.jsonl",
                                                    "policy", "reference", runs.MANIFEST]


def test_two_runs_started_together_leave_one_runs_directory(tmp_path, sft_run):
    out = tmp_path / "same"
    args = ["align", "--from", sft_run, "--max-steps", "12", "--save-steps", "4", *TRAIN, "-o", out]
    procs = {seed: spawn(*args, "--seed", seed) for seed in (1, 2)}
    codes = {seed: proc.wait(timeout=600) for seed, proc in procs.items()}
    assert sorted(codes.values()) == [0, 2], {s: p.communicate()[1][-2000:] for s, p in procs.items()}
    winner = next(seed for seed, code in codes.items() if code == 0)
    [line] = errors(procs[3 - winner].communicate()[1], "align")
    # Refused by the lock, or, had the winner already finished, by its checkpoints.
    assert "is in use by trcli" in line or "holds checkpoint-12 of an earlier run" in line
    assert manifest(out)["config"]["train"]["seed"] == winner and manifest(out)["status"] == "completed"
    assert [m["step"] for m in metrics(out)] == list(range(1, 13))


@pytest.mark.distributed
def test_under_torchrun_rank_0_locks_and_a_refusal_stops_every_rank(tmp_path, sft_run):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from trcli.runs import output_lock
        with output_lock(sys.argv[1], "judge"):
            print("held", flush=True)
            sys.stdin.read()
    """), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "-m", "trcli.cli", "align", "--from", str(sft_run), "--max-steps", "2", *TRAIN,
                                 "--device", "cpu", "-o", str(out)],
                                capture_output=True, text=True, env=ENV, timeout=600)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert result.returncode != 0
    assert f"is in use by trcli judge (pid {holder.pid}" in result.stderr  # rank 0
    assert "rank 0 could not take the run lock" in result.stderr  # rank 1 stopped with it, did not wait
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the holder's lock file gone


# --- torn metrics.jsonl ------------------------------------------------------------------------

def killed_run(tmp_path: Path, sft_run: Path, steps: int, at: str) -> tuple[Path, list[str], int]:
    out = tmp_path / "killed"
    args = ["align", "--from", str(sft_run), "--max-steps", str(steps), "--save-steps", "2", *TRAIN, "--seed", "4"]
    proc = spawn(*args, "-o", out)
    wait_for(lambda: (out / at).exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return out, args, proc.pid


def test_resume_repairs_a_torn_metrics_line_once_and_logs_each_step_once(tmp_path, sft_run):
    out, args, _ = killed_run(tmp_path, sft_run, 6, "checkpoint-2")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    # A bad line before the last is not a torn write: refused, naming file and line.
    (out / "metrics.jsonl").write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    result = run_cli(*args, "--resume", "-o", out)
    assert result.exit_code == 2 and f"{out / 'metrics.jsonl'}:2: not valid JSON" in result.stderr
    # The last line cut short, as a kill, a crash or a full disk leaves it: dropped once, said once.
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + '{"step": 3, "epoch": 0.7, "lo')
    result = ok(*args, "--resume", "-o", out)
    assert result.stderr.count("torn last line") == 1 and "metrics.jsonl:" in result.stderr
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5, 6]
    assert manifest(out)["status"] == "completed"


# --- kill and resume ---------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_sigterm_and_sigint_record_interrupted_and_the_run_resumes(tmp_path, sft_run, sig, code, name):
    out = tmp_path / "run"
    args = ["align", "--from", str(sft_run), "--max-steps", "8", "--save-steps", "2", *TRAIN, "--seed", "6"]
    proc = spawn(*args, "-o", out)
    wait_for(lambda: (out / "checkpoint-2").exists(), proc)
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == code, stderr
    assert errors(stderr, "align") == [f"trcli align: interrupted ({name})"]
    assert manifest(out)["status"] == "interrupted" and manifest(out)["ended"]
    assert runs.holder(out) is None and staging(out) == []
    if sig == signal.SIGTERM:
        ok(*args, "--resume", "-o", out)
        assert manifest(out)["status"] == "completed"
        assert [m["step"] for m in metrics(out)] == list(range(1, 9))


def test_a_killed_run_reads_as_died_and_resumes_over_its_leftovers(tmp_path, sft_run):
    out, args, pid = killed_run(tmp_path, sft_run, 8, "checkpoint-4")
    assert manifest(out)["status"] == "running" and runs.status(out, manifest(out)) == "died"
    # --from a dead run is refused, saying what happened; the report says it too.
    result = run_cli("align", "--from", out, "--max-steps", "1", "-o", tmp_path / "next")
    assert result.exit_code == 2 and "its manifest says running, but no process holds it" in result.stderr
    report = ok("report", out, "-o", tmp_path / "report")
    assert "died while running" in (tmp_path / "report" / "report.html").read_text()
    # What a kill during a checkpoint write (or the final save) leaves behind.
    (out / ".checkpoint-6.x1y2z3w4" / "policy").mkdir(parents=True)
    (out / ".checkpoint-6.x1y2z3w4" / "trainer_state.pt").write_bytes(b"half")
    (out / ".policy.staging").mkdir()
    result = ok(*args, "--resume", "-o", out)
    assert f"taking over the lock left by trcli align (pid {pid} on {socket.gethostname()}" in result.stderr
    assert "removed 2 staging directories left by an interrupted write" in result.stderr
    assert staging(out) == [] and not (out / runs.LOCK).exists()
    assert manifest(out)["status"] == "completed" and [m["step"] for m in metrics(out)] == list(range(1, 9))
    assert report.exit_code == 0


def test_a_run_killed_after_its_last_checkpoint_reports_its_last_metrics(tmp_path, sft_run):
    """Killed between the final checkpoint and the manifest's end: the resumed run has no step left to
    train, and still reports the last logged loss (a sweep's table reads it from the manifest)."""
    import shutil

    out = tmp_path / "run"
    args = ["align", "--from", str(sft_run), "--max-steps", "2", "--save-steps", "1", *TRAIN, "--seed", "4"]
    ok(*args, "-o", out)
    logged = metrics(out)[-1]
    # What a kill right after checkpoint-2 leaves: no policy / reference yet, the manifest still running.
    for name in ("policy", "reference"):
        shutil.rmtree(out / name)
    data = manifest(out)
    data["status"], data["outputs"] = "running", {}
    (out / "trcli-run.json").write_text(json.dumps(data))
    ok(*args, "--resume", "-o", out)
    final = manifest(out)["outputs"]["final"]
    assert manifest(out)["status"] == "completed" and final["loss"] == logged["loss"] and final["steps"] == 2


def test_a_failing_run_records_failed_and_frees_its_directory(tmp_path, sft_run):
    out = tmp_path / "nan"
    result = run_cli("align", "--from", sft_run, "--method", "tr-ipo", "--beta", "1e-30", "--max-steps", "2", "-o", out)
    assert result.exit_code == 1 and "loss is" in result.stderr
    assert manifest(out)["status"] == "failed" and runs.holder(out) is None


# --- bad configs and outputs -------------------------------------------------------------------

@pytest.mark.parametrize("flags,key", [
    (["--epochs", "inf"], "train.epochs"), (["--lr", "inf"], "train.learning_rate"),
    (["--lr", "nan"], "train.learning_rate"), (["--beta", "inf"], "align.beta"),
    (["--max-grad-norm", "nan"], "train.max_grad_norm"), (["--alpha", "-inf"], "align.alpha"),
])
def test_non_finite_numbers_are_refused_naming_the_key(tmp_path, sft_run, flags, key):
    result = run_cli("align", "--from", sft_run, *flags, "-o", tmp_path / "out")
    assert result.exit_code == 2 and f"bad value for '{key}'" in result.stderr and "finite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe,needle", [
    ("train:\n  batch_size: true\n", "bad value for 'train.batch_size': expected a number, got true"),
    ("train:\n  epochs: .inf\n", "bad value for 'train.epochs': Input should be a finite number"),
    ("model:\n  lora_alpha: .inf\n", "bad value for 'model.lora_alpha'"),
    ("generate:\n  temperature: false\n", "bad value for 'generate.temperature': expected a number, got false"),
    ("judge:\n  max_cost_usd: .inf\n", "bad value for 'judge.max_cost_usd'"),
])
def test_recipe_booleans_and_infinities_for_numbers_are_refused(tmp_path, recipe, needle):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe)
    result = run_cli("config", "show", "-c", path)
    assert result.exit_code == 2 and f"{path}: {needle}" in result.stderr


def test_every_number_in_the_schema_refuses_booleans_and_every_float_infinity():
    from pydantic import BaseModel

    from trcli.config import Config, ConfigError, _numeric, load

    def fields(model: type[BaseModel], prefix: str = ""):
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                yield from fields(field.annotation, f"{prefix}{name}.")
            else:
                yield prefix + name, field.annotation

    numbers = [(key, ann) for key, ann in fields(Config) if _numeric(ann)]
    assert len(numbers) > 30
    for key, ann in numbers:
        with pytest.raises(ConfigError, match=rf"'{key}': expected a number, got true"):
            load(None, {key: True})
        if float in (getattr(ann, "__args__", None) or (ann,)):
            for value in (math.inf, -math.inf, math.nan):
                with pytest.raises(ConfigError, match=rf"'{key}': Input should be a finite number"):
                    load(None, {key: value})
    assert load(None, {"train.batch_size": 3, "train.epochs": 2}).train.epochs == 2.0  # numbers still pass


def test_an_environment_boolean_for_a_number_names_the_variable(tmp_path):
    result = run_cli("config", "show", env={"TRCLI_TRAIN__BATCH_SIZE": "true"})
    assert result.exit_code == 2 and "environment variable TRCLI_TRAIN__BATCH_SIZE" in result.stderr


@pytest.mark.parametrize("stage", ["align", "prep"])
def test_an_output_that_is_a_file_is_exit_2_and_the_file_untouched(tmp_path, sft_run, pairs_file, stage):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for out in (taken, taken / "run"):
        if stage == "align":
            result = run_cli("align", "--from", sft_run, "--max-steps", "1", "-o", out)
        else:
            result = run_cli("prep", "--input", pairs_file, "-o", out)
        assert result.exit_code == 2, result.stderr
        assert f"{out}: exists and is not a directory" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert taken.read_text() == "keep me"


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small real file systems (as root, as here and in CI); skip where that is not allowed."""
    mounted = []

    def mount(size: str, readonly: bool = False) -> Path:
        path = tmp_path / f"fs{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_an_output_on_a_read_only_file_system_is_exit_2(tmp_path, sft_run, tmpfs):
    readonly = tmpfs("1m", readonly=True)
    result = run_cli("align", "--from", sft_run, "--max-steps", "1", "-o", readonly / "run")
    assert result.exit_code == 2
    assert f"{readonly / 'run'}: cannot write there (Read-only file system)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_full_disk_stops_with_one_line_and_what_is_intact_resumes(tmp_path, sft_run, tmpfs):
    disk = tmpfs("600k")  # room for a few checkpoints (about 125 kB each) and no more
    out = disk / "run"
    args = ["align", "--from", sft_run, "--max-steps", "16", "--save-steps", "1", *TRAIN, "--seed", "8"]
    result = run_cli(*args, "-o", out)
    assert result.exit_code == 1, result.stderr
    [line] = errors(result.stderr, "align")
    assert "no space left on device" in line and "the one being written was discarded" in line
    kept = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert kept and f"the latest checkpoint is checkpoint-{kept[-1]} (--resume continues from it)" in line
    assert staging(out) == [] and runs.holder(out) is None
    assert runs.status(out, manifest(out)) in ("failed", "died")  # "died": not even the status could be written
    # What it says is intact is: with room again, --resume finishes the run from the latest checkpoint.
    subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
    result = ok(*args, "--resume", "-o", out)
    assert f"resumed from {out / f'checkpoint-{kept[-1]}'}" in result.stderr
    assert [m["step"] for m in metrics(out)] == list(range(1, 17)) and manifest(out)["status"] == "completed"


# --- a DeepSpeed op build lock left by a killed build ------------------------------------------

BUILDER = textwrap.dedent("""
    import sys, time
    from torch.utils.file_baton import FileBaton
    baton = FileBaton(sys.argv[1])
    assert baton.try_acquire()  # exactly as torch.utils.cpp_extension takes it while it compiles
    print("building", flush=True)
    time.sleep(600)
""")


def test_a_build_lock_no_live_build_holds_is_cleared_and_a_live_one_kept(tmp_path, capfd):
    from torch.utils.file_baton import FileBaton

    from trcli import zero

    stale = tmp_path / "py312_cpu" / "cpu_adam" / "lock"
    live = tmp_path / "py312_cpu" / "fused_adam" / "lock"
    stale.parent.mkdir(parents=True)
    live.parent.mkdir(parents=True)
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(stale)], stdout=subprocess.PIPE, text=True)
    assert builder.stdout.readline().strip() == "building"
    builder.kill()  # killed mid-build: torch's waiters would wait for this file forever
    builder.wait()
    builder = subprocess.Popen([sys.executable, "-c", BUILDER, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert builder.stdout.readline().strip() == "building"
        assert zero.clear_stale_build_locks([tmp_path]) == [stale]
        assert not stale.exists() and live.exists()  # a running build is waited for, as it should be
        assert f"removed {stale}: a killed build of a DeepSpeed op left it" in capfd.readouterr().err
        assert FileBaton(str(stale)).try_acquire()  # the next build goes ahead instead of waiting
    finally:
        builder.kill()
        builder.wait()
    assert zero.clear_stale_build_locks([tmp_path]) == [live]


@pytest.mark.deepspeed
def test_a_deepspeed_run_clears_a_stale_build_lock_before_anything_builds(tmp_path, tiny_model, prep_run):
    pytest.importorskip("deepspeed")
    lock = tmp_path / "ext" / "cpu_adam" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")
    result = ok("sft", "--model", tiny_model, "--from", prep_run, "--max-steps", "1", "--batch-size", "4",
                "--deepspeed", "2", "-o", tmp_path / "sft", env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert f"removed {lock}" in result.stderr and not lock.exists()
