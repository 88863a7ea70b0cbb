"""``prunecli eval``: perplexity, parameter count and throughput of a model on a text."""

from __future__ import annotations

from pathlib import Path
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
    QuietOpt,
    SeqlenOpt,
    TextFieldOpt,
    TrustRemoteCodeOpt,
    check_data_source,
)
from prunecli.cli.output import Output, library_bars_off, to_json
from prunecli.errors import InputError


def eval_model(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Models to evaluate: folders, .gguf files, hub ids or aliases; `-` reads them from stdin "
            "(one per line, or the JSON that `prunecli compress --json` prints: its output folder is used).",
            metavar="MODEL...",
            show_default=False,
        ),
    ],
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Text for perplexity: a .txt/.jsonl file, a folder of .txt files, builtin:heldout (shipped), "
            "or hf:NAME[:CONFIG]:SPLIT[:FIELD].",
            metavar="SRC",
            show_default=False,
        ),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy); needs prunecli[eval]. "
            "The loaded model object is evaluated, so per-layer checkpoints need no remote code.",
            metavar="NAMES",
            show_default=False,
        ),
    ] = None,
    task_dir: Annotated[
        list[Path] | None,
        typer.Option(
            "--task-dir",
            help="Folder of extra lm-eval task YAML files (repeatable).",
            metavar="DIR",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="At most N documents per task.", metavar="N", show_default=False),
    ] = None,
    seqlen: SeqlenOpt = 512,
    max_windows: MaxWindowsOpt = None,
    text_field: TextFieldOpt = "text",
    no_speed: Annotated[
        bool, typer.Option("--no-speed", help="Do not time forward passes (tokens/s).")
    ] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
    jsonl: Annotated[
        bool,
        typer.Option("--jsonl", help="Print one JSON line per model as each finishes (for pipelines)."),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Measure the perplexity of one or more models on non-overlapping windows of a text.

    With one model, --json prints one object; with several, one JSON list. --jsonl prints one
    line per model as soon as it is measured. --quiet prints the perplexity (with several
    models: MODEL<TAB>PERPLEXITY lines).

    Examples:

      prunecli eval smollm2-135m --data builtin:heldout --seqlen 256 --max-windows 4

      prunecli compress smollm2-135m -m magnitude -s 0.2 -o out/m20 --json | prunecli eval - --data builtin:heldout --jsonl
    """
    import sys

    from prunecli.data import eval_windows
    from prunecli.evaluate import evaluate, max_length_warning
    from prunecli.models import classify_spec, load_model

    if jsonl and json:
        raise InputError("--json and --jsonl both given", hint="pick one: --json (one document) or --jsonl")
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if data is None and not task_names:
        raise InputError(
            "nothing to evaluate", hint="pass --data SRC (perplexity) and/or --tasks NAMES (lm-eval)"
        )
    for folder in task_dir or []:
        if not folder.is_dir():
            raise InputError(
                f"--task-dir: no such folder: {folder}", hint="pass a folder of lm-eval task YAML files"
            )
    specs = read_model_names(models, sys.stdin)
    for spec in specs:  # every name is checked before the first model is loaded
        classify_spec(spec, allow_pickle=allow_pickle)
    if data is not None:
        check_data_source(data, "--data")
    out = Output(json=json or jsonl, quiet=quiet)
    reports: list[dict[str, Any]] = []
    for spec in specs:
        with library_bars_off(), out.progress() as progress:
            loaded = load_model(
                spec,
                dtype=dtype,
                device=device,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
                progress=progress,
            )
            metrics: dict[str, Any] = {}
            if data is not None:
                warning = max_length_warning(loaded.model, seqlen)
                if warning:
                    out.warn(warning)
                windows = eval_windows(
                    loaded.tokenizer,
                    data,
                    seqlen=seqlen,
                    max_windows=max_windows,
                    text_field=text_field,
                    progress=progress,
                )
                metrics = dict(
                    evaluate(loaded.model, windows, progress=progress, measure_throughput=not no_speed)
                )
            if task_names:
                from prunecli.evaluate import count_parameters, task_accuracy

                metrics.setdefault("params", count_parameters(loaded.model))
                metrics["tasks"] = task_accuracy(
                    loaded.model,
                    loaded.tokenizer,
                    task_names,
                    task_dirs=[str(d) for d in task_dir or []],
                    limit=limit,
                )
        report: dict[str, Any] = {
            "model": spec,
            "source": str(loaded.source),
            "data": data,
            **metrics,
            "load_seconds": loaded.load_seconds,
        }
        del loaded
        reports.append(report)
        if jsonl:
            sys.stdout.write(to_json_line(report) + "\n")
            sys.stdout.flush()
    if jsonl:
        return
    if len(reports) == 1:
        report = reports[0]
        out.result(report, lambda console: render_eval(console, report), quiet_line=_headline(report))
        return
    lines = "\n".join(f"{r['model']}\t{_headline(r)}" for r in reports)
    out.result(reports, lambda console: render_many(console, reports), quiet_line=lines)


def _headline(report: dict[str, Any]) -> str:
    """Perplexity, else the first task's accuracy (``--quiet``)."""
    if report.get("perplexity") is not None:
        return f"{report['perplexity']:.4f}"
    first = next(iter((report.get("tasks") or {}).values()), {})
    value = first.get("acc", next(iter(first.values()), float("nan")))
    return f"{value:.4f}"


def read_model_names(models: list[str], stdin: Any) -> list[str]:
    """The model names of ``eval``'s arguments, with ``-`` replaced by what stdin holds.

    Stdin holds names one per line, or JSON documents (``prunecli compress --json`` output, a
    list of them, or JSON lines): each document's ``output`` (else ``model``) is taken.
    """
    import json as _json

    names: list[str] = []
    for item in models:
        if item != "-":
            names.append(item)
            continue
        text = stdin.read()
        stripped = text.strip()
        if stripped.startswith(("{", "[")):
            decoder = _json.JSONDecoder()
            pos = 0
            while pos < len(stripped):
                try:
                    doc, end = decoder.raw_decode(stripped, pos)
                except ValueError as e:
                    raise InputError(
                        f"stdin is not JSON documents: {e}",
                        hint="pipe `prunecli compress ... --json`, or one name per line",
                    ) from None
                for d in doc if isinstance(doc, list) else [doc]:
                    name = d.get("output") or d.get("model") if isinstance(d, dict) else None
                    if not name:
                        raise InputError(
                            "a JSON document on stdin names no model (no `output` or `model`)",
                            hint="run compress with -o DIR so its report names the checkpoint",
                        )
                    names.append(str(name))
                pos = end
                while pos < len(stripped) and stripped[pos].isspace():
                    pos += 1
        else:
            names.extend(line.strip() for line in text.splitlines() if line.strip())
    if not names:
        raise InputError(
            "no model to evaluate", hint="pass MODEL arguments, or pipe names into `prunecli eval -`"
        )
    return names


def to_json_line(data: Any) -> str:
    """One line of strict JSON (for ``--jsonl``)."""
    import json as _json

    return _json.dumps(_json.loads(to_json(data)), separators=(",", ":"))


def render_many(console: Console, reports: list[dict[str, Any]]) -> None:
    """One row per model."""
    what = f"perplexity on {reports[0]['data']}" if reports[0].get("data") else "first task's accuracy"
    table = Table(title=what)
    table.add_column("model")
    table.add_column("perplexity" if reports[0].get("data") else "accuracy", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("tokens/s", justify="right")
    for r in reports:
        tps = r.get("tokens_per_s")
        table.add_row(r["model"], _headline(r), f"{r['params']:,}", "-" if tps is None else f"{tps:,.0f}")
    console.print(table)


def render_eval(console: Console, report: dict[str, Any]) -> None:
    """Table of the evaluation metrics."""
    title = report["model"] + (f" on {report['data']}" if report.get("data") else "")
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if report.get("perplexity") is not None:
        table.add_row("perplexity", f"{report['perplexity']:.3f}")
        table.add_row("windows x tokens", f"{report['n_windows']} x {report['seqlen']}")
    table.add_row("parameters", f"{report['params']:,}")
    if report.get("tokens_per_s") is not None:
        table.add_row("tokens/s (forward pass)", f"{report['tokens_per_s']:,.0f}")
    for task, metrics in (report.get("tasks") or {}).items():
        for name, value in metrics.items():
            table.add_row(f"{task}: {name}", f"{value:.4f}")
    table.add_row("seconds: load", f"{report['load_seconds']:.1f}")
    if report.get("eval_seconds") is not None:
        table.add_row("seconds: perplexity", f"{report['eval_seconds']:.1f}")
    console.print(table)
