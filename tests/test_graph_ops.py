"""Graph patterns the tracer must lock or couple exactly (hand-built micro-networks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunecli.graph import build_graph


class _TopK(nn.Module):
    """Keeps the 4 largest activations: the survivors' channels depend on the values."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.topk(self.a(x), 4, dim=-1).values)


class _Sort(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.sort(self.a(x), dim=-1).values)


@pytest.mark.parametrize(("cls", "op"), [(_TopK, "topk"), (_Sort, "sort")])
def test_topk_and_sort_lock_their_channels(cls: type[nn.Module], op: str) -> None:
    graph = build_graph(cls(), (torch.randn(2, 8),))
    # the channels reaching topk/sort are locked, with the op named as the reason
    locked = [g for g in graph.groups.values() if any(m.param == "a.weight" for m in g.members)]
    assert locked and all(not g.prunable for g in locked)
    assert any(op in g.reason for g in locked)
    assert any(op in name for name in graph.unknown_ops)


class _HardReshape(nn.Module):
    """A view with literal sizes: the traced ids move fine, the pruned model cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).view(-1, 4, 4).flatten(1))


def test_apply_plan_probe_refuses_a_model_that_cannot_run() -> None:
    from prunecli.engine import Plan, apply_plan
    from prunecli.errors import PrunedModelError

    model = _HardReshape()
    graph = build_graph(model, (torch.randn(1, 8),))
    g = graph.prunable()[0]
    with pytest.raises(PrunedModelError, match="forward fails"):
        apply_plan(model, graph, Plan({g.name: [0, 5]}))
