"""Command-line flags generated from the config's declarations (:func:`rnnlm.config.setting`):
each flag's name, default, help, choices and environment variable are stated once, there."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from rnnlm.config import TrainConfig, flag_name, flat_fields
from rnnlm.errors import FlagError

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE`` and one option per setting of :class:`TrainConfig`."""
    hints = _field_types()
    for name, f in reversed(list(flat_fields().items())):
        command = _option(f, hints[name])(command)
    return _config_file_option(command)


def config_from_flags(flags: dict[str, Any]) -> TrainConfig:
    """The config of parsed flags (click gives lists for repeated flags; the config keeps
    tuples)."""
    values = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in flags.items()}
    return TrainConfig.from_flat(values)


def config_from_values(values: dict[str, Any], where: str) -> TrainConfig:
    """The config of a JSON/YAML object of settings (flag names with '_'), each value of the
    type its flag takes and the whole checked as a one-process job; a :class:`FlagError` naming
    ``where`` (e.g. ``--spec``) otherwise."""
    unknown = sorted(set(values) - set(flat_fields()))
    if unknown:
        raise FlagError(where, f"unknown settings {unknown}; use the training flags' names with "
                        "'_' (python -m jobs.train --help).")  # fmt: skip
    hints = _field_types()
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise FlagError(where, f"{name}: {json.dumps(value)} is not {_kind(hints[name])}.")
    config = config_from_flags(values)
    try:
        config.validate(1)
    except FlagError as exc:
        raise FlagError(where, str(exc)) from None
    return config


def _option(f: dataclasses.Field[Any], annotation: Any) -> Decorator:
    help_text, flag = f.metadata["help"], flag_name(f)
    default = f.default
    if default is dataclasses.MISSING:
        default = typing.cast(Callable[[], Any], f.default_factory)()
    common: dict[str, Any] = {"help": help_text, "envvar": f.metadata.get("envvar")}
    if annotation is bool:
        if default:  # on unless switched off: --tracking/--no-tracking
            return click.option(f"{flag}/--no-{flag[2:]}", f.name, default=True, **common)
        return click.option(flag, f.name, is_flag=True, default=False, **common)
    if isinstance(default, tuple):
        return click.option(flag, f.name, multiple=True, default=default, **common)
    choices = f.metadata.get("choices")
    kind: Any = click.Choice(choices) if choices else _scalar(annotation)
    if default is None:  # its help says what "none" means; no "[default: None]"
        return click.option(flag, f.name, type=kind, default=None, show_default=False, **common)
    return click.option(flag, f.name, type=kind, default=default, **common)


def _scalar(annotation: Any) -> type:
    """int, float or str, from a field's type (``str | None`` is str)."""
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float) else str


def _field_types() -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for section in TrainConfig.__dataclass_fields__.values():
        hints.update(typing.get_type_hints(section.default_factory))
    return hints


def _config_file_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        is_eager=True,
        expose_value=False,
        callback=_load_config_file,
        help="JSON file of settings (flag names with '_'); flags on the line and their "
        "environment variables win.",
    )(command)


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--config FILE``: a JSON object of setting names; flags given on the line still win."""
    if not value:
        return
    try:
        data = json.loads(Path(value).read_text())
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter("the file must hold a JSON object of settings.")
    unknown = sorted(set(data) - set(flat_fields()))
    if unknown:
        raise click.BadParameter(f"unknown settings {unknown}; use the flags' names with '_'.")
    hints = _field_types()
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise click.BadParameter(
                f"{name}: {json.dumps(value)} is not {_kind(hints[name])}; "
                f"write it as the flag {flag_name(flat_fields()[name])} takes it."
            )
    ctx.default_map = {**(ctx.default_map or {}), **data}


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value has the field's type as written (1.9 is no int, "5" no number):
    click would convert it silently, 1.9 epochs into 1."""
    if isinstance(annotation, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typing.get_origin(annotation) is tuple:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, annotation)


def _kind(annotation: Any) -> str:
    names = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}
    if isinstance(annotation, types.UnionType):
        return " or ".join(_kind(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    return names.get(annotation, "a list of strings")
