"""``compress_onnx``: prune an ONNX file with a registered method and write a smaller one.

load -> graph (:func:`~prunecli.onnx.graph.build_onnx_graph`) -> calibration samples (methods
that need data) -> the method's plan, computed by the method's own function on
:func:`~prunecli.onnx.runner.torch_view` with :class:`~prunecli.onnx.runner.OnnxRunner` ->
:func:`~prunecli.onnx.apply.apply_plan_onnx` -> checked in onnxruntime -> written atomically.

Calibration data (``calib``): a ``.npy`` file (or an array/tensor) of samples of the model's
main input, ``[n, seqlen]`` token ids for a language model or ``[n, ...]`` inputs otherwise.
An ONNX file carries no tokenizer, so text is tokenized beforehand (e.g. with
``prunecli.data``'s windows saved by ``numpy.save``). A model whose main input is
floating-point (an image model) calibrates on ``nsamples`` standard-normal samples (seeded)
when no data is given; a token model without data is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunecli.errors import DataError, InputError, SparsityError, UnsupportedModelError

#: methods whose scores need nothing the torch model alone has
ONNX_METHODS = ("magnitude", "random", "wanda-sp", "flap")


def check_onnx_method(method: str) -> str:
    """Canonical method name, or :class:`UnsupportedModelError` when it does not run on ONNX."""
    from prunecli.pipeline import canonical_method

    name = canonical_method(method)
    if name not in ONNX_METHODS:
        raise UnsupportedModelError(
            f"method {name!r} is not supported on ONNX models",
            hint=f"choose one of: {', '.join(ONNX_METHODS)}",
        )
    return name


def onnx_config(method: str, sparsity: float, **options: Any) -> Any:
    """The method's config (validated: sparsity strictly between 0 and 1, known options)."""
    from prunecli.config import get_method

    name = check_onnx_method(method)
    cls, _ = get_method(name)
    if not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) < 1.0:
        raise SparsityError(f"sparsity must be strictly between 0 and 1, got {sparsity!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(
            f"unknown option {unknown[0]!r} for {name}", hint=f"options: {', '.join(sorted(names))}"
        )
    return cls(sparsity=float(sparsity), **options)


def load_calib(calib: Any, model: Any, config: Any) -> torch.Tensor | None:
    """Calibration samples as a tensor, or ``None`` for data-free methods (see the module docstring)."""
    from onnx import helper

    from prunecli.onnx.runner import main_input

    if not getattr(config, "needs_data", False):
        return None
    main = main_input(model)
    is_tokens = np.issubdtype(helper.tensor_dtype_to_np_dtype(main.type.tensor_type.elem_type), np.integer)
    if calib is None:
        if is_tokens:
            raise DataError(
                f"{config.method} needs calibration token ids for this ONNX language model",
                hint="pass --calib windows.npy (an int array [n, seqlen] of token ids)",
            )
        dims = main.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 0 for d in dims][1:]
        if any(s == 0 for s in shape):
            raise DataError("the model's input has dynamic dimensions: pass --calib samples.npy")
        g = torch.Generator().manual_seed(config.seed)
        n = int(getattr(config, "nsamples", 16) or 16)
        return torch.randn(min(n, 64), *shape, generator=g)
    if isinstance(calib, (str, os.PathLike)):
        p = Path(calib)
        if p.suffix.lower() != ".npy" or not p.is_file():
            raise DataError(
                f"ONNX calibration data must be a .npy file: {calib}", hint="numpy.save(...) the samples"
            )
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise DataError(f"cannot read {calib}: {e}") from None
    else:
        arr = np.asarray(calib)
    if arr.ndim < 2 or arr.size == 0:
        raise DataError(f"calibration samples must be an array [n, ...], got shape {arr.shape}")
    if is_tokens and not np.issubdtype(arr.dtype, np.integer):
        raise DataError("this ONNX model takes token ids: the calibration array must be integers")
    return torch.from_numpy(np.ascontiguousarray(arr))


