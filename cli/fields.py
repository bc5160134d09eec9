"""The command line's options generated from an options dataclass's fields (type, default, help,
panel), so that an option is written once, where the options are (options.cli_field)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Callable

import typer

from ..options import CLI_KEY, Flag


def _flag(name: str, flag: Flag, annotation) -> tuple[str, ...]:
    """The option's declarations: --NAME (a bool gets --NAME/--no-NAME)."""
    long = flag.flag or "--" + name.replace("_", "-")
    return (f"{long}/--no-{long[2:]}",) if annotation is bool else (long,)


def option_parameters(cls: type) -> list[inspect.Parameter]:
    """A keyword parameter with a typer.Option per field of ``cls`` that the command line offers."""
    from ..retrain.options import RetrainOptions  # resolves MergeOptions.retrain's annotation; no torch
    hints = typing.get_type_hints(cls, localns={"RetrainOptions": RetrainOptions})
    params = []
    for f in dataclasses.fields(cls):
        flag = f.metadata.get(CLI_KEY)
        if flag is None:
            continue
        annotation = hints[f.name] if flag.parse_as is None else (flag.parse_as | None if f.default is None
                                                                     else flag.parse_as)
        if flag.choices:  # typer shows <a|b|c> in the help and refuses other values with a usage error
            annotation = typing.Literal[flag.choices]
        option = typer.Option(f.default, *_flag(f.name, flag, annotation), help=flag.help, rich_help_panel=flag.panel)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def field_values(cls: type, values: dict) -> dict:
    """The entries of ``values`` that are generated options of ``cls`` (its cli_field fields)."""
    names = {f.name for f in dataclasses.fields(cls) if CLI_KEY in f.metadata}
    return {k: v for k, v in values.items() if k in names}


def with_options(cls: type) -> Callable[[Callable], Callable]:
    """Decorator: the command takes its own parameters plus one option per cli_field of ``cls``
    (passed as keywords; see field_values)."""
    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]

        @functools.wraps(command)
        def wrapper(**kwargs):
            return command(**kwargs)
        wrapper.__signature__ = inspect.Signature(own + option_parameters(cls))
        return wrapper
    return decorate
