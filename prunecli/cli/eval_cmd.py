"""``prunecli eval``: perplexity, parameter count and throughput of a model on a text, its
lm-evaluation-harness accuracy (``--tasks``), or the accuracy, macro-F1 and examples/s of an
encoder classifier on a labelled ``.jsonl`` (``--task``)."""

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
from prunecli.errors import InputError, UnsupportedModelError


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
            help="lm-evaluation-harness task NAMES, comma-separated (e.g. hellaswag,arc_easy); needs "
            "prunecli\\[eval]. The loaded model object is evaluated, so per-layer checkpoints need no remote "
            "code. (A labelled .jsonl file of your own is --task FILE.)",
            metavar="NAMES",
            show_default=False,
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="Labelled .jsonl FILE to classify with an encoder classifier (e.g. a `compress --task` "
            "checkpoint): accuracy, macro-F1, examples/s. Texts: --text-field, labels: --label-field, "
            "tokens per example: --seqlen, at most --max-windows examples. Not with --data or --tasks "
            "(lm-eval task names).",
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    label_field: Annotated[
        str, typer.Option("--label-field", help="JSON key of the label in --task FILE.", metavar="NAME")
    ] = "label",
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
    """Measure the perplexity of one or more models on non-overlapping windows of a text, or
    classify a labelled task with encoder classifiers (--task).

    With one model, --json prints one object; with several, one JSON list. --jsonl prints one
    line per model as soon as it is measured. --quiet prints the perplexity (with several
    models: MODEL<TAB>PERPLEXITY lines).

    Examples:

      prunecli eval smollm2-135m --data builtin:heldout --seqlen 256 --max-windows 4

      prunecli compress smollm2-135m -m magnitude -s 0.2 -o out/m20 --json | prunecli eval - --data builtin:heldout --jsonl

      prunecli eval minilm-shrp-50 --task test.jsonl --text-field review --label-field score --seqlen 128
    """
    import sys

    from prunecli.data import eval_windows
    from prunecli.evaluate import evaluate, max_length_warning
    from prunecli.models import classify_spec, load_model

    if jsonl and json:
        raise InputError("--json and --jsonl both given", hint="pick one: --json (one document) or --jsonl")
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if task is not None:
        check_task_file(task, data=data, tasks=task_names)
    elif data is None and not task_names:
        raise InputError(
            "nothing to evaluate",
            hint="pass --data SRC (perplexity), --tasks NAMES (lm-eval) or --task FILE (a labelled .jsonl)",
        )
    for name in task_names:
        if name.endswith((".jsonl", ".json")) and Path(name).is_file():
            raise InputError(
                f"--tasks takes lm-eval task names, {name!r} is a file",
                hint=f"classify a labelled file with --task {name}",
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
            if task is not None:
                metrics = classify_task(loaded, task, text_field, label_field, seqlen, max_windows)
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
            **({"task": task} if task is not None else {}),
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


def check_task_file(task: str, *, data: str | None, tasks: list[str]) -> None:
    """``--task FILE`` before any model loads: alone (not with --data / --tasks) and an existing file."""
    if data is not None or tasks:
        raise InputError(
            "--task (classify a labelled .jsonl) cannot be combined with "
            + ("--data (perplexity)" if data is not None else "--tasks (lm-eval)"),
            hint="evaluate the classifier with --task FILE alone, in a separate `prunecli eval` call",
        )
    if not Path(task).is_file():
        hint = "pass a .jsonl file, one labelled example per line"
        if not task.endswith((".jsonl", ".json")) and "/" not in task:
            hint += f"; for lm-evaluation-harness tasks use --tasks {task}"
        raise InputError(f"--task: task file not found: {task}", hint=hint)


def classify_task(
    loaded: Any, task: str, text_field: str, label_field: str, seqlen: int, max_examples: int | None
) -> dict[str, Any]:
    """Accuracy, macro-F1, examples/s and parameters of a loaded sequence classifier on a labelled jsonl."""
    from prunecli.evaluate import count_parameters
    from prunecli.tasks import evaluate_task, is_classifier, load_task, model_label_names

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
    return {**evaluate_task(loaded.model, data), "params": count_parameters(loaded.model)}


def _headline(report: dict[str, Any]) -> str:
    """Perplexity, else the classification accuracy (``--task``), else the first lm-eval task's accuracy (``--quiet``)."""
    if report.get("perplexity") is not None:
        return f"{report['perplexity']:.4f}"
    if report.get("accuracy") is not None:
        return f"{report['accuracy']:.4f}"
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
    first = reports[0]
    if first.get("data"):
        what = f"perplexity on {first['data']}"
    elif first.get("task"):
        what = f"accuracy on {first['task']}"
    else:
        what = "first task's accuracy"
    classify = bool(first.get("task"))
    table = Table(title=what)
    table.add_column("model")
    table.add_column("perplexity" if first.get("data") else "accuracy", justify="right")
    if classify:
        table.add_column("macro-F1", justify="right")
    table.add_column("parameters", justify="right")
    table.add_column("examples/s" if classify else "tokens/s", justify="right")
    for r in reports:
        rate = r.get("examples_per_s") if classify else r.get("tokens_per_s")
        rate_text = "-" if rate is None else f"{rate:,.1f}" if classify else f"{rate:,.0f}"
        f1 = [f"{r['macro_f1']:.4f}"] if classify else []
        table.add_row(r["model"], _headline(r), *f1, f"{r['params']:,}", rate_text)
    console.print(table)


def render_eval(console: Console, report: dict[str, Any]) -> None:
    """Table of the evaluation metrics."""
    where = report.get("data") or report.get("task")
    title = report["model"] + (f" on {where}" if where else "")
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    if report.get("perplexity") is not None:
        table.add_row("perplexity", f"{report['perplexity']:.3f}")
        table.add_row("windows x tokens", f"{report['n_windows']} x {report['seqlen']}")
    if report.get("accuracy") is not None:  # --task
        table.add_row("accuracy", f"{report['accuracy']:.4f}")
        table.add_row("macro-F1", f"{report['macro_f1']:.4f}")
        table.add_row("examples", f"{report['examples']:,}")
        table.add_row("examples/s (forward pass)", f"{report['examples_per_s']:,.1f}")
    table.add_row("parameters", f"{report['params']:,}")
    if report.get("tokens_per_s") is not None:
        table.add_row("tokens/s (forward pass)", f"{report['tokens_per_s']:,.0f}")
    for task, metrics in (report.get("tasks") or {}).items():
        for name, value in metrics.items():
            table.add_row(f"{task}: {name}", f"{value:.4f}")
    table.add_row("seconds: load", f"{report['load_seconds']:.1f}")
    if report.get("eval_seconds") is not None:
        what = "classification" if report.get("accuracy") is not None else "perplexity"
        table.add_row(f"seconds: {what}", f"{report['eval_seconds']:.1f}")
    console.print(table)
