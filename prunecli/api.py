"""The one public verb: :func:`prune`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from prunecli.config import MethodConfig, get_method
from prunecli.engine import Plan, PruneSummary, apply_plan
from prunecli.engine.select import selectable_groups
from prunecli.errors import DataError, UnsupportedModelError
from prunecli.graph import DependencyGraph, build_graph
from prunecli.progress import Progress, resolve


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        plan: the applied plan (replayable with ``prunecli.engine.replay_plan``).
        summary: parameter counts before/after and removed units.
        config: the method config.
        seconds: wall time of graph building, scoring and removal.
    """

    plan: Plan
    summary: PruneSummary
    config: MethodConfig
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "summary": self.summary.to_dict(),
            "seconds": self.seconds,
        }


def prune(
    model: nn.Module,
    config: MethodConfig,
    calib: torch.Tensor | None = None,
    *,
    graph: DependencyGraph | None = None,
    progress: Progress | None = None,
) -> PruneResult:
    """Prune ``model`` in place with the method that ``config`` names.

    Args:
        model: a transformers model (or a traced-compatible ``nn.Module``), unpruned.
        config: a method config, e.g. ``FlapConfig(sparsity=0.2)``.
        calib: calibration token windows ``[n, seqlen]`` for methods that need data.
        graph: a dependency graph already built for this model.
        progress: progress reporter.

    Returns:
        A :class:`PruneResult`.

    Raises:
        DataError: the method needs calibration data and none was given.
        UnsupportedModelError: the model has no prunable attention or MLP groups.

    Example:
        >>> from prunecli.methods.magnitude import MagnitudeConfig   # doctest: +SKIP
        >>> result = prune(model, MagnitudeConfig(sparsity=0.2))     # doctest: +SKIP
        >>> round(result.summary.block_sparsity, 2)                    # doctest: +SKIP
        0.2
    """
    _, fn = get_method(config.method)
    if config.needs_data and calib is None:
        raise DataError(f"method {config.method!r} needs calibration data", hint="pass --calib FILE")
    if calib is not None and (calib.dtype != torch.long or calib.dim() != 2):
        raise DataError("calibration data must be a LongTensor of token windows [n, seqlen]")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if graph is None:
        with resolve(progress).task("tracing graph", total=1) as task:
            graph = build_graph(model)
            task.advance()
    seconds["graph"] = time.perf_counter() - t0
    if not selectable_groups(graph, config.ignore):
        reasons = sorted({g.reason for g in graph.groups.values() if g.reason and g.num_units > 1})
        raise UnsupportedModelError(
            "unsupported: no prunable attention or MLP groups found"
            + (f" ({reasons[0]})" if reasons else ""),
            hint="run `prunecli graph MODEL` to see every group and why it is locked",
        )
    t1 = time.perf_counter()
    with torch.no_grad() if not getattr(fn, "needs_grad", False) else _nullcontext():
        plan = fn(model, graph, config, calib, progress=progress)
    seconds["score"] = time.perf_counter() - t1
    plan.fingerprint = graph.fingerprint
    plan.meta.update({"method": config.method, "config": config.to_dict()})
    t2 = time.perf_counter()
    summary = apply_plan(model, graph, plan)
    seconds["apply"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    return PruneResult(plan=plan, summary=summary, config=config, seconds=seconds)


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
