"""What ``sparsity`` is a fraction of, and what one selectable group costs.

``--sparsity s`` means: remove ``s`` of the parameters of every attention and MLP block of
every layer (FLAP's definition). The denominator counts the blocks whether or not their
groups may be pruned: a locked attention (an unsupported pattern) or an ``ignore`` pattern
changes what can be removed, not what the fraction refers to.
"""

from __future__ import annotations

from torch import nn

from prunecli.engine.apply import block_params
from prunecli.engine.select import HeadLayout
from prunecli.graph import DependencyGraph, Group


def all_block_params(model: nn.Module, graph: DependencyGraph) -> int:
    """Parameters of every attention + MLP block in the layers, prunable or locked.

    Counts every parameter of a module holding a producer or consumer slice of a head,
    key/value-head or channel group inside a layer (tied parameters once).

    Args:
        model: the model the graph was built from.
        graph: its dependency graph.
    """
    return block_params(model, graph, include_locked=True)


def group_cost(graph: DependencyGraph, group: Group) -> int:
    """Parameters a uniform selection can take from ``group`` (a head group with its key/value heads)."""
    if group.kind == "heads":
        return HeadLayout(graph, group).total()
    return group.total_params()


def largest_step(graph: DependencyGraph, groups: list[Group], round_to: int = 1) -> int:
    """Parameters of the coarsest legal removal step among ``groups`` (the "one unit" tolerance).

    A channel group moves ``round_to`` channels at a time; a head group with grouped-query
    attention may have to move a whole key/value head with its query heads.

    Args:
        graph: the dependency graph.
        groups: the groups a method may prune.
        round_to: the method's ``round_to``.
    """
    step = 0
    for g in groups:
        if g.num_units == 0:
            continue
        if g.kind == "heads":
            layout = HeadLayout(graph, g)
            step = max(step, layout.kv_cost + layout.rep * layout.q_cost, round_to * layout.q_cost)
        else:
            step = max(step, min(round_to, g.num_units) * g.unit_params(0))
    return step
