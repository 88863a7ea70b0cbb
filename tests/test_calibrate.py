"""The shared calibration runner: accumulators, whole vs layer-sequential, pruned propagation."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import DECODERS, block_observations, mixed_layers_model, tiny_model
from torch import nn

from prunecli.calibrate import AngularDistance, ChannelStats, Observe, Runner, SumSquares
from prunecli.errors import DataError, InputError, UnsupportedModelError
from prunecli.graph import build_graph
from prunecli.methods.cfsp import CfspConfig, prune_cfsp
from prunecli.methods.flap import FlapConfig, prune_flap
from prunecli.methods.wanda_sp import WandaSpConfig, prune_wanda_sp


def _calib(n: int = 6, seqlen: int = 12, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- accumulators


def test_channel_stats_merge_equals_one_pass() -> None:
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3 + 1
    whole = ChannelStats()
    whole.update(x)
    a, b = ChannelStats(), ChannelStats()
    a.update(x[:13])
    b.update(x[13:])
    a.merge(b)
    assert a.count == 50
    assert torch.allclose(a.mean, x.double().mean(0))
    assert torch.allclose(a.var, x.double().var(0))
    assert torch.allclose(a.mean_sq, x.double().square().mean(0))
    assert torch.allclose(whole.var, a.var)
    # transport round trip
    c = ChannelStats.from_state(a.state())
    assert c.count == 50 and torch.equal(c.var, a.var)
    with pytest.raises(ValueError, match="channels"):
        ChannelStats(3).update(torch.zeros(2, 4))


def test_sum_squares_and_angular_merge() -> None:
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))
    y = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(2))
    s1, s2 = SumSquares(), SumSquares()
    s1.update(x[:1])
    s2.update(x[1:])
    s1.merge(s2)
    assert s1.count == 20 and torch.allclose(s1.sum_sq, x.double().square().sum((0, 1)))
    a1, a2 = AngularDistance(), AngularDistance()
    a1.update(x[:3], y[:3])
    a2.update(x[3:], y[3:])
    a1.merge(a2)
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
    assert a1.count == 20 and a1.mean == pytest.approx(float((torch.arccos(cos) / torch.pi).mean()))
    assert AngularDistance.from_state(a1.state()).mean == pytest.approx(a1.mean)


def test_observe_validatesblock_observations() -> None:
    with pytest.raises(InputError):
        Observe("x", stat="nope")
    with pytest.raises(InputError):
        Observe("x", stat="angular", site="input")
    with pytest.raises(InputError):
        Runner(mode="sideways")


# ---------------------------------------------------------------- whole vs sequential


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_sequential_statistics_equal_whole_model(arch: str) -> None:
    model = mixed_layers_model(
        arch, ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    )
    before = copy.deepcopy(model.state_dict())
    reqs = block_observations(model)
    calib = _calib()
    whole = Runner(mode="whole", batch_tokens=24).observe(model, reqs, calib)
    seq_runner = Runner(mode="sequential", batch_tokens=24)
    seq = seq_runner.observe(model, reqs, calib)
    for r in reqs:
        a, b = whole[r].state(), seq[r].state()
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), r
    assert seq_runner.log[-1]["block_passes"] == 4
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_sequential_stops_after_last_observed_block() -> None:
    model = tiny_model("llama", num_hidden_layers=4)
    runner = Runner(mode="sequential")
    runner.observe(model, [Observe("model.layers.1.mlp.down_proj")], _calib())
    assert runner.log[-1]["block_passes"] == 2


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen2"])
def test_plans_equal_whole_and_sequential(arch: str) -> None:
    model = mixed_layers_model(arch, ["sliding_attention", "full_attention", "sliding_attention"])
    graph = build_graph(model)
    calib = _calib(8, 16)
    configs = [
        FlapConfig(sparsity=0.3),
        FlapConfig(sparsity=0.3, structure="UL-UM", metric="WIFN"),
        CfspConfig(sparsity=0.3, round_to=1),
        WandaSpConfig(sparsity=0.3),
    ]
    fns = {"flap": prune_flap, "cfsp": prune_cfsp, "wanda-sp": prune_wanda_sp}
    for cfg in configs:
        fn = fns[cfg.method]
        whole = fn(model, graph, cfg, calib, runner=Runner(mode="whole", batch_tokens=32))
        seq = fn(model, graph, cfg, calib, runner=Runner(mode="sequential", batch_tokens=32))
        assert whole.removals == seq.removals, cfg
        assert whole.bias_updates == seq.bias_updates, cfg


def test_pruned_propagation_restores_weights_and_costs_two_passes() -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    before = copy.deepcopy(model.state_dict())
    graph = build_graph(model)
    runner = Runner()
    plan = prune_wanda_sp(
        model, graph, WandaSpConfig(sparsity=0.4, propagation="pruned"), _calib(), runner=runner
    )
    assert plan.removals
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # each block runs once to measure and once more (after its units are zeroed) to feed the next
    assert runner.log[-1]["block_passes"] == 3 + 2


def test_runner_errors() -> None:
    model = tiny_model("llama")
    with pytest.raises(DataError):
        Runner().observe(model, [Observe("model.layers.0.mlp.down_proj")], torch.zeros(3))
    with pytest.raises(UnsupportedModelError, match="no module"):
        Runner().observe(model, [Observe("model.layers.9.mlp")], _calib())
    with pytest.raises(UnsupportedModelError, match="inside the repeated"):
        Runner(mode="sequential").observe(model, [Observe("lm_head")], _calib())
    # a module the forward never calls
    model.model.layers[0].mlp.spare = nn.Linear(64, 64)
    with pytest.raises(UnsupportedModelError, match="never reached"):
        Runner().observe(model, [Observe("model.layers.0.mlp.spare")], _calib())


def test_batches_are_dealt_round_robin(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunecli.calibrate import distributed

    calib = _calib(7, 4)
    runner = Runner(batch_tokens=8)  # 2 windows per batch -> 4 batches
    assert [b for b, _ in runner.batches(calib)] == [0, 1, 2, 3]
    monkeypatch.setattr(distributed, "rank_world", lambda: (1, 2))
    got = runner.batches(calib)
    assert [b for b, _ in got] == [1, 3]
    assert torch.equal(got[1][1], calib[6:7])
