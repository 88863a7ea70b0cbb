"""``prunecli eval``: perplexity, parameter count and throughput of a model on a text."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxWindowsOpt,
    ModelArg,
    QuietOpt,
    SeqlenOpt,
    TextFieldOpt,
    TrustRemoteCodeOpt,
    check_data_source,
)
from prunecli.cli.output import Output, library_bars_off


def eval_model(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Text to evaluate on: a .txt/.jsonl file, a folder of .txt files, or hf:NAME[:CONFIG]:SPLIT[:FIELD].",
            metavar="SRC",
            show_default=False,
        ),
    ],
    seqlen: SeqlenOpt = 512,
    max_windows: MaxWindowsOpt = None,
    text_field: TextFieldOpt = "text",
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure the perplexity of MODEL on non-overlapping windows of a text.

    Example:

      prunecli eval smollm2-flap-20 --data persuasion.txt --seqlen 512 --max-windows 16
    """
    from prunecli.data import eval_windows
    from prunecli.evaluate import evaluate
    from prunecli.models import load_model

    check_data_source(data, "--data")
    out = Output(json=json, quiet=quiet)
    with library_bars_off(), out.progress() as progress:
        loaded = load_model(
            model,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
        windows = eval_windows(
            loaded.tokenizer,
            data,
            seqlen=seqlen,
            max_windows=max_windows,
            text_field=text_field,
            progress=progress,
        )
        metrics = dict(evaluate(loaded.model, windows, progress=progress))
    report: dict[str, Any] = {
        "model": model,
        "source": str(loaded.source),
        "data": data,
        **metrics,
        "load_seconds": loaded.load_seconds,
    }
    out.result(report, lambda console: render_eval(console, report), quiet_line=f"{report['perplexity']:.4f}")


def render_eval(console: Console, report: dict[str, Any]) -> None:
    """Table of the evaluation metrics."""
    table = Table(title=f"{report['model']} on {report['data']}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{report['perplexity']:.3f}")
    table.add_row("windows x tokens", f"{report['n_windows']} x {report['seqlen']}")
    table.add_row("parameters", f"{report['params']:,}")
    if report.get("tokens_per_s") is not None:
        table.add_row("tokens/s (forward pass)", f"{report['tokens_per_s']:,.0f}")
    table.add_row("seconds: load", f"{report['load_seconds']:.1f}")
    table.add_row("seconds: perplexity", f"{report['eval_seconds']:.1f}")
    console.print(table)
