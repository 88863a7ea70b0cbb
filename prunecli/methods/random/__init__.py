"""Random baseline: units drawn uniformly at random (seeded), uniform per-layer sparsity."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from prunecli.config import MethodConfig, register_method
from prunecli.engine import Plan, select_uniform
from prunecli.engine.select import selectable_groups
from prunecli.graph import DependencyGraph


@dataclasses.dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """Remove a random subset of units (``seed`` fixes it), the same fraction in every block."""

    method = "random"


@register_method(RandomConfig)
def prune_random(
    model: nn.Module, graph: DependencyGraph, config: RandomConfig, calib: Tensor | None = None, progress=None
) -> Plan:
    gen = torch.Generator().manual_seed(config.seed)
    scores = {g.name: torch.rand(g.num_units, generator=gen) for g in selectable_groups(graph, config.ignore)}
    return select_uniform(graph, scores, config.sparsity, round_to=config.round_to, ignore=config.ignore)
