"""Recipes (YAML files of `compress` options), their gates, and typed ``--set key=value`` method options.

A recipe is a mapping of ``compress`` option names to values. Three keys are special:

- ``extends: base.yaml`` (or a list): the recipe starts from those files (read the same way,
  relative to this file) and overrides their keys; ``set`` and ``expect`` are merged key by key.
- paths (``model`` when it names a local folder or file, ``output``, ``calib``,
  ``eval_data``, ``recover_data``) are relative to the recipe file, not the current directory,
  and are made absolute when the recipe is read; ``hf:`` sources, aliases and hub ids are kept.
- ``expect`` holds gates that the run's report must pass (:data:`GATES`, :func:`check_gates`).
"""

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
    "task": (str,),
    "label_field": (str,),
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
    "speed": (bool,),
    "expect": (dict,),
    "keep_experts": (float, int),
    "demos": (list, str),
    "export": (str,),
    "export_outtype": (str,),
}
# Keys that hold paths, resolved relative to the recipe file ("model" only when that path exists).
PATH_KEYS = ("model", "output", "calib", "task", "eval_data", "recover_data", "demos")
# Options that must be typed on the command line, never taken from a file someone sent you.
COMMAND_LINE_ONLY = ("allow_pickle", "trust_remote_code", "overwrite", "json", "quiet", "recipe")

# Config fields that have their own `compress` flag.
COMMON_FIELDS = {"sparsity": "--sparsity", "round_to": "--round-to", "seed": "--seed", "ignore": "--ignore"}


