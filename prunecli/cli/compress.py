"""``prunecli compress``: load a model, prune it with a method, evaluate, save a checkpoint.

Every option is checked before the model is loaded, so bad input fails in well under a
second and writes nothing. The flow is: load -> calibration windows (methods that need
data) -> perplexity before (``--eval-data``) -> prune -> perplexity after -> save (``-o``)
-> a before/after table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import (
    DATA_PANEL,
    OUTPUT_PANEL,
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    NoVerifyOpt,
    QuietOpt,
    TextFieldOpt,
    TrustRemoteCodeOpt,
)
from prunecli.cli.output import Output, library_bars_off
from prunecli.errors import GateError
from prunecli.pipeline import (  # noqa: F401  (the names the CLI tests and other commands import)
    DEFAULT_CALIB,
    CompressOptions,
    canonical_method,
    check_processes,
    choose_memory_plan,
    read_verify,
    resolve_options,
)
from prunecli.pipeline import backend as _backend

METHOD_PANEL = "Method"
RUN_PANEL = "Calibration run"


def compress(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            help="Model: a local folder, a .gguf file, a hub id, or an alias from `prunecli models list` "
            "(may come from --recipe).",
            metavar="MODEL",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help="Pruning method, e.g. magnitude, wanda-sp, flap (an unknown name lists them all).",
            rich_help_panel=METHOD_PANEL,
            show_default=False,
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(
            "--sparsity",
            "-s",
            help="Fraction of the attention + MLP parameters to remove, strictly between 0 and 1.",
            rich_help_panel=METHOD_PANEL,
            show_default=False,
        ),
    ] = None,
    round_to: Annotated[
        int,
        typer.Option(
            "--round-to",
            min=1,
            help="Keep pruned widths multiples of N where possible.",
            metavar="N",
            rich_help_panel=METHOD_PANEL,
        ),
    ] = 1,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed for calibration sampling and the method.", rich_help_panel=METHOD_PANEL
        ),
    ] = 0,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore",
            help="Glob pattern of module names never to prune (repeatable), e.g. 'model.layers.0.*'.",
            metavar="PATTERN",
            rich_help_panel=METHOD_PANEL,
            show_default=False,
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Method-specific option KEY=VALUE (repeatable), e.g. --set metric=WIFV for flap.",
            metavar="KEY=VALUE",
            rich_help_panel=METHOD_PANEL,
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Folder to write the pruned checkpoint to.",
            metavar="DIR",
            rich_help_panel=OUTPUT_PANEL,
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace --output if it is an existing prunecli checkpoint (anything else is refused).",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    no_verify: NoVerifyOpt = False,
    export: Annotated[
        str | None,
        typer.Option(
            "--export",
            help="Also write the pruned model as OUT.onnx (onnxruntime) or OUT.gguf (llama.cpp) beside "
            "the --output folder, checked like `prunecli export` does.",
            metavar="onnx|gguf",
            rich_help_panel=OUTPUT_PANEL,
            show_default=False,
        ),
    ] = None,
    export_outtype: Annotated[
        str,
        typer.Option(
            "--export-outtype",
            help="GGUF weight type for --export gguf: f32, f16 or q8_0.",
            metavar="TYPE",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = "f32",
    refit: Annotated[
        bool,
        typer.Option(
            "--refit",
            help="After the method chooses, refit every projection that loses input columns by least "
            "squares on the calibration tokens (weights and bias; works with every method).",
            rich_help_panel=METHOD_PANEL,
        ),
    ] = False,
    sequential: Annotated[
        bool,
        typer.Option(
            "--sequential",
            help="Layer-sequential calibration: the model's blocks are read from the checkpoint files "
            "and run one at a time (same plan as whole-model calibration, a fraction of the memory).",
            rich_help_panel=RUN_PANEL,
        ),
    ] = False,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Memory prunecli may use, e.g. 4GB: it calibrates the whole model when that fits, "
            "else layer by layer with block weights read from the checkpoint files (the report says which).",
            metavar="SIZE",
            rich_help_panel=RUN_PANEL,
            show_default=False,
        ),
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            help="Calibration text: a .txt/.jsonl file, a folder of .txt files, or hf:NAME[:CONFIG]:SPLIT[:FIELD]. "
            "Default: the sample shipped with prunecli.",
            metavar="SRC",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    text_field: TextFieldOpt = "text",
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="Labelled .jsonl task for encoder methods (shrp, michel): the model gets a classifier, "
            "is fine-tuned on it, and --recover-steps fine-tunes on it too. Texts: --text-field.",
            metavar="FILE",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    label_field: Annotated[
        str,
        typer.Option(
            "--label-field",
            help="JSON key of the label in --task.",
            metavar="NAME",
            rich_help_panel=DATA_PANEL,
        ),
    ] = "label",
    nsamples: Annotated[
        int | None,
        typer.Option(
            "--nsamples",
            min=1,
            help="Calibration windows (default: the method's paper setting, e.g. 1024 for flap; 128 otherwise).",
            metavar="N",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    seqlen: Annotated[
        int | None,
        typer.Option(
            "--seqlen",
            min=1,
            help="Tokens per calibration window (default: the method's paper setting, e.g. 128 for flap; "
            "128 otherwise).",
            metavar="L",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Text to measure perplexity on before and after pruning (same forms as --calib).",
            metavar="SRC",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    eval_seqlen: Annotated[
        int,
        typer.Option(
            "--eval-seqlen",
            min=1,
            help="Tokens per evaluation window.",
            metavar="L",
            rich_help_panel=DATA_PANEL,
        ),
    ] = 512,
    max_windows: Annotated[
        int | None,
        typer.Option(
            "--max-windows",
            min=1,
            help="Evaluate at most N windows (default: all).",
            metavar="N",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    recover_steps: Annotated[
        int,
        typer.Option(
            "--recover-steps",
            min=0,
            help="After pruning, LoRA-fine-tune this many steps (batch 4) and merge the adapters.",
            metavar="N",
            rich_help_panel=METHOD_PANEL,
        ),
    ] = 0,
    recover_data: Annotated[
        str | None,
        typer.Option(
            "--recover-data",
            help="Text for recovery fine-tuning (default: the calibration text).",
            metavar="SRC",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Calibrate data-parallel in N processes on this machine (same plan as 1; with --device cuda, "
            "one GPU each). On several machines run under torchrun instead, without --nproc: torchrun "
            "--nnodes M --node-rank R --nproc-per-node K --master-addr HOST --master-port 29500 "
            "-m prunecli compress MODEL ...",
            metavar="N",
            rich_help_panel=DATA_PANEL,
        ),
    ] = 1,
    no_speed: Annotated[
        bool,
        typer.Option(
            "--no-speed",
            help="Do not measure forward-pass tokens/s before and after (it needs a second copy of the model).",
            rich_help_panel=DATA_PANEL,
        ),
    ] = False,
    recipe: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="YAML file of options (same names as the flags; flags given here override it).",
            metavar="FILE.yaml",
            show_default=False,
        ),
    ] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
    # --- Mixture-of-Experts expert pruning ---
    keep_experts: Annotated[
        float | None,
        typer.Option(
            "--keep-experts",
            help="Expert methods (easy-ep, reap, frequency, random-experts): routed experts to keep per "
            "MoE layer, a fraction (0.5) or a count (16). Replaces --sparsity.",
            metavar="K",
            rich_help_panel=METHOD_PANEL,
            show_default=False,
        ),
    ] = None,
    demos: Annotated[
        list[str] | None,
        typer.Option(
            "--demos",
            help="Expert methods: demonstrations of the target domain (.txt/.jsonl, same forms as --calib); "
            "repeat for several domains (mixed-domain selection).",
            metavar="SRC",
            rich_help_panel=DATA_PANEL,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Prune MODEL with a structured method and save a smaller checkpoint.

    Examples:

      prunecli compress smollm2-135m --method magnitude --sparsity 0.2 -o out/smollm2-mag-20

      prunecli compress smollm2-135m -m flap -s 0.2 --nsamples 32 --max-windows 4 --eval-data builtin:heldout

      prunecli compress --recipe my-recipe.yaml --sparsity 0.3 --json

      prunecli compress ./my-moe --method easy-ep --demos demos.jsonl --keep-experts 0.5 -o my-moe-half
    """
    given = {
        "model": model,
        "method": method,
        "sparsity": sparsity,
        "output": str(output) if output is not None else None,
        "overwrite": overwrite,
        "calib": calib,
        "text_field": text_field,
        "task": task,
        "label_field": label_field,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "round_to": round_to,
        "ignore": list(ignore or []),
        "set": set_ or [],
        "eval_data": eval_data,
        "eval_seqlen": eval_seqlen,
        "max_windows": max_windows,
        "recover_steps": recover_steps,
        "recover_data": recover_data,
        "dtype": dtype,
        "device": device,
        "allow_pickle": allow_pickle,
        "trust_remote_code": trust_remote_code,
        "verify": not no_verify,
        "sequential": sequential,
        "max_memory": max_memory,
        "refit": refit,
        "nproc": nproc,
        "speed": not no_speed,
        "keep_experts": keep_experts,
        "demos": list(demos or []),
        "export": export,
        "export_outtype": export_outtype,
    }
    param_names = {"set": "set_", "verify": "no_verify", "speed": "no_speed"}
    on_command_line = {
        key
        for key in given
        if _source_name(ctx, param_names.get(key, key)) not in ("DEFAULT", "DEFAULT_MAP", None)
    }
    out = Output(json=json, quiet=quiet)
    if model is not None and model.lower().endswith(".onnx") and recipe is None:
        from prunecli.cli.onnx_cmd import compress_onnx_cli

        compress_onnx_cli(given, on_command_line, out)
        return
    opts, config = resolve_options(given, on_command_line, recipe)
    if opts.nproc > 1 and "WORLD_SIZE" not in os.environ:  # under torchrun the ranks already exist
        from prunecli.calibrate.launch import launch

        if opts.nproc > (os.cpu_count() or 1):
            out.warn(f"--nproc {opts.nproc} is more than the {os.cpu_count()} CPU cores of this machine")
        argv = getattr(ctx.find_root().command, "argv", None) or sys.argv[1:]
        raise typer.Exit(launch(argv, opts.nproc, backend=_backend(opts.device)))
    run_compress(opts, config, out)


