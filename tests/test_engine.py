"""Graph + engine on tiny models of every supported architecture and hand-built networks."""

from __future__ import annotations

import math

import pytest
import torch
from archs import ALL, DECODERS, example_input, model_output, tiny_cnn, tiny_model
from torch import nn

from prunecli.engine import Plan, apply_plan, replay_plan, select_uniform, zero_units
from prunecli.engine.apply import block_params, count_params, resolve_removals
from prunecli.errors import PlanError, UnsupportedModelError
from prunecli.graph import build_graph

_GRAPHS: dict[str, object] = {}


def graph_of(arch: str, model: nn.Module):
    """Graphs depend only on the architecture and shapes: trace each tiny model once."""
    if arch not in _GRAPHS:
        _GRAPHS[arch] = build_graph(model)
    return _GRAPHS[arch]


def random_plan(graph, frac: float = 0.3, seed: int = 0) -> Plan:
    """A legal plan removing about ``frac`` of every prunable group (random units).

    With grouped-query attention every layer also loses a whole key/value head (and keeps
    1 or all query heads per remaining key/value head, alternating with the seed).
    """
    from prunecli.engine.select import HeadLayout

    gen = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.num_units, generator=gen) for g in graph.prunable()}
    plan = select_uniform(graph, scores, frac)
    for g in graph.prunable("heads"):
        layout = HeadLayout(graph, g)
        if layout.kv is not None and layout.num_kv > 1:
            r = layout.rep if seed % 2 == 0 else 1
            plan.removals[g.name] = layout.removal(scores[g.name], layout.num_kv - 1, r)
    # groups outside layers (a CNN) are selectable too; make sure every prunable group is hit
    for g in graph.prunable():
        if g.name not in plan.removals and g.num_units > 1:
            k = max(1, int(frac * g.num_units))
            plan.removals[g.name] = sorted(torch.randperm(g.num_units, generator=gen)[:k].tolist())
    plan.fingerprint = graph.fingerprint
    return plan


def _assert_removes_kv_heads(arch: str, graph, plan: Plan) -> None:
    """Every grouped-query layer loses a key/value head under ``plan`` (all decoders are GQA)."""
    removals = resolve_removals(graph, plan)
    gqa = [s for s in graph.attention if s.kv_heads != s.heads]
    assert bool(gqa) == (arch in DECODERS), arch
    for site in gqa:
        assert removals.get(site.kv_heads), f"{site.module}: no key/value head removed"


def expected_params_after(model: nn.Module, graph, plan: Plan) -> int:
    """Parameter count implied by the plan, computed independently of the engine."""
    removals = resolve_removals(graph, plan)
    removed: dict[str, dict[int, set[int]]] = {}
    for name, units in removals.items():
        for m in graph.groups[name].members:
            for u in units:
                removed.setdefault(m.param, {}).setdefault(m.dim, set()).update(m.index[u])
    params = {id(p): (n, p) for n, p in model.named_parameters()}
    total = 0
    for n, p in params.values():
        dims = removed.get(n, {})
        total += math.prod(s - len(dims.get(d, ())) for d, s in enumerate(p.shape))
    return total


@pytest.mark.parametrize("arch", ALL)
def test_random_30_percent_runs_and_counts(arch: str) -> None:
    model = tiny_model(arch)
    graph = graph_of(arch, model)
    kinds = {g.kind for g in graph.prunable()}
    assert kinds == {"heads", "channels"}, f"{arch}: {kinds}"
    assert len(graph.attention) == 2
    plan = random_plan(graph)
    _assert_removes_kv_heads(arch, graph, plan)
    expected = expected_params_after(model, graph, plan)
    summary = apply_plan(model, graph, plan)
    assert summary.params_after == expected == count_params(model)
    assert summary.params_after < summary.params_before
    out = model_output(model, example_input(arch))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ALL)
