"""``prunecli compress``: load a model, prune it with a method, evaluate, save a checkpoint.

Every option is checked before the model is loaded, so bad input fails in well under a
second and writes nothing. The flow is: load -> calibration windows (methods that need
data) -> perplexity before (``--eval-data``) -> prune -> perplexity after -> save (``-o``)
-> a before/after table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings
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
    check_data_source,
)
from prunecli.cli._recipe import coerce_options, load_recipe, parse_set
from prunecli.cli.output import Output, library_bars_off
from prunecli.errors import InputError

METHOD_PANEL = "Method"
RUN_PANEL = "Calibration run"
DEFAULT_CALIB = {"nsamples": 128, "seqlen": 128}
"""Windows and their length for methods whose config has no calibration size (recovery uses seqlen)."""


@dataclasses.dataclass
class CompressOptions:
    """The effective options of one ``compress`` run (command line merged over a recipe)."""

    model: str
    method: str
    sparsity: float
    output: str | None = None
    overwrite: bool = False
    calib: str | None = None
    text_field: str = "text"
    nsamples: int = 128  # resolve_options fills in the method's default when none is given
    seqlen: int = 128
    seed: int = 0
    round_to: int = 1
    ignore: list[str] = dataclasses.field(default_factory=list)
    set: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval_data: str | None = None
    eval_seqlen: int = 512
    max_windows: int | None = None
    recover_steps: int = 0
    recover_data: str | None = None
    dtype: str = "auto"
    device: str = "cpu"
    allow_pickle: bool = False
    trust_remote_code: bool = False
    verify: bool = True
    sequential: bool = False
    max_memory: str | None = None
    refit: bool = False
    nproc: int = 1
    export: str | None = None
    export_outtype: str = "f32"

    def to_recipe(self) -> dict[str, Any]:
        """The options as a recipe mapping (``--recipe`` re-runs it; security flags left out)."""
        d = dataclasses.asdict(self)
        for key in ("overwrite", "allow_pickle", "trust_remote_code", "verify"):
            d.pop(key)
        if d["nproc"] == 1:
            d.pop("nproc")
        if d["export"] is None or d["export"] == "onnx":
            d.pop("export_outtype")
        return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


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
) -> None:
    """Prune MODEL with a structured method and save a smaller checkpoint.

    Examples:

      prunecli compress smollm2-135m --method flap --sparsity 0.2 -o smollm2-flap-20

      prunecli compress ./my-llama -m wanda-sp -s 0.5 --calib emma.txt --eval-data persuasion.txt --json

      prunecli compress --recipe recipes/smollm2-magnitude-20.yaml --sparsity 0.3
    """
    given = {
        "model": model,
        "method": method,
        "sparsity": sparsity,
        "output": str(output) if output is not None else None,
        "overwrite": overwrite,
        "calib": calib,
        "text_field": text_field,
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
        "export": export,
        "export_outtype": export_outtype,
    }
    param_names = {"set": "set_", "verify": "no_verify"}
    on_command_line = {
        key
        for key in given
        if _source_name(ctx, param_names.get(key, key)) not in ("DEFAULT", "DEFAULT_MAP", None)
    }
    opts, config = resolve_options(given, on_command_line, recipe)
    out = Output(json=json, quiet=quiet)
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


def resolve_options(
    given: dict[str, Any], on_command_line: set[str], recipe_path: Path | None
) -> tuple[CompressOptions, Any]:
    """Merge command-line values over a recipe and check everything that can be checked without the model.

    Args:
        given: every ``compress`` option as parsed (``set`` as a list of ``KEY=VALUE`` strings).
        on_command_line: names of the options the user typed (these override the recipe).
        recipe_path: the ``--recipe`` file, or ``None``.

    Returns:
        The effective options and the method's validated config object.
    """
    from prunecli.config import get_method

    merged = dict(given)
    recipe = load_recipe(recipe_path) if recipe_path is not None else {}
    for key, value in recipe.items():
        if key == "set":
            continue
        if key not in on_command_line:
            merged[key] = value

    if not merged.get("model"):
        raise InputError(
            "missing MODEL", hint="pass a model folder, .gguf file, hub id or alias (or use --recipe)"
        )
    if not merged.get("method"):
        raise InputError("missing --method", hint="e.g. --method magnitude (or use --recipe)")
    if merged.get("sparsity") is None:
        raise InputError("missing --sparsity", hint="e.g. --sparsity 0.2 removes 20% of the block parameters")
    for key in ("nsamples", "seqlen", "eval_seqlen", "max_windows", "round_to", "nproc"):
        value = merged.get(key)
        if value is not None and value < 1:
            raise InputError(f"{key} must be a positive integer, got {value}")
    if int(merged.get("recover_steps") or 0) < 0:
        raise InputError(f"recover_steps must be >= 0, got {merged['recover_steps']}")
    if merged.get("max_memory") is not None:
        from prunecli.calibrate.memory import parse_size

        parse_size(merged["max_memory"])

    from prunecli.models import classify_spec, resolve_dtype

    kind, target = classify_spec(str(merged["model"]), allow_pickle=bool(merged["allow_pickle"]))
    resolve_dtype(merged["dtype"])
    merged["method"] = canonical_method(str(merged["method"]))
    nproc = int(merged.get("nproc") or 1)
    check_processes(merged["method"], int(merged.get("recover_steps") or 0), nproc, str(merged["device"]))
    config_cls, _ = get_method(merged["method"])
    method_options = coerce_options(recipe.get("set", {}), config_cls)
    method_options.update(parse_set(merged["set"], config_cls))
    # calibration size: --nsamples/--seqlen (or the recipe's) override the method's paper default
    fields = {f.name for f in dataclasses.fields(config_cls)}
    calib_size = {
        key: int(merged[key])
        for key in ("nsamples", "seqlen")
        if key in fields and merged.get(key) is not None and (key in on_command_line or key in recipe)
    }
    try:
        config = config_cls(
            sparsity=float(merged["sparsity"]),
            round_to=int(merged["round_to"]),
            seed=int(merged["seed"]),
            ignore=tuple(merged["ignore"]),
            **{**method_options, **calib_size},
        )
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid options for method {merged['method']!r}: {e}") from None
    merged["set"] = {k: v for k, v in method_options.items() if k not in ("nsamples", "seqlen")}
    for key in ("nsamples", "seqlen"):
        merged[key] = getattr(config, key) if key in fields else (merged.get(key) or DEFAULT_CALIB[key])
    opts = CompressOptions(**merged)

    if opts.output is not None:
        from prunecli.checkpoint.save import check_output_dir

        # Before the model is loaded: --overwrite replaces only a prunecli checkpoint, never the
        # input model, the current directory or its ancestors; the folder must be writable.
        check_output_dir(opts.output, overwrite=opts.overwrite, inputs=(target,) if kind != "hub" else ())
    if opts.export is not None:
        from prunecli.export import check_format
        from prunecli.export._files import check_output_file

        opts.export = check_format(opts.export, opts.export_outtype)
        if opts.output is None:
            raise InputError("--export needs --output (the file is written beside the folder)")
        check_output_file(export_path(opts), overwrite=opts.overwrite, suffix=f".{opts.export}")
    for flag, source in (
        ("--calib", opts.calib),
        ("--eval-data", opts.eval_data),
        ("--recover-data", opts.recover_data),
    ):
        check_data_source(source, flag)
    return opts, config


def export_path(opts: CompressOptions) -> Path:
    """Where ``--export`` writes: ``OUT.onnx`` / ``OUT.gguf`` beside the ``--output`` folder ``OUT``."""
    out = Path(str(opts.output)).expanduser()
    return out.parent / f"{out.name}.{opts.export}"


def check_processes(method: str, recover_steps: int, nproc: int, device: str | None = None) -> None:
    """Refuse, before anything is loaded, what cannot run in ``nproc`` data-parallel processes.

    Args:
        method: the method's registered name.
        recover_steps: ``--recover-steps``.
        nproc: number of processes (``--nproc``, or torchrun's ``WORLD_SIZE``).
        device: ``--device`` when this machine's processes are launched here (``--nproc``):
            with CUDA, rank r uses GPU r. ``None`` under torchrun.
    """
    if nproc <= 1:
        return
    if recover_steps:
        raise InputError(
            f"--recover-steps cannot run in {nproc} processes: LoRA recovery is not data-parallel",
            hint="drop --nproc, or run `prunecli recover` on the saved checkpoint",
        )
    if method == "loraprune":
        raise InputError(
            f"loraprune cannot run in {nproc} processes: its LoRA training is not data-parallel",
            hint="drop --nproc (or use flap, cfsp or wanda-sp)",
        )
    if device is not None and _backend(device) == "nccl":
        import torch

        if ":" in device:
            raise InputError(
                f"--nproc {nproc} with --device {device}", hint="pass --device cuda: rank r uses GPU r"
            )
        if nproc > torch.cuda.device_count():
            raise InputError(
                f"--nproc {nproc} with --device cuda needs {nproc} GPUs, found {torch.cuda.device_count()}",
                hint="lower --nproc to the number of GPUs, or use --device cpu",
            )


def _backend(device: str) -> str:
    return "nccl" if device.split(":")[0] == "cuda" else "gloo"


def canonical_method(name: str) -> str:
    """The registered spelling of a method name (``wanda_sp``, ``wanda-sp`` and ``Wanda-SP`` are the same).

    Unknown names are returned unchanged (``get_method`` then reports them).
    """
    from prunecli.config import method_names

    def key(text: str) -> str:
        return text.lower().replace("-", "_")

    matches = [m for m in method_names() if key(m) == key(name)]
    return matches[0] if matches else name


def run_compress(opts: CompressOptions, config: Any, out: Output) -> dict[str, Any]:
    """Load, prune, evaluate and save as ``opts`` says; print and return the report.

    Args:
        opts: effective options (from :func:`resolve_options`).
        config: the method's config object.
        out: where to print.
    """
    from prunecli.api import SparsityWarning, prune
    from prunecli.calibrate import Runner, distributed
    from prunecli.data import calibration_windows, data_hash, eval_windows
    from prunecli.evaluate import count_parameters, evaluate
    from prunecli.models import load_model

    # data parallel (--nproc, torchrun): every rank loads, calibrates and prunes; rank 0 alone
    # evaluates, saves and prints
    check_processes(opts.method, opts.recover_steps, distributed.env_world_size())
    if int(os.environ.get("RANK", "0") or 0) > 0:
        out = Output(quiet=True)
    if opts.calib is not None and not config.needs_data and not opts.refit:
        out.warn(f"method {opts.method!r} uses no calibration data; --calib is ignored")
    if opts.eval_data is not None and opts.calib is not None and opts.eval_data == opts.calib:
        out.warn("calibrating and evaluating on the same text makes the perplexity look better than it is")

    memory = choose_memory_plan(opts, config)
    if memory is not None and memory.offload:
        if opts.refit:
            raise InputError(
                f"--refit rewrites the projections, which are not in memory in this run ({memory.reason})",
                hint="drop --refit, or run where the model fits (without --sequential / --max-memory)",
            )
        if opts.export:
            raise InputError(
                f"--export needs the whole pruned model in memory, which it is not in this run ({memory.reason})",
                hint="export the saved checkpoint where it fits: prunecli export OUT --format ...",
            )
        if opts.recover_steps:
            raise InputError(
                "--recover-steps fine-tunes the whole model, which is not in memory in this run "
                f"({memory.reason})",
                hint="recover the saved checkpoint on a machine that holds it: prunecli recover OUT ...",
            )

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    with distributed.session(opts.device) as (rank, world), library_bars_off(), out.progress() as progress:
        loaded = load_model(
            opts.model,
            dtype=opts.dtype,
            device=opts.device,
            allow_pickle=opts.allow_pickle,
            trust_remote_code=opts.trust_remote_code,
            progress=progress,
            offload=bool(memory is not None and memory.offload),
        )
        seconds["load"] = loaded.load_seconds
        runner = Runner(
            mode=memory.mode if memory is not None else "whole", device=opts.device, weights=loaded.weights
        )
        model, tokenizer = loaded.model, loaded.tokenizer

        calib = None
        calibration: dict[str, Any] | None = None
        if config.needs_data or opts.refit:
            t = time.perf_counter()
            calib = calibration_windows(
                tokenizer,
                opts.calib,
                nsamples=opts.nsamples,
                seqlen=opts.seqlen,
                seed=opts.seed,
                text_field=opts.text_field,
                progress=progress,
            )
            seconds["calibration"] = time.perf_counter() - t
            calibration = {
                "source": opts.calib if opts.calib is not None else "prunecli/data/sample.txt",
                "text_field": opts.text_field,
                "nsamples": int(calib.shape[0]),
                "seqlen": int(calib.shape[1]),
                "seed": opts.seed,
                "hash": data_hash(calib),
                "processes": world,
            }

        windows = None
        ppl_before = ppl_after = None
        if opts.eval_data is not None and rank == 0:
            windows = eval_windows(
                tokenizer,
                opts.eval_data,
                seqlen=opts.eval_seqlen,
                max_windows=opts.max_windows,
                text_field=opts.text_field,
                progress=progress,
            )
            t = time.perf_counter()
            ppl_before = evaluate(model, windows, progress=progress, runner=runner)
            seconds["eval_before"] = time.perf_counter() - t

        params_before = count_parameters(model)
        t = time.perf_counter()
        with warnings.catch_warnings():  # printed once below, through `out`
            warnings.simplefilter("ignore", SparsityWarning)
            result = prune(model, config, calib=calib, progress=progress, runner=runner, refit=opts.refit)
        seconds["prune"] = time.perf_counter() - t
        for message in result.warnings:
            out.warn(message)
        params_after = count_parameters(model)

        recovery = None
        if opts.recover_steps:
            from prunecli.recover import recover_on_text

            recovery = recover_on_text(
                model,
                tokenizer,
                opts.recover_data if opts.recover_data is not None else opts.calib,
                steps=opts.recover_steps,
                seqlen=opts.seqlen,
                seed=opts.seed,
                text_field=opts.text_field,
                progress=progress,
            )
            seconds["recover"] = recovery["seconds"]

        if windows is not None:
            t = time.perf_counter()
            ppl_after = evaluate(model, windows, progress=progress, runner=runner)
            seconds["eval_after"] = time.perf_counter() - t

        summary = result.summary.to_dict()
        plan = result.plan
        report: dict[str, Any] = {
            "model": opts.model,
            "source": str(loaded.source),
            "kind": loaded.kind,
            "dtype": loaded.dtype,
            "method": opts.method,
            "config": config.to_dict(),
            "calibration": calibration,
            "memory": _memory_section(memory, runner),
            "refit": result.plan.meta.get("refit"),
            "params": _params_section(params_before, params_after, summary),
            "sparsity": {},
            "perplexity": _perplexity_section(opts, windows, ppl_before, ppl_after),
            "seconds": seconds,
            "prune_steps_seconds": dict(getattr(result, "seconds", {}) or {}),
            "output": None,
            "export": None,
            "verify": None,
            "plan": _plan_section(plan),
            "summary": summary,
            "recovery": recovery,
        }
        # sparsity is a share of every attention + MLP block, locked or ignored ones included
        report["params"]["blocks_before"] = result.block_params_before
        report["params"]["blocks_after"] = result.block_params_after
        report["sparsity"] = _sparsity_section(config.sparsity, report["params"])
        report["warnings"] = list(result.warnings)

        if opts.output is not None and rank == 0:
            from prunecli.checkpoint import save_checkpoint

            provenance = {
                "model": {"spec": opts.model, "source": str(loaded.source), "kind": loaded.kind},
                "method": opts.method,
                "config": config.to_dict(),
                "calibration": calibration,
                "plan": plan.to_dict(),
                "recovery": recovery,
                "summary": summary,
                "params": report["params"],
                "perplexity": report["perplexity"],
                "recipe": opts.to_recipe(),
            }
            t = time.perf_counter()
            path = save_checkpoint(
                model,
                tokenizer,
                Path(opts.output),
                provenance=provenance,
                overwrite=opts.overwrite,
                verify=opts.verify,
                progress=progress,
                weights=loaded.weights,
            )
            seconds["save"] = time.perf_counter() - t
            report["output"] = str(path)
            report["verify"] = read_verify(path)
            if opts.export:
                from prunecli.export import export_model

                t = time.perf_counter()
                report["export"] = export_model(
                    model,
                    opts.export,
                    export_path(opts),
                    tokenizer=tokenizer,
                    outtype=opts.export_outtype,
                    overwrite=opts.overwrite,
                    verify=opts.verify,
                )
                seconds["export"] = time.perf_counter() - t
                for message in report["export"].get("warnings", []):
                    out.warn(message)
    seconds["total"] = time.perf_counter() - started
    if rank > 0:
        return report

    out.result(report, lambda console: render_report(console, report), quiet_line=report["output"])
    return report


def choose_memory_plan(opts: CompressOptions, config: Any) -> Any:
    """Whole-model or layer-sequential (offloaded) calibration for ``--sequential`` / ``--max-memory``.

    Returns ``None`` when neither was given (whole model, as always).
    """
    if not opts.sequential and opts.max_memory is None:
        return None
    from prunecli.calibrate.memory import parse_size, plan_memory
    from prunecli.models import classify_spec
    from prunecli.models.files import weight_files
    from prunecli.models.loading import _load_config, load_dtype, local_folder

    kind, target = classify_spec(opts.model, allow_pickle=opts.allow_pickle)
    folder = local_folder(kind, target)
    model_config = _load_config(str(folder), trust_remote_code=opts.trust_remote_code, hub=False)
    dtype = load_dtype(kind, target, opts.dtype, model_config)
    nsamples = int(getattr(config, "nsamples", opts.nsamples) or opts.nsamples)
    seqlen = int(getattr(config, "seqlen", opts.seqlen) or opts.seqlen)
    return plan_memory(
        model_config,
        dtype=dtype,
        max_memory=parse_size(opts.max_memory) if opts.max_memory is not None else None,
        nsamples=nsamples,
        seqlen=seqlen,
        sequential=opts.sequential,
        can_offload=bool(weight_files(folder)),
    )


def _memory_section(memory: Any, runner: Any) -> dict[str, Any]:
    if memory is None:
        return {"mode": runner.mode, "offload": False, "reason": "default (the whole model in memory)"}
    return {
        "mode": memory.mode,
        "offload": memory.offload,
        "reason": memory.reason,
        "estimated_bytes": memory.sequential_bytes if memory.mode == "sequential" else memory.whole_bytes,
    }


def read_verify(path: Path) -> dict[str, Any] | None:
    """The ``verify`` record that ``save_checkpoint`` wrote into the checkpoint's ``prunecli.json``."""
    from prunecli.checkpoint import PROVENANCE_FILE
    from prunecli.models.files import read_json

    value = read_json(Path(path) / PROVENANCE_FILE).get("verify")
    return value if isinstance(value, dict) else None


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


def _params_section(before: int, after: int, summary: dict[str, Any]) -> dict[str, Any]:
    blocks_before = summary.get("block_params_before")
    blocks_after = summary.get("block_params_after")
    return {
        "before": before,
        "after": after,
        "removed": before - after,
        "blocks_before": blocks_before,
        "blocks_after": blocks_after,
    }


def _sparsity_section(target: float, params: dict[str, Any]) -> dict[str, Any]:
    blocks = None
    if params["blocks_before"] and params["blocks_after"] is not None:
        blocks = 1.0 - params["blocks_after"] / params["blocks_before"]
    model = 1.0 - params["after"] / params["before"] if params["before"] else None
    return {"target": target, "blocks": blocks, "model": model}


def _perplexity_section(
    opts: CompressOptions, windows: Any, before: Any, after: Any
) -> dict[str, Any] | None:
    if windows is None:
        return None
    return {
        "data": opts.eval_data,
        "seqlen": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "before": before["perplexity"],
        "after": after["perplexity"],
        "tokens_per_s_before": before.get("tokens_per_s"),
        "tokens_per_s_after": after.get("tokens_per_s"),
    }


def _plan_section(plan: Any) -> dict[str, Any]:
    removed = {name: len(units) for name, units in plan.removals.items()}
    return {
        "groups_pruned": len(removed),
        "units_removed": sum(removed.values()),
        "removed": removed,
        "bias_updates": len(plan.bias_updates),
        "fingerprint": plan.fingerprint,
    }


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
                f"tokens/s (forward of {ppl['seqlen']} tokens)",
                f"{ppl['tokens_per_s_before']:,.0f}",
                f"{ppl['tokens_per_s_after']:,.0f}",
                _fmt_change(ppl["tokens_per_s_before"], ppl["tokens_per_s_after"]),
            )
    secs = report["seconds"]
    table.add_section()
    for key, label in (
        ("load", "seconds: load"),
        ("calibration", "seconds: calibration data"),
        ("prune", "seconds: prune"),
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
    refit = report.get("refit") or {}
    if refit.get("modules"):
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
    if report["output"]:
        console.print(f"saved to {report['output']}", markup=False, highlight=False, soft_wrap=True)
        line = verify_line(report.get("verify"))
        if line:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    if report.get("export"):
        from prunecli.cli.export_cmd import verify_text

        exported = report["export"]
        console.print(
            f"exported to {exported['path']} ({exported['bytes'] / 1e6:,.1f} MB): {verify_text(exported['verify'])}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
