"""Check every config group against the code it configures, before anything is built.

A leaf config names its builder with `_target_`; the builder's keyword-only parameters (all fields,
for a dataclass) are the only keys the config may set, with the types their hints declare. So the
signature is the schema: a typo or a wrong type fails in one line that names the key, instead of
deep inside a run, and adding a knob means adding a parameter, nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = ("model", "benchmark", "method", "quantizer", "attribution", "eval", "logger")
RESERVED = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


# conf/config.yaml's own keys and their types (the groups are checked against their builders).
TOP_LEVEL = {"seed": int, "storage": Literal["fp32", "bf16", "bf16_master"], "device": str,
             "cpu_threads": int | None, "output_root": str, "cache_dir": str}


class ConfigError(ValueError):
    """A config that does not fit the code it configures."""


def validate_top_level(cfg: DictConfig) -> None:
    for key, hint in TOP_LEVEL.items():
        if key in cfg and not fits(cfg.get(key), hint):
            raise ConfigError(f"{key}: expected {type_name(hint)}, got {cfg.get(key)!r}")


def knobs_of(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """The configurable parameters of a builder and their type hints."""
    params = inspect.signature(target).parameters
    if dataclasses.is_dataclass(target):
        knobs = dict(params)
    else:
        knobs = {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return knobs, typing.get_type_hints(target)


def validate(cfg: DictConfig, groups: tuple[str, ...] = GROUPS) -> None:
    """Raise ConfigError for the first key or value that does not fit its group's builder."""
    for group in groups:
        node = cfg.get(group)
        if node is None:
            raise ConfigError(f"config group '{group}' is missing")
        validate_node(node, group)


def validate_node(node: DictConfig, where: str) -> None:
    target_path = node.get("_target_")
    if target_path is None:
        raise ConfigError(f"{where}: no _target_ naming the code it configures")
    try:
        target = get_object(target_path)
    except Exception as err:  # hydra wraps import errors in several types
        raise ConfigError(f"{where}._target_: cannot import {target_path!r}: {err}") from None
    knobs, hints = knobs_of(target)
    values = OmegaConf.to_container(node, resolve=True)
    for key, value in values.items():
        if key in RESERVED:
            continue
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{where}.{key}: required but not set (add {where}.{key}=...)")
        if key not in knobs:
            close = difflib.get_close_matches(key, list(knobs), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}.{key}: unknown key for {target_path}{hint}; "
                              f"known keys: {', '.join(knobs) or 'none'}")
        if key in hints and not fits(value, hints[key]):
            raise ConfigError(f"{where}.{key}: expected {type_name(hints[key])}, got {value!r}")
    for name, param in knobs.items():
        if param.default is inspect.Parameter.empty and name not in values:
            raise ConfigError(f"{where}.{name}: required by {target_path} but not set")


def fits(value: Any, hint: Any) -> bool:
    """Whether a plain (resolved) config value fits a type hint; numbers widen int → float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        return not args or len(args) != 1 or all(fits(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, (dict, DictConfig))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