def _source_name(ctx: typer.Context, name: str) -> str | None:
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else None


def run_compress(opts: CompressOptions, config: Any, out: Output) -> dict[str, Any]:
    """Run the library pipeline (:func:`prunecli.pipeline.run`) for ``opts``; print and return the report.

    Args:
        opts: effective options (from :func:`resolve_options`).
        config: the method's config object.
        out: where to print.

    Raises:
        GateError: a gate of the recipe failed (after the report was printed).
    """
    from prunecli import pipeline

    # data parallel (--nproc, torchrun): every rank loads, calibrates and prunes; rank 0 alone
    # evaluates, saves and prints
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank > 0:
        out = Output(quiet=True)
    with library_bars_off(), out.progress() as progress:
        report = pipeline.run(opts, config, progress=progress, on_warning=out.warn, check_gates=False)
    data = report.to_dict()
    if rank > 0:
        return data
    out.result(data, lambda console: render_report(console, data), quiet_line=report.output)
    raise_for_gates(report)
    return data


def raise_for_gates(report: Any) -> None:
    """Raise :class:`GateError` (exit code 3) when a gate of the report failed."""
    failed = report.failed_gates
    if failed:
        raise GateError(
            f"{len(failed)} of {len(report.gates)} gates failed: " + "; ".join(g["message"] for g in failed),
            failures=failed,
            report=report.to_dict(),
            hint="loosen `expect:` in the recipe, or change the method or sparsity"
            + (f"; the checkpoint is in {report.output}" if report.output else ""),
        )


