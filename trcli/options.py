"""Command-line options generated from the config schema: each option is declared once, in
:mod:`trcli.config` (type, default, choices, description), and a command names the keys it takes.

``--help`` shows the schema's default and choices; a value reaches the config only when it was
given on the command line, so defaults < recipe < TRCLI_* env < flags holds (a flag left at its
shown default does not override a recipe). Values are validated by the schema, so a bad one is
the config's one-line error naming the key (``flags: bad value for 'align.beta': ...``).
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import typer
from pydantic import BaseModel

from trcli.config import Config


@dataclass(frozen=True)
class Flag:
    """A config key as a command-line option. ``decls``: the option's names (default
    ``--last-part``; booleans ``--x/--no-x``); ``parse``: text -> value (e.g. a comma list);
    ``help``: overrides the schema's description; ``repeat``: a list option given once per item."""

    key: str
    decls: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None
    help: str | None = None
    repeat: bool = False

    @property
    def name(self) -> str:  # the Python parameter name Typer passes the value under
        return self.key.replace(".", "__")


def field(key: str):
    """The pydantic FieldInfo of a dotted config key."""
    model: type[BaseModel] = Config
    *sections, last = key.split(".")
    for part in sections:
        model = model.model_fields[part].annotation
    return model.model_fields[last]


def _choices(annotation: Any) -> list[str] | None:
    """Literal choices of an annotation (inside Optional / list too), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return None


def _base(annotation: Any) -> Any:
    """The scalar type behind Optional[...] / Literal[...] / list[...]."""
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (list, List):
        return _base(args[0])
    if args and typing.get_origin(annotation) is not dict:
        return _base(args[0])
    return annotation


def _parameter(flag: Flag) -> inspect.Parameter:
    info = field(flag.key)
    default = info.get_default(call_default_factory=True)
    base = _base(info.annotation)
    choices = _choices(info.annotation)
    kind = bool if base is bool and not flag.parse else base
    if flag.parse is not None or typing.get_origin(info.annotation) is dict:
        kind = str
    last = flag.key.rsplit(".", 1)[-1].replace("_", "-")
    decls = flag.decls or ((f"--{last}/--no-{last}",) if kind is bool else (f"--{last}",))
    if flag.repeat:
        annotation, default = Optional[List[kind]], None
    else:
        annotation = Optional[kind]
        if isinstance(default, (list, dict)) or flag.parse is not None:
            shown = ",".join(map(str, default)) if isinstance(default, list) else None
            default = shown or None
    metavar = f"[{'|'.join(choices)}]" if choices else None
    one_sided = kind is bool and "/" not in decls[0]  # --dry-run: no --no-dry-run, no default shown
    option = typer.Option(default, *decls, help=flag.help or info.description, metavar=metavar,
                          show_default=default is not None and not one_sided)
    return inspect.Parameter(flag.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


_PARSERS: dict[str, Flag] = {}  # parameter name -> its Flag (a key parses the same in every command)


def command(*flags: Flag) -> Callable[[Callable], Callable]:
    """Give ``fn`` (which takes ``ctx: typer.Context`` and ``**kw``) the options of ``flags`` after
    its own; :func:`given` turns what the user typed into dotted config flags."""

    def wrap(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind is not p.VAR_KEYWORD]
        fn.__signature__ = inspect.Signature([*own, *(_parameter(f) for f in flags)])
        for flag in flags:
            _PARSERS.setdefault(flag.name, flag)
        return fn

    return wrap


def given(ctx: typer.Context, kw: dict[str, Any]) -> dict[str, Any]:
    """Dotted config keys for the schema options given on the command line (parsed), and only those."""
    out: dict[str, Any] = {}
    for name, value in kw.items():
        flag = _PARSERS[name]
        source = ctx.get_parameter_source(name)  # Typer's own (vendored) click: compared by name
        if getattr(source, "name", None) != "COMMANDLINE" or (flag.repeat and not value):
            continue
        out[flag.key] = flag.parse(value) if flag.parse is not None else value
    return out


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def pairs(param: str) -> Callable[[str], dict[str, str]]:
    """'a=b,c=d' -> {'a': 'b', 'c': 'd'}, a bad pair being a usage error naming ``param``."""

    def parse(spec: str) -> dict[str, str]:
        out = {}
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if not sep or not key.strip() or not value.strip():
                raise typer.BadParameter(f"expected field=column pairs, got '{part}'", param_hint=param)
            out[key.strip()] = value.strip()
        return out

    return parse
