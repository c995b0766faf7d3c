"""Every option of a Hydra config checked against the type its target declares, before anything is built.

A config node with `_target_` names a class (a dataclass config such as `rl.rollouts.SamplingConfig`) or a function
(`pipelines.load_pipeline`); their annotations say what each option takes. `check_option_types` walks a config and
refuses, with one `ConfigError` line naming the option, a value of the wrong type (`algo.epochs=1.5` for an `int`,
`algo.sampling.strength=half` for a `float | None`, `algo.optim.betas=[0.9]` for a `tuple[float, float]`, a
`Literal` choice not among its values) and an option the target does not take (`reward.clip` reaching a reward
without CLIP). Without it such values reach the code: some as tracebacks, some silently (an int option given a
float). Whole numbers are not floats here: an `int` option refuses `2.0`; a `float` option takes an int.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Union

from pipelines.errors import ConfigError

HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def describe(hint: Any) -> str:
    """What a type annotation takes, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arm) for arm in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {describe_each(args[0])}"
    if origin in (tuple, list, typing.Sequence) or hint in (list, tuple):
        return f"a list of {describe_each(args[0])}" if args else "a list"
    return {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint, str(hint))


def describe_each(hint: Any) -> str:
    return {int: "whole numbers", float: "numbers", str: "strings", bool: "booleans"}.get(hint, describe(hint))


def fits(value: Any, hint: Any) -> bool:
    """Whether a config value (OmegaConf containers as plain lists / dicts) fits a type annotation. Unknown kinds of
    annotation (classes, callables, `Any`) take anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(fits(value, arm) for arm in args)
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
        return all(fits(v, args[0]) for v in value) if args else True
    if origin in (list, typing.Sequence) or hint is list:
        return isinstance(value, (list, tuple)) and (not args or all(fits(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict) or value is None
    return True


def target_options(target: str) -> tuple[dict[str, Any], set[str] | None]:
    """The annotated options of a `_target_` and the names it takes (None: any, it has `**kwargs`); nothing known
    when the target cannot be imported (Hydra then says so itself)."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception:  # noqa: BLE001 - Hydra's own error names the target when it builds
        return {}, None
    try:
        hints = typing.get_type_hints(obj if dataclasses.is_dataclass(obj) else
                                      obj.__init__ if inspect.isclass(obj) else obj)
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError, NameError):
        return {}, None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return hints, None
    return hints, set(parameters)


def plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_option_types(config: Any, section: str) -> None:
    """Raise `ConfigError` (one line) for the first option under `section` (`algo`, `model`, ...) whose value does not
    fit its target's annotation, or that its target does not take; nested nodes are checked by their own targets."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(config, ListConfig | list):
        for index, item in enumerate(config):
            check_option_types(item, f"{section}[{index}]")
        return
    if not isinstance(config, DictConfig | dict):
        return
    target = config.get("_target_")
    hints, names = target_options(target) if isinstance(target, str) else ({}, None)
    for key in config:
        if key in HYDRA_KEYS:
            continue
        option = f"{section}.{key}"
        if names is not None and key not in names:
            known = ", ".join(sorted(n for n in names if n not in ("self", "args", "kwargs")))
            raise ConfigError(f"{option} is not an option of {target} (its options: {known}); remove it, or pick "
                              f"the config group that has it")
        value = config[key]
        if key in hints and not fits(plain(value), hints[key]):
            raise ConfigError(f"{option} must be {describe(hints[key])}, got {plain(value)!r}")
        check_option_types(value, option)
