"""The one public verb: :func:`prune`."""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from typing import Any

import torch
from torch import nn

from prunecli.calibrate import Runner
from prunecli.config import MethodConfig, get_method
from prunecli.engine import Plan, PruneSummary, apply_plan
from prunecli.engine.apply import check_supported
from prunecli.engine.select import _ignored, selectable_groups
from prunecli.errors import DataError, UnsupportedModelError
from prunecli.graph import DependencyGraph, build_graph
from prunecli.methods._budget import all_block_params, group_cost, largest_step
from prunecli.progress import Progress, resolve


class SparsityWarning(UserWarning):
    """The achieved sparsity differs from the requested one by more than one removal step."""


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` did.

    Attributes:
        plan: the applied plan (replayable with ``prunecli.engine.replay_plan``).
        summary: parameter counts before/after and removed units (the engine's count of the
            prunable blocks).
        config: the method config.
        seconds: wall time of graph building, scoring and removal.
        block_params_before / block_params_after: parameters of every attention + MLP block,
            prunable or locked (what ``sparsity`` is a fraction of).
        achieved_sparsity: ``1 - block_params_after / block_params_before``.
        warnings: messages about the result (also issued as :class:`SparsityWarning`).
    """

    plan: Plan
    summary: PruneSummary
    config: MethodConfig
    seconds: dict[str, float]
    block_params_before: int = 0
    block_params_after: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.block_params_after / max(1, self.block_params_before)

    def to_dict(self) -> dict[str, Any]:
        if getattr(self.config, "units", "blocks") == "experts":
            kept = {k: v for k, v in self.summary.layers.items() if "experts" in v}
            return {
                "method": self.config.method,
                "config": self.config.to_dict(),
                "summary": self.summary.to_dict(),
                "experts": {
                    str(k): {"kept": v["experts"], "before": v["experts_before"]} for k, v in kept.items()
                },
                "warnings": list(self.warnings),
                "seconds": self.seconds,
            }
        return {
            "method": self.config.method,
            "config": self.config.to_dict(),
            "summary": self.summary.to_dict(),
            "sparsity": {
                "target": self.config.sparsity,
                "achieved": self.achieved_sparsity,
                "block_params_before": self.block_params_before,
                "block_params_after": self.block_params_after,
            },
            "warnings": list(self.warnings),
            "seconds": self.seconds,
        }


def sparsity_warning(
    target: float, achieved: float, step: int, total: int, prunable: int, method: str = ""
) -> str | None:
    """The warning for a result that misses ``target`` by more than one step, else ``None``.

    Args:
        target: requested fraction of all attention + MLP parameters.
        achieved: removed fraction of them.
        step: parameters of the coarsest legal removal step (see ``largest_step``).
        total: parameters of all attention + MLP blocks.
        prunable: parameters of the groups the method may prune.
        method: method name for the message.

    Example:
        >>> sparsity_warning(0.2, 0.146, 100, 10_000, 7_300, "magnitude")[:31]
        'magnitude removed 0.1460 of the'
    """
    if total <= 0 or abs(achieved - target) <= step / total + 1e-9:
        return None
    msg = f"{method + ' ' if method else ''}removed {achieved:.4f} of the attention + MLP parameters, asked {target:g}"
    if prunable < 0.99 * total:  # output biases and norms inside blocks are never a unit's
        msg += (
            f"; only {prunable / total:.1%} of them are in groups it may prune (the others are locked "
            "or excluded by --ignore)"
        )
    else:
        msg += "; the legal widths (grouped-query heads, --round-to) are coarser than the target"
    return msg


def prune(
    model: nn.Module,
    config: MethodConfig,
    calib: torch.Tensor | list[torch.Tensor] | None = None,
    *,
    graph: DependencyGraph | None = None,
    progress: Progress | None = None,
    runner: Runner | None = None,
    refit: bool = False,
    task: Any = None,
) -> PruneResult:
    """Prune ``model`` in place with the method that ``config`` names.

    Args:
        model: a transformers model (or a traced-compatible ``nn.Module``), unpruned.
        config: a method config, e.g. ``FlapConfig(sparsity=0.2)``.
        calib: calibration token windows ``[n, seqlen]`` for methods that need data (expert
            methods: demonstration windows, or a list with one tensor per domain for
            mixed-domain selection).
        graph: a dependency graph already built for this model.
        progress: progress reporter.
        runner: the calibration runner (:class:`prunecli.calibrate.Runner`): whole-model or
            layer-sequential, offloaded weights, data-parallel; default whole-model.
        refit: after the method has chosen, refit every projection that loses input columns
            by least squares on ``calib`` (:mod:`prunecli.refit`); works with every method.
        task: a labelled task (:class:`prunecli.tasks.TaskData`) for methods that fine-tune on
            one (``shrp``, ``michel``); their model must be a sequence classifier.

    Returns:
        A :class:`PruneResult`. When the removed share of all attention + MLP parameters
        misses ``config.sparsity`` by more than one removal step (locked or ignored groups,
        coarse legal widths), the result carries a warning and a :class:`SparsityWarning`
        is issued.

    Raises:
        DataError: the method needs calibration data and none was given.
        UnsupportedModelError: the model has no prunable attention or MLP groups.

    Example:
        >>> from prunecli.methods.magnitude import MagnitudeConfig   # doctest: +SKIP
        >>> result = prune(model, MagnitudeConfig(sparsity=0.2))     # doctest: +SKIP
        >>> round(result.achieved_sparsity, 2)                         # doctest: +SKIP
        0.2
    """
    _, fn = get_method(config.method)
    if getattr(config, "needs_task", False) and task is None:
        raise DataError(
            f"method {config.method!r} needs a labelled task", hint="pass --task FILE --label-field NAME"
        )
    if config.needs_data and calib is None:
        raise DataError(f"method {config.method!r} needs calibration data", hint="pass --calib FILE")
    if refit and calib is None:
        raise DataError("refit needs calibration data", hint="pass calibration windows (--calib FILE)")
    experts = getattr(config, "units", "blocks") == "experts"  # expert methods: keep_experts, not sparsity
    for windows in calib if experts and isinstance(calib, (list, tuple)) else [calib]:
        if windows is not None and (windows.dtype != torch.long or windows.dim() != 2):
            raise DataError("calibration data must be a LongTensor of token windows [n, seqlen]")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    weights = runner.weights if runner is not None else None
    if graph is None:
        with resolve(progress).task("tracing graph", total=1) as bar:
            if weights is not None:
                from prunecli.calibrate.offload import build_graph_offloaded

                graph = build_graph_offloaded(model, weights)
            else:
                graph = build_graph(model)
            bar.advance()
    seconds["graph"] = time.perf_counter() - t0
    selectable = (
        [g for g in graph.prunable("experts") if not _ignored(g, config.ignore)]
        if experts
        else selectable_groups(graph, config.ignore)
    )
    if not selectable:
        reasons = sorted({g.reason for g in graph.groups.values() if g.reason and g.num_units > 1})
        raise UnsupportedModelError(
            "unsupported: no prunable attention or MLP groups found"
            + (f" ({reasons[0]})" if reasons else ""),
            hint="run `prunecli graph MODEL` to see every group and why it is locked",
        )
    # refuse an architecture whose widths the engine cannot record before any calibration work
    check_supported(model, graph, {g.name: [] for g in selectable})
    t1 = time.perf_counter()
    with torch.no_grad() if not getattr(fn, "needs_grad", False) else _nullcontext():
        kwargs: dict[str, Any] = {"progress": progress}
        if "runner" in inspect.signature(fn).parameters:  # data-free methods without it read no weights
            kwargs["runner"] = runner or Runner()
        if "task" in inspect.signature(fn).parameters:
            kwargs["task"] = task
        plan = fn(model, graph, config, calib, **kwargs)
    seconds["score"] = time.perf_counter() - t1
    if refit and "refit" not in plan.meta:  # tyr refits its own candidates
        from prunecli.refit import refit_plan

        t_refit = time.perf_counter()
        with torch.no_grad():
            refit_plan(model, graph, plan, calib, runner=runner, progress=progress)
        seconds["refit"] = time.perf_counter() - t_refit
    plan.fingerprint = graph.fingerprint
    plan.meta.update({"method": config.method, "config": config.to_dict()})
    t2 = time.perf_counter()
    total = all_block_params(model, graph)  # every attention + MLP block, locked ones included
    prunable = sum(group_cost(graph, g) for g in selectable)
    step = largest_step(graph, selectable, config.round_to)
    summary = apply_plan(model, graph, plan, deferred=weights)
    after = all_block_params(model, graph)
    if plan.meta.get("drop_layers"):  # whole layers (encoder layer dropping), after the heads
        after -= _drop_layers(model, summary, plan.meta["drop_layers"])
    seconds["apply"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    if total == 0:  # no repeated layers (a plain CNN): the whole model is the block
        total, after = summary.params_before, summary.params_after
        prunable = total
    result = PruneResult(
        plan=plan,
        summary=summary,
        config=config,
        seconds=seconds,
        block_params_before=total,
        block_params_after=after,
    )
    msg = (
        None
        if experts
        else sparsity_warning(config.sparsity, result.achieved_sparsity, step, total, prunable, config.method)
    )
    if getattr(config, "sparsity_unit", "params") == "heads":  # a share of heads, not of parameters
        msg = None
    if msg is not None:
        result.warnings.append(msg)
        warnings.warn(msg, SparsityWarning, stacklevel=2)
    return result


def _drop_layers(model: nn.Module, summary: PruneSummary, layers: list[int]) -> int:
    """Remove whole layers after the plan; returns the attention + MLP parameters they held."""
    from prunecli.checkpoint.modeling_prunecli import find_decoder_layers
    from prunecli.engine.layers import drop_layers

    _, layer_list = find_decoder_layers(model, model.config.num_hidden_layers)
    dropped = sum(
        p.numel()
        for i in set(layers)
        for m in layer_list[i].modules()
        if isinstance(m, nn.Linear)
        for p in m.parameters(recurse=False)
    )
    drop_layers(model, layers)
    if hasattr(summary, "params_after"):
        summary.params_after = sum(p.numel() for p in model.parameters())
    return dropped


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
