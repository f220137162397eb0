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
    ctx.default_map = {**(ctx.default_map or {}), **data}
