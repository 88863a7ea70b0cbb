"""CFSP on a model: calibration pass, coarse allocation, fine scores, plan."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import torch
from torch import nn

from prunecli.calibrate import Observe, Runner
from prunecli.config import register_method
from prunecli.engine.apply import block_params
from prunecli.engine.plan import Plan
from prunecli.errors import SparsityError, UnsupportedModelError
from prunecli.graph.groups import Group, Member
from prunecli.methods.cfsp.config import CfspConfig
from prunecli.methods.cfsp.scoring import allocate_sparsity, allocate_units, channel_importance
from prunecli.progress import Progress


@dataclasses.dataclass
class CfspScores:
    """What CFSP measured, per MLP channel group (in layer order).

    Args:
        groups: names of the scored groups.
        blocks: the block of each group.
        block_importance: mean angular distance between the block's input and output.
        sparsity: the share of each group's units to remove (real-valued, from the allocation).
        remove: units removed from each group (whole numbers, ``round_to`` honoured).
        scores: per group, the fine score of every unit (higher = more important).
    """

    groups: list[str]
    blocks: list[str]
    block_importance: list[float]
    sparsity: list[float]
    remove: list[int]
    scores: dict[str, torch.Tensor]


def _ignored(group: Group, patterns: tuple[str, ...]) -> bool:
    names = [group.module, *(m.module for m in group.members)]
    return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def block_of(model: nn.Module, module_name: str) -> str:
    """Qualified name of the repeated block holding ``module_name`` (a child of a ModuleList).

    Args:
        model: the model.
        module_name: qualified name of a module inside a block, e.g. ``model.layers.3.mlp``.
    """
    parts = module_name.split(".")
    for cut in range(len(parts), 0, -1):
        parent = ".".join(parts[: cut - 1])
        try:
            parent_mod = model.get_submodule(parent) if parent else model
        except AttributeError:
            continue
        if isinstance(parent_mod, nn.ModuleList):
            return ".".join(parts[:cut])
    raise UnsupportedModelError(
        f"module {module_name!r} is not inside a repeated block (no nn.ModuleList parent)",
        hint="CFSP needs transformer layers held in an nn.ModuleList",
    )


def collect(
    model: nn.Module,
    calib: torch.Tensor,
    blocks: list[str],
    consumers: list[str],
    *,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """What CFSP measures, from one dense calibration pass through the shared runner.

    Args:
        model: a causal LM taking ``input_ids``.
        calib: LongTensor ``[n, seqlen]`` of token windows.
        blocks: qualified names of the blocks whose mean angular distance is wanted.
        consumers: qualified names of linear modules whose input channel norms are wanted.
        runner: the calibration runner (default: whole-model).
        progress: optional progress reporter.

    Returns:
        ``(distance, act_norm)``: mean angular distance per block, and per consumer the
        float64 ``[in_features]`` root-mean-square of each input channel over all tokens.
    """
    runner = runner or Runner()
    blocks, consumers = list(dict.fromkeys(blocks)), list(dict.fromkeys(consumers))
    requests = [Observe(b, "angular", "block") for b in blocks] + [Observe(c, "sumsq") for c in consumers]
    obs = runner.observe(model, requests, calib, progress=progress, label="cfsp: calibration pass")
    distance = {b: obs[Observe(b, "angular", "block")].mean for b in blocks}
    act_norm = {c: obs[Observe(c, "sumsq")].rms.cpu() for c in consumers}
    return distance, act_norm


def _split_members(group: Group) -> tuple[Member, list[Member]]:
    consumers = [m for m in group.consumers() if len(m.shape) == 2]
    producers = [m for m in group.producers() if len(m.shape) == 2]
    if not consumers:
        raise UnsupportedModelError(
            f"group {group.name} has no linear consumer whose input columns are its channels",
            hint="CFSP scores MLP channels by the input of the down projection",
        )
    return consumers[0], producers


def _flat_index(member: Member) -> list[int]:
    return [i for unit in member.index for i in unit]


def _unit_sum(values: torch.Tensor, member: Member) -> torch.Tensor:
    """Sum per-index values (in the order of :func:`_flat_index`) into per-unit values."""
    sizes = [len(u) for u in member.index]
    if all(s == 1 for s in sizes):
        return values
    return torch.stack([chunk.sum() for chunk in torch.split(values, sizes)])


def cfsp_scores(
    model: nn.Module,
    graph: Any,
    config: CfspConfig,
    calib: torch.Tensor,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> CfspScores:
    """Measure block importances, allocate the budget and score every MLP channel.

    Args:
        model: the model to measure (unchanged).
        graph: its dependency graph (``prunecli.graph.build_graph``).
        config: CFSP options.
        calib: LongTensor ``[n, seqlen]`` of calibration token windows.
        progress: optional progress reporter.
        runner: the calibration runner (whole-model, layer-sequential, offloaded, distributed).
    """
    runner = runner or Runner()
    groups = [
        g
        for g in graph.prunable("channels")
        if g.layer is not None and g.num_units > 0 and not _ignored(g, config.ignore)
    ]
    if not groups:
        raise UnsupportedModelError(
            "CFSP found no prunable MLP channel group inside a repeated block",
            hint="check --ignore patterns; CFSP prunes the intermediate channels of transformer MLPs",
        )
    groups.sort(key=lambda g: (g.layer, g.name))
    members = [_split_members(g) for g in groups]
    blocks = [block_of(model, g.module) for g in groups]
    distance, act_norm = collect(
        model,
        calib,
        blocks,
        [c.module for c, _ in members],
        runner=runner,
        progress=progress,
    )

    importance = [distance[b] for b in blocks]
    sizes = [g.total_params() for g in groups]
    # --sparsity is a share of the attention + MLP parameters (as for every method); CFSP
    # spends all of it on MLP channels, so the MLP share removed is larger
    target = config.sparsity * block_params(model, graph)
    mlp_sparsity = target / sum(sizes)
    min_keep = [min(g.num_units, max(1, config.round_to)) for g in groups]
    max_sparsity = min(1.0 - k / g.num_units for k, g in zip(min_keep, groups, strict=True))
    if mlp_sparsity > max_sparsity:
        raise SparsityError(
            f"sparsity {config.sparsity} needs {mlp_sparsity:.3f} of the MLP parameters, which would empty "
            f"an MLP (at most {max_sparsity:.3f} with round_to={config.round_to})",
            hint="lower --sparsity or --round-to",
        )
    sparsity = allocate_sparsity(
        importance, mlp_sparsity, sizes=sizes, alpha=config.alpha, max_sparsity=max_sparsity
    )
    remove = allocate_units(
        sparsity,
        [g.num_units for g in groups],
        [g.unit_params(0) for g in groups],
        target,
        round_to=config.round_to,
    )

    scores: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for g, (cons, prods) in zip(groups, members, strict=True):
            idx = torch.tensor(_flat_index(cons), dtype=torch.long)
            w_cons = runner.tensor(model, cons.param).detach()
            w_cons = w_cons.index_select(cons.dim, idx.to(w_cons.device)).cpu()
            w_cons = w_cons if cons.dim == 1 else w_cons.t()  # (d_out, m); Conv1D stores (m, d_out)
            w_prods = []
            for p in prods:
                w = runner.tensor(model, p.param).detach()
                w = w.index_select(p.dim, torch.tensor(_flat_index(p), device=w.device)).cpu()
                w_prods.append(w if p.dim == 0 else w.t())  # (m, d_in)
            a = act_norm[cons.module].index_select(0, idx)
            per_index = channel_importance(
                w_prods, w_cons, a, criterion=config.criterion, b=config.b, c=config.c
            )
            scores[g.name] = _unit_sum(per_index, cons)
    return CfspScores(
        groups=[g.name for g in groups],
        blocks=blocks,
        block_importance=importance,
        sparsity=[float(s) for s in sparsity],
        remove=remove,
        scores=scores,
    )


def plan_from_scores(result: CfspScores, fingerprint: str = "", config: CfspConfig | None = None) -> Plan:
    """The plan that removes, in each group, its ``remove`` lowest-scoring units.

    Args:
        result: output of :func:`cfsp_scores`.
        fingerprint: the graph fingerprint to stamp on the plan.
        config: recorded in the plan's metadata when given.
    """
    removals: dict[str, list[int]] = {}
    for name, k in zip(result.groups, result.remove, strict=True):
        if k <= 0:
            continue
        s = result.scores[name]
        order = sorted(range(s.numel()), key=lambda i: (float(s[i]), i))
        removals[name] = sorted(order[:k])
    meta: dict[str, Any] = {
        "method": "cfsp",
        "block_importance": {
            b: round(float(d), 6) for b, d in zip(result.blocks, result.block_importance, strict=True)
        },
        "block_sparsity": {g: round(s, 6) for g, s in zip(result.groups, result.sparsity, strict=True)},
    }
    if config is not None:
        meta["config"] = config.to_dict()
    return Plan(removals=removals, fingerprint=fingerprint, meta=meta)


@register_method(CfspConfig)
def prune_cfsp(
    model: nn.Module,
    graph: Any,
    config: CfspConfig,
    calib: torch.Tensor,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Plan:
    """CFSP plan for ``model``: remove MLP channels, fewer in blocks that change the hidden state more.

    Args:
        model: the model (not modified).
        graph: its dependency graph.
        config: CFSP options; ``config.sparsity`` is the share of attention + MLP parameters removed,
            all of it taken from MLP channels.
        calib: LongTensor ``[n, seqlen]`` of calibration windows.
        progress: optional progress reporter.
        runner: the calibration runner.

    Example:
        >>> plan = prune_cfsp(model, build_graph(model), CfspConfig(sparsity=0.3), calib)  # doctest: +SKIP
    """
    result = cfsp_scores(model, graph, config, calib, progress=progress, runner=runner)
    return plan_from_scores(result, fingerprint=str(getattr(graph, "fingerprint", "")), config=config)
