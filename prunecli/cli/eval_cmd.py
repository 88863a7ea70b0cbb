"""``prunecli eval``: perplexity, parameter count and throughput of a model on a text, or
accuracy, macro-F1 and examples/s of an encoder classifier on a labelled task (``--task``)."""

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
from prunecli.errors import InputError, UnsupportedModelError


def eval_model(
    model: ModelArg,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Text to evaluate on: a .txt/.jsonl file, a folder of .txt files, or hf:NAME[:CONFIG]:SPLIT[:FIELD].",
            metavar="SRC",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="Labelled .jsonl to classify instead (encoder classifiers): accuracy, macro-F1, examples/s.",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    label_field: Annotated[
        str, typer.Option("--label-field", help="JSON key of the label in --task.", metavar="NAME")
    ] = "label",
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

      prunecli eval minilm-shrp-50 --task test.jsonl --text-field review --label-field score --seqlen 128
    """
    from prunecli.data import eval_windows
    from prunecli.evaluate import evaluate
    from prunecli.models import load_model

    if (data is None) == (task is None):
        raise InputError("pass exactly one of --data (perplexity) and --task (classification)")
    if task is not None:
        return eval_task(
            model,
            task,
            text_field,
            label_field,
            seqlen,
            max_windows,
            dtype,
            device,
            allow_pickle,
            trust_remote_code,
            json,
            quiet,
        )
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


def eval_task(
    model: str,
    task: str,
    text_field: str,
    label_field: str,
    seqlen: int,
    max_examples: int | None,
    dtype: str,
    device: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    json: bool,
    quiet: bool,
) -> None:
    """Accuracy, macro-F1 and examples/s of a sequence classifier on a labelled jsonl."""
    from pathlib import Path

    from prunecli.evaluate import count_parameters
    from prunecli.models import load_model
    from prunecli.tasks import evaluate_task, is_classifier, load_task, model_label_names

    if not Path(task).is_file():
        raise InputError(
            f"task file not found: {task}", hint="pass a .jsonl file, one labelled example per line"
        )
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
        if not is_classifier(loaded.model):
            raise UnsupportedModelError(
                f"{type(loaded.model).__name__} has no classification head",
                hint="evaluate a checkpoint fine-tuned on the task (prunecli compress ... --task FILE)",
            )
        data = load_task(
            task,
            loaded.tokenizer,
            text_field=text_field,
            label_field=label_field,
            max_length=seqlen,
            limit=max_examples,
            label_names=model_label_names(loaded.model),
        )
        metrics = evaluate_task(loaded.model, data)
    report: dict[str, Any] = {
        "model": model,
        "source": str(loaded.source),
        "task": task,
        **metrics,
        "params": count_parameters(loaded.model),
        "load_seconds": loaded.load_seconds,
    }
    out.result(report, lambda console: render_task(console, report), quiet_line=f"{report['accuracy']:.4f}")


def render_task(console: Console, report: dict[str, Any]) -> None:
    """Table of the classification metrics."""
    table = Table(title=f"{report['model']} on {report['task']}", show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("accuracy", f"{report['accuracy']:.4f}")
    table.add_row("macro-F1", f"{report['macro_f1']:.4f}")
    table.add_row("examples", f"{report['examples']:,}")
    table.add_row("examples/s (forward pass)", f"{report['examples_per_s']:,.1f}")
    table.add_row("parameters", f"{report['params']:,}")
    table.add_row("seconds: load", f"{report['load_seconds']:.1f}")
    console.print(table)


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
