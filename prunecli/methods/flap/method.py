"""FLAP: calibration pass, scoring, structure search and bias compensation -> Plan.

The maths lives in :mod:`prunecli.methods.flap.scoring` (metrics, standardisation,
selection, bias); the streaming channel statistics are the shared
:class:`prunecli.calibrate.ChannelStats`. This module declares what FLAP observes and
assembles the plan.

Calibration: the shared runner (:mod:`prunecli.calibrate`) gathers the per-channel moments of
the *inputs* of every output projection that consumes a prunable group (``o_proj`` for heads,
``down_proj`` for MLP channels; found from the dependency graph, not from names) with dense
propagation: nothing is pruned during the pass, so each layer sees the dense outputs of the
layer before it, as in the reference code (which runs the layers one by one to fit LLaMA-65B on
a GPU; whole-model and layer-sequential runs give the same statistics and the same plan).
"""

from __future__ import annotations

import torch
from torch import nn

from prunecli.calibrate import ChannelStats, Observe, Runner
from prunecli.config import register_method
from prunecli.engine.apply import block_params
from prunecli.engine.plan import Plan
from prunecli.engine.select import selectable_groups
from prunecli.errors import DataError, UnsupportedModelError
from prunecli.graph import DependencyGraph, Group, Member
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
from prunecli.progress import Progress


def _consumer_weight(model: nn.Module, member: Member, runner: Runner) -> torch.Tensor:
    """The weight of a consumer member as ``[out, in]`` (``in`` = the sliced dim), read from
    the offloaded files when the model's blocks are not in memory."""
    w = runner.tensor(model, member.param)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or member.dim not in (0, 1):
        raise UnsupportedModelError(
            f"FLAP needs a 2-D input projection, got {member.param} with shape {tuple(member.shape)}",
            hint="prune this model with a data-free method, or add its module to --ignore",
        )
    return w if member.dim == 1 else w.t()


def _observable(model: nn.Module, group: Group) -> list[Member]:
    """Consumer members whose module takes the group's channels as the last dim of its input."""
    out = []
    for m in group.consumers():
        module = model.get_submodule(m.module)
        w = getattr(module, m.param.rsplit(".", 1)[-1], None)
        if isinstance(w, torch.Tensor) and w.dim() == 2 and m.dim in (0, 1):
            out.append(m)
    return out


def collect_stats(
    model: nn.Module,
    modules: list[str],
    calib: torch.Tensor,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> dict[str, ChannelStats]:
    """Per-input-channel moments of ``modules`` over every calibration token (dense propagation).

    Args:
        model: the model (run with ``model(input_ids=...)``).
        modules: qualified names of the modules whose inputs are observed.
        calib: token windows ``[n, seqlen]``.
        runner: the calibration runner (default: whole-model).
        progress: progress reporter.

    Returns:
        module name -> :class:`ChannelStats` of its input.
    """
    runner = runner or Runner()
    obs = runner.observe(
        model, [Observe(m, "moments") for m in modules], calib, progress=progress, label="FLAP calibration"
    )
    stats = {r.module: acc for r, acc in obs.items()}
    few = [m for m in modules if stats[m].count < 2]
    if few:
        raise DataError(
            f"FLAP needs at least 2 calibration tokens entering {few[0]}", hint="use more calibration windows"
        )
    return stats  # type: ignore[return-value]


def _candidate(
    model: nn.Module,
    graph: DependencyGraph,
    group: Group,
    consumers: list[Member],
    stats: dict[str, ChannelStats],
    config: FlapConfig,
    runner: Runner,
) -> Candidate:
    """Standardised unit scores and unit costs of one group."""
    per_consumer = []
    for m in consumers:
        w = _consumer_weight(model, m, runner)
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
    runner: Runner | None = None,
) -> dict[str, torch.Tensor]:
    """Bias deltas ``W[:, R] @ mean(x[R])`` of every output projection losing input channels.

    Args:
        model: the dense model.
        groups: the groups named in ``removals``.
        removals: group name -> removed unit indices.
        stats: input statistics of the consumer modules (from :func:`collect_stats`).
        runner: where offloaded weights are read from (default: the model's own).

    Returns:
        consumer module name -> float64 delta ``[out]`` (summed over groups sharing a module).
    """
    runner = runner or Runner()
    deltas: dict[str, torch.Tensor] = {}
    for name, removed in removals.items():
        if not removed:
            continue
        for m in _observable(model, groups[name]):
            w = _consumer_weight(model, m, runner)
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
    runner: Runner | None = None,
) -> Plan:
    """Score heads and MLP channels with FLAP and choose what to remove.

    See :mod:`prunecli.methods.flap.scoring` for the formulas and where they come from.

    Args:
        model: the dense model (not modified).
        graph: its dependency graph (``prunecli.graph.build_graph(model)``).
        config: FLAP options (metric, structure, bias compensation, sparsity, round_to, ignore).
        calib: calibration token windows ``[n, seqlen]``.
        progress: progress reporter.
        runner: the calibration runner (whole-model, layer-sequential, offloaded, distributed).

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
    runner = runner or Runner()
    stats = collect_stats(model, modules, calib, runner, progress=progress)

    cands = [_candidate(model, graph, g, consumers[g.name], stats, config, runner) for g in groups]
    total = block_params(model, graph)
    if config.structure == "AL-AM":
        removals = select_global(cands, config.sparsity * total)
    else:
        removals = select_uniform(cands, config.sparsity)

    bias_updates: dict[str, list[float]] = {}
    if config.bias_compensation:
        deltas = compensation(model, {g.name: g for g in groups}, removals, stats, runner)
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
