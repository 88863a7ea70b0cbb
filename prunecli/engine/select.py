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
