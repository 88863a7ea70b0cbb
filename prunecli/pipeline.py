"""One compress pipeline: load -> calibrate -> evaluate -> prune -> refit/recover -> evaluate -> save.

``prunecli compress``, ``prunecli run`` and Python users all call :func:`compress`, so a
recipe gives the same checkpoint from any of them. The :class:`Report` it returns is what
``--json`` prints and what the checkpoint's ``prunecli.json`` records (the writer adds the
versions, the creation time and the ``verify`` record)::

    import prunecli
    report = prunecli.compress({"model": "smollm2-135m", "method": "magnitude", "sparsity": 0.2,
                                "output": "out/mag20"})
    report.params["after"], report.output

Everything that can be checked without the model (options, method and its ``set`` options,
data files, output folder, gates) is checked by :func:`resolve_options` before anything is
loaded. A step is a private function of :class:`_Run`; a new option is a field of
:class:`CompressOptions` (and of ``prunecli.recipe.RECIPE_KEYS``), a method's own options go
through ``set``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prunecli.errors import GateError, InputError
from prunecli.progress import Progress

DEFAULT_CALIB = {"nsamples": 128, "seqlen": 128}
"""Windows and their length for methods whose config has no calibration size (recovery uses seqlen)."""
SAMPLE_TEXT = "prunecli/data/sample.txt"


@dataclasses.dataclass
class CompressOptions:
    """The effective options of one compress run (command line merged over a recipe).

    The names are ``prunecli compress``'s flags with dashes turned into underscores; ``set``
    holds the method's own config fields (typed by its config dataclass), ``expect`` the
    gates (:data:`prunecli.recipe.GATES`).
    """

    model: str
    method: str
    sparsity: float | None = None  # None for the expert methods (they take keep_experts)
    output: str | None = None
    overwrite: bool = False
    calib: str | None = None
    text_field: str = "text"
    task: str | None = None
    label_field: str = "label"
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
    speed: bool = True
    expect: dict[str, float] = dataclasses.field(default_factory=dict)
    # Mixture-of-Experts expert pruning (easy-ep, reap, frequency, random-experts)
    keep_experts: float | None = None
    demos: list[str] = dataclasses.field(default_factory=list)
    # also write the pruned model as OUT.onnx / OUT.gguf beside the output folder
    export: str | None = None
    export_outtype: str = "f32"

    def to_recipe(self) -> dict[str, Any]:
        """The options as a recipe mapping (re-runs the same run; security flags left out).

        Local paths are absolute, so the recipe replays from any directory.
        """
        d = dataclasses.asdict(self)
        for key in ("overwrite", "allow_pickle", "trust_remote_code", "verify"):
            d.pop(key)
        if d["nproc"] == 1:
            d.pop("nproc")
        if d["speed"]:
            d.pop("speed")
        if d["task"] is None:
            d.pop("label_field")
        if d["export"] is None or d["export"] == "onnx":
            d.pop("export_outtype")
        for key in ("output", "calib", "task", "eval_data", "recover_data", "model"):
            value = d.get(key)
            if isinstance(value, str) and not value.startswith(("hf:", "builtin:")):
                p = Path(value).expanduser()
                if key != "model" or p.exists():
                    d[key] = str(p.resolve())
        d["demos"] = [
            src if src.startswith(("hf:", "builtin:")) else str(Path(src).expanduser().resolve())
            for src in d["demos"]
        ]
        return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


@dataclasses.dataclass
class Report:
    """What a compress run did: the ``--json`` output and the content of ``prunecli.json``.

    Attributes:
        model / source / kind / dtype: the model as given, where it was read from, how, in
            which dtype.
        method / config: the method and its full config (``config.to_dict()``).
        calibration: source, windows, seed and hash of the calibration tokens (``None`` for
            data-free methods).
        memory: whole-model or layer-sequential calibration, and why.
        refit: the least-squares refit record (``--refit``), else ``None``.
        params: parameters before/after, whole model and attention + MLP blocks.
        sparsity: target, achieved share of the blocks, achieved share of the model.
        perplexity: before/after on ``eval_data`` and the forward-pass speed, else ``None``.
        seconds: wall time per step and ``total``.
        prune_steps_seconds: graph, score, apply times inside :func:`prunecli.prune`.
        output / verify: the checkpoint folder and the reload check it passed.
        plan: the replayable plan (``Plan.to_dict()``) plus ``groups_pruned`` / ``units_removed``.
        summary: the engine's summary of the removal.
        recovery: the LoRA recovery record (``recover_steps``), or with ``task`` the task
            fine-tuning record (task, steps, final loss, seconds), else ``None``.
        task: the labelled task (file, text/label fields, labels, examples) the model was
            turned into a classifier for and fine-tuned on (``task``), else ``None``.
        warnings: everything the run warned about.
        recipe: the effective recipe (absolute paths); also saved as ``recipe.yaml``.
        gates: one record per ``expect`` gate (see ``prunecli.recipe.check_gates``).
        load_hint: how to load the saved checkpoint.
        export: the ``--export`` record (format, path, bytes, verification), else ``None``.
        tyr: Týr's search record (per-layer sparsity, fitness per generation, cost split), or
            ``None`` for other methods (also in ``plan.meta.tyr``).
        experts: the expert methods' record (experts kept and removed per MoE layer, see
            ``PruneResult.to_dict()["experts"]``), or ``None`` for other methods.
    """

    model: str
    source: str
    kind: str
    dtype: str
    method: str
    config: dict[str, Any]
    calibration: dict[str, Any] | None
    memory: dict[str, Any]
    refit: dict[str, Any] | None
    params: dict[str, Any]
    sparsity: dict[str, Any]
    perplexity: dict[str, Any] | None
    seconds: dict[str, float]
    prune_steps_seconds: dict[str, float]
    output: str | None
    verify: dict[str, Any] | None
    plan: dict[str, Any]
    summary: dict[str, Any]
    recovery: dict[str, Any] | None
    warnings: list[str]
    recipe: dict[str, Any]
    gates: list[dict[str, Any]]
    load_hint: str | None = None
    tyr: dict[str, Any] | None = None
    experts: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    export: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:  # report["params"] reads like the JSON
        return getattr(self, key)

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [g for g in self.gates if not g["passed"]]


# ----------------------------------------------------------------------------- options


def resolve_options(
    given: Mapping[str, Any],
    on_command_line: set[str] | None = None,
    recipe_path: str | Path | None = None,
    *,
    recipe: Mapping[str, Any] | None = None,
) -> tuple[CompressOptions, Any]:
    """Merge given values over a recipe and check everything that can be checked without the model.

    Args:
        given: option values (``set`` as a list of ``KEY=VALUE`` strings or a dict).
        on_command_line: names of the options that override the recipe (default: every key
            of ``given``).
        recipe_path: a recipe YAML file, or ``None``.
        recipe: an already-read recipe mapping (instead of, or over, ``recipe_path``).

    Returns:
        The effective options and the method's validated config object.
    """
    from prunecli.config import get_method
    from prunecli.recipe import check_expect, coerce_options, load_recipe, merge_recipes, parse_set

    if on_command_line is None:
        on_command_line = set(given)
    base = load_recipe(Path(recipe_path)) if recipe_path is not None else {}
    if recipe is not None:
        base = merge_recipes(base, dict(recipe))
    merged = dict(given)
    for key, value in base.items():
        if key in ("set", "expect"):
            continue
        if key not in on_command_line:
            merged[key] = value

    if not merged.get("model"):
        raise InputError(
            "missing MODEL", hint="pass a model folder, .gguf file, hub id or alias (or use --recipe)"
        )
    if not merged.get("method"):
        raise InputError("missing --method", hint="e.g. --method magnitude (or use --recipe)")
    if str(merged["model"]).lower().endswith(".onnx"):
        raise InputError(
            f"{merged['model']}: ONNX models are pruned without a recipe",
            hint="run `prunecli compress MODEL.onnx --method M --sparsity S -o OUT.onnx` "
            "(or prunecli.compress_onnx in Python)",
        )
    for key in ("nsamples", "seqlen", "eval_seqlen", "max_windows", "round_to", "nproc"):
        value = merged.get(key)
        if value is not None and value < 1:
            raise InputError(f"{key} must be a positive integer, got {value}", hint=f"pass {key} >= 1")
    if int(merged.get("recover_steps") or 0) < 0:
        raise InputError(f"recover_steps must be >= 0, got {merged['recover_steps']}", hint="pass 0 or more")
    if merged.get("max_memory") is not None:
        from prunecli.calibrate.memory import parse_size

        parse_size(merged["max_memory"])

    from prunecli.models import classify_spec, resolve_dtype

    kind, target = classify_spec(str(merged["model"]), allow_pickle=bool(merged.get("allow_pickle")))
    resolve_dtype(merged.get("dtype", "auto"))
    merged["method"] = canonical_method(str(merged["method"]))
    nproc = int(merged.get("nproc") or 1)
    check_processes(
        merged["method"], int(merged.get("recover_steps") or 0), nproc, str(merged.get("device", "cpu"))
    )
    config_cls, _ = get_method(merged["method"])
    experts = getattr(config_cls, "units", "blocks") == "experts"
    if merged.get("sparsity") is None and not experts:
        raise InputError("missing --sparsity", hint="e.g. --sparsity 0.2 removes 20% of the block parameters")
    if experts and merged.get("sparsity") is not None:
        raise InputError(f"{merged['method']} keeps experts, not a sparsity", hint="use --keep-experts K")
    if not experts and (merged.get("keep_experts") is not None or merged.get("demos")):
        raise InputError(
            "--keep-experts and --demos are for the expert methods",
            hint="use --method easy-ep, reap, frequency or random-experts",
        )
    sizes = {"keep_experts": float(merged["keep_experts"])} if merged.get("keep_experts") is not None else {}
    if not experts:
        sizes["sparsity"] = float(merged["sparsity"])
    method_options = coerce_options(base.get("set", {}), config_cls)
    given_set = merged.get("set") or []
    if isinstance(given_set, Mapping):
        method_options.update(coerce_options(dict(given_set), config_cls))
    else:
        method_options.update(parse_set(list(given_set), config_cls))
    # calibration size: the given --nsamples/--seqlen (or the recipe's) override the method's paper default
    fields = {f.name for f in dataclasses.fields(config_cls)}
    calib_size = {
        key: int(merged[key])
        for key in ("nsamples", "seqlen")
        if key in fields and merged.get(key) is not None and (key in on_command_line or key in base)
    }
    try:
        config = config_cls(
            **sizes,
            round_to=int(merged.get("round_to", 1)),
            seed=int(merged.get("seed", 0)),
            ignore=tuple(merged.get("ignore") or ()),
            **{**method_options, **calib_size},
        )
    except (TypeError, ValueError) as e:
        raise InputError(
            f"invalid options for method {merged['method']!r}: {e}",
            hint=f"`prunecli methods {merged['method']}` lists its options",
        ) from None
    merged["set"] = {k: v for k, v in method_options.items() if k not in ("nsamples", "seqlen")}
    for key in ("nsamples", "seqlen"):
        merged[key] = getattr(config, key) if key in fields else (merged.get(key) or DEFAULT_CALIB[key])
    expect = dict(base.get("expect", {}))
    expect.update(check_expect(dict(merged.get("expect") or {})))
    merged["expect"] = expect
    merged["ignore"] = list(merged.get("ignore") or [])
    merged["demos"] = [str(d) for d in (merged.get("demos") or [])]
    opts = CompressOptions(**{k: v for k, v in merged.items() if k in _FIELDS})

    from prunecli.recipe import NEEDS_EVAL

    for gate in expect:
        if gate in NEEDS_EVAL and opts.eval_data is None:
            raise InputError(
                f"gate {gate} needs a perplexity evaluation and no eval_data is given",
                hint="add eval_data: FILE to the recipe (or --eval-data), or remove the gate",
            )
        if gate == "min_speedup" and not opts.speed:
            raise InputError("gate min_speedup needs the speed measurement", hint="drop --no-speed")
    if opts.output is not None:
        from prunecli.checkpoint.save import check_output_dir

        # Before the model is loaded: overwrite replaces only a prunecli checkpoint, never the
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
        *(("--demos", d) for d in opts.demos),
    ):
        check_data_source(source, flag)
    if getattr(config, "needs_task", False) and opts.task is None:
        raise InputError(
            f"method {opts.method!r} fine-tunes on a labelled task",
            hint="pass --task train.jsonl --text-field TEXT --label-field LABEL",
        )
    if opts.task is not None and not Path(opts.task).is_file():
        raise InputError(
            f"task file not found: {opts.task}", hint="pass a .jsonl file, one labelled example per line"
        )
    return opts, config


_FIELDS = {f.name for f in dataclasses.fields(CompressOptions)}


def check_data_source(source: str | None, flag: str) -> None:
    """Fail early when a data source names a local file or folder that does not exist.

    Args:
        source: ``None`` (the shipped sample), a path, or an ``hf:`` dataset spec.
        flag: the option name used in the message.
    """
    from prunecli.errors import DataError

    if source is None or source.startswith("hf:") or Path(source).exists():
        return
    if source.startswith("builtin:"):
        from prunecli.data.sources import BUILTIN

        if source.removeprefix("builtin:") in BUILTIN:
            return
        raise DataError(f"{flag}: no shipped text {source!r}", hint="use builtin:sample or builtin:heldout")
    raise DataError(
        f"{flag}: no such file or folder: {source}",
        hint="pass a .txt/.jsonl file, a folder of .txt files, builtin:heldout, or hf:NAME[:CONFIG]:SPLIT[:FIELD]",
    )


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
    if device is not None and backend(device) == "nccl":
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


def backend(device: str) -> str:
    """The torch.distributed backend for ``device``."""
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


def choose_memory_plan(opts: CompressOptions, config: Any) -> Any:
    """Whole-model or layer-sequential (offloaded) calibration for ``sequential`` / ``max_memory``.

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


