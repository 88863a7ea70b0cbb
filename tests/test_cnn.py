"""Grouped and depthwise convolutions: exact removal and consistent ``groups``."""

from __future__ import annotations

import pytest
import torch
from archs import mobile_cnn
from test_engine import random_plan

from prunecli.engine import apply_plan, zero_units
from prunecli.graph import build_graph

_X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _graph(model):
    return build_graph(model, (_X[:1],))


def test_depthwise_and_grouped_couplings() -> None:
    graph = _graph(mobile_cnn())
    by_param: dict[str, list] = {}
    for g in graph.groups.values():
        for m in g.members:
            by_param.setdefault(m.param, []).append((g, m))
    # depthwise: channel i of the expand conv is channel i of the depthwise conv
    (g, exp), *_ = [(g, m) for g, m in by_param["block1.expand.weight"] if m.dim == 0]
    dw = [m for m in g.members if m.param == "block1.dw.weight" and m.dim == 0][0]
    assert g.prunable and exp.index == dw.index
    # multiplier 2: input channel c goes with output channels 2c and 2c+1 (the grouped
    # conv after it further ties positions c, c+8, c+16, c+24 of its input)
    dw2 = [m for g, m in by_param["dw2.weight"] if m.dim == 0][0]
    for ix in dw2.index:
        assert sorted(ix) == sorted(r for c in {i // 2 for i in ix} for r in (2 * c, 2 * c + 1))
    assert dw2.index[0] == [0, 1, 8, 9, 16, 17, 24, 25]
    # general groups (4 groups, 6 outputs each): one unit is a position in every group
    out = [(g, m) for g, m in by_param["grouped.weight"] if m.dim == 0][0]
    assert out[0].prunable and out[1].index[0] == [0, 6, 12, 18]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zeroed_units_removed_exactly(seed: int) -> None:
    model = mobile_cnn(seed)
    graph = _graph(model)
    plan = random_plan(graph, 0.3, seed=seed)
    assert {"block1.dw.weight", "dw2.weight", "grouped.weight"} <= {
        m.param for name in plan.removals for m in graph[name].members
    }
    zero_units(model, graph, plan.removals)
    ref = model(_X)
    apply_plan(model, graph, plan)
    torch.testing.assert_close(model(_X), ref, atol=1e-5, rtol=0)
    for conv in (model.block1.dw, model.block2.dw):
        assert conv.groups == conv.in_channels == conv.out_channels == conv.weight.shape[0]
    assert model.dw2.out_channels == 2 * model.dw2.groups == 2 * model.dw2.in_channels
    assert model.grouped.groups == 4 and model.grouped.in_channels == 4 * model.grouped.weight.shape[1]


@pytest.mark.parametrize("seed", [3, 4, 5, 6])
def test_random_30_percent_plans_run(seed: int) -> None:
    model = mobile_cnn(seed)
    graph = _graph(model)
    summary = apply_plan(model, graph, random_plan(graph, 0.3, seed=seed))
    assert summary.params_after < summary.params_before
    assert model(_X).shape == (2, 10)
