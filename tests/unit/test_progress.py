"""trcli.progress (training steps, evaluation, generation, judging) and trcli.verbosity (-q / -v)."""

import io
import logging
import re
import time

from trcli import progress as progress_mod
from trcli import verbosity
from trcli.progress import Progress


def test_training_lines_say_seconds_per_step_tokens_per_second_eta_and_the_note(monkeypatch):
    """A resumed run (start=4 of 12): rates and the ETA count only the steps done here; show() prints
    a line now with the note (the loss), and the last line gives the time taken."""
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 30.0)
    out = io.StringIO()
    with Progress("trcli sft", 12, "steps", stream=out, start=4, seconds_per=True) as p:
        for _ in range(4):
            time.sleep(0.02)
            p.advance(1, tokens=100)
        p.show("loss 1.2345")
    first, last = out.getvalue().splitlines()
    m = re.fullmatch(r"trcli sft: 8/12 steps \(67%\), ([\d.]+) s/step, (\d+) tokens/s, ETA (\d+)s, loss 1\.2345", first)
    assert m and 0.02 <= float(m.group(1)) < 1 and int(m.group(2)) > 0 and int(m.group(3)) <= 4, first
    assert re.fullmatch(r"trcli sft: 8/12 steps in \d+s, [\d.]+ s/step, \d+ tokens/s", last), last


def test_a_line_at_least_every_interval_between_asked_for_lines(monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 0.1)
    out = io.StringIO()
    with Progress("trcli generate", 10, "completions", stream=out) as p:
        p.advance(3, tokens=30)
        time.sleep(0.35)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3
    assert all(re.fullmatch(r"trcli generate: 3/10 completions \(30%\), [\d.]+ completions/s, \d+ tokens/s, "
                            r"ETA \d+s", line) for line in lines[:-1]), lines
    assert lines[-1].startswith("trcli generate: 3/10 completions in ")


def test_work_started_under_a_bar_is_a_row_of_it():
    """sft's evaluation inside training: one live display with two rows, gone when both end."""
    out = io.StringIO()
    with Progress("trcli sft", 4, "steps", stream=out, tty=True, seconds_per=True) as train:
        for _ in range(2):
            train.advance(1, tokens=50)
            time.sleep(0.1)
        train.show("loss 2.0000")
        time.sleep(0.3)  # the bar redraws 10 times a second
        with Progress("trcli sft: eval", 3, "batches", stream=out, tty=True) as evaluation:
            assert evaluation._bar is train._bar and len(train._bar.tasks) == 2
            evaluation.advance(3)
        assert len(train._bar.tasks) == 1
        train.advance(2)
    assert progress_mod._Shared.bar is None
    text = out.getvalue()
    assert "trcli sft" in text and "s/step" in text and "ETA" in text and "loss 2.0000" in text


def test_quiet_shows_no_progress(monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY", 0.01)
    monkeypatch.setenv(verbosity.ENV, "quiet")
    out = io.StringIO()
    with Progress("trcli judge", 4, stream=out) as p:
        time.sleep(0.05)
        p.advance(4)
        p.show("note")
    assert out.getvalue() == ""


def test_levels_and_the_deepspeed_logger(monkeypatch):
    """DeepSpeed resets its logger's level when imported: a filter keeps its warnings (e.g. "Setting
    accelerator to CPU") off stderr unless verbose; errors always pass."""
    monkeypatch.delenv("TRCLI_DEBUG", raising=False)
    monkeypatch.delenv(verbosity.ENV, raising=False)
    assert verbosity.level() == verbosity.NORMAL
    restore = verbosity.apply()
    try:
        seen = []
        logger = logging.getLogger("DeepSpeed")
        handler = logging.Handler()
        handler.emit = seen.append
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)  # what deepspeed does on import
        logger.warning("Setting accelerator to CPU.")
        logger.error("a real error")
        monkeypatch.setenv(verbosity.ENV, "verbose")
        logger.warning("shown with -v")
        logger.removeHandler(handler)
        assert [r.getMessage() for r in seen] == ["a real error", "shown with -v"]
    finally:
        restore()
    monkeypatch.setenv("TRCLI_DEBUG", "1")
    assert verbosity.verbose()


def test_quiet_drops_stderr_except_errors(monkeypatch, capsys):
    import sys

    monkeypatch.delenv("TRCLI_DEBUG", raising=False)
    restore = verbosity.apply(quiet_flag=True)
    try:
        print("warning: dropped", file=sys.stderr)
        print("trcli x: error: kept", file=verbosity.errors())
    finally:
        restore()
    assert capsys.readouterr().err == "trcli x: error: kept\n"
    assert verbosity.level() == verbosity.NORMAL  # the level ends with the command