def test_removing_zeroed_units_keeps_outputs(arch: str) -> None:
    model = tiny_model(arch)
    graph = graph_of(arch, model)
    plan = random_plan(graph, seed=1)
    _assert_removes_kv_heads(arch, graph, plan)
    zero_units(model, graph, plan.removals)
    x = example_input(arch)
    before = model_output(model, x)
    apply_plan(model, graph, plan)
    after = model_output(model, x)
    assert before.shape == after.shape
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_gqa_groups_and_uniform_heads_per_kv() -> None:
    model = tiny_model("llama")  # 4 query heads, 2 key/value heads
    graph = build_graph(model)
    heads = graph["model.layers.0.self_attn:heads"]
    kv = graph["model.layers.0.self_attn:kv_heads"]
    assert heads.num_units == 4 and kv.num_units == 2
    assert heads.parent == kv.name and heads.parent_of == [0, 0, 1, 1]
    assert not kv.prunable
    # one query head from each kv group: legal, kv heads stay
    ok = Plan({heads.name: [0, 2]}, fingerprint=graph.fingerprint)
    assert resolve_removals(graph, ok) == {heads.name: [0, 2]}
    # both query heads of kv group 0: the kv head goes too
    whole = resolve_removals(graph, Plan({heads.name: [0, 1]}))
    assert whole[kv.name] == [0]
    # 2 heads on one kv head, 1 on the other: transformers cannot represent it
    with pytest.raises(PlanError, match="same number of query heads"):
        resolve_removals(graph, Plan({heads.name: [0]}))


def test_heads_and_mlp_members_llama() -> None:
    model = tiny_model("llama")
    graph = build_graph(model)
    mlp = graph["model.layers.1.mlp:channels"]
    roles = {(m.param.rsplit(".", 2)[-2], m.dim): m.role for m in mlp.members}
    assert roles == {("gate_proj", 0): "producer", ("up_proj", 0): "producer", ("down_proj", 1): "consumer"}
    heads = graph["model.layers.1.self_attn:heads"]
    o = [m for m in heads.members if m.role == "consumer"][0]
    assert o.param.endswith("o_proj.weight") and o.index[1] == list(range(16, 32))
    # the residual stream is coupled by RMSNorm: never offered for pruning
    assert all(g.kind in ("heads", "channels") and g.layer is not None for g in graph.prunable())


def test_fused_projections_phi3_and_gpt2() -> None:
    phi = build_graph(tiny_model("phi3"))
    g = phi["model.layers.0.mlp:channels"]
    gate_up = [m for m in g.members if m.param.endswith("gate_up_proj.weight")][0]
    assert gate_up.index[0] == [0, 96]  # gate row i and up row 96 + i together
    qkv = [m for m in phi["model.layers.0.self_attn:heads"].members if "qkv" in m.param]
    assert qkv and qkv[0].index[0] == list(range(16))
    gpt2 = build_graph(tiny_model("gpt2"))
    heads = gpt2["transformer.h.0.attn:heads"]
    c_attn = [m for m in heads.members if m.param.endswith("c_attn.weight")][0]
    assert c_attn.dim == 1 and c_attn.index[1] == list(range(16, 32)) + list(range(80, 96)) + list(
        range(144, 160)
    )


def test_qk_norm_follows_heads_qwen3() -> None:
    model = tiny_model("qwen3")
    graph = build_graph(model)
    # q_norm / k_norm weights are shared by every head: they are kept whole
    norm_groups = [g for g in graph.groups.values() if any("q_norm" in m.param for m in g.members)]
    assert norm_groups and all(not g.prunable for g in norm_groups)
    plan = random_plan(graph)
    apply_plan(model, graph, plan)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)


def test_cnn_residual_concat_and_depthwise() -> None:
    model = tiny_cnn()
    x = torch.randn(2, 3, 8, 8)
    graph = build_graph(model, (x[:1],))
    by_module = {g.module: g for g in graph.prunable()}
    residual = by_module["stem"]
    params = {m.param for m in residual.members}
    # the residual stream couples stem, a2, the depthwise conv, merge and the head's inputs
    assert {
        "stem.weight",
        "a2.weight",
        "dw.weight",
        "merge.weight",
        "head.weight",
        "bn0.running_mean",
    } <= params
    # the concat keeps its two branches apart, each mapping to its slice of merge's inputs
    b1 = [m for m in by_module["b1"].members if m.param == "merge.weight"][0]
    b2 = [m for m in by_module["b2"].members if m.param == "merge.weight"][0]
    assert b1.index[0] == [0] and b2.index[0] == [8]
    plan = random_plan(graph)
    zero_units(model, graph, plan.removals)
    ref = model(x)
    apply_plan(model, graph, plan)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0)
    assert model.dw.groups == model.dw.in_channels == model.dw.out_channels


def test_plan_replay_on_fresh_model_gives_same_weights() -> None:
    a = tiny_model("qwen2", seed=3)
    b = tiny_model("qwen2", seed=3)
    graph = build_graph(a)
    plan = random_plan(graph, seed=5)
    apply_plan(a, graph, plan)
    restored = Plan.from_json(plan.to_json())
    replay_plan(b, restored)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0)


