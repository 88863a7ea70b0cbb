"""Recipes (YAML files of `compress` options) and typed ``--set key=value`` method options."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from prunecli.errors import InputError

# Recipe key -> accepted Python types. The names are the `compress` flags with dashes
# turned into underscores; `set` holds method-specific config fields.
RECIPE_KEYS: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "method": (str,),
    "sparsity": (float, int),
    "output": (str,),
    "calib": (str,),
    "text_field": (str,),
    "nsamples": (int,),
    "seqlen": (int,),
    "seed": (int,),
    "round_to": (int,),
    "ignore": (list, str),
    "set": (dict,),
    "eval_data": (str,),
    "eval_seqlen": (int,),
    "max_windows": (int,),
    "recover_steps": (int,),
    "recover_data": (str,),
    "dtype": (str,),
    "device": (str,),
    "nproc": (int,),
    "sequential": (bool,),
    "refit": (bool,),
    "max_memory": (str, int),
    "export": (str,),
    "export_outtype": (str,),
}
# Options that must be typed on the command line, never taken from a file someone sent you.
COMMAND_LINE_ONLY = ("allow_pickle", "trust_remote_code", "overwrite", "json", "quiet", "recipe")

# Config fields that have their own `compress` flag.
COMMON_FIELDS = {"sparsity": "--sparsity", "round_to": "--round-to", "seed": "--seed", "ignore": "--ignore"}


def load_recipe(path: Path) -> dict[str, Any]:
    """Read and check a YAML recipe.

    Args:
        path: a YAML file whose top level maps option names (``model``, ``method``,
            ``sparsity``, ``calib``, ... as in ``prunecli compress --help``, dashes or
            underscores) to values; ``set`` maps method-specific fields to values.

    Returns:
        The options with underscore names; ``ignore`` as a list; ``set`` as a dict.

    Example:
        >>> load_recipe(Path("recipes/smollm2-magnitude-20.yaml"))["method"]  # doctest: +SKIP
        'magnitude'
    """
    import yaml

    if not path.is_file():
        raise InputError(f"recipe file not found: {path}", hint="pass an existing YAML file to --recipe")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"recipe {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a mapping of option names to values")
    recipe: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in COMMAND_LINE_ONLY:
            raise InputError(
                f"recipe {path}: {key!r} must be given on the command line, not in a recipe",
                hint=f"pass --{key.replace('_', '-')} on the command line instead",
            )
        if key not in RECIPE_KEYS:
            raise InputError(
                f"recipe {path}: unknown key {raw_key!r}",
                hint=f"known keys: {', '.join(RECIPE_KEYS)}",
            )
        if value is None:
            continue
        allowed = RECIPE_KEYS[key]
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise InputError(f"recipe {path}: {key!r} must be {names}, got {value!r}")
        if key == "ignore":
            value = [value] if isinstance(value, str) else [str(v) for v in value]
        if key == "set":
            value = {str(k).replace("-", "_"): v for k, v in value.items()}
        recipe[key] = value
    return recipe


def method_fields(config_cls: type) -> dict[str, Any]:
    """Method-specific config fields (not settable by a dedicated flag) and their resolved types."""
    hints = typing.get_type_hints(config_cls)
    return {
        f.name: hints.get(f.name, str) for f in dataclasses.fields(config_cls) if f.name not in COMMON_FIELDS
    }


def parse_set(items: list[str], config_cls: type) -> dict[str, Any]:
    """Parse ``--set key=value`` items into typed config options.

    Args:
        items: strings ``key=value``; dashes in ``key`` are read as underscores.
        config_cls: the method's config dataclass; each value is converted to its field's type.

    Returns:
        ``{field: value}`` with values of the field types.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set expects key=value, got {item!r}", hint="e.g. --set metric=WIFV")
        options[key.strip().replace("-", "_")] = value.strip()
    return coerce_options(options, config_cls)


def coerce_options(options: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """Check that every key is a method-specific field of ``config_cls`` and convert its value.

    Args:
        options: field name -> value (strings from the command line or YAML values).
        config_cls: the method's config dataclass.
    """
    fields = method_fields(config_cls)
    method = getattr(config_cls, "method", "") or config_cls.__name__
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key in COMMON_FIELDS:
            raise InputError(
                f"{key} has its own flag, not --set: use {COMMON_FIELDS[key]}",
                hint=f"in a recipe write it at the top level ({key}: ...)",
            )
        if key not in fields:
            known = ", ".join(sorted(fields)) or "none"
            raise InputError(
                f"method {method!r} has no option {key!r}", hint=f"options of {method!r}: {known}"
            )
        out[key] = convert(value, fields[key], key)
    return out


def convert(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (a string or a YAML scalar/list) to the type annotation ``tp``.

    Supports ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``, ``X | None`` and
    ``tuple[X, ...]`` / ``list[X]`` (comma-separated on the command line).
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, name)
            except InputError as e:
                errors.append(e.message)
        raise InputError(errors[0] if errors else f"{name}: cannot read {value!r}")
    if origin is typing.Literal:
        for choice in args:
            if value == choice or str(value) == str(choice):
                return choice
        raise InputError(
            f"{name} must be one of {', '.join(map(str, args))}, got {value!r}",
        )
    if origin in (tuple, list):
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
        inner = args[0] if args else str
        converted = [convert(v, inner, name) for v in items]
        return tuple(converted) if origin is tuple else converted
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise InputError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise InputError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value) if tp is float else int(str(value), 10) if isinstance(value, str) else value
        except ValueError:
            raise InputError(
                f"{name} must be {'an integer' if tp is int else 'a number'}, got {value!r}"
            ) from None
        if tp is int and not isinstance(number, int):
            raise InputError(f"{name} must be an integer, got {value!r}")
        return number
    if tp is str:
        return str(value)
    raise InputError(f"option {name} of type {tp} cannot be set from the command line")
