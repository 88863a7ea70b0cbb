"""LoRAPrune: the gradient estimate, its agreement with true gradients, and a full run."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SAMPLE_TEXT, build_tiny_llama

from prunecli.errors import InputError
from prunecli.methods.loraprune import (
    LorapruneConfig,
    cubic_sparsity,
    estimate_weight_grad,
    group_importance,
    lora_weight_importance,
    moving_average,
    run_loraprune,
    unit_sums,
)
from prunecli.methods.loraprune.prune import UnitMasks, adapter_targets
from prunecli.methods.loraprune.scoring import combine
from prunecli.recover import attach_lora, detach_lora, lm_loss, lora_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny matrices: one thread (see conftest.one_thread_module)."""
    yield


# ---------------------------------------------------------------- pure maths


def test_estimate_weight_grad_hand_computed() -> None:
    a = torch.tensor([[1.0, 2.0]])  # r=1, in=2
    b = torch.tensor([[3.0], [4.0]])  # out=2
    ga = torch.tensor([[0.5, -1.0]])
    gb = torch.tensor([[1.0], [0.0]])
    # gB A = [[1, 2], [0, 0]]; B gA = [[1.5, -3], [2, -4]]; gB gA = [[0.5, -1], [0, 0]]
    assert torch.equal(estimate_weight_grad(a, b, ga, gb), torch.tensor([[2.0, 0.0], [2.0, -4.0]]))


def test_estimate_is_minus_one_sgd_step_change() -> None:
    gen = torch.Generator().manual_seed(0)
    a, ga = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    b, gb = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    change = (b - gb) @ (a - ga) - b @ a  # merged-weight change after one step with lr 1
    assert torch.allclose(estimate_weight_grad(a, b, ga, gb), -change, atol=1e-5)


def test_lora_weight_importance_hand_computed() -> None:
    w = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[1.0], [0.0]])
    ga = torch.zeros(1, 2)
    gb = torch.tensor([[2.0], [1.0]])
    # G = gB A = [[2, 0], [1, 0]]; W + 0.5 B A = [[1.5, -1], [0, 2]] -> |.*G| = [[3, 0], [0, 0]]
    imp = lora_weight_importance(w, a, b, ga, gb, scaling=0.5)
    assert torch.equal(imp, torch.tensor([[3.0, 0.0], [0.0, 0.0]]))


def test_unit_sums_combine_and_average() -> None:
    v = torch.arange(12.0).reshape(3, 4)
    assert unit_sums(v, 1, [[0, 1], [3]]).tolist() == [12.0 + 15.0, 21.0]
    assert unit_sums(v, 0, [[2], [0]]).tolist() == [38.0, 6.0]
    c = combine([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])], normalize=True, eps=0.0)
    assert c.tolist() == pytest.approx([0.6, 1.8])
    prev = torch.tensor([1.0, 1.0])
    assert moving_average(prev, torch.tensor([0.0, 2.0]), 0.9).tolist() == pytest.approx([0.9, 1.1])
    assert torch.equal(moving_average(prev, torch.tensor([float("nan"), 1.0]), 0.9), prev)


def test_cubic_schedule() -> None:
    vals = [cubic_sparsity(s, 100, 0.1, 0.1, 0.0, 0.5) for s in range(100)]
    assert vals[0] == 0.0 and vals[10] == 0.0 and vals[-1] == 0.5 and vals[91] == 0.5
    assert all(b >= a for a, b in zip(vals, vals[1:], strict=False))
    # halfway through the ramp: 0.5 * (1 - 0.5^3)
    assert cubic_sparsity(50, 100, 0.1, 0.1, 0.0, 0.5) == pytest.approx(0.5 * (1 - 0.5**3))


def test_config_validation() -> None:
    with pytest.raises(InputError):
        LorapruneConfig(warmup=0.6, cooldown=0.5)
    with pytest.raises(InputError):
        LorapruneConfig(kinds=("layers",))
    with pytest.raises(InputError):
        LorapruneConfig(steps=0)
    assert LorapruneConfig(kinds=["channels"]).kinds == ("channels",)


# ---------------------------------------------------------------- on a tiny Llama


@pytest.fixture(scope="module")
def graph():
    """Dependency graph of the tiny Llama architecture (valid for every seed: same names and shapes)."""
    from prunecli.graph import build_graph

    return build_graph(build_tiny_llama())


def _text_windows(n: int, seqlen: int) -> torch.Tensor:
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    ids = tok(SAMPLE_TEXT * 4)["input_ids"]
    return torch.tensor(ids[: n * seqlen]).reshape(n, seqlen)


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = torch.argsort(torch.argsort(x)).double()
    ry = torch.argsort(torch.argsort(y)).double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def test_lora_importance_tracks_true_gradient_importance(graph) -> None:
    from prunecli.engine.select import selectable_groups

    model = build_tiny_llama(seed=1)
    groups = selectable_groups(graph)
    windows = _text_windows(8, 24)
    torch.manual_seed(0)
    peft_model, flags = attach_lora(model, adapter_targets(model, graph, groups), rank=8, alpha=16)
    base = peft_model.get_base_model()
    opt = torch.optim.AdamW(lora_parameters(peft_model), lr=5e-3)
    for i in range(15):  # move B away from zero so that both adapter gradients matter
        lm_loss(peft_model, windows[(i % 4) * 2 : (i % 4) * 2 + 2]).backward()
        opt.step()
        opt.zero_grad()
    lm_loss(peft_model, windows).backward()
    est = group_importance(base, graph, groups, normalize=False)
    opt.zero_grad()
    merged = detach_lora(peft_model, flags)

    # true first-order importance |W * dL/dW| of the merged weights on the same batch
    for p in merged.parameters():
        p.requires_grad_(True)
    lm_loss(merged, windows).backward()
    true_w = {}
    for name, mod in merged.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.weight.grad is not None:
            true_w[name] = (mod.weight * mod.weight.grad).abs().detach()
    true = group_importance(merged, graph, groups, normalize=False, weight_importance=true_w)
    for kind in ("heads", "channels"):
        names = [g.name for g in groups if g.kind == kind]
        rho = _spearman(torch.cat([est[n] for n in names]), torch.cat([true[n] for n in names]))
        assert rho > 0.5, f"{kind}: spearman {rho:.2f}"