# ----------------------------------------------------------------------------- the run


def compress(
    recipe_or_options: CompressOptions | Mapping[str, Any] | str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
    check_gates: bool = True,
    **overrides: Any,
) -> Report:
    """Load, calibrate, evaluate, prune, (refit / recover), evaluate and save, as one call.

    Args:
        recipe_or_options: a recipe file (YAML), a recipe mapping (``{"model": ...,
            "method": ..., "sparsity": ...}``, the keys of ``prunecli compress`` with
            underscores), or :class:`CompressOptions`.
        progress: progress reporter for the long steps.
        on_warning: called with each warning as it happens (default: ``warnings.warn``).
        check_gates: raise :class:`GateError` when a gate of ``expect`` fails (after saving).
        **overrides: option values over the recipe's, e.g. ``sparsity=0.3`` (``overwrite``,
            ``allow_pickle``, ``trust_remote_code`` are only accepted here, never from a file).

    Returns:
        The :class:`Report`.

    Raises:
        InputError (and subclasses): bad options, data or model, checked before loading where
            possible.
        GateError: a gate failed (``check_gates``); ``err.report`` holds the report.

    Example:
        >>> report = compress("recipes/smollm2-magnitude-20.yaml", output="out/m20")  # doctest: +SKIP
        >>> round(report.sparsity["blocks"], 2)  # doctest: +SKIP
        0.2
    """
    opts, config = options_and_config(recipe_or_options, **overrides)
    return run(opts, config, progress=progress, on_warning=on_warning, check_gates=check_gates)


