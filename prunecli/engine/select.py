"""From unit scores to a legal plan under a parameter budget.

Methods return ``scores[group_name] -> Tensor[num_units]`` (higher = keep).
:func:`select_uniform` spends the budget uniformly: every block (each layer's attention,
each layer's MLP) loses the same fraction of its parameters. Methods with their own
allocation across blocks (FLAP's global threshold, CFSP's block budgets) use the same cost
model, :class:`HeadLayout` and the groups' ``unit_params``.

Cost accounting is in parameters, computed from the group shapes, so a query head, a
key/value head and an MLP channel each cost what they really remove in this
architecture. With grouped-query attention a layer keeps ``g`` key/value heads with ``r``
query heads each (transformers repeats every key/value head the same number of times);
:func:`choose_heads` picks the best such ``(g, r)`` for a target.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from prunecli.engine.apply import ExpertRouting
from prunecli.engine.plan import Plan
from prunecli.graph import DependencyGraph, Group


def _ignored(g: Group, ignore: tuple[str, ...]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(g.module, pat) or fnmatch.fnmatch(g.name, pat) for pat in ignore)


def selectable_groups(graph: DependencyGraph, ignore: tuple[str, ...] = ()) -> list[Group]:
    """Prunable head and channel groups inside layers (the prunable blocks).

    A model without repeated layers (a plain CNN) has no blocks in that sense: all of its
    prunable groups are selectable.
    """
    groups = [g for g in graph.prunable() if g.kind in ("heads", "channels") and not _ignored(g, ignore)]
    if any(g.layer is not None for g in groups):
        groups = [g for g in groups if g.layer is not None]
    return groups


class HeadLayout:
    """Cost model of one head group and its key/value parent group."""

    def __init__(self, graph: DependencyGraph, g: Group) -> None:
        self.group = g
        self.kv = graph.groups[g.parent] if g.parent else None
        self.q_cost = g.unit_params(0)
        self.kv_cost = self.kv.unit_params(0) if self.kv else 0
        if self.kv is not None and g.parent_of is not None:
            self.children: dict[int, list[int]] = defaultdict(list)
            for u, p in enumerate(g.parent_of):
                self.children[p].append(u)
        else:
            self.children = {u: [u] for u in range(g.num_units)}
        self.num_kv = len(self.children)
        self.rep = g.num_units // self.num_kv

    def total(self) -> int:
        return self.group.num_units * self.q_cost + self.num_kv * self.kv_cost

    def kept_cost(self, g: int, r: int) -> int:
        return g * r * self.q_cost + g * self.kv_cost

    def removal(self, scores: Tensor, g: int, r: int) -> list[int]:
        """Keep the best ``g`` key/value heads with their best ``r`` query heads each."""
        best: list[tuple[float, int, list[int]]] = []
        for p, cs in self.children.items():
            order = sorted(cs, key=lambda u: -float(scores[u]))[:r]
            best.append((sum(float(scores[u]) for u in order), p, order))
        best.sort(key=lambda t: -t[0])
        keep = {u for _, _, order in best[:g] for u in order}
        return [u for u in range(self.group.num_units) if u not in keep]

    def options(self, round_to: int = 1) -> list[tuple[int, int]]:
        opts = [(g, r) for g in range(1, self.num_kv + 1) for r in range(1, self.rep + 1)]
        rounded = [(g, r) for g, r in opts if (g * r) % round_to == 0]
        return rounded or opts


def choose_heads(layout: HeadLayout, scores: Tensor, target_kept: float, round_to: int = 1) -> list[int]:
    """Removal for a head group whose kept cost is closest to ``target_kept`` parameters."""
    best = None
    for g, r in layout.options(round_to):
        cost = layout.kept_cost(g, r)
        key = (abs(cost - target_kept), -g * r)
        if best is None or key < best[0]:
            best = (key, g, r)
    assert best is not None
    return layout.removal(scores, best[1], best[2])


def _lowest(scores: Tensor, n_remove: int) -> list[int]:
    if n_remove <= 0:
        return []
    order = torch.argsort(scores.float(), stable=True)
    return sorted(int(i) for i in order[:n_remove])


def select_uniform(
    graph: DependencyGraph,
    scores: dict[str, Tensor],
    sparsity: float,
    *,
    round_to: int = 1,
    ignore: tuple[str, ...] = (),
) -> Plan:
    """Every block loses ``sparsity`` of its parameters; lowest scores go first.

    Args:
        graph: the model's dependency graph.
        scores: group name -> per-unit importance (higher = keep).
        sparsity: fraction of each block's parameters to remove.
        round_to: keep widths multiples of this.
        ignore: module/group name patterns left untouched.
    """
    removals: dict[str, list[int]] = {}
    for g in selectable_groups(graph, ignore):
        s = scores.get(g.name)
        if s is None:
            continue
        if g.kind == "heads":
            layout = HeadLayout(graph, g)
            removals[g.name] = choose_heads(layout, s, (1 - sparsity) * layout.total(), round_to)
        else:
            keep = _round_keep(g.num_units, (1 - sparsity) * g.num_units, round_to)
            removals[g.name] = _lowest(s, g.num_units - keep)
    return Plan(removals, fingerprint=graph.fingerprint, meta={"selection": "uniform", "sparsity": sparsity})


def _round_keep(n: int, target: float, round_to: int) -> int:
    """Units to keep: nearest multiple of ``round_to`` to ``target``, at least one step, at most n."""
    step = max(1, round_to)
    keep = int(round(target / step)) * step
    return min(n, max(step, keep))


def legal_expert_keep(target: int, routing: ExpertRouting) -> int:
    """Experts to keep in one MoE block: ``target`` made legal for its routing.

    Without group-limited routing: between 1 and all experts (the engine lowers experts per
    token when fewer are left). With ``G`` expert groups of which ``topk_groups`` are chosen
    per token (DeepSeek): the same number ``p`` in every group, ``p >= 2`` (each group is
    scored by its best two experts) and ``p * topk_groups >= top_k``.

    Example:
        >>> from prunecli.engine.apply import ExpertRouting
        >>> legal_expert_keep(3, ExpertRouting("b:experts", 0, 8, 2, groups=2, topk_groups=1))
        4
    """
    n = routing.num_experts
    if routing.groups <= 1:
        return min(n, max(1, int(target)))
    size = n // routing.groups
    low = max(2, -(-routing.top_k // max(1, routing.topk_groups)))
    per = min(size, max(low, int(round(target / routing.groups))))
    return per * routing.groups


def _keep_best(scores: Tensor, keep: int, routing: ExpertRouting) -> list[int]:
    """Removal list keeping the ``keep`` best experts (the same number per routing group)."""
    n = routing.num_experts
    groups = max(1, routing.groups)
    size, per = n // groups, keep // groups
    removed: list[int] = []
    for i in range(groups):
        lo = i * size
        order = torch.argsort(scores[lo : lo + size].double(), descending=True, stable=True)
        removed += sorted(lo + int(u) for u in order[per:])
    return sorted(removed)


def select_experts(
    scores: dict[str, Tensor],
    keep: dict[str, int],
    routing: dict[str, ExpertRouting],
    *,
    selection: str = "layer",
) -> dict[str, list[int]]:
    """Which experts of each MoE block to remove.

    Args:
        scores: ``experts`` group name -> score per expert (higher = keep).
        keep: group name -> experts to keep (made legal with :func:`legal_expert_keep`).
        routing: group name -> its :class:`~prunecli.engine.apply.ExpertRouting`.
        selection: ``layer`` (the same number kept in every block, as EASY-EP does) or
            ``global`` (prunecli's variant, not in the paper: each block's scores are
            normalised to sum to 1, one threshold over all blocks keeps as many experts in
            total as ``layer`` would, each block keeping at least its legal minimum).

    Returns:
        group name -> sorted indices of the experts to remove.
    """
    names = [n for n in keep if n in scores]
    counts = {n: legal_expert_keep(keep[n], routing[n]) for n in names}
    if selection == "global" and names:
        norm = {n: _normalised(scores[n]) for n in names}
        budget = sum(counts.values())
        pooled = torch.cat([norm[n] for n in names])
        order = torch.argsort(pooled, descending=True, stable=True)
        chosen = torch.zeros_like(pooled, dtype=torch.bool)
        chosen[order[:budget]] = True
        start = 0
        for n in names:
            k = int(chosen[start : start + routing[n].num_experts].sum())
            start += routing[n].num_experts
            counts[n] = legal_expert_keep(max(1, k), routing[n])
    elif selection != "layer":
        raise ValueError(f"unknown expert selection {selection!r}")
    return {n: _keep_best(scores[n], counts[n], routing[n]) for n in names}


def _normalised(s: Tensor) -> Tensor:
    """``s / s.sum()`` (uniform when the sum is not positive)."""
    s = s.double().clamp(min=0)
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1.0 / max(1, s.numel()))
