"""Calibration of ONNX models through onnxruntime, behind the shared runner's interface.

Methods read weights with ``runner.tensor(model, name)`` and activation statistics with
``runner.observe(model, [Observe(module, stat)], calib)``. For an ONNX model, ``model`` is
:func:`torch_view` (an ``nn.Module`` whose parameters are the graph's parameters in PyTorch
orientation, so methods run unchanged) and the runner is :class:`OnnxRunner`: each observed
module's input activation (the first operand of its ``MatMul``/``Gemm``/``Conv``) is added to
the graph as an extra output, the calibration samples run through onnxruntime in batches, and
the accumulators of :mod:`prunecli.calibrate.stats` fold them in exactly as the torch runner
does (dense propagation: every layer sees the unpruned outputs of the layers before it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from prunecli.calibrate.runner import AfterBlock, Observe, Runner
from prunecli.calibrate.stats import STATISTICS, Accumulator
from prunecli.errors import DataError, UnsupportedModelError
from prunecli.onnx.graph import OnnxGraph, _session, graph_inputs
from prunecli.progress import Progress, resolve

_ONNX_STATS = ("moments", "sumsq", "gram")


def torch_view(model: Any, graph: OnnxGraph) -> nn.Module:
    """The ONNX model's parameters as an ``nn.Module`` tree (read-only copies, torch orientation).

    ``view.get_submodule("model.layers.0.mlp.down_proj").weight`` is the ``[out, in]`` weight
    of that module's ``MatMul``, whatever its orientation in the file.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    root = nn.Module()
    for pname, info in graph.params.items():
        arr = numpy_helper.to_array(inits[info.initializer])
        t = torch.from_numpy(np.array(arr, dtype=np.float32 if arr.dtype != np.float64 else arr.dtype))
        if info.transposed:
            t = t.t().contiguous()
        *path, leaf = pname.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    return root.eval()


def main_input(model: Any) -> Any:
    """The graph input that carries the data: token ids (an integer input that is not a mask
    or token types) or the first floating-point input."""
    from onnx import helper

    inputs = graph_inputs(model)
    for inp in inputs:
        dt = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if np.issubdtype(dt, np.integer) and "mask" not in inp.name and "type" not in inp.name:
            return inp
    for inp in inputs:
        if np.issubdtype(helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type), np.floating):
            return inp
    raise UnsupportedModelError("the ONNX model has no token-id or floating-point input")


def batch_feed(model: Any, samples: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs for one batch of samples of the main input (masks of ones, token types of zeros)."""
    from onnx import helper

    main = main_input(model)
    feed: dict[str, np.ndarray] = {}
    for inp in graph_inputs(model):
        dt = helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        if inp.name == main.name:
            feed[inp.name] = samples.astype(dt)
        elif "mask" in inp.name:
            feed[inp.name] = np.ones(samples.shape[:2], dtype=dt)
        elif "type" in inp.name or "position" in inp.name:
            ar = np.broadcast_to(np.arange(samples.shape[1]), samples.shape[:2])
            feed[inp.name] = (ar if "position" in inp.name else np.zeros_like(ar)).astype(dt)
        else:
            raise UnsupportedModelError(f"cannot fill the ONNX input {inp.name!r} for calibration")
    return feed


def _fixed_batch(model: Any) -> int | None:
    d = main_input(model).type.tensor_type.shape.dim
    return int(d[0].dim_value) if len(d) and d[0].HasField("dim_value") and d[0].dim_value > 0 else None


@dataclasses.dataclass
class OnnxRunner(Runner):
    """:class:`~prunecli.calibrate.runner.Runner` for an ONNX model (see the module docstring).

    Args:
        onnx_model: the ``onnx.ModelProto``.
        graph: its :class:`~prunecli.onnx.graph.OnnxGraph` (where each module's input is).
    """

    onnx_model: Any = None
    graph: Any = None

    def observe(
        self,
        model: nn.Module,
        requests: Sequence[Observe],
        calib: Tensor,
        *,
        propagation: str = "dense",
        after_block: AfterBlock | None = None,
        progress: Progress | None = None,
        label: str = "calibration",
    ) -> dict[Observe, Accumulator]:
        """Run ``calib`` (``[n, ...]``: token windows or input samples) through onnxruntime."""
        if propagation != "dense":
            raise UnsupportedModelError(
                "ONNX calibration runs dense propagation only (pruned propagation needs the torch model)",
                hint="use --set propagation=dense",
            )
        if not isinstance(calib, Tensor) or calib.dim() < 2 or calib.numel() == 0:
            raise DataError("calibration data must be a non-empty tensor [n, ...] of model inputs")
        requests = list(dict.fromkeys(requests))
        sites: dict[Observe, tuple[str, int]] = {}
        for r in requests:
            if r.site != "input" or r.stat not in _ONNX_STATS:
                raise UnsupportedModelError(
                    f"ONNX calibration observes module inputs ({', '.join(_ONNX_STATS)}), not {r.stat}/{r.site}"
                )
            if r.module not in self.graph.observe_sites:
                raise UnsupportedModelError(
                    f"the ONNX model has no weight op for module {r.module!r} to observe"
                )
            sites[r] = self.graph.observe_sites[r.module]
        obs: dict[Observe, Accumulator] = {r: STATISTICS[r.stat]() for r in requests}
        if not requests:
            return obs
        values = sorted({v for v, _ in sites.values()})
        session = _session(self.onnx_model, values)
        data = calib.numpy()
        per = _fixed_batch(self.onnx_model) or (
            max(1, self.batch_tokens // data.shape[1]) if np.issubdtype(data.dtype, np.integer) else 8
        )
        starts = list(range(0, data.shape[0], per))
        with resolve(progress).task(label, total=len(starts)) as task:
            for s in starts:
                got = dict(zip(values, session.run(values, batch_feed(self.onnx_model, data[s : s + per]))))
                for r, (value, axis) in sites.items():
                    x = torch.from_numpy(np.asarray(got[value], dtype=np.float32))
                    if axis != -1:
                        x = x.movedim(axis, -1)
                    obs[r].update(x)
                task.advance()
        self.log.append({"mode": "onnxruntime", "batches": len(starts)})
        return obs