def options_and_config(
    recipe_or_options: CompressOptions | Mapping[str, Any] | str | os.PathLike[str], **overrides: Any
) -> tuple[CompressOptions, Any]:
    """Checked :class:`CompressOptions` and the method config for any form :func:`compress` takes."""
    if isinstance(recipe_or_options, CompressOptions):
        given = dataclasses.asdict(recipe_or_options)
        given.update(overrides)
        return resolve_options(given, set(given))
    if isinstance(recipe_or_options, Mapping):
        from prunecli.recipe import RECIPE_KEYS, check_mapping

        for key in recipe_or_options:
            name = str(key).replace("-", "_")
            if name in _FIELDS and name not in RECIPE_KEYS:  # overwrite, allow_pickle, ...
                raise InputError(
                    f"{name!r} is not read from a recipe",
                    hint=f"pass it as a keyword: compress(..., {name}=True)",
                )
        recipe = check_mapping(dict(recipe_or_options), where="options", folder=Path.cwd())
        _check_overrides(overrides)
        return resolve_options(dict(overrides), set(overrides), recipe=recipe)
    _check_overrides(overrides)
    return resolve_options(dict(overrides), set(overrides), Path(recipe_or_options))


def _check_overrides(overrides: Mapping[str, Any]) -> None:
    bad = [k for k in overrides if k not in _FIELDS]
    if bad:
        raise InputError(f"unknown option {bad[0]!r}", hint=f"known options: {', '.join(sorted(_FIELDS))}")


