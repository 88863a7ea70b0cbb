"""Export pruned (or dense) checkpoints to deployment formats: ONNX (onnxruntime) and GGUF (llama.cpp).

Library::

    from prunecli.export import export_model, to_gguf, to_onnx
    export_model("smollm2-flap-50", "gguf", "smollm2-flap-50.gguf", outtype="f16")
    # or, with a model already in memory:
    to_onnx(model, "model.onnx")
    to_gguf(model, tokenizer, "model.gguf", outtype="q8_0")

Each writes one file atomically and checks it before publishing it: the ONNX file is run in
onnxruntime and compared with the PyTorch logits; the GGUF file is read back (architecture,
per-layer widths, tensor shapes) and, when llama-cpp-python is installed, run in llama.cpp
and compared with the PyTorch logits. See ``docs/export.md``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from prunecli.errors import InputError
from prunecli.export.gguf_export import OUTTYPES, llamacpp_logits, open_llama, to_gguf
from prunecli.export.onnx_export import onnxruntime_logits, to_onnx

FORMATS = ("onnx", "gguf")

__all__ = [
    "FORMATS",
    "OUTTYPES",
    "export_model",
    "llamacpp_logits",
    "onnxruntime_logits",
    "open_llama",
    "to_gguf",
    "to_onnx",
]


def check_format(fmt: str, outtype: str = "f32") -> str:
    """Normalise and check an export format (``onnx``/``gguf``) and a GGUF out type."""
    name = str(fmt).lower().lstrip(".")
    if name not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}", hint="use onnx or gguf")
    if outtype not in OUTTYPES:
        raise InputError(f"unknown --outtype {outtype!r}", hint=f"use one of {', '.join(OUTTYPES)}")
    if name == "onnx" and outtype != "f32":
        raise InputError("--outtype applies to GGUF only (the ONNX export is float32)")
    return name


def export_model(
    model: Any,
    fmt: str,
    output: str | os.PathLike[str],
    *,
    tokenizer: Any | None = None,
    outtype: str = "f32",
    overwrite: bool = False,
    verify: bool = True,
    trust_remote_code: bool = False,
    progress: Any | None = None,
) -> dict[str, Any]:
    """Export a model to ONNX or GGUF.

    Args:
        model: a model spec that :func:`prunecli.models.load_model` accepts (a prunecli
            checkpoint folder, an alias, a ``.gguf`` file, ...), loaded in float32; or a
            transformers model already in memory (then pass ``tokenizer`` for GGUF).
        fmt: ``"onnx"`` or ``"gguf"``.
        output: the file to write (``.onnx`` / ``.gguf``).
        tokenizer: the tokenizer of an in-memory model (GGUF carries the vocabulary).
        outtype: GGUF weight type: ``f32``, ``f16`` or ``q8_0``.
        overwrite: replace an existing file.
        verify: check the written file (see :func:`to_onnx`, :func:`to_gguf`).
        trust_remote_code: passed to ``load_model``.
        progress: progress reporter for loading.

    Returns:
        The exporter's report plus ``format`` and, when a spec was loaded, ``source`` and
        ``load_seconds``.

    Example:
        >>> export_model("smollm2-flap-50", "onnx", "smollm2-flap-50.onnx")["verify"]["check"]  # doctest: +SKIP
        'onnxruntime'
    """
    name = check_format(fmt, outtype)
    from prunecli.export._files import check_output_file

    check_output_file(output, overwrite=overwrite, suffix=f".{name}")  # before loading anything
    extra: dict[str, Any] = {}
    if isinstance(model, (str, os.PathLike)):
        from prunecli.models import load_model

        started = time.perf_counter()
        loaded = load_model(model, dtype="float32", trust_remote_code=trust_remote_code, progress=progress)
        model, tokenizer = loaded.model, loaded.tokenizer
        extra = {"source": str(loaded.source), "load_seconds": time.perf_counter() - started}
    if name == "onnx":
        report = to_onnx(model, output, overwrite=overwrite, verify=verify)
    else:
        report = to_gguf(model, tokenizer, output, outtype=outtype, overwrite=overwrite, verify=verify)
    return {"format": name, **extra, **report}
