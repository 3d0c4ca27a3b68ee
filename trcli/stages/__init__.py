"""The stages behind ``trcli prep | sft | align | generate | judge``: each module is a :class:`Stage`."""

from __future__ import annotations

from typing import Any, Callable, Protocol

NAMES = ("prep", "sft", "align", "generate", "judge")


class Stage(Protocol):
    """What the CLI calls (torchtune's recipe interface, as module attributes):

    ``run(cfg)``: the stage; its result (None on ranks other than 0, which rank 0 reports for).
    ``render(result)``: the table printed on stdout, or None to print the result as JSON.
    ``gate(cfg, result)``: raises GateError (exit 3) when the result misses a required bar, or None."""

    run: Callable[[Any], dict | None]
    render: Callable[[dict], Any] | None
    gate: Callable[[Any, dict], None] | None


def load(name: str) -> Stage:
    import importlib

    return importlib.import_module(f"trcli.stages.{name}")