def run(
    opts: CompressOptions,
    config: Any,
    *,
    progress: Progress | None = None,
    on_warning: Callable[[str], None] | None = None,
    check_gates: bool = True,
) -> Report:
    """Run the pipeline for options already checked by :func:`resolve_options`.

    In a data-parallel run (``torchrun`` / ``--nproc``) every rank loads, calibrates and
    prunes; rank 0 alone evaluates and saves.
    """
    report = _Run(opts, config, progress, on_warning).run()
    if check_gates and report.failed_gates:
        failed = report.failed_gates
        raise GateError(
            "gate failed: " + "; ".join(g["message"] for g in failed),
            failures=failed,
            report=report.to_dict(),
            hint="loosen `expect:` in the recipe, or change the method/sparsity"
            + (f" (the checkpoint is in {report.output})" if report.output else ""),
        )
    return report


class _Run:
    """The state of one run; each step is a method that fills in ``self``."""

    def __init__(
        self,
        opts: CompressOptions,
        config: Any,
        progress: Progress | None,
        on_warning: Callable[[str], None] | None,
    ) -> None:
        from prunecli.progress import NullProgress

        self.opts = opts
        self.config = config
        self.progress = progress if progress is not None else NullProgress()
        self._on_warning = on_warning
        self.warnings: list[str] = []
        self.seconds: dict[str, float] = {}

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        if self._on_warning is not None:
            self._on_warning(message)
        else:
            warnings.warn(message, UserWarning, stacklevel=3)

    def run(self) -> Report:
        from prunecli.calibrate import distributed

        opts, config = self.opts, self.config
        check_processes(opts.method, opts.recover_steps, distributed.env_world_size())
        if opts.refit and getattr(config, "units", "") == "experts":
            raise InputError(
                "--refit refits projections that lose input channels; expert pruning removes none"
            )
        if opts.calib is not None and not config.needs_data and not opts.refit:
            self.warn(f"method {opts.method!r} uses no calibration data; --calib is ignored")
        if opts.eval_data is not None and opts.calib is not None and opts.eval_data == opts.calib:
            self.warn(
                "calibrating and evaluating on the same text makes the perplexity look better than it is"
            )
        self.memory = choose_memory_plan(opts, config)
        if self.memory is not None and self.memory.offload:
            if opts.refit:
                raise InputError(
                    f"--refit rewrites the projections, which are not in memory in this run ({self.memory.reason})",
                    hint="drop --refit, or run where the model fits (without --sequential / --max-memory)",
                )
            if opts.recover_steps:
                raise InputError(
                    "--recover-steps fine-tunes the whole model, which is not in memory in this run "
                    f"({self.memory.reason})",
                    hint="recover the saved checkpoint on a machine that holds it: prunecli recover OUT ...",
                )
            if opts.export:
                raise InputError(
                    f"--export needs the whole pruned model in memory, which it is not in this run ({self.memory.reason})",
                    hint="export the saved checkpoint where it fits: prunecli export OUT --format ...",
                )
            if opts.task is not None:
                raise InputError(
                    f"--task fine-tunes the whole model, which is not in memory in this run ({self.memory.reason})",
                    hint="drop --sequential / --max-memory (encoders fit in memory)",
                )
        started = time.perf_counter()
        with distributed.session(opts.device) as (rank, world):
            self.rank, self.world = rank, world
            self._load()
            self._calibration()
            self._eval_windows()
            self.ppl_before = self._evaluate("eval_before")
            self._task()
            self._keep_dense_copy()
            self._prune()
            self._recover()
            self.ppl_after = self._evaluate("eval_after")
            self._speed()
            self.report = self._report()
            self._save()
        self.seconds["total"] = time.perf_counter() - started
        from prunecli.recipe import check_gates

        self.report.gates = check_gates(self.report.to_dict(), opts.expect) if rank == 0 else []
        return self.report

    # -- steps ----------------------------------------------------------------------------

    def _load(self) -> None:
        from prunecli.calibrate import Runner
        from prunecli.models import load_model

        opts, memory = self.opts, self.memory
        self.loaded = load_model(
            opts.model,
            dtype=opts.dtype,
            device=opts.device,
            allow_pickle=opts.allow_pickle,
            trust_remote_code=opts.trust_remote_code,
            progress=self.progress,
            offload=bool(memory is not None and memory.offload),
        )
        self.seconds["load"] = self.loaded.load_seconds
        self.runner = Runner(
            mode=memory.mode if memory is not None else "whole",
            device=opts.device,
            weights=self.loaded.weights,
        )

    def _calibration(self) -> None:
        from prunecli.data import calibration_windows, data_hash

        opts = self.opts
        self.calib = None
        self.calibration: dict[str, Any] | None = None
        if not (self.config.needs_data or opts.refit):
            return
        t = time.perf_counter()
        sources = opts.demos or [opts.calib]  # expert methods: one window tensor per domain
        domains = [
            calibration_windows(
                self.loaded.tokenizer,
                src,
                nsamples=opts.nsamples,
                seqlen=opts.seqlen,
                seed=opts.seed,
                text_field=opts.text_field,
                progress=self.progress,
            )
            for src in sources
        ]
        self.calib = domains[0] if len(domains) == 1 else domains
        self.seconds["calibration"] = time.perf_counter() - t
        self.calibration = {
            "source": ", ".join(s if s is not None else SAMPLE_TEXT for s in sources),
            "text_field": opts.text_field,
            "nsamples": sum(int(d.shape[0]) for d in domains),
            "seqlen": int(domains[0].shape[1]),
            "seed": opts.seed,
            "hash": data_hash(domains[0]) if len(domains) == 1 else [data_hash(d) for d in domains],
            "processes": self.world,
        }

    def _eval_windows(self) -> None:
        from prunecli.data import eval_windows

        opts = self.opts
        self.windows = None
        if opts.eval_data is None or self.rank != 0:
            return
        from prunecli.evaluate import max_length_warning

        warning = max_length_warning(self.loaded.model, opts.eval_seqlen)
        if warning:
            self.warn(warning)
        self.windows = eval_windows(
            self.loaded.tokenizer,
            opts.eval_data,
            seqlen=opts.eval_seqlen,
            max_windows=opts.max_windows,
            text_field=opts.text_field,
            progress=self.progress,
        )

    def _evaluate(self, step: str) -> dict[str, Any] | None:
        from prunecli.evaluate import evaluate

        if self.windows is None:
            return None
        t = time.perf_counter()
        result = evaluate(
            self.loaded.model,
            self.windows,
            progress=self.progress,
            runner=self.runner,
            measure_throughput=False,  # timed interleaved with the dense copy in _speed
        )
        self.seconds[step] = time.perf_counter() - t
        return result

    def _task(self) -> None:
        """With ``task``: read the labelled examples and give the model a classifier head for them."""
        opts = self.opts
        self.task = None
        self.task_record: dict[str, Any] | None = None
        if opts.task is None:
            return
        from prunecli.tasks import as_classifier, load_task, model_label_names

        t = time.perf_counter()
        self.task = load_task(
            opts.task,
            self.loaded.tokenizer,
            text_field=opts.text_field,
            label_field=opts.label_field,
            max_length=int(getattr(self.config, "max_length", 128)),
            label_names=model_label_names(self.loaded.model),
        )
        self.loaded.model = as_classifier(self.loaded.model, self.task.label_names, seed=opts.seed)
        self.seconds["task"] = time.perf_counter() - t
        self.task_record = {
            "source": opts.task,
            "text_field": opts.text_field,
            "label_field": opts.label_field,
            "labels": [str(n) for n in self.task.label_names],
            "examples": len(self.task),
        }

    def _keep_dense_copy(self) -> None:
        """A copy of the unpruned model, to time it interleaved with the pruned one (``speed``)."""
        self.dense = None
        self.speed = None
        if self.opts.speed and self.windows is not None and self.loaded.weights is None:
            import copy

            self.dense = copy.deepcopy(self.loaded.model)

    def _speed(self) -> None:
        if self.dense is None:
            return
        from prunecli.evaluate import compare_throughput

        t = time.perf_counter()
        self.speed = compare_throughput(
            {"before": self.dense, "after": self.loaded.model}, seqlen=int(self.windows.shape[1])
        )
        self.dense = None
        self.seconds["speed"] = time.perf_counter() - t

    def _prune(self) -> None:
        from prunecli.api import SparsityWarning, prune
        from prunecli.evaluate import count_parameters

        model = self.loaded.model
        self.params_before = count_parameters(model)
        self._check_ignore(model)
        t = time.perf_counter()
        with warnings.catch_warnings():  # reported once below, through warn()
            warnings.simplefilter("ignore", SparsityWarning)
            self.result = prune(
                model,
                self.config,
                calib=self.calib,
                progress=self.progress,
                runner=self.runner,
                refit=self.opts.refit,
                task=self.task,
            )
        self.seconds["prune"] = time.perf_counter() - t
        for message in self.result.warnings:
            self.warn(message)
        self.params_after = count_parameters(model)

    def _check_ignore(self, model: Any) -> None:
        """Warn about ``ignore`` patterns that match no module (a typo keeps nothing whole)."""
        import fnmatch

        names = [name for name, _ in model.named_modules() if name]
        for pattern in self.opts.ignore:
            if not any(fnmatch.fnmatch(name, pattern) for name in names):
                example = next((n for n in names if ".layers.0." in n), names[0] if names else "")
                self.warn(
                    f"--ignore {pattern!r} matches no module of this model, so it keeps nothing "
                    f"(module names look like {example!r})"
                )

    def _recover(self) -> None:
        opts = self.opts
        self.recovery = None
        if not opts.recover_steps:
            return
        if self.task is not None:  # fine-tune the classifier on the task instead of LoRA on text
            from prunecli.tasks import finetune

            t = time.perf_counter()
            losses = finetune(self.loaded.model, self.task, steps=opts.recover_steps, seed=opts.seed + 1)
            self.seconds["recover"] = time.perf_counter() - t
            self.recovery = {
                "task": opts.task,
                "steps": opts.recover_steps,
                "final_loss": losses[-1],
                "seconds": self.seconds["recover"],
            }
            return
        from prunecli.recover import recover_on_text

        self.recovery = recover_on_text(
            self.loaded.model,
            self.loaded.tokenizer,
            opts.recover_data if opts.recover_data is not None else opts.calib,
            steps=opts.recover_steps,
            seqlen=opts.seqlen,
            seed=opts.seed,
            text_field=opts.text_field,
            progress=self.progress,
        )
        self.seconds["recover"] = self.recovery["seconds"]

    def _report(self) -> Report:
        opts, loaded, result = self.opts, self.loaded, self.result
        summary = result.summary.to_dict()
        params = {
            "before": self.params_before,
            "after": self.params_after,
            "removed": self.params_before - self.params_after,
            # sparsity is a share of every attention + MLP block, locked or ignored ones included
            "blocks_before": result.block_params_before,
            "blocks_after": result.block_params_after,
        }
        plan = result.plan.to_dict()
        plan["groups_pruned"] = len(result.plan.removals)
        plan["units_removed"] = sum(len(u) for u in result.plan.removals.values())
        expert_method = getattr(self.config, "units", "") == "experts"
        return Report(
            model=opts.model,
            source=str(loaded.source),
            kind=loaded.kind,
            dtype=loaded.dtype,
            method=opts.method,
            config=self.config.to_dict(),
            calibration=self.calibration,
            memory=_memory_section(self.memory, self.runner),
            refit=result.plan.meta.get("refit"),
            params=params,
            sparsity=_sparsity_section(None if expert_method else self.config.sparsity, params),
            perplexity=_perplexity_section(opts, self.windows, self.ppl_before, self.ppl_after, self.speed),
            seconds=self.seconds,
            prune_steps_seconds=dict(getattr(result, "seconds", {}) or {}),
            output=None,
            verify=None,
            plan=plan,
            summary=summary,
            recovery=self.recovery,
            warnings=self.warnings,
            recipe=opts.to_recipe(),
            gates=[],
            tyr=result.plan.meta.get("tyr"),
            experts=result.to_dict()["experts"] if expert_method else None,
            task=self.task_record,
        )

    def _save(self) -> None:
        opts, report = self.opts, self.report
        if opts.output is None or self.rank != 0:
            return
        from prunecli.checkpoint import save_checkpoint

        t = time.perf_counter()
        path = save_checkpoint(
            self.loaded.model,
            self.loaded.tokenizer,
            Path(opts.output),
            provenance=report.to_dict(),
            overwrite=opts.overwrite,
            verify=opts.verify,
            progress=self.progress,
            weights=self.loaded.weights,
            add_files=_tyr_plot(report.tyr),
        )
        self.seconds["save"] = time.perf_counter() - t
        report.output = str(path)
        report.verify = read_verify(path)
        report.load_hint = load_hint(path)
        if opts.export:
            from prunecli.export import export_model

            t = time.perf_counter()
            report.export = export_model(
                self.loaded.model,
                opts.export,
                export_path(opts),
                tokenizer=self.loaded.tokenizer,
                outtype=opts.export_outtype,
                overwrite=opts.overwrite,
                verify=opts.verify,
            )
            self.seconds["export"] = time.perf_counter() - t
            for message in report.export.get("warnings", []):
                self.warn(message)