def test_run_loraprune_masks_equal_removal(graph) -> None:
    from prunecli.engine.apply import apply_plan
    from prunecli.engine.select import selectable_groups

    model = build_tiny_llama(seed=2)
    windows = _text_windows(8, 24)
    cfg = LorapruneConfig(sparsity=0.4, steps=30, prune_every=5, lr=2e-3, batch_size=2, lora_dropout=0.0)
    plan, log = run_loraprune(model, graph, cfg, windows)

    # adapters merged, the model is plain again and its trainable flags are restored
    assert not any("peft" in type(m).__module__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    # only adapters trained: rank * (in + out) per adapted linear
    lins = [model.get_submodule(t) for t in adapter_targets(model, graph, selectable_groups(graph))]
    assert log["trainable_params"] == sum(8 * (m.in_features + m.out_features) for m in lins)
    # the schedule ramps to the target and stays monotone
    sp = [p["sparsity"] for p in log["prune_steps"]]
    assert sp == sorted(sp) and sp[-1] == pytest.approx(0.4)
    assert len(log["losses"]) == 30 and plan.fingerprint == graph.fingerprint

    # zeroing the removed units' consumer columns == removing them physically
    masks = UnitMasks(model, selectable_groups(graph))
    masks.set(plan.removals)
    with torch.no_grad():
        masked = model(input_ids=windows).logits
    masks.remove()
    summary = apply_plan(model, graph, plan)
    with torch.no_grad():
        pruned = model(input_ids=windows).logits
    assert torch.allclose(masked, pruned, atol=1e-5)
    assert 0.3 <= summary.block_sparsity <= 0.45


def test_run_loraprune_channels_only_reaches_block_sparsity(graph) -> None:
    from prunecli.engine.apply import apply_plan
    from prunecli.methods._budget import all_block_params

    model = build_tiny_llama(seed=4)
    before = copy.deepcopy(model.state_dict())
    total = all_block_params(model, graph)
    cfg = LorapruneConfig(
        sparsity=0.25, steps=6, prune_every=2, kinds=("channels",), protect_layers=(), lora_dropout=0.0
    )
    plan, _ = run_loraprune(model, graph, cfg, _text_windows(4, 16))
    assert set(plan.removals) == {"model.layers.0.mlp:channels", "model.layers.1.mlp:channels"}
    unit = graph["model.layers.0.mlp:channels"].unit_params(0)
    removed = sum(len(v) for v in plan.removals.values()) * unit
    # 25 % of all attention + MLP parameters, taken from the MLPs alone: within one channel
    assert abs(removed - 0.25 * total) <= unit
    # merged adapters changed the adapted weights but not the embeddings
    after = model.state_dict()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(
        before["model.layers.0.mlp.down_proj.weight"], after["model.layers.0.mlp.down_proj.weight"]
    )
    summary = apply_plan(model, graph, plan)
    assert all(layer.self_attn.o_proj.in_features == 64 for layer in model.model.layers)
    assert summary.block_params_before == total
    assert abs(summary.block_sparsity - 0.25) <= unit / total


def test_protected_layers_reference_rule() -> None:
    from prunecli.methods.loraprune.config import protected_layers

    assert protected_layers(LorapruneConfig(), 30) == [0, 1, 2, 29]
    assert protected_layers(LorapruneConfig(), 32) == [0, 1, 2, 31]
    assert protected_layers(LorapruneConfig(), 2) == [1]
    assert protected_layers(LorapruneConfig(protect_layers=()), 30) == []
    assert protected_layers(LorapruneConfig(protect_layers=[0, -1]), 4) == [0, 3]
    with pytest.raises(InputError, match="layer 9"):
        protected_layers(LorapruneConfig(protect_layers=(9,)), 4)
    with pytest.raises(InputError):
        LorapruneConfig(protect_layers=("a",))


def test_run_loraprune_default_keeps_protected_layers_whole() -> None:
    """Reference rule on 10 layers: layer 0 (first 10 %) and layer 9 (last) keep full width."""
    import transformers

    from prunecli.engine.apply import apply_plan
    from prunecli.graph import build_graph
    from prunecli.methods._budget import all_block_params

    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    graph = build_graph(model)
    total = all_block_params(model, graph)
    lp = LorapruneConfig(sparsity=0.3, steps=4, prune_every=2, lora_dropout=0.0)
    plan, _ = run_loraprune(model, graph, lp, _text_windows(4, 16))
    assert plan.meta["protected_layers"] == [0, 9]
    pruned_layers = {graph[name].layer for name in plan.removals}
    assert pruned_layers == set(range(1, 9))
    summary = apply_plan(model, graph, plan)
    for i in (0, 9):
        layer = model.model.layers[i]
        assert layer.mlp.down_proj.in_features == 64 and layer.self_attn.o_proj.in_features == 32
    # the budget is a share of all ten layers: the eight pruned layers lose more
    assert summary.block_params_before == total
    assert abs(summary.block_sparsity - 0.3) < 0.05
