"""``prunecli export``: write a checkpoint as an ONNX file (onnxruntime) or a GGUF file (llama.cpp)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import JsonOpt, ModelArg, NoVerifyOpt, QuietOpt, TrustRemoteCodeOpt
from prunecli.cli.output import Output, library_bars_off

FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        "-f",
        help="onnx (onnxruntime; dynamic batch and sequence axes, no KV cache) or gguf (llama.cpp; "
        "Llama-family checkpoints).",
        metavar="FORMAT",
        show_default=False,
    ),
]
OuttypeOpt = Annotated[
    str,
    typer.Option(
        "--outtype",
        help="GGUF weight type: f32, f16 or q8_0 (norms and biases stay f32).",
        metavar="TYPE",
    ),
]


def export(
    model: ModelArg,
    format: FormatOpt,
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="File to write (.onnx or .gguf).", metavar="FILE", show_default=False
        ),
    ],
    outtype: OuttypeOpt = "f32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace FILE if it exists.")] = False,
    no_verify: NoVerifyOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Export MODEL (e.g. a pruned checkpoint folder) to ONNX or GGUF, and check the file.

    The ONNX file is run in onnxruntime and its logits compared with PyTorch's; the GGUF file is
    read back and, when llama-cpp-python is installed, run in llama.cpp and compared.

    Examples:

      prunecli export smollm2-flap-50 --format onnx -o smollm2-flap-50.onnx

      prunecli export smollm2-flap-50 --format gguf --outtype q8_0 -o smollm2-flap-50-q8_0.gguf
    """
    from prunecli.export import check_format, export_model

    fmt = check_format(format, outtype)
    out = Output(json=json, quiet=quiet)
    with library_bars_off(), out.progress() as progress:
        report = export_model(
            model,
            fmt,
            output,
            outtype=outtype,
            overwrite=overwrite,
            verify=not no_verify,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    report = {"model": model, **report}
    for message in report.get("warnings", []):
        out.warn(message)
    out.result(report, lambda console: render_export(console, report), quiet_line=report["path"])


def verify_text(verify: dict[str, Any]) -> str:
    """One line for an export's ``verify`` record."""
    check = verify.get("check")
    if check == "none":
        return "not checked (--no-verify)"
    if check == "onnxruntime":
        return f"onnxruntime logits max |diff| {verify['max_abs_diff']:.2e} (tolerance {verify['tolerance']:.1e})"
    if check == "llama.cpp":
        text = f"llama.cpp logits max |diff| {verify['max_abs_diff']:.2e}, top-1 agreement {verify['top1_agreement']:.0%}"
        if "tolerance" in verify:
            text += f" (tolerance {verify['tolerance']:.1e})"
        return text
    return f"{verify.get('tensors', '?')} tensor shapes read back (llama.cpp {verify.get('llama_cpp', 'not run')})"


def render_export(console: Console, report: dict[str, Any]) -> None:
    """Table of one export."""
    table = Table(title=f"{report['model']} -> {report['format']}", show_header=False)
    table.add_column("item")
    table.add_column("value")
    table.add_row("file", str(report["path"]))
    table.add_row("size", f"{report['bytes'] / 1e6:,.1f} MB")
    if report["format"] == "gguf":
        widths = report["widths"]
        table.add_row("architecture", f"{report['architecture']} ({report['outtype']})")
        table.add_row("heads per layer", " ".join(str(w["n_head"]) for w in widths))
        table.add_row("MLP width per layer", " ".join(str(w["n_ff"]) for w in widths))
    else:
        table.add_row("ONNX nodes / opset", f"{report['nodes']} / {report['opset']}")
    table.add_row("check", verify_text(report["verify"]))
    table.add_row("seconds", f"{report['seconds']:.1f}")
    console.print(table)
