"""Command-line options built from settings fields: each option is declared once, in its field.

A field made with :func:`painwatch.settings.setting` becomes one argparse argument: ``--<name>`` (or the
field's ``flag``), its default from the field, its type from the annotation, its ``choices`` and
``metavar``. Booleans are switches (``negated_by`` turns off a field that defaults to True);
``zero_means_none`` fields take 0 for None; tuple fields take one or more values (or one value split
at the field's ``separator``); a field with a ``const`` may be given without its value.
:func:`config_from_args` reads the parsed values back.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from painwatch.settings import declared_fields

T = TypeVar("T")

#: argparse's ArgumentDefaultsHelpFormatter prints "(default: ...)" after every help text.
HELP_FORMATTER = argparse.ArgumentDefaultsHelpFormatter


def _unwrap_optional(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"cannot make a command-line option of a field typed {annotation!r}")
        return kinds[0]
    return annotation


def flag_of(field: dataclasses.Field) -> str:
    """The option string of a field: its ``negated_by`` switch, its ``flag`` or ``--<name>``."""
    meta = field.metadata
    return meta.get("negated_by") or meta.get("flag") or "--" + field.name.replace("_", "-")


def _split(separator: str, kind: type) -> typing.Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(part.strip()) for part in text.split(separator) if part.strip())

    parse.__name__ = f"{kind.__name__} list"
    return parse


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    defaults: Any | None = None,
    groups: tuple[str, ...] | None = None,
) -> None:
    """Add one argument per declared field of dataclass ``cls`` (only the fields of ``groups`` when
    given), with the defaults of ``defaults`` (an instance of ``cls``; the field defaults when None).

    Each argument's ``dest`` is its field's name, so :func:`config_from_args` can read it back.
    """
    hints = typing.get_type_hints(cls)
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for field in declared_fields(cls, groups=groups):
        meta = field.metadata
        if defaults is not None:
            default = getattr(defaults, field.name)
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        target = parser
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = parser.add_mutually_exclusive_group()
            target = exclusive[meta["exclusive"]]
        kind = _unwrap_optional(hints[field.name])
        if kind is bool:
            action = "store_false" if meta["negated_by"] else "store_true"
            target.add_argument(flag_of(field), dest=field.name, action=action, default=default,
                                help=meta["help"])
            continue
        kwargs: dict[str, Any] = {"help": meta["help"], "default": default}
        if typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            if meta["separator"]:
                kwargs["type"] = _split(meta["separator"], item)
            else:
                kwargs.update(type=item, nargs="+")
        else:
            kwargs["type"] = kind
        if meta["zero_means_none"] and default is None:
            kwargs["default"] = kwargs["type"](0)
        if meta.get("const") is not None:
            kwargs.update(nargs="?", const=meta["const"])
        if meta["choices"]:
            kwargs["choices"] = meta["choices"]
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["positional"]:
            kwargs.pop("default")
            target.add_argument(field.name, **kwargs)
            continue
        if meta["required"]:
            kwargs.update(required=True)
            kwargs.pop("default")
        target.add_argument(flag_of(field), dest=field.name, **kwargs)


def config_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``cls`` from the arguments :func:`add_options` declared: fields without a parsed
    value keep their defaults, ``overrides`` replace fields, and tuple values stay tuples. ``cls``
    validates itself (a bad value raises ``ValueError`` naming the field)."""
    values: dict[str, Any] = {}
    for field in declared_fields(cls):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if field.metadata["zero_means_none"] and value == 0:
            value = None
        if isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    values.update(overrides)
    return cls(**values)
