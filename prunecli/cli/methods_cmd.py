"""``prunecli methods``: every registered method, its paper and its ``--set`` options."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunecli.cli._options import JsonOpt, QuietOpt
from prunecli.cli.output import Output


def describe_method(name: str) -> dict[str, Any]:
    """A method's name, paper line, data needs and ``--set`` options (name, type, default).

    Args:
        name: a registered method name.
    """
    from prunecli.config import get_method
    from prunecli.recipe import method_fields

    config_cls, fn = get_method(name)
    name_of = config_cls.__module__
    package = name_of.rsplit(".", 1)[0] if name_of.rsplit(".", 1)[-1] == "config" else name_of
    module = importlib.import_module(package)
    doc = (module.__doc__ or config_cls.__doc__ or "").strip().splitlines()
    defaults = {f.name: _default(f) for f in dataclasses.fields(config_cls)}
    options = [
        {"name": field, "type": _type_name(tp), "default": defaults.get(field)}
        for field, tp in method_fields(config_cls).items()
    ]
    return {
        "method": name,
        "paper": doc[0] if doc else "",
        "needs_data": bool(getattr(config_cls, "needs_data", False)),
        "options": options,
    }


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def list_methods(
    names: Annotated[
        list[str] | None, typer.Argument(help="Methods to show (default: all).", metavar="[METHOD]...")
    ] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """List the pruning methods with their paper and their --set options (type, default).

    Examples:

      prunecli methods

      prunecli methods flap --json
    """
    from prunecli.config import method_names
    from prunecli.pipeline import canonical_method

    out = Output(json=json, quiet=quiet)
    wanted = [canonical_method(n) for n in names] if names else method_names()
    methods = [describe_method(n) for n in wanted]
    out.result(
        methods,
        lambda console: render_methods(console, methods),
        quiet_line="\n".join(m["method"] for m in methods),
    )


def render_methods(console: Console, methods: list[dict[str, Any]]) -> None:
    """One table: method, paper, data, options."""
    table = Table(title="methods (options are set with --set KEY=VALUE, or `set:` in a recipe)")
    table.add_column("method")
    table.add_column("paper / description")
    table.add_column("data")
    table.add_column("--set options: type = default")
    for m in methods:
        opts = "\n".join(f"{o['name']}: {o['type']} = {o['default']!r}" for o in m["options"]) or "-"
        table.add_row(m["method"], escape(m["paper"]), "yes" if m["needs_data"] else "no", escape(opts))
    console.print(table)