def load_recipe(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read and check a YAML recipe, following ``extends`` and resolving paths.

    Args:
        path: a YAML file whose top level maps option names (``model``, ``method``,
            ``sparsity``, ``calib``, ... as in ``prunecli compress --help``, dashes or
            underscores) to values; ``set`` maps method-specific fields to values, ``expect``
            gates (:data:`GATES`) to limits, ``extends`` names base recipes.

    Returns:
        The options with underscore names; ``ignore`` as a list; ``set`` and ``expect`` as
        dicts; paths absolute (relative ones are read from the recipe's folder).

    Example:
        >>> load_recipe(Path("recipes/smollm2-magnitude-20.yaml"))["method"]  # doctest: +SKIP
        'magnitude'
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise InputError(f"recipe file not found: {path}", hint="pass an existing YAML file")
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(p.name for p in (*_seen, resolved))
        raise InputError(f"recipe {path}: extends itself ({chain})", hint="remove the cycle from `extends:`")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(
            f"recipe {path} is not valid YAML: {' '.join(str(e).split())}",
            hint="check the indentation and quoting near the line named",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(
            f"recipe {path} must be a mapping of option names to values",
            hint="write one `name: value` per line, e.g. `method: magnitude`",
        )
    base: dict[str, Any] = {}
    extends = data.pop("extends", None)
    if extends is not None:
        if isinstance(extends, str):
            extends = [extends]
        if not isinstance(extends, list) or not all(isinstance(e, str) for e in extends):
            raise InputError(f"recipe {path}: 'extends' must be a file name or a list of them")
        for name in extends:
            parent = Path(name) if Path(name).is_absolute() else path.parent / name
            if not parent.is_file():
                raise InputError(
                    f"recipe {path}: extends {name!r}, which does not exist",
                    hint=f"paths in `extends:` are relative to {path.parent}",
                )
            base = merge_recipes(base, load_recipe(parent, _seen=(*_seen, resolved)))
    recipe = check_mapping(data, where=f"recipe {path}", folder=path.parent)
    return merge_recipes(base, recipe)


def check_mapping(data: dict[str, Any], *, where: str, folder: Path) -> dict[str, Any]:
    """Check a recipe mapping's keys and value types; normalise names, lists and paths.

    Args:
        data: option name -> value (dashes or underscores).
        where: how to name the source in messages (``recipe FILE``, ``--set``).
        folder: relative paths are resolved against it (the recipe's folder; the current
            directory for command-line values).
    """
    path = where
    recipe: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in COMMAND_LINE_ONLY:
            raise InputError(
                f"{path}: {key!r} must be given on the command line, not in a recipe",
                hint=f"pass --{key.replace('_', '-')} on the command line instead",
            )
        if key not in RECIPE_KEYS:
            raise InputError(
                f"{path}: unknown key {raw_key!r}",
                hint=f"known keys: {', '.join(RECIPE_KEYS)}, extends",
            )
        if value is None:
            continue
        allowed = RECIPE_KEYS[key]
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise InputError(
                f"{path}: {key!r} must be {names}, got {value!r}",
                hint=f"see `prunecli compress --help` for --{key.replace('_', '-')}",
            )
        if key in ("ignore", "demos"):
            value = [value] if isinstance(value, str) else [str(v) for v in value]
        if key == "set":
            value = {str(k).replace("-", "_"): v for k, v in value.items()}
        if key == "expect":
            value = check_expect(value, where=f"{path}")
        if key in PATH_KEYS and isinstance(value, str):
            value = resolve_path(key, value, folder)
        elif key in PATH_KEYS and isinstance(value, list):  # demos: one source per domain
            value = [resolve_path(key, v, folder) for v in value]
        recipe[key] = value
    return recipe


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``prunecli run``'s ``--set KEY=VALUE`` items as a recipe mapping.

    ``KEY`` is a recipe key (``sparsity``, ``output``, ...); ``set.FIELD`` and ``expect.GATE``
    reach into those sections. ``VALUE`` is read as YAML (``0.3``, ``true``, ``[a, b]``); paths
    are relative to the current directory.

    Example:
        >>> parse_overrides(["sparsity=0.3", "set.metric=WIFV", "expect.max_ppl_ratio=1.5"])
        {'sparsity': 0.3, 'set': {'metric': 'WIFV'}, 'expect': {'max_ppl_ratio': 1.5}}
    """
    import yaml

    data: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError(f"--set expects KEY=VALUE, got {item!r}", hint="e.g. --set sparsity=0.3")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        section, dot, field = key.partition(".")
        if dot:
            if section not in ("set", "expect") or not field:
                raise InputError(
                    f"--set {item!r}: only set.FIELD and expect.GATE take a dot",
                    hint="e.g. --set set.metric=WIFV or --set expect.max_ppl_ratio=1.5",
                )
            data.setdefault(section, {})[field] = value
        else:
            data[key] = value
    return check_mapping(data, where="--set", folder=Path.cwd())


def resolve_path(key: str, value: str, folder: Path) -> str:
    """A recipe's path value made absolute against ``folder`` (the recipe's own folder).

    ``hf:`` sources are kept; ``model`` is resolved only when that path exists (otherwise it is
    an alias or a hub id); ``~`` is expanded.
    """
    if value.startswith(("hf:", "builtin:")):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = (folder / p).resolve()
    if key == "model" and not candidate.exists():
        return value
    return str(candidate)


def merge_recipes(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; ``set`` and ``expect`` are merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        if key in ("set", "expect") and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


# Gate name -> (what it bounds, "max" or "min"). A gate reads the run's report (see check_gates).
GATES: dict[str, tuple[str, str]] = {
    "max_ppl_ratio": ("perplexity after / before", "max"),
    "max_ppl": ("perplexity after pruning", "max"),
    "min_block_sparsity": ("removed share of the attention + MLP parameters", "min"),
    "max_block_sparsity": ("removed share of the attention + MLP parameters", "max"),
    "min_model_sparsity": ("removed share of all parameters", "min"),
    "max_params": ("parameters after pruning", "max"),
    "max_seconds": ("seconds of the whole run", "max"),
    "min_speedup": ("forward-pass tokens/s after / before", "min"),
}
# Gates that need an evaluation (--eval-data) or the speed measurement to be checkable.
NEEDS_EVAL = ("max_ppl_ratio", "max_ppl", "min_speedup")


def check_expect(value: dict[str, Any], where: str = "expect") -> dict[str, float]:
    """Check a mapping of gates (known names, numeric limits) and return it with float values."""
    out: dict[str, float] = {}
    for raw, limit in value.items():
        key = str(raw).replace("-", "_")
        if key not in GATES:
            raise InputError(f"{where}: unknown gate {raw!r}", hint=f"known gates: {', '.join(GATES)}")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit != limit:
            raise InputError(f"{where}: gate {key!r} needs a number, got {limit!r}", hint=f"e.g. {key}: 1.5")
        out[key] = float(limit)
    return out


def gate_values(report: dict[str, Any]) -> dict[str, float | None]:
    """The measured value each gate compares, read from a compress report (``None`` if not measured)."""
    ppl = report.get("perplexity") or {}
    sparsity = report.get("sparsity") or {}
    params = report.get("params") or {}
    before, after = ppl.get("before"), ppl.get("after")
    tps_before, tps_after = ppl.get("tokens_per_s_before"), ppl.get("tokens_per_s_after")
    return {
        "max_ppl_ratio": after / before if before and after is not None else None,
        "max_ppl": after,
        "min_block_sparsity": sparsity.get("blocks"),
        "max_block_sparsity": sparsity.get("blocks"),
        "min_model_sparsity": sparsity.get("model"),
        "max_params": params.get("after"),
        "max_seconds": (report.get("seconds") or {}).get("total"),
        "min_speedup": tps_after / tps_before if tps_before and tps_after is not None else None,
    }


def check_gates(report: dict[str, Any], expect: dict[str, float]) -> list[dict[str, Any]]:
    """Compare a compress report with its gates.

    Args:
        report: a compress report (``Report.to_dict()`` or the ``--json`` output).
        expect: gate name -> limit (:data:`GATES`).

    Returns:
        One record per gate: ``{"gate", "limit", "value", "passed", "by", "message"}``, where
        ``by`` is how far the value is on the wrong side of the limit (0 when it passed).

    Example:
        >>> r = check_gates({"sparsity": {"blocks": 0.15}}, {"min_block_sparsity": 0.19})[0]
        >>> r["passed"], round(r["by"], 2)
        (False, 0.04)
    """
    values = gate_values(report)
    results = []
    for gate, limit in expect.items():
        what, side = GATES[gate]
        value = values.get(gate)
        if value is None:
            passed, by = False, None
            message = f"{gate}: {what} was not measured (limit {limit:g})"
        else:
            by = max(0.0, value - limit) if side == "max" else max(0.0, limit - value)
            passed = by == 0.0
            sign = "<=" if side == "max" else ">="
            message = f"{gate}: {what} is {value:.4g}, expected {sign} {limit:g}"
            if not passed:
                message += (
                    f" (off by {by:.4g}, {by / abs(limit):.1%} of the limit)"
                    if limit
                    else f" (off by {by:.4g})"
                )
        results.append(
            {"gate": gate, "limit": limit, "value": value, "passed": passed, "by": by, "message": message}
        )
    return results


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
