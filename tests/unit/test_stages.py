"""Every stage module is a trcli.stages.Stage: the CLI calls run, render and gate, nothing found by getattr."""

from __future__ import annotations

import pytest

from trcli import stages


@pytest.mark.parametrize("name", stages.NAMES)
def test_each_stage_declares_run_render_and_gate(name):
    module = stages.load(name)
    assert callable(module.run)
    assert module.render is None or callable(module.render)
    assert module.gate is None or callable(module.gate)
