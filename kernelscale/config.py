"""Typed command configs: one dataclass per command, shared by the CLI and the Python API.

Each field of a config dataclass is declared with :func:`option`, which records in the field's metadata how the
command line spells it (flag, help text, metavar, choices, type, action), whether ``--resume`` must find it
unchanged, and a check of its value. From that one declaration come

- the argparse flags (:func:`add_arguments`, in field order: the ``--help`` text is the order of the fields),
- the validation (:func:`validate`: one-line :class:`~kernelscale.errors.InputError` naming ``--flag`` on the
  command line and the keyword argument in Python),
- the resume keys (:func:`resume_keys`) and the config of a parsed command line (:func:`from_namespace`).

Defaults are written once, on the field. Fields declared with ``flag=None`` are Python-only (e.g. ``progress``,
which the CLI sets from ``--no-progress``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import MISSING
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence, TypeVar

from kernelscale.errors import InputError, in_cli

#: A check of one value: None when it is fine, else the problem ("must be >= 1, got 0").
Check = Callable[[Any], "str | None"]
C = TypeVar("C")


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a config field appears on the command line (``flag`` None: Python-only)."""

    flag: str | None
    help: str | None = None
    metavar: str | None = None
    choices: Sequence[Any] | None = None
    type: Callable[[str], Any] | None = None
    action: str | None = None
    required: bool = False
    resume: bool = False
    check: Check | None = None


def option(flag: str | None, default: Any = MISSING, *, help: str | None = None, metavar: str | None = None,
           choices: Sequence[Any] | None = None, type: Callable[[str], Any] | None = None, action: str | None = None,
           resume: bool = False, check: Check | None = None) -> Any:
    """A config field: ``default`` (none: required), its command-line spelling and its check.

    ``flag`` is ``--name`` for an option, a bare name for a positional argument, None for a Python-only field.
    Choices are checked for Python callers too (argparse checks them on the command line).
    """
    if check is None and choices is not None:
        check = one_of(choices)
    meta = Flag(flag, help, metavar, choices, type, action, default is MISSING and flag is not None, resume, check)
    return dataclasses.field(default=default, metadata={"cli": meta})


def flags_of(cls: type) -> list[tuple[str, Flag]]:
    """(field name, :class:`Flag`) of every field of config class ``cls``, in declaration order."""
    return [(f.name, f.metadata["cli"]) for f in dataclasses.fields(cls) if "cli" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser, cls: type, fields: Collection[str] | None = None) -> None:
    """Add the flags of config class ``cls`` to ``parser``, in field order (defaults from the fields); with
    ``fields``, only those fields' flags (to place other flags between them)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, meta in flags_of(cls):
        if meta.flag is None or (fields is not None and name not in fields):
            continue
        kwargs: dict[str, Any] = {}
        positional = not meta.flag.startswith("-")
        if not positional:
            kwargs["dest"] = name
            if meta.required:
                kwargs["required"] = True
            else:
                kwargs["default"] = defaults[name]
        for key in ("type", "action", "choices", "metavar", "help"):
            value = getattr(meta, key)
            if value is not None:
                kwargs[key] = value
        parser.add_argument(meta.flag, **kwargs)


def from_namespace(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """The config of a parsed command line (``extra``: Python-only fields, e.g. ``progress``)."""
    values = {name: getattr(args, name) for name, meta in flags_of(cls) if meta.flag is not None}
    return cls(**values, **extra)


def build(cls: type[C], config: C | None, overrides: Mapping[str, Any]) -> C:
    """``config`` (or the defaults of ``cls``) with ``overrides`` replaced; an unknown name is a TypeError, as
    for a function's unknown keyword argument."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no parameter {', '.join(unknown)}")
    if config is None:
        return cls(**overrides)
    return dataclasses.replace(config, **overrides) if overrides else config


def name_of(field: str, meta: Flag) -> str:
    """How a message names a field: ``--flag`` on the command line, the keyword argument in Python."""
    return meta.flag if in_cli() and meta.flag is not None and meta.flag.startswith("-") else field


def validate(config: Any) -> None:
    """Run every field's check; the first problem is raised as a one-line :class:`InputError`."""
    for name, meta in flags_of(type(config)):
        if meta.check is None:
            continue
        problem = meta.check(getattr(config, name))
        if problem is not None:
            raise InputError(f"{name_of(name, meta)} {problem}")


def resume_keys(cls: type) -> tuple[str, ...]:
    """The fields that ``--resume`` must find unchanged, in declaration order."""
    return tuple(name for name, meta in flags_of(cls) if meta.resume)


# -- checks ----------------------------------------------------------------------------------------------------


def one_of(choices: Sequence[Any]) -> Check:
    """The value is one of ``choices``."""
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}, got {v!r}"


def at_least(low: int, optional: bool = False) -> Check:
    """An integer >= ``low`` (``optional``: None is fine too)."""
    return lambda v: None if (optional and v is None) or v >= low else f"must be >= {low}, got {v}"


def positive(optional: bool = False) -> Check:
    """A finite number > 0 (``optional``: None is fine too)."""
    return lambda v: None if (optional and v is None) or (v > 0 and math.isfinite(v)) else \
        f"must be a positive number, got {v}"


def non_negative(words: str = ">= 0") -> Check:
    """A finite number >= 0; ``words`` is how the message says so."""
    return lambda v: None if v >= 0 and math.isfinite(v) else f"must be {words}, got {v}"


# -- results ---------------------------------------------------------------------------------------------------


class JsonResult(Mapping[str, Any]):
    """Base of the typed results (``SolveResult``, ``CurveResult``, ``DistillResult``): a dataclass whose
    :meth:`to_json` is the command's JSON summary; it also reads like that summary (``result["status"]``,
    ``dict(result)``, ``result | {...}``)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON summary: the command's keys, in the command's order."""
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    def __or__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return self.to_json() | dict(other)

    def __ror__(self, other: Mapping[str, Any]) -> dict[str, Any]:
        return dict(other) | self.to_json()
