"""Export a (pruned) causal LM to ONNX and check it with onnxruntime.

The graph is produced by ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript)
from a wrapper whose forward is ``model(input_ids, attention_mask, use_cache=False).logits``:
inputs ``input_ids`` and ``attention_mask`` (int64, ``[batch, sequence]``, both axes dynamic),
output ``logits`` (float32, ``[batch, sequence, vocab]``), no KV cache. Widths that differ by
layer need nothing special: every layer is traced with its own shapes.

The file is then loaded in onnxruntime and run on a probe whose batch and length differ from
the example used for tracing (so the dynamic axes are exercised); its logits must equal the
PyTorch model's within ``1e-4 x max(1, max |logits|)``, the checkpoint verification bound.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prunecli.errors import DependencyMissingError, UnsupportedModelError, VerifyError
from prunecli.export._files import atomic_output, check_output_file

ONNX_TOLERANCE = 1e-4  # x max(1, max |logits|), as in checkpoint verification (float32)


def _require(package: str, purpose: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise DependencyMissingError(
            f"{purpose} needs the {package!r} package",
            hint=f"pip install 'prunecli[onnx]' (or pip install {package})",
        )


def probe_ids(vocab_size: int, batch: int = 2, length: int = 11, seed: int = 0) -> Any:
    """A fixed ``[batch, length]`` int64 tensor of token ids drawn from ``[0, vocab_size)``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def _wrapper(model: Any) -> Any:
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:  # (B, T) -> (B, T, V)
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def onnxruntime_logits(path: str | os.PathLike[str], ids: Any, attention_mask: Any | None = None) -> Any:
    """Run an exported file in onnxruntime (CPU) and return its logits as a numpy array.

    Args:
        path: the ``.onnx`` file written by :func:`to_onnx`.
        ids: token ids ``[batch, sequence]`` (torch tensor or numpy array).
        attention_mask: same shape; all ones when ``None``.
    """
    import numpy as np

    _require("onnxruntime", "running an ONNX export")
    import onnxruntime as ort

    ids = np.asarray(ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]


def to_onnx(
    model: Any,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    verify: bool = True,
    opset: int | None = None,
) -> dict[str, Any]:
    """Write ``model`` (a transformers causal LM, pruned or not) as an ONNX file.

    Args:
        model: the model; exported in float32 on the CPU (a half-precision model is exported
            from a float32 copy).
        path: the ``.onnx`` file to write; written atomically (a temporary file renamed into
            place). A model above 2 GB also gets a ``<name>.data`` external-data file beside it.
        overwrite: replace an existing file.
        verify: run the file in onnxruntime on a probe (batch 2, 11 tokens) and compare its
            logits with the PyTorch model's; a mismatch raises :class:`VerifyError` and nothing
            is written.
        opset: ONNX opset (default: the exporter's).

    Returns:
        A report: ``path``, ``bytes``, ``seconds``, ``nodes`` (ONNX node count), ``opset``,
        ``verify`` (``{"check": "onnxruntime", "max_abs_diff": ..., "tolerance": ...}`` or
        ``{"check": "none"}``).

    Example:
        >>> from prunecli.models import load_model
        >>> lm = load_model("smollm2-flap-20", dtype="float32")  # doctest: +SKIP
        >>> to_onnx(lm.model, "smollm2-flap-20.onnx")["verify"]  # doctest: +SKIP
        {'check': 'onnxruntime', 'max_abs_diff': 1.1e-05, 'tolerance': 0.0021}
    """
    import torch

    _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export (torch.onnx dynamo exporter)")
    if verify:
        _require("onnxruntime", "verifying an ONNX export")
    out = check_output_file(path, overwrite=overwrite, suffix=".onnx")
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"ONNX export handles causal language models; got {type(model).__name__}",
            hint="export a *ForCausalLM checkpoint",
        )
    started = time.perf_counter()
    if next(model.parameters()).dtype != torch.float32 or next(model.parameters()).device.type != "cpu":
        import copy

        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    model.eval()
    vocab = int(model.get_output_embeddings().weight.shape[0])
    example = probe_ids(vocab, batch=1, length=8, seed=1)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    dims = {0: batch, 1: sequence}
    import contextlib
    import io
    import warnings

    # the exporter prints its steps on stdout; a library call stays silent (and --json clean)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                _wrapper(model),
                (example, torch.ones_like(example)),
                dynamo=True,
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                opset_version=opset,
                verbose=False,
            )
        except Exception as exc:  # noqa: BLE001 - the exporter raises many unrelated types
            first = " ".join(str(exc).split())[:300]
            raise UnsupportedModelError(f"torch.onnx.export failed: {type(exc).__name__}: {first}") from exc
    nodes = len(program.model.graph)
    opset_used = int(program.model.opset_imports.get("", 0))
    with atomic_output(out) as tmp:
        target = tmp / out.name
        # external data only when the protobuf limit (2 GB) demands it
        big = sum(p.numel() * 4 for p in model.parameters()) > 1_900_000_000
        program.save(os.fspath(target), external_data=big)
        report: dict[str, Any] = {"path": str(out), "nodes": nodes, "opset": opset_used}
        report["verify"] = _verify(model, target, vocab) if verify else {"check": "none"}
        report["bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
    report["seconds"] = time.perf_counter() - started
    return report


def _verify(model: Any, path: Path, vocab: int) -> dict[str, Any]:
    import numpy as np
    import torch

    ids = probe_ids(vocab, batch=2, length=11)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float().numpy()
    got = onnxruntime_logits(path, ids, mask)
    if got.shape != expected.shape:
        raise VerifyError(f"onnxruntime returned logits of shape {got.shape}, PyTorch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    tolerance = ONNX_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    if not diff <= tolerance:
        raise VerifyError(
            f"the ONNX file's logits differ from the PyTorch model's by {diff:.3g} (tolerance {tolerance:.3g})",
            hint="report this as a bug with the model's config.json",
        )
    return {"check": "onnxruntime", "max_abs_diff": diff, "tolerance": tolerance, "probe": list(ids.shape)}