def compress_onnx(
    model: str | os.PathLike[str],
    method: str,
    sparsity: float,
    *,
    output: str | os.PathLike[str] | None = None,
    calib: Any = None,
    overwrite: bool = False,
    options: dict[str, Any] | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Prune an ONNX model and (with ``output``) write the smaller ``.onnx`` file.

    Args:
        model: the ``.onnx`` file (external data beside it is read too).
        method: ``magnitude``, ``random``, ``wanda-sp`` or ``flap``.
        sparsity: fraction to remove (the method's meaning, as for PyTorch models).
        output: the ``.onnx`` file to write (atomically; ``None``: only plan and report).
        calib: calibration samples for data-driven methods (see the module docstring).
        overwrite: replace an existing ``output`` file.
        options: further config options of the method (``round_to``, ``seed``, ``ignore``, ...).
        progress: progress reporter.

    Returns:
        The report, with the keys of :class:`prunecli.pipeline.Report` that apply (``model``,
        ``source``, ``kind`` = ``"onnx"``, ``method``, ``config``, ``calibration``, ``params``
        with ``blocks_before``/``blocks_after``, ``sparsity``, ``seconds``, ``output``,
        ``verify``, ``plan`` with ``groups_pruned``/``units_removed``, ``summary``,
        ``warnings``) plus ``graph`` (group counts, unknown ops), ``opset`` and ``bytes``.

    Raises:
        InputError: not an ONNX file, a corrupt file, an invalid sparsity or option.
        UnsupportedModelError: the method does not run on ONNX, or the model cannot be pruned.

    Example:
        >>> report = compress_onnx("model.onnx", "magnitude", 0.3, output="pruned.onnx")  # doctest: +SKIP
        >>> report["params"]["after"] < report["params"]["before"]                       # doctest: +SKIP
        True
    """
    from prunecli.config import get_method
    from prunecli.engine.apply import block_params
    from prunecli.export._files import atomic_output, check_output_file
    from prunecli.onnx.apply import apply_plan_onnx
    from prunecli.onnx.graph import build_onnx_graph, load_onnx
    from prunecli.onnx.runner import OnnxRunner, torch_view
    from prunecli.pipeline import _sparsity_section
    from prunecli.progress import resolve

    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = now - clock
        clock = now

    if Path(model).suffix.lower() != ".onnx":
        raise InputError(f"not an ONNX file (expected a .onnx path): {model}")
    config = onnx_config(method, sparsity, **(options or {}))
    out = check_output_file(output, overwrite=overwrite, suffix=".onnx") if output is not None else None
    _, fn = get_method(config.method)
    proto = load_onnx(model)
    bar = resolve(progress)
    with bar.task("tracing the ONNX graph") as task:
        graph = build_onnx_graph(proto)
        task.advance()
    if not graph.prunable():
        raise UnsupportedModelError(
            "no prunable groups in this ONNX model", hint="see `prunecli graph MODEL --all`"
        )
    lap("graph")
    samples = load_calib(calib, proto, config)
    view = torch_view(proto, graph)
    runner = OnnxRunner(onnx_model=proto, graph=graph)
    kwargs: dict[str, Any] = {"progress": progress}
    if "runner" in inspect.signature(fn).parameters:  # data-free methods without it read no weights
        kwargs["runner"] = runner
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = fn(view, graph, config, samples, **kwargs)
    lap("prune")
    pruned, summary = apply_plan_onnx(proto, graph, plan)
    lap("apply")
    blocks_before = block_params(view, graph, include_locked=True)
    blocks_after = (
        block_params(torch_view(pruned, graph), graph, include_locked=True) if blocks_before else None
    )
    params = {
        "before": summary.params_before,
        "after": summary.params_after,
        "removed": summary.params_before - summary.params_after,
        # as for PyTorch models: sparsity is a share of every attention + MLP block
        "blocks_before": blocks_before,
        "blocks_after": blocks_after,
    }
    plan_dict = plan.to_dict()
    plan_dict["groups_pruned"] = len(plan.removals)
    plan_dict["units_removed"] = sum(len(u) for u in plan.removals.values())
    report: dict[str, Any] = {
        "model": str(model),
        "source": str(Path(model).absolute()),
        "kind": "onnx",
        "method": config.method,
        "config": config.to_dict(),
        "calibration": _calibration_section(calib, samples, config),
        "params": params,
        "sparsity": _sparsity_section(config.sparsity, params),
        "seconds": seconds,
        "output": None,
        "verify": {"check": "onnxruntime", "runs": True, "output_shapes_kept": True},
        "plan": plan_dict,
        "summary": summary.to_dict(),
        "warnings": list(dict.fromkeys(str(w.message) for w in caught)),
        "graph": {
            "groups": len(graph.groups),
            "prunable": len(graph.prunable()),
            "unknown_ops": graph.unknown_ops,
        },
        "opset": {o.domain or "ai.onnx": o.version for o in pruned.opset_import},
    }
    if out is not None:
        import onnx

        with atomic_output(out) as tmp:
            big = pruned.ByteSize() > 1_900_000_000
            onnx.save(
                pruned, os.fspath(tmp / out.name), save_as_external_data=big, location=f"{out.name}.data"
            )
        report["output"] = str(out)
        report["bytes"] = sum(f.stat().st_size for f in out.parent.glob(f"{out.name}*") if f.is_file())
        lap("save")
    seconds["total"] = time.perf_counter() - started
    return report


def _calibration_section(calib: Any, samples: torch.Tensor | None, config: Any) -> dict[str, Any] | None:
    if samples is None:
        return None
    if calib is None:
        source = f"standard normal (seed {config.seed})"
    elif isinstance(calib, (str, os.PathLike)):
        source = str(calib)
    else:
        source = "array"
    return {"source": source, "samples": int(samples.shape[0]), "shape": list(samples.shape)}
