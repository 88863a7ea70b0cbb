"""The ONNX branch of ``prunecli compress`` (a MODEL ending in ``.onnx``): option checks and one
call to :func:`prunecli.onnx.compress.compress_onnx`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from prunecli.cli.output import Output, library_bars_off
from prunecli.errors import InputError

#: compress options that mean something for an ONNX file
_FLAGS = {"verify": "no-verify", "speed": "no-speed"}
ONNX_OPTIONS = {
    "model",
    "method",
    "sparsity",
    "calib",
    "output",
    "overwrite",
    "seed",
    "round_to",
    "ignore",
    "set",
}


def compress_onnx_cli(given: dict[str, Any], on_command_line: set[str], out: Output) -> dict[str, Any]:
    """Run ``compress`` on an ONNX file; print and return the report.

    Args:
        given: the command's option values (as ``compress`` collects them).
        on_command_line: options the user gave explicitly.
        out: where to print.
    """
    from prunecli.config import get_method
    from prunecli.onnx.compress import check_onnx_method, compress_onnx
    from prunecli.recipe import parse_set

    other = sorted(on_command_line - ONNX_OPTIONS)
    if other:
        raise InputError(
            f"--{_FLAGS.get(other[0], other[0]).replace('_', '-')} is not supported for ONNX models",
            hint="ONNX compress takes --method, --sparsity, --calib FILE.npy, -o FILE.onnx, --seed, --round-to, "
            "--ignore, --set",
        )
    if not given.get("method") or given.get("sparsity") is None:
        raise InputError("ONNX compress needs --method and --sparsity", hint="e.g. -m magnitude -s 0.3")
    name = check_onnx_method(given["method"])
    cls, _ = get_method(name)
    options = parse_set(list(given.get("set") or []), cls)
    options.update(
        seed=given.get("seed", 0), round_to=given.get("round_to", 1), ignore=tuple(given.get("ignore") or ())
    )
    with library_bars_off(), out.progress() as progress:
        report = compress_onnx(
            given["model"],
            name,
            given["sparsity"],
            output=given.get("output"),
            calib=given.get("calib"),
            overwrite=bool(given.get("overwrite")),
            options=options,
            progress=progress,
        )
    for message in report.get("warnings", []):
        out.warn(message)
    out.result(report, lambda console: render_onnx_report(console, report), quiet_line=report.get("output"))
    return report


def render_onnx_report(console: Console, report: dict[str, Any]) -> None:
    """Parameters before/after and the units removed per group."""
    p = report["params"]
    table = Table(title=f"{report['model']} — {report['method']}", show_edge=False)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("parameters", f"{p['before']:,}", f"{p['after']:,}")
    if p["blocks_before"]:
        table.add_row("attention + MLP blocks", f"{p['blocks_before']:,}", f"{p['blocks_after']:,}")
    console.print(table)
    console.print(
        f"removed {p['removed']:,} parameters ({report['sparsity']['model']:.1%} of the model) from "
        f"{report['plan']['groups_pruned']} groups; onnxruntime runs the result",
        markup=False,
        highlight=False,
    )
    if report.get("output"):
        console.print(f"wrote {report['output']}", markup=False, highlight=False)
