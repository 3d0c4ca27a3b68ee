"""trcli.runs: the run lock (held by real processes), JSONL files with a torn last line, staging
leftovers and what a dead run's status reads as."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trcli import runs
from trcli.errors import UsageError

# A real second process that takes an output's lock and holds it until its stdin closes (or it is killed).
HOLDER = textwrap.dedent("""
    import sys
    from trcli.runs import output_lock
    with output_lock(sys.argv[1], "generate", file=sys.argv[2] == "file"):
        print("held", flush=True)
        sys.stdin.read()
""")


def hold(target: Path, file: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(target), "file" if file else "dir"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


# --- the lock ----------------------------------------------------------------------------------

@pytest.mark.parametrize("file", [False, True])
def test_an_output_held_by_another_process_is_refused_naming_its_pid_and_host(tmp_path, file):
    target = tmp_path / ("gens.jsonl" if file else "run")
    proc = hold(target, file)
    try:
        assert runs.holder(target, file)["pid"] == proc.pid
        with pytest.raises(UsageError) as err:
            with runs.output_lock(target, "generate", file=file):
                pass
        message = str(err.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message and "trcli generate" in message
        assert "\n" not in message
    finally:
        release(proc)
    # Released on exit: the lock file is gone and the output is free again.
    assert runs.holder(target, file) is None and not runs._lock_path(target, file).exists()
    with runs.output_lock(target, "generate", file=file) as lock:
        assert lock.info["pid"] == os.getpid()
        assert runs.holder(target, file) is not None  # a reader sees it held (by this process)
    assert runs.holder(target, file) is None


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, capfd):
    target = tmp_path / "run"
    proc = hold(target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (target / runs.LOCK).exists()  # the file stays, naming the dead holder...
    assert runs.holder(target) is None  # ...but the kernel released the lock with the process
    with runs.output_lock(target, "judge"):
        assert runs.holder(target)["pid"] == os.getpid()
    assert f"taking over the lock left by trcli generate (pid {proc.pid}" in capfd.readouterr().err


def test_claim_is_reentrant_within_a_process_and_the_run_releases_it(tmp_path):
    from trcli.config import Config

    target = tmp_path / "run"
    first = runs.claim(target)
    run = runs.Run("align", target, Config())
    assert runs.claim(target) is first and runs.holder(target)["stage"] == "align"
    run.finish()
    assert runs.holder(target) is None
    assert json.loads((target / runs.MANIFEST).read_text())["status"] == "completed"


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_an_abandoned_run_records_how_it_ended_and_lets_go(tmp_path, status):
    from trcli.config import Config

    runs.Run("sft", tmp_path / "run", Config())
    assert runs.abandon(status) == [tmp_path / "run"]
    manifest = json.loads((tmp_path / "run" / runs.MANIFEST).read_text())
    assert manifest["status"] == status and manifest["ended"]
    assert runs.holder(tmp_path / "run") is None and runs.abandon(status) == []


def test_a_running_manifest_reads_as_died_once_no_process_holds_the_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.MANIFEST).write_text(json.dumps({"stage": "sft", "status": "running"}))
    assert runs.status(run, {"status": "running"}) == "died"
    proc = hold(run)
    try:
        assert runs.status(run, {"status": "running"}) == "running"
        assert runs.upstream(run)["status"] == "running"
    finally:
        release(proc)
    assert runs.upstream(run)["status"] == "died"
    assert runs.status(run, {"status": "completed"}) == "completed"


@pytest.mark.parametrize("make", ["file", "file-parent"])
def test_an_output_that_is_a_file_is_refused(tmp_path, make):
    (tmp_path / "f").write_text("x")
    target = tmp_path / "f" if make == "file" else tmp_path / "f" / "run"
    with pytest.raises(UsageError, match="exists and is not a directory"):
        runs.claim(target)


# --- staging leftovers -------------------------------------------------------------------------

def test_a_fresh_lock_clears_staging_directories_of_killed_writes_and_nothing_else(tmp_path, capfd):
    run = tmp_path / "run"
    for name in (".checkpoint-6.k2j4h1x0", ".trcli-run.json.abcdefgh", ".policy.staging", "checkpoint-4",
                 ".keepme", ".git"):
        (run / name).mkdir(parents=True)
        (run / name / "x").write_text("partial")
    (run / ".notes.abcdefgh").write_text("a file, not a staging directory")
    with runs.output_lock(run, "align"):
        left = sorted(p.name for p in run.iterdir())
    assert left == [".git", ".keepme", ".notes.abcdefgh", ".trcli.lock", "checkpoint-4"]
    assert "removed 3 staging directories left by an interrupted write" in capfd.readouterr().err


def test_an_output_file_lock_clears_only_that_files_staging(tmp_path):
    (tmp_path / ".gens.jsonl.abcdefgh").mkdir()
    (tmp_path / ".other.jsonl.abcdefgh").mkdir()
    with runs.output_lock(tmp_path / "gens.jsonl", "generate", file=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.jsonl.abcdefgh"]


# --- JSONL with a torn last line ---------------------------------------------------------------

ROWS = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
WHOLE = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


@pytest.mark.parametrize("tail", [b'{"step": 3, "lo', b"\0\0\0\0\0\0", '{"step": 3, "note": "caf\u00e9'.encode()[:-1]])
def test_a_torn_last_line_is_cut_off_with_one_warning(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE + tail)
    warnings = []
    assert runs.read_jsonl_repairing(path, warn=warnings.append) == ROWS
    assert len(warnings) == 1 and f"{path}:3: not valid JSON (a torn last line" in warnings[0]
    assert path.read_bytes() == WHOLE  # appending goes on from a whole line
    assert runs.read_jsonl_repairing(path, warn=warnings.append) == ROWS and len(warnings) == 1


def test_the_warning_goes_to_stderr_once(tmp_path, capfd):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE + b'{"st')
    runs.read_jsonl_repairing(path)
    err = capfd.readouterr().err
    assert err.count("warning:") == 1 and "torn last line of 4 bytes" in err and "removed it" in err


def test_a_reader_that_does_not_own_the_file_leaves_it_as_it_is(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE + b'{"step": 3')
    warnings = []
    assert runs.read_jsonl_repairing(path, repair=False, warn=warnings.append) == ROWS
    assert "left it out" in warnings[0] and path.read_bytes() == WHOLE + b'{"step": 3'


def test_a_whole_last_line_without_its_newline_is_kept_and_completed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(WHOLE + b'{"step": 3}')
    warnings = []
    assert runs.read_jsonl_repairing(path, warn=warnings.append) == [*ROWS, {"step": 3}]
    assert warnings == [] and path.read_bytes() == WHOLE + b'{"step": 3}\n'


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{oops\n\n{"step": 3}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: not valid JSON; fix or delete that line"):
        runs.read_jsonl_repairing(path)
    path.write_bytes(b'{"step": 1}\n[1, 2]\n')  # whole, but not an object: not torn
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: not a JSON object"):
        runs.read_jsonl_repairing(path)
    warnings = []
    assert runs.read_jsonl_repairing(path, strict=False, warn=warnings.append) == [{"step": 1}]
    assert warnings == [f"{path}:2: not a JSON object, left out"]


def test_missing_and_empty_files_have_no_rows(tmp_path):
    assert runs.read_jsonl_repairing(tmp_path / "none.jsonl") == []
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert runs.read_jsonl_repairing(tmp_path / "empty.jsonl") == []
    assert (tmp_path / "empty.jsonl").read_bytes() == b""


# --- disk full ---------------------------------------------------------------------------------

def test_out_of_space_is_told_by_errno_message_or_the_space_left(tmp_path):
    import errno

    assert runs.out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert runs.out_of_space(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    wrapped = RuntimeError("unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert runs.out_of_space(wrapped)
    assert not runs.out_of_space(RuntimeError("unexpected pos 576 vs 534"), tmp_path)  # plenty of space here
    assert not runs.out_of_space(OSError(errno.EACCES, "Permission denied"))