def test_plan_errors() -> None:
    model = tiny_model("llama")
    graph = build_graph(model)
    mlp = graph["model.layers.0.mlp:channels"]
    with pytest.raises(PlanError, match="every unit"):
        apply_plan(model, graph, Plan({mlp.name: list(range(mlp.num_units))}))
    with pytest.raises(PlanError, match="does not have"):
        apply_plan(model, graph, Plan({"nope:channels": [1]}))
    with pytest.raises(PlanError, match="other parameter shapes"):
        apply_plan(model, graph, Plan({mlp.name: [1]}, fingerprint="0" * 16))
    with pytest.raises(PlanError):
        Plan.from_json("{not json")


def test_uniform_config_and_per_layer_config() -> None:
    model = tiny_model("llama")
    graph = build_graph(model)
    mlp0, mlp1 = graph["model.layers.0.mlp:channels"], graph["model.layers.1.mlp:channels"]
    apply_plan(model, graph, Plan({mlp0.name: list(range(10)), mlp1.name: list(range(10))}))
    assert model.config.intermediate_size == 86 and not model.config.is_heterogeneous
    model = tiny_model("llama")
    graph = build_graph(model)
    apply_plan(model, graph, Plan({graph["model.layers.0.mlp:channels"].name: list(range(10))}))
    assert model.config.per_layer_config[0].intermediate_size == 86
    assert model.config.per_layer_config[1].intermediate_size == 96


class _Unsupported(nn.Module):
    """Channels mixed by an op the tracer does not model (a cumulative product)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumprod(self.a(x), dim=-1))


def test_unsupported_op_locks_instead_of_guessing() -> None:
    from prunecli.api import prune
    from prunecli.methods.magnitude import MagnitudeConfig

    model = _Unsupported()
    graph = build_graph(model, (torch.randn(1, 8),))
    assert not graph.prunable()
    assert any("cumprod" in op for op in graph.unknown_ops)
    with pytest.raises(UnsupportedModelError, match="unsupported"):
        prune(model, MagnitudeConfig(sparsity=0.3), graph=graph)


def test_block_params_counts_attention_and_mlp() -> None:
    model = tiny_model("llama")
    graph = build_graph(model)
    per_layer = 64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 96  # q,o + k,v + gate,up,down
    assert block_params(model, graph) == 2 * per_layer


def test_truncated_trace_matches_full_trace() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        vocab_size=128,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    from prunecli.graph.repeat import repeated_blocks

    assert repeated_blocks(model) is not None  # the fast path is the one under test
    _assert_same_graph(build_graph(model), _full_graph(model))


def _assert_same_graph(fast, full) -> None:
    assert fast.groups.keys() == full.groups.keys()
    for name, g in full.groups.items():
        f = fast.groups[name]
        assert (f.kind, f.num_units, f.prunable, f.parent, f.parent_of) == (
            g.kind,
            g.num_units,
            g.prunable,
            g.parent,
            g.parent_of,
        ), name
        assert [(m.param, m.dim, m.index) for m in f.members] == [
            (m.param, m.dim, m.index) for m in g.members
        ]
    assert [vars(a) for a in fast.attention] == [vars(a) for a in full.attention]


def _full_graph(model):
    from prunecli.graph import build as build_mod

    original = build_mod.repeated_blocks
    build_mod.repeated_blocks = lambda m: None  # force the full trace
    try:
        return build_graph(model)
    finally:
        build_mod.repeated_blocks = original


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_layers_differing_by_config_are_traced_once_per_signature(arch: str) -> None:
    from prunecli.graph.repeat import sample_blocks

    # Gemma 2 alternates sliding/global; Gemma 3 has 5 sliding layers then 1 global
    if arch == "gemma2":
        types, traced = ["sliding_attention", "full_attention"] * 3, [0, 1, 2, 3]
    else:
        types, traced = (["sliding_attention"] * 5 + ["full_attention"]) * 2, [0, 1, 5, 11]
    model = tiny_model(arch, num_hidden_layers=len(types), layer_types=types, sliding_window=4)
    assert model.config.layer_types[5] == "full_attention"
    sample = sample_blocks(model)
    # two blocks of each layer type are traced; every layer copies a traced block of its own type
    assert sample is not None and sample.traced == traced
    assert all(types[sample.traced[sample.template[j]]] == types[j] for j in range(len(types)))
    _assert_same_graph(build_graph(model), _full_graph(model))
    # a global layer held by one layer only is traced as itself
    if arch == "gemma3_text":
        six = tiny_model(arch, num_hidden_layers=6, layer_types=types[:6], sliding_window=4)
        assert sample_blocks(six).traced == [0, 1, 5]
        _assert_same_graph(build_graph(six), _full_graph(six))
