"""Hand-computed scores of the baselines and the shared input norms, and a per-method check that
a unit whose weights are all zero is the first to go."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_llama
from torch import nn

from prunecli.calibrate import Observe, Runner
from prunecli.graph import Group, Member, build_graph
from prunecli.methods.magnitude import unit_weight_norms
from prunecli.methods.random import RandomConfig, prune_random
from prunecli.methods.wanda_sp import wanda_sp_scores


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


# ---------------------------------------------------------------- magnitude


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(2, 3, bias=False)
        self.down = nn.Linear(3, 2, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 3.0], [4.0, 0.0]]))
            self.down.weight.copy_(torch.tensor([[1.0, 0.0, 2.0], [2.0, 1.0, 1.0]]))


def _mlp_group(index: list[list[int]]) -> Group:
    return Group(
        name="mlp:channels",
        kind="channels",
        module="",
        layer=0,
        num_units=len(index),
        members=[
            Member(param="up.weight", dim=0, index=index, role="producer", module="up", shape=(3, 2)),
            Member(param="down.weight", dim=1, index=index, role="consumer", module="down", shape=(2, 3)),
        ],
    )


def test_magnitude_scores_hand_computed() -> None:
    model = _TwoLinears()
    # rows of up: 1+4, 0+9, 16+0; columns of down: 1+4, 0+1, 4+1
    s = unit_weight_norms(model, _mlp_group([[0], [1], [2]]))
    assert torch.allclose(s, torch.tensor([10.0, 10.0, 21.0], dtype=torch.float64).sqrt())
    # a unit owning two channels: the norm over all of its weights
    s = unit_weight_norms(model, _mlp_group([[0, 1], [2]]))
    assert torch.allclose(s, torch.tensor([20.0, 21.0], dtype=torch.float64).sqrt())


# ---------------------------------------------------------------- wanda-sp and the shared input norms


def test_wanda_sp_scores_hand_computed() -> None:
    w = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -0.5]])  # (out=2, in=3)
    sq = torch.tensor([4.0, 9.0, 16.0])  # summed x_j^2 -> ||X_j|| = 2, 3, 4
    # column |W| sums 4, 2, 1 times 2, 3, 4
    assert wanda_sp_scores(w, sq, [[0], [1], [2]]).tolist() == pytest.approx([8.0, 6.0, 4.0])
    assert wanda_sp_scores(w, sq, [[0, 2], [1]]).tolist() == pytest.approx([12.0, 6.0])


class _EmbedLinear(nn.Module):
    """Takes input_ids like a causal LM; the linear sees the embeddings."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(3, 2)
        self.lin = nn.Linear(2, 1)
        with torch.no_grad():
            self.emb.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        return self.lin(self.emb(input_ids))


@pytest.mark.parametrize("batch_tokens", [2, 4, 16])
def test_input_sq_norms_hand_computed(batch_tokens: int) -> None:
    model = _EmbedLinear().train()
    ids = torch.tensor([[0, 1], [2, 2], [1, 0]])
    # tokens: [1,0] [0,2] [1,-1] [1,-1] [0,2] [1,0] -> sums of squares 1+0+1+1+0+1, 0+4+1+1+4+0
    req = Observe("lin", "sumsq")
    sums = Runner(batch_tokens=batch_tokens).observe(model, [req], ids)[req]
    assert sums.sum_sq.dtype == torch.float64
    assert sums.sum_sq.tolist() == [4.0, 10.0] and sums.count == 6
    assert model.training  # mode restored
    assert not model.lin._forward_pre_hooks  # hooks removed


# ---------------------------------------------------------------- random


@pytest.fixture(scope="module")
def tiny():
    model = build_tiny_llama(seed=5)
    return model, build_graph(model)


def test_random_is_seeded_and_uniform(tiny) -> None:
    model, graph = tiny
    name = "model.layers.0.mlp:channels"
    a = prune_random(model, graph, RandomConfig(sparsity=0.3, seed=1))
    b = prune_random(model, graph, RandomConfig(sparsity=0.3, seed=1))
    c = prune_random(model, graph, RandomConfig(sparsity=0.3, seed=2))
    assert a.removals == b.removals and a.removals[name] != c.removals[name]
    counts = torch.zeros(128)
    n = 300
    for seed in range(n):
        removed = prune_random(model, graph, RandomConfig(sparsity=0.3, seed=seed)).removals[name]
        assert len(removed) == 38  # round(0.3 * 128): the same amount for every seed
        counts[removed] += 1
    # every channel is removed with probability 38/128: binomial mean 89, sd 7.9; allow 5 sd
    p = 38 / 128
    mean, sd = n * p, (n * p * (1 - p)) ** 0.5
    assert float((counts - mean).abs().max()) < 5 * sd
    assert counts.min() > 0


