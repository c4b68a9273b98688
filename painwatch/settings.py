"""Declaring a setting once: a dataclass field that carries its help text, flag and metavar.

A setting of painwatch (a field of :class:`painwatch.training.config.TrainConfig`, of the LOIO or
certification settings) is written once, as a dataclass field made with :func:`setting`. Its default
lives in the field; its ``metadata`` says how people set it. ``painwatch.cli.options`` builds the
command-line options from those fields, so no option, default or help text is written twice.
"""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    metavar: str | None = None,
    choices: tuple[Any, ...] | None = None,
    negated_by: str | None = None,
    zero_means_none: bool = False,
    group: str = "",
    exclusive: str | None = None,
    positional: bool = False,
    required: bool = False,
    separator: str | None = None,
    const: Any = None,
    cli: bool = True,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field whose ``metadata`` declares its command-line option.

    ``flag`` defaults to ``--<name-with-dashes>``. A boolean field is a switch: one that defaults to
    False is turned on by its flag; one that defaults to True is turned off by ``negated_by`` (e.g.
    ``--no-amp``). ``zero_means_none``: an ``int | None`` or ``float | None`` field whose option takes 0
    for None ("off"). ``group`` lets a command take some groups only (e.g. ``head``); options with the
    same ``exclusive`` name exclude each other. ``positional`` fields are positional arguments,
    ``required`` ones required options. A tuple field takes one or more values, or one value split at
    ``separator`` (e.g. ``","`` for ``--individuals a,b,c``). ``const``: the option may also be given
    without a value, which then means ``const`` (``--ray`` alone: ``"local"``). ``cli=False`` fields
    have no option (they change speed only, or are set by the program).
    """
    return dataclasses.field(
        default=default,
        default_factory=default_factory,
        metadata={
            "help": help,
            "flag": flag,
            "metavar": metavar,
            "choices": choices,
            "negated_by": negated_by,
            "zero_means_none": zero_means_none,
            "group": group,
            "exclusive": exclusive,
            "positional": positional,
            "required": required,
            "separator": separator,
            "const": const,
            "cli": cli,
        },
    )


def declared_fields(cls: type, *, groups: tuple[str, ...] | None = None) -> list[dataclasses.Field]:
    """The fields of dataclass ``cls`` declared with :func:`setting` that have an option, in order
    (only those of ``groups`` when given)."""
    return [
        f
        for f in dataclasses.fields(cls)
        if "help" in f.metadata
        and f.metadata["cli"]
        and (groups is None or f.metadata["group"] in groups)
    ]