def export_path(opts: CompressOptions) -> Path:
    """Where ``--export`` writes: ``OUT.onnx`` / ``OUT.gguf`` beside the ``--output`` folder ``OUT``."""
    out = Path(str(opts.output)).expanduser()
    return out.parent / f"{out.name}.{opts.export}"


def _tyr_plot(meta: dict[str, Any] | None) -> Any:
    """Writer of ``tyr_sparsity.png`` (Týr's per-layer sparsity) into a checkpoint folder."""
    if not meta:
        return None

    def write(folder: Path) -> None:
        from prunecli.methods.tyr import write_plot

        write_plot(folder / "tyr_sparsity.png", meta)

    return write


def read_verify(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``verify`` record that ``save_checkpoint`` wrote into the checkpoint's ``prunecli.json``."""
    from prunecli.checkpoint import PROVENANCE_FILE
    from prunecli.models.files import read_json

    value = read_json(Path(path) / PROVENANCE_FILE).get("verify")
    return value if isinstance(value, dict) else None


def load_hint(path: str | os.PathLike[str]) -> str:
    """How to load the checkpoint at ``path``: stock transformers, or remote code / prunecli for per-layer widths."""
    from prunecli.checkpoint.save import MODELING_FILE
    from prunecli.models.files import read_json

    config_file = Path(path) / "config.json"
    architectures = (read_json(config_file).get("architectures") if config_file.is_file() else None) or [""]
    auto = "AutoModelForCausalLM"
    if str(architectures[0]).endswith("ForSequenceClassification"):  # compress --task
        auto = "AutoModelForSequenceClassification"
    if (Path(path) / MODELING_FILE).is_file():
        return (
            f"widths differ by layer: load with {auto}.from_pretrained({str(path)!r}, "
            f"trust_remote_code=True) or prunecli.load_model({str(path)!r})"
        )
    return f"load with {auto}.from_pretrained({str(path)!r})"


def _memory_section(memory: Any, runner: Any) -> dict[str, Any]:
    if memory is None:
        return {"mode": runner.mode, "offload": False, "reason": "default (the whole model in memory)"}
    return {
        "mode": memory.mode,
        "offload": memory.offload,
        "reason": memory.reason,
        "estimated_bytes": memory.sequential_bytes if memory.mode == "sequential" else memory.whole_bytes,
    }


def _sparsity_section(target: float | None, params: dict[str, Any]) -> dict[str, Any]:
    blocks = None
    if params["blocks_before"] and params["blocks_after"] is not None:
        blocks = 1.0 - params["blocks_after"] / params["blocks_before"]
    model = 1.0 - params["after"] / params["before"] if params["before"] else None
    return {"target": target, "blocks": blocks, "model": model}


def _perplexity_section(
    opts: CompressOptions, windows: Any, before: Any, after: Any, speed: dict[str, Any] | None
) -> dict[str, Any] | None:
    if windows is None or before is None or after is None:
        return None
    return {
        "data": opts.eval_data,
        "seqlen": int(windows.shape[1]),
        "windows": int(windows.shape[0]),
        "before": before["perplexity"],
        "after": after["perplexity"],
        "tokens_per_s_before": speed["before"]["tokens_per_s"] if speed else None,
        "tokens_per_s_after": speed["after"]["tokens_per_s"] if speed else None,
        "speed_method": speed["after"]["method"] if speed else None,
    }
