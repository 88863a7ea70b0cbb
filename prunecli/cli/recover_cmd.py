"""``prunecli recover``: LoRA recovery fine-tuning of a pruned checkpoint, merged back."""

from __future__ import annotations

import json as _json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import (
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxWindowsOpt,
    ModelArg,
    QuietOpt,
    TextFieldOpt,
    check_data_source,
)
from prunecli.cli.output import Output, library_bars_off
from prunecli.errors import InputError, OutputExistsError


def recover_model(
    model: ModelArg,
    data: Annotated[
        str,
        typer.Option(
            "--data", help="Training text (a .txt/.jsonl file, a folder, or hf:...).", metavar="SRC"
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder for the recovered checkpoint.", metavar="DIR")
    ],
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")] = 100,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (linear decay).")] = 2e-4,
    lora_rank: Annotated[int, typer.Option("--lora-rank", min=1, help="LoRA rank.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Windows per step.")] = 4,
    seqlen: Annotated[int, typer.Option("--seqlen", min=2, help="Tokens per training window.")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seed for windows and adapters.")] = 0,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval-data", help="Held-out text: perplexity before and after.", metavar="SRC"),
    ] = None,
    eval_seqlen: Annotated[int, typer.Option("--eval-seqlen", min=2, help="Tokens per eval window.")] = 512,
    max_windows: MaxWindowsOpt = None,
    text_field: TextFieldOpt = "text",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace DIR if it exists.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a (pruned) MODEL with LoRA on causal-LM loss, merge, and save a plain checkpoint.

    Example:

      prunecli recover out/flap50 --data builtin:sample --steps 200 --eval-data builtin:heldout -o out/flap50-rec
    """
    from prunecli.checkpoint import save_checkpoint
    from prunecli.data import eval_windows
    from prunecli.evaluate import perplexity
    from prunecli.models import classify_spec, load_model
    from prunecli.recover import recover_on_text

    classify_spec(model)
    check_data_source(data, "--data")
    check_data_source(eval_data, "--eval-data")
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output folder already exists: {output}")
    if eval_data is not None and eval_data == data:
        raise InputError("--eval-data is the training text", hint="evaluate on held-out text")
    out = Output(json=json, quiet=quiet)
    seconds: dict[str, float] = {}
    with library_bars_off(), out.progress() as progress:
        loaded = load_model(model, dtype=dtype, device=device, progress=progress)
        seconds["load"] = loaded.load_seconds
        held = None
        ppl: dict[str, Any] = {}
        if eval_data is not None:
            held = eval_windows(loaded.tokenizer, eval_data, seqlen=eval_seqlen, max_windows=max_windows)
            ppl["before"] = perplexity(loaded.model, held, progress=progress)
        recovery = recover_on_text(
            loaded.model,
            loaded.tokenizer,
            data,
            steps=steps,
            batch_size=batch_size,
            seqlen=seqlen,
            seed=seed,
            text_field=text_field,
            lr=lr,
            lora_rank=lora_rank,
            progress=progress,
        )
        seconds["recover"] = recovery["seconds"]
        if held is not None:
            ppl["after"] = perplexity(loaded.model, held, progress=progress)
        provenance = _input_provenance(loaded.source)
        # the input's recipe made the input, not this folder: keep it as a record, write no recipe.yaml
        parent_recipe = provenance.pop("recipe", None)
        if parent_recipe is not None:
            provenance["parent_recipe"] = parent_recipe
        provenance["recovery"] = recovery
        t = time.perf_counter()
        path = save_checkpoint(
            loaded.model,
            loaded.tokenizer,
            output,
            provenance=provenance,
            overwrite=overwrite,
            progress=progress,
        )
        seconds["save"] = time.perf_counter() - t
    report = {
        "model": model,
        "output": str(path),
        "steps": steps,
        "loss": {
            "first": recovery["loss_first"],
            "last": recovery["loss_last"],
            "start": recovery["loss_start"],
            "end": recovery["loss_end"],
            "window": recovery["loss_window"],
        },
        "perplexity": ppl or None,
        "trainable_params": recovery["trainable_params"],
        "seconds": seconds,
    }
    out.result(report, lambda console: _render(console, report), quiet_line=report["output"])


def _input_provenance(source: str) -> dict[str, Any]:
    """Keep the pruned checkpoint's provenance (method, plan) and add the recovery to it."""
    f = Path(source) / "prunecli.json"
    if f.is_file():
        try:
            return dict(_json.loads(f.read_text()))
        except ValueError:
            pass
    return {"model": {"source": str(source)}}


def _render(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"recovery of {report['model']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    loss = report["loss"]
    table.add_row(
        f"training loss (mean of {loss['window']} steps)", f"{loss['start']:.3f}", f"{loss['end']:.3f}"
    )
    if report["perplexity"]:
        table.add_row(
            "perplexity", f"{report['perplexity']['before']:.2f}", f"{report['perplexity']['after']:.2f}"
        )
    console.print(table)
    console.print(f"saved to {report['output']}  ({report['seconds']['recover']:.1f}s of fine-tuning)")
