"""Every stage module is a trcli.stages.Stage: the CLI calls run, render and gate, nothing found by getattr."""

from __future__ import annotations

import pytest

from trcli import memory, stages
from trcli.stages import judge, prep


@pytest.mark.parametrize("name", stages.NAMES)
def test_each_stage_declares_run_render_and_gate(name):
    module = stages.load(name)
    assert callable(module.run)
    # Tables for prep / judge (their own) and sft / align (the run's or the plan's); generate prints JSON.
    assert module.render is {"prep": prep.render, "judge": judge.render, "generate": None}.get(name, memory.render)
    # Only judge has a bar to meet (--min-win-rate, exit 3).
    assert module.gate is (judge.gate if name == "judge" else None)