# ---------------------------------------------------------------- zero units go first


DEAD = 7  # the MLP channel whose weights are zeroed in every layer


def _zero_channel(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[DEAD] = 0
            layer.mlp.up_proj.weight[DEAD] = 0
            layer.mlp.down_proj.weight[:, DEAD] = 0


def _config(method: str):
    from prunecli.methods.cfsp import CfspConfig
    from prunecli.methods.flap.config import FlapConfig
    from prunecli.methods.loraprune import LorapruneConfig
    from prunecli.methods.magnitude import MagnitudeConfig
    from prunecli.methods.wanda_sp import WandaSpConfig

    one_per_block = 1 / 128  # uniform methods: one channel of each MLP
    one_in_all = 192 / 73728  # global methods: one channel's worth of all blocks
    return {
        "magnitude": MagnitudeConfig(sparsity=one_per_block),
        "wanda-sp": WandaSpConfig(sparsity=one_per_block),
        "flap": FlapConfig(sparsity=one_in_all),
        "cfsp": CfspConfig(sparsity=one_in_all),
        # only layer 0 is pruned (the last layer is protected): it loses twice the share
        "loraprune": LorapruneConfig(sparsity=1 / 256, steps=4, prune_every=2, lora_dropout=0.0),
    }[method]


@pytest.mark.parametrize("method", ["magnitude", "wanda-sp", "flap", "cfsp", "loraprune"])
def test_zeroed_channel_is_removed_first(method: str) -> None:
    from prunecli.config import get_method

    model = build_tiny_llama(seed=6)
    _zero_channel(model)
    graph = build_graph(model)
    calib = torch.randint(4, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    _, fn = get_method(method)
    with torch.set_grad_enabled(method == "loraprune"):
        plan = fn(model, graph, _config(method), calib)
    removed = {name: units for name, units in plan.removals.items() if units}
    assert removed, "nothing removed"
    assert all(name.endswith("mlp:channels") for name in removed), removed
    assert all(units == [DEAD] for units in removed.values()), removed


def test_wanda_sp_pruned_propagation_measures_each_layer_on_the_pruned_model() -> None:
    """The reference's propagation: layer 1 is scored on inputs of the model with layer 0 pruned."""
    import copy

    from conftest import build_tiny_llama

    from prunecli.engine.apply import zero_units
    from prunecli.graph import build_graph
    from prunecli.methods.wanda_sp import WandaSpConfig, prune_wanda_sp, wanda_sp_scores

    model = build_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    graph = build_graph(model)
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = WandaSpConfig(sparsity=0.3, propagation="pruned", ignore=("*self_attn*",))
    plan = prune_wanda_sp(model, graph, cfg, calib)
    # the model is left as it came
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    dense = prune_wanda_sp(model, graph, dataclasses.replace(cfg, propagation="dense"), calib)
    mlp0, mlp1 = "model.layers.0.mlp:channels", "model.layers.1.mlp:channels"
    assert plan.removals[mlp0] == dense.removals[mlp0]  # layer 0 sees the same inputs either way
    # layer 1 by hand: zero layer 0's choice, measure, score, take the lowest
    pruned = copy.deepcopy(model)
    zero_units(pruned, graph, {mlp0: plan.removals[mlp0]})
    down = "model.layers.1.mlp.down_proj"
    req = Observe(down, "sumsq")
    norms = Runner().observe(pruned, [req], calib)[req].sum_sq
    member = next(m for m in graph[mlp1].consumers() if m.module == down)
    scores = wanda_sp_scores(pruned.get_submodule(down).weight, norms, member.index)
    expected = sorted(torch.argsort(scores, stable=True)[: len(plan.removals[mlp1])].tolist())
    assert plan.removals[mlp1] == expected
    assert plan.removals[mlp1] != dense.removals[mlp1]  # and it differs from the dense pass here
