"""``prunecli graph``: the groups of coupled channels that methods score and the engine removes."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from prunecli.cli._options import AllowPickleOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelArg, TrustRemoteCodeOpt
from prunecli.cli.output import Output, library_bars_off


def graph(
    model: ModelArg,
    all_groups: Annotated[
        bool, typer.Option("--all", help="Also show groups that cannot be pruned, with the reason.")
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
) -> None:
    """Show the dependency graph of MODEL: its groups by layer, units, parameters per unit.

    MODEL may be an ONNX file (``model.onnx``): its groups come from the ONNX graph itself.

    Without --all only prunable groups are listed (also in --json, which prints a JSON
    list with one object per group).

    Example:

      prunecli graph smollm2-135m --all
    """
    from prunecli.graph import build_graph
    from prunecli.models import load_model

    out = Output(json=json)
    if model.lower().endswith(".onnx"):
        from prunecli.onnx.graph import build_onnx_graph, load_onnx

        with library_bars_off(), out.progress() as progress, progress.task("tracing the ONNX graph") as task:
            dep = build_onnx_graph(load_onnx(model))
            task.advance()
        _show(out, model, dep, all_groups, json)
        return
    with library_bars_off(), out.progress() as progress:
        loaded = load_model(
            model,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
        with progress.task("tracing the model") as task:
            dep = build_graph(loaded.model)
            task.advance()
    _show(out, model, dep, all_groups, json)


def _show(out: Output, title: str, dep: Any, all_groups: bool, json: bool) -> None:
    groups = [g for g in dep.groups.values() if all_groups or g.prunable]
    if json:
        out.result([g.to_dict() for g in groups])
        return
    out.result({}, lambda console: render_graph(console, title, dep, groups))


def render_graph(console: Console, title: str, dep: Any, groups: list[Any]) -> None:
    """Draw ``groups`` as a tree: model -> layer -> group (kind, units, params per unit, status)."""
    tree = Tree(f"[bold]{escape(title)}[/]  fingerprint {dep.fingerprint}")
    branches: dict[Any, Tree] = {}
    for g in groups:
        key = g.layer
        if key not in branches:
            branches[key] = tree.add(f"layer {key}" if key is not None else "outside the layers")
        status = (
            "[green]prunable[/]" if g.prunable else f"[red]fixed[/]: {escape(g.reason or 'not prunable')}"
        )
        parent = f", parent {escape(g.parent)}" if g.parent else ""
        branches[key].add(
            f"{escape(g.name)}  [cyan]{g.kind}[/]  {g.num_units} units x "
            f"{g.unit_params(0) if g.num_units else 0:,} params{parent}  {status}"
        )
    console.print(tree)
    prunable = [g for g in dep.groups.values() if g.prunable]
    console.print(
        f"{len(dep.groups)} groups, {len(prunable)} prunable, "
        f"{sum(g.total_params() for g in prunable):,} parameters in prunable groups",
        highlight=False,
    )
    if dep.unknown_ops:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(dep.unknown_ops.items()))
        console.print(
            f"ops the tracer does not model (their channels are fixed): {escape(ops)}", highlight=False
        )