def verify_line(verify: dict[str, Any] | None) -> str | None:
    """One line saying which check the saved checkpoint passed."""
    if not verify:
        return None
    check = verify.get("check")
    if check in ("logits", "hidden_state"):
        what = "logits" if check == "logits" else "last hidden state"
        return (
            f"verified: reloaded ({verify.get('route')}) {what} match, "
            f"max abs diff {verify.get('max_abs_diff'):.2g}"
        )
    if check == "shapes":
        return f"verified: tensor shapes only; logit check skipped ({verify.get('reason')})"
    return f"not verified ({verify.get('reason', 'turned off')})"


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "-"
    ratio = after / before
    if ratio >= 10:
        return f"x{ratio:,.0f}"
    return f"{ratio - 1:+.1%}"


def _fmt_seconds(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def render_report(console: Console, report: dict[str, Any]) -> None:
    """The human view of a ``compress`` report: one before/after table and the output folder."""
    params = report["params"]
    table = Table(title=f"{report['method']} at sparsity {report['config']['options']['sparsity']:g}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_row(
        "parameters (whole model)",
        _fmt_int(params["before"]),
        _fmt_int(params["after"]),
        _fmt_change(params["before"], params["after"]),
    )
    table.add_row(
        "parameters (attention + MLP blocks)",
        _fmt_int(params["blocks_before"]),
        _fmt_int(params["blocks_after"]),
        _fmt_change(params["blocks_before"], params["blocks_after"]),
    )
    ppl = report["perplexity"]
    if ppl is not None:
        table.add_row(
            f"perplexity ({ppl['windows']} x {ppl['seqlen']} tokens)",
            f"{ppl['before']:,.2f}",
            f"{ppl['after']:,.2f}",
            _fmt_change(ppl["before"], ppl["after"]),
        )
        if ppl["tokens_per_s_before"] is not None and ppl["tokens_per_s_after"] is not None:
            table.add_row(
                "tokens/s (forward, median of interleaved rounds)",
                f"{ppl['tokens_per_s_before']:,.0f}",
                f"{ppl['tokens_per_s_after']:,.0f}",
                _fmt_change(ppl["tokens_per_s_before"], ppl["tokens_per_s_after"]),
            )
    recovery = report.get("recovery")
    if recovery and "final_loss" in recovery:  # --task: the classifier fine-tuned on the task
        table.add_row(
            f"task loss after {recovery['steps']} fine-tuning steps", "", f"{recovery['final_loss']:.3f}", ""
        )
    elif recovery:
        table.add_row(
            f"recovery loss ({recovery['steps']} steps, mean of {recovery['loss_window']})",
            f"{recovery['loss_start']:.3f}",
            f"{recovery['loss_end']:.3f}",
            _fmt_change(recovery["loss_start"], recovery["loss_end"]),
        )
    secs = report["seconds"]
    table.add_section()
    for key, label in (
        ("load", "seconds: load"),
        ("calibration", "seconds: calibration data"),
        ("prune", "seconds: prune"),
        ("recover", "seconds: recovery"),
        ("eval_before", "seconds: evaluate (before / after)"),
        ("save", "seconds: save"),
    ):
        if key in secs:
            after = _fmt_seconds(secs["eval_after"]) if key == "eval_before" and "eval_after" in secs else ""
            before = _fmt_seconds(secs[key])
            if key == "eval_before":
                table.add_row(label, before, after, "")
            else:
                table.add_row(label, "", before, "")
    console.print(table)
    plan = report["plan"]
    console.print(
        f"removed {plan['units_removed']:,} units from {plan['groups_pruned']} groups", highlight=False
    )
    tyr = report.get("tyr") or {}
    if tyr.get("per_layer_sparsity"):
        from prunecli.methods.tyr import sparsity_series
        from prunecli.plot import bar_chart

        console.print("per-layer sparsity found by the Týr search:", highlight=False)
        console.print(bar_chart(sparsity_series(tyr), width=20), markup=False, highlight=False)
        fit = [h for h in tyr.get("search", []) if h.get("best_fitness")]
        if fit:
            console.print(
                f"search fitness (sparse KL to the dense model): "
                f"{fit[0].get('start_candidates', {}).get('centre', fit[0]['start_fitness']):.4g} uniform -> "
                f"{fit[-1]['best_fitness'][-1]:.4g} after {len(fit)} iteration(s); "
                f"supernet {tyr['seconds']['supernet']:.0f} s, search {tyr['seconds']['search']:.0f} s",
                highlight=False,
            )
    refit = report.get("refit") or {}
    if refit.get("modules") and "error_refit" in refit:
        base = min(refit["error_removed"], refit["error_bias"]) or 1.0
        console.print(
            f"refit {refit['modules']} projections by least squares: calibration error "
            f"{refit['error_refit'] / base:.1%} of the best of removal and bias compensation",
            highlight=False,
        )
    memory = report.get("memory") or {}
    if memory.get("mode") == "sequential" or memory.get("reason", "").startswith("the whole model needs"):
        how = "layer by layer" + (
            ", block weights read from the checkpoint files" if memory.get("offload") else ""
        )
        if memory.get("mode") == "whole":
            how = "whole model in memory"
        console.print(
            f"calibration: {how} ({memory.get('reason')})", markup=False, highlight=False, soft_wrap=True
        )
    calibration = report.get("calibration") or {}
    if calibration.get("processes", 1) > 1:
        console.print(f"calibrated in {calibration['processes']} processes (data parallel)", highlight=False)
    for gate in report.get("gates") or []:
        mark = "passed" if gate["passed"] else "FAILED"
        console.print(f"gate {mark}: {gate['message']}", markup=False, highlight=False, soft_wrap=True)
    if report["output"]:
        console.print(f"saved to {report['output']}", markup=False, highlight=False, soft_wrap=True)
        line = verify_line(report.get("verify"))
        if line:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        if report.get("load_hint"):
            console.print(report["load_hint"], markup=False, highlight=False, soft_wrap=True)
    if report.get("export"):
        from prunecli.cli.export_cmd import verify_text

        exported = report["export"]
        console.print(
            f"exported to {exported['path']} ({exported['bytes'] / 1e6:,.1f} MB): {verify_text(exported['verify'])}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
