"""The named options of the settings, made from the config's field metadata.

Every training setting with a ``Flag`` (config.py) becomes an option of the commands its flag
names, typed, bounded and explained by the field (``--lr`` is ``learning_rate``'s flag). The
values given arrive as config keys: ``given_settings()`` inside the command. Adding a setting
with an option is adding the field.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..config import (
    FINETUNING_TYPES,
    Flag,
    LoRAConfig,
    TrainingConfig,
    allowed_types,
    flags,
    parse_mapping,
    parse_trackers,
    parse_weights,
)
from ..config import setting_help as _setting_help
from ..errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
_META_KEY = "sage_finetune_settings"


def setting_options(command: str) -> Callable[[F], F]:
    """Add the options of ``command``'s settings (in the order the config declares them)."""
    options = [_option(key, flag) for key, flag in flags(command)]

    def decorate(function: F) -> F:
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def given_settings() -> dict[str, Any]:
    """The settings given as named options in the running command: ``{config key: value}``."""
    found = click.get_current_context().meta.get(_META_KEY, {})
    return {key: value for key, value in found.items() if value is not None and value is not False}


def _option(key: str, flag: Flag) -> Callable[[F], F]:
    owner = LoRAConfig if key.startswith("lora.") else TrainingConfig
    allowed = allowed_types(typing.get_type_hints(owner)[key.removeprefix("lora.")]) or (str,)
    kwargs: dict[str, Any] = {
        "help": _help(key, flag),
        "expose_value": False,
        "callback": _store(key, _converter(key, flag, allowed)),
        "metavar": flag.metavar,
    }
    if bool in allowed:
        kwargs["is_flag"] = True
    elif int in allowed and float not in allowed:
        minimum = int(flag.minimum) if flag.minimum is not None else None
        kwargs["type"] = click.IntRange(min=minimum) if minimum is not None else int
    elif float in allowed:
        kwargs["type"] = click.FloatRange(min=flag.minimum, min_open=flag.open_minimum)
    elif key == "method":
        kwargs["type"] = _MethodChoice()
    elif key == "finetuning_type":
        kwargs["type"] = click.Choice(FINETUNING_TYPES)
    if dict in allowed or list in allowed:
        kwargs["multiple"] = flag.multiple
    return click.option(f"--{flag.name}", **kwargs)


class _MethodChoice(click.Choice):
    """The registered methods, looked up when the option is shown or used (not when the
    command line is built: plugins are found through their entry points then)."""

    def __init__(self) -> None:
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> list[str]:
        from ..methods import method_names

        return method_names()

    @choices.setter
    def choices(self, value: Any) -> None:
        pass


def _help(key: str, flag: Flag) -> str:
    text = flag.help or _setting_help(key)
    names = {k: f for k, f in flags("run") + flags("quickstart")}
    for cleared in flag.clears:
        other = names.get(cleared)
        shown = f"--{other.name}" if other else cleared
        text += f" Clears {shown} unless it is given too."
    if flag.keeps_ratio:
        name = key.rpartition(".")[2]
        text += f" {flag.keeps_ratio} is scaled with it ({flag.keeps_ratio} / {name} stays)."
    return text


def _converter(key: str, flag: Flag, allowed: tuple[type, ...]) -> Callable[[Any], Any]:
    """The option's text as the setting's value (mappings and formats are parsed here)."""
    if dict in allowed:
        return lambda value: parse_mapping(value, f"--{flag.name}") if value else None
    if key == "data_format":
        return _format
    if key == "report_to":
        return lambda value: parse_trackers(value) if value is not None else None
    if key == "reward_weights":
        return lambda value: parse_weights(value) if value is not None else None
    if list in allowed and flag.multiple:  # repeated: the values in order, none given: None
        return lambda value: list(value) or None
    return lambda value: value


def _format(value: str | None) -> str | None:
    from ..data.formats import resolve_format  # when the option is given: the data layer

    return resolve_format(value)


def _store(key: str, convert: Callable[[Any], Any]) -> Callable[[click.Context, Any, Any], Any]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            converted = convert(value)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        ctx.meta.setdefault(_META_KEY, {})[key] = converted
        return converted

    return callback
