"""Magnitude baseline: a unit's score is the L2 norm of every weight it owns.

Score of unit u = sqrt(sum over the group's weight members of ||W[slice(u)]||^2): the
rows it produces and the columns it consumes (biases and norm weights are left out).
Uniform per-layer sparsity. Needs no data.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.calibrate import Runner
from prunecli.config import MethodConfig, register_method
from prunecli.engine import Plan, select_uniform
from prunecli.engine.select import selectable_groups
from prunecli.graph import DependencyGraph, Group
from prunecli.progress import Progress


@dataclasses.dataclass(frozen=True)
class MagnitudeConfig(MethodConfig):
    """Remove the units with the smallest weight norm, the same fraction in every block."""

    method = "magnitude"


def unit_weight_norms(model: nn.Module, group: Group, params: Mapping[str, Tensor] | Any = None) -> Tensor:
    """Per-unit L2 norm over the group's producer and consumer weight slices.

    Args:
        model: the model.
        group: the group to score.
        params: ``name -> tensor`` (anything indexable; default: the model's parameters).
    """
    params = params if params is not None else dict(model.named_parameters(remove_duplicate=False))
    total = torch.zeros(group.num_units, dtype=torch.float64)
    for m in group.members:
        if m.role not in ("producer", "consumer"):
            continue
        w = params[m.param].detach()
        other = [d for d in range(w.dim()) if d != m.dim]
        sq = torch.linalg.vector_norm(w, dim=other, dtype=torch.float64).pow(2)  # per index along m.dim
        total += unit_sums(sq, m.index)
    return total.sqrt()


def unit_sums(values: Tensor, index: list[list[int]]) -> Tensor:
    """``out[u] = values[index[u]].sum()`` for every unit, in one scatter (on the CPU)."""
    values = values.detach().cpu()
    lengths = torch.tensor([len(ix) for ix in index], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(index)), lengths)
    flat = torch.tensor(list(itertools.chain.from_iterable(index)), dtype=torch.long)
    out = torch.zeros(len(index), dtype=values.dtype)
    return out.index_add_(0, owner, values[flat])


@register_method(MagnitudeConfig)
def prune_magnitude(
    model: nn.Module,
    graph: DependencyGraph,
    config: MagnitudeConfig,
    calib: Tensor | None = None,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Plan:
    """Magnitude plan (data-free); weights of offloaded blocks are read one tensor at a time."""
    params = (runner or Runner()).tensors(model)
    scores = {g.name: unit_weight_norms(model, g, params) for g in selectable_groups(graph, config.ignore)}
    return select_uniform(graph, scores, config.sparsity, round_to=config.round_to, ignore=config.ignore)
