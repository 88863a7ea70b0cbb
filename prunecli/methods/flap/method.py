"""FLAP: calibration pass, scoring, structure search and bias compensation -> Plan.

The maths lives in :mod:`prunecli.methods.flap.scoring` (metrics, standardisation,
selection, bias) and :mod:`prunecli.methods.flap.stats` (streaming channel statistics);
this module only runs the calibration pass with hooks and assembles the plan.

Calibration: the dense model runs once over the calibration windows, a mini-batch of
windows at a time, with forward pre-hooks on the *inputs* of every output projection that
consumes a prunable group (``o_proj`` for heads, ``down_proj`` for MLP channels; found from
the dependency graph, not from names). Nothing is pruned during the pass, so each layer sees
the dense outputs of the layer before it, as in the reference code (which runs the layers one
by one only to fit LLaMA-65B on a GPU; the statistics are the same). The pass stops right
after the last decoder layer that holds a hooked module, so the final norm and the LM head
are never computed. Memory is bounded by one mini-batch's activations; no layer inputs are
stored.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from prunecli.config import register_method
from prunecli.engine.apply import block_params
from prunecli.engine.plan import Plan
from prunecli.engine.select import selectable_groups
from prunecli.errors import DataError, UnsupportedModelError
from prunecli.graph import DependencyGraph, Group, Member
from prunecli.methods._calib import StopForward, stop_module
from prunecli.methods.flap.config import FlapConfig
from prunecli.methods.flap.scoring import (
    Candidate,
    bias_delta,
    channel_metric,
    removed_cost,
    select_global,
    select_uniform,
    unit_scores,
)
from prunecli.methods.flap.stats import ChannelStats
from prunecli.progress import Progress, resolve

#: tokens per calibration mini-batch (windows per batch = max(1, TOKENS_PER_BATCH // seqlen))
TOKENS_PER_BATCH = 8192


def _consumer_weight(model: nn.Module, member: Member) -> tuple[nn.Module, torch.Tensor]:
    """The module of a consumer member and its weight as ``[out, in]`` (``in`` = sliced dim)."""
    module = model.get_submodule(member.module)
    param_name = member.param.rsplit(".", 1)[-1]
    w = getattr(module, param_name, None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or member.dim not in (0, 1):
        raise UnsupportedModelError(
            f"FLAP needs a 2-D input projection, got {member.param} with shape {tuple(member.shape)}",
            hint="prune this model with a data-free method, or add its module to --ignore",
        )
    return module, (w if member.dim == 1 else w.t())


def _observable(model: nn.Module, group: Group) -> list[Member]:
    """Consumer members whose module takes the group's channels as the last dim of its input."""
    out = []
    for m in group.consumers():
        module = model.get_submodule(m.module)
        w = getattr(module, m.param.rsplit(".", 1)[-1], None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and m.dim in (0, 1):
            out.append(m)
    return out


def _check_calib(calib: Any) -> torch.Tensor:
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise DataError(
            "FLAP needs calibration token windows as a 2-D LongTensor [n, seqlen]",
            hint="pass calib=calibration_windows(...) or --calib-data to the CLI",
        )
    if calib.dtype not in (torch.int64, torch.int32):
        raise DataError(f"calibration windows must hold token ids, got dtype {calib.dtype}")
    return calib.long()


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    modules: list[str],
    calib: torch.Tensor,
    stop_after: nn.Module | None = None,
    batch_windows: int | None = None,
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """Per-input-channel statistics of ``modules`` over every calibration token (one dense pass).

    Args:
        model: the model (run with ``model(input_ids=...)``).
        modules: qualified names of the modules whose inputs are observed.
        calib: token windows ``[n, seqlen]``.
        stop_after: module after which the forward pass is cut short (``None``: run it all).
        batch_windows: windows per forward pass (default: about 8192 tokens per pass).
        progress: progress reporter.

    Returns:
        module name -> :class:`ChannelStats` of its input.
    """
    calib = _check_calib(calib)
    n, seqlen = calib.shape
    bw = batch_windows or max(1, TOKENS_PER_BATCH // seqlen)
    stats: dict[str, ChannelStats] = {}
    handles = []

    def observe(name: str):
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if name not in stats:
                stats[name] = ChannelStats(x.shape[-1])
            stats[name].update(x)

        return hook

    def stop(_mod: nn.Module, _args: Any, _out: Any) -> None:
        raise StopForward

    for name in modules:
        handles.append(model.get_submodule(name).register_forward_pre_hook(observe(name)))
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    kwargs: dict[str, Any] = {}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    was_training = model.training
    model.eval()
    try:
        with resolve(progress).task("FLAP calibration", total=(n + bw - 1) // bw) as task:
            for i in range(0, n, bw):
                try:
                    model(input_ids=calib[i : i + bw].to(device), **kwargs)
                except StopForward:
                    pass
                task.advance()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    missing = [m for m in modules if m not in stats or stats[m].count < 2]
    if missing:
        raise UnsupportedModelError(
            f"FLAP saw no calibration activations entering {missing[0]}",
            hint="the module is not called by model(input_ids=...); add it to --ignore",
        )
    return stats


def _candidate(
    model: nn.Module,
    graph: DependencyGraph,
    group: Group,
    consumers: list[Member],
    stats: dict[str, ChannelStats],
    config: FlapConfig,
) -> Candidate:
    """Standardised unit scores and unit costs of one group."""
    per_consumer = []
    for m in consumers:
        _, w = _consumer_weight(model, m)
        s = stats[m.module]
        raw = channel_metric(config.metric, w, var=s.var, mean_sq=s.mean_sq)
        per_consumer.append(unit_scores(raw, m.index, square=group.kind == "heads"))
    scores = torch.stack(per_consumer).mean(dim=0)
    parent_of, parent_cost = None, 0
    if group.kind == "heads" and group.parent is not None and group.parent_of is not None:
        parent = graph.groups[group.parent]
        parent_of = list(group.parent_of)
        parent_cost = parent.unit_params(0)
    return Candidate(
        name=group.name,
        kind="heads" if group.kind == "heads" else "channels",
        scores=scores,
        unit_cost=[group.unit_params(u) for u in range(group.num_units)],
        parent_of=parent_of,
        parent_cost=parent_cost,
        round_to=config.round_to,
    )


def compensation(
    model: nn.Module,
    groups: dict[str, Group],
    removals: dict[str, list[int]],
    stats: dict[str, ChannelStats],
) -> dict[str, torch.Tensor]:
    """Bias deltas ``W[:, R] @ mean(x[R])`` of every output projection losing input channels.

    Args:
        model: the dense model.
        groups: the groups named in ``removals``.
        removals: group name -> removed unit indices.
        stats: input statistics of the consumer modules (from :func:`collect_stats`).

    Returns:
        consumer module name -> float64 delta ``[out]`` (summed over groups sharing a module).
    """
    deltas: dict[str, torch.Tensor] = {}
    for name, removed in removals.items():
        if not removed:
            continue
        for m in _observable(model, groups[name]):
            _, w = _consumer_weight(model, m)
            channels = [c for u in removed for c in m.index[u]]
            d = bias_delta(w, stats[m.module].mean, channels)
            deltas[m.module] = deltas[m.module] + d if m.module in deltas else d
    return deltas


@register_method(FlapConfig)
def prune_flap(
    model: nn.Module,
    graph: DependencyGraph,
    config: FlapConfig,
    calib: torch.Tensor | None,
    progress: Progress | None = None,
) -> Plan:
    """Score heads and MLP channels with FLAP and choose what to remove.

    See :mod:`prunecli.methods.flap.scoring` for the formulas and where they come from.

    Args:
        model: the dense model (not modified).
        graph: its dependency graph (``prunecli.graph.build_graph(model)``).
        config: FLAP options (metric, structure, bias compensation, sparsity, round_to, ignore).
        calib: calibration token windows ``[n, seqlen]``.
        progress: progress reporter.

    Returns:
        a :class:`Plan` with the removals and, with ``bias_compensation``, the bias deltas of
        every output projection that loses input channels.

    Example:
        >>> graph = build_graph(model)                                          # doctest: +SKIP
        >>> plan = prune_flap(model, graph, FlapConfig(sparsity=0.2), windows)  # doctest: +SKIP
        >>> apply_plan(model, graph, plan)                                      # doctest: +SKIP
    """
    if calib is None:
        raise DataError("FLAP needs calibration data", hint="pass --calib-data (e.g. a text file)")
    groups = [g for g in selectable_groups(graph, config.ignore) if g.num_units > 1]
    consumers = {g.name: _observable(model, g) for g in groups}
    skipped = sorted(g.name for g in groups if not consumers[g.name])
    groups = [g for g in groups if consumers[g.name]]
    if not groups:
        raise UnsupportedModelError(
            "FLAP found no attention heads or MLP channels whose output projection it can observe",
            hint="use a data-free method such as magnitude for this model",
        )
    modules = sorted({m.module for g in groups for m in consumers[g.name]})
    stats = collect_stats(model, modules, calib, stop_module(model, set(modules)), progress=progress)

    cands = [_candidate(model, graph, g, consumers[g.name], stats, config) for g in groups]
    total = block_params(model, graph)
    if config.structure == "AL-AM":
        removals = select_global(cands, config.sparsity * total)
    else:
        removals = select_uniform(cands, config.sparsity)

    bias_updates: dict[str, list[float]] = {}
    if config.bias_compensation:
        deltas = compensation(model, {g.name: g for g in groups}, removals, stats)
        bias_updates = {k: v.tolist() for k, v in deltas.items()}

    removed = removed_cost(cands, removals)
    return Plan(
        removals=removals,
        bias_updates=bias_updates,
        fingerprint=getattr(graph, "fingerprint", ""),
        meta={
            "method": "flap",
            "metric": config.metric,
            "structure": config.structure,
            "sparsity": config.sparsity,
            "bias_compensation": config.bias_compensation,
            "calib_tokens": int(calib.numel()),
            "block_params": total,
            "removed_params": removed,
            "achieved_sparsity": removed / total if total else 0.0,
            "skipped_groups": skipped,
        },
    )
