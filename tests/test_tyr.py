"""Týr-the-Pruner: OBS maths, budget-exact mutation, determinism, search beats uniform, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from prunecli.api import prune
from prunecli.errors import InputError
from prunecli.graph import build_graph
from prunecli.methods.tyr import TyrConfig, initial_widths, variables_of
from prunecli.methods.tyr.local import augmented, damped_inverse, greedy_path, head_scores, unit_errors
from prunecli.methods.tyr.search import Variable, channel_ladder, cost, evolve, mutate, split_starts
from prunecli.refit import refit_columns
from tests.archs import tiny_model

FAST = dict(generations=3, offspring=4, stage_tokens=(64, 256), survivors=(2, 1), iterations=2)


def _calib(model, n=12, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, seqlen), generator=g)


# ----------------------------------------------------------------------------- local OBS maths


def _problem(seed=0, n=200, cin=6, out=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, generator=g, dtype=torch.float64)
    x[:, 2] = 0.7 * x[:, 0] - 0.2 * x[:, 1] + 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(out, cin, generator=g, dtype=torch.float64)
    aug = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    return x, w, aug.T @ aug


def test_obs_error_is_the_exact_error_after_reoptimisation():
    """ΔE(u) from the inverse equals the reconstruction error of removing u and re-solving."""
    _, w, gram = _problem()
    b = augmented(w, None)
    units = [[i] for i in range(w.shape[1])]
    err = unit_errors(b, damped_inverse(gram, 0.0), units, [True] * len(units))
    for u in range(w.shape[1]):
        res = refit_columns(w, None, gram, [u], damp=0.0)
        assert err[u].item() == pytest.approx(0.5 * res.error_refit, rel=1e-6, abs=1e-9)


def test_greedy_path_removes_the_redundant_column_first_and_is_nested():
    _, w, gram = _problem()
    b = augmented(w, None)
    path = greedy_path([(b, gram, [[i] for i in range(6)])], [1, 2, 4], round_size=1, damp=0.0)
    assert path[1] == [2]  # column 2 is (almost) a combination of 0 and 1
    assert set(path[1]) <= set(path[2]) <= set(path[4])
    assert [len(path[k]) for k in (1, 2, 4)] == [1, 2, 4]


def test_greedy_path_beats_magnitude_choice():
    """The OBS choice's refitted error is no worse than dropping the smallest-norm columns."""
    _, w, gram = _problem(seed=3, cin=8)
    b = augmented(w, None)
    obs = greedy_path([(b, gram, [[i] for i in range(8)])], [4], round_size=1, damp=0.0)[4]
    norms = w.norm(dim=0)
    mag = sorted(torch.argsort(norms)[:4].tolist())
    e_obs = refit_columns(w, None, gram, obs, damp=0.0).error_refit
    e_mag = refit_columns(w, None, gram, mag, damp=0.0).error_refit
    assert e_obs <= e_mag + 1e-9


def test_head_scores_group_columns():
    _, w, gram = _problem(cin=6)
    b = augmented(w, None)
    s = head_scores([(b, gram, [[0, 1], [2, 3], [4, 5]])], 0.0)
    assert s.shape == (3,) and torch.isfinite(s).all() and (s <= 0).all()


# ----------------------------------------------------------------------------- search


def _vars():
    rng = random.Random(0)
    out = []
    for i in range(6):  # MLP-like: uniform step costs
        widths = channel_ladder(32, 10, 16, 4, 9, 1)
        out.append(Variable(f"m{i}", "channels", i, [f"d{i}"], 320, [k * 10 for k in widths], widths, 4))
    for i in range(6):  # GQA-like heads: irregular costs (SmolLM2's legal layouts in head units)
        costs = [12, 9, 8, 6, 4, 3, 2]
        out.append(Variable(f"h{i}", "heads", i, [f"o{i}"], 12, costs, [[(0, 0)]] * 7, rng.randrange(1, 6)))
    return out


def test_mutation_keeps_the_budget_exact():
    variables = _vars()
    rng = random.Random(1)
    parent = tuple(v.center for v in variables)
    budget = cost(variables, parent)
    changed = 0
    state = parent
    for _ in range(500):
        child = mutate(variables, state, rng, max_flips=4)
        assert cost(variables, child) == budget
        assert all(0 <= s < len(v.costs) for v, s in zip(variables, child))
        changed += child != state
        state = child
    assert changed > 400


def test_split_starts_move_every_attention_block_and_keep_the_budget():
    # SmolLM2-like costs in head units: heads cost g*(r+1) (dense 12), MLP steps of 6 units
    heads = [12, 9, 8, 6, 4, 3, 2]
    mlp = [36, 30, 24, 18, 12, 6]
    variables = []
    for layer in range(4):
        variables.append(Variable(f"h{layer}", "heads", layer, [], 12, heads, heads, 3))
        variables.append(Variable(f"m{layer}", "channels", layer, [], 36, mlp, mlp, 3))
    start = tuple(v.center for v in variables)
    starts = split_starts(variables, start)
    assert starts, "no split found"
    for label, state in starts.items():
        assert cost(variables, state) == cost(variables, start), label
    dense = starts["attention 0%"]  # every head kept, every MLP one step (6 units) sparser
    assert all(dense[i] == 0 for i in range(0, 8, 2))
    assert all(dense[i] == 4 for i in range(1, 8, 2))
    # +3 head units per layer: two layers' moves are paid by one 6-unit MLP step
    quarter = starts["attention 25%"]
    assert [quarter[i] for i in range(0, 8, 2)] == [1, 1, 1, 1]
    assert sorted(quarter[i] for i in range(1, 8, 2)) == [3, 3, 4, 4]
    # with an odd number of layers the last, unpaid move is undone
    odd = split_starts(variables[:6], start[:6])["attention 25%"]
    assert [odd[i] for i in range(0, 6, 2)] == [1, 1, 3]
    assert cost(variables[:6], odd) == cost(variables[:6], start[:6])


def test_evolve_is_elitist_and_finds_the_optimum_of_a_separable_fitness():
    variables = _vars()[:6]  # channels only
    target = (2, 6, 4, 4, 3, 5)  # same cost as all-4 (sum 24)
    rng = random.Random(0)

    def fitness(states, stage, gen, parent):
        return [float(sum((a - b) ** 2 for a, b in zip(s, target))) for s in states]

    start = tuple(v.center for v in variables)
    best, log = evolve(
        variables,
        start,
        fitness,
        generations=60,
        offspring=8,
        survivors=(3, 1),
        stage_tokens=(1, 2),
        max_flips=3,
        rng=rng,
    )
    assert cost(variables, best) == cost(variables, start)
    assert all(b <= a for a, b in zip(log.best_fitness, log.best_fitness[1:]))
    assert log.best_fitness[-1] == 0.0 and best == target


def test_initial_widths_hit_the_budget_within_one_channel_step():
    model = tiny_model("llama")
    graph = build_graph(model)
    variables = variables_of(model, graph)
    for sparsity in (0.2, 0.5):
        centers = initial_widths(graph, variables, sparsity, 1)
        budget = (1 - sparsity) * sum(v.total for v in variables)
        unit = max(graph.groups[v.name].unit_params(0) for v in variables if v.kind == "channels")
        assert abs(sum(centers) - budget) <= unit


# ----------------------------------------------------------------------------- end to end


def test_tiny_search_beats_uniform_and_is_deterministic():
    results = []
    for _ in range(2):
        model = tiny_model("llama", seed=1)
        calib = _calib(model)
        r = prune(model, TyrConfig(sparsity=0.5, seed=3, **FAST), calib)
        logits = model(input_ids=calib[:2]).logits
        results.append((r, logits))
    (r1, l1), (r2, l2) = results
    meta = r1.plan.meta["tyr"]
    first = meta["search"][0]
    assert min(first["best_fitness"]) < first["start_candidates"]["centre"]  # improved on uniform
    assert min(first["best_fitness"]) <= first["start_fitness"]
    assert r1.plan.removals == r2.plan.removals
    assert r1.plan.bias_updates == r2.plan.bias_updates
    assert json.dumps(meta["search"]) == json.dumps(r2.plan.meta["tyr"]["search"])
    assert torch.equal(l1, l2)
    assert abs(r1.achieved_sparsity - 0.5) < 0.05
    assert set(meta["per_layer_sparsity"]) == {"0", "1"}


@pytest.mark.parametrize("search_dtype", ["float32", "model"])
def test_final_refit_is_kept_only_when_it_lowers_the_fitness(search_dtype):
    model = tiny_model("llama", seed=1)
    calib = _calib(model)
    r = prune(model, TyrConfig(sparsity=0.5, seed=3, search_dtype=search_dtype, **FAST), calib)
    meta = r.plan.meta
    final = meta["tyr"]["final"]
    refit_won = final["fitness_refit"] < final["fitness_supernet"]
    assert final["chosen"] == ("refit" if refit_won else "supernet")
    assert meta["refit"]["by"] == ("tyr final refit" if refit_won else "tyr")
    # the supernet assembly's fitness is the search's last best (same windows, same weights)
    assert final["fitness_supernet"] == pytest.approx(meta["tyr"]["search"][-1]["best_fitness"][-1], rel=1e-5)
    # the pruned model runs
    assert torch.isfinite(model(input_ids=calib[:2]).logits).all()
    plain = tiny_model("llama", seed=1)
    r0 = prune(
        plain, TyrConfig(sparsity=0.5, seed=3, search_dtype=search_dtype, final_refit=False, **FAST), calib
    )
    assert r0.plan.removals == r.plan.removals  # the refit changes weights, never the choice
    assert "final" not in r0.plan.meta["tyr"] or not r0.plan.meta["tyr"]["final"]


def test_locked_groups_keep_their_share_and_the_rest_reaches_the_target():
    model = tiny_model("llama", seed=1)
    calib = _calib(model)
    cfg = TyrConfig(sparsity=0.4, seed=3, ignore=("model.layers.0.mlp*",), final_refit=False, **FAST)
    r = prune(model, cfg, calib)
    assert "model.layers.0.mlp:channels" not in r.plan.removals
    assert abs(r.achieved_sparsity - 0.4) < 0.05  # the other blocks gave up more
    assert r.plan.meta["tyr"]["searchable_share"] < 1.0
    with pytest.raises(InputError, match="only"):
        prune(
            tiny_model("llama", seed=1),
            TyrConfig(sparsity=0.9, ignore=("model.layers.*.mlp*",), **FAST),
            calib,
        )


def test_tyr_beats_uniform_magnitude_on_reconstruction():
    """The refitted supernet candidates keep the model far closer to the dense one than an
    unrefitted uniform magnitude prune at the same sparsity."""
    from prunecli.methods.magnitude import MagnitudeConfig

    base = tiny_model("llama", seed=2)
    calib = _calib(base, n=16)
    with torch.no_grad():
        dense = base(input_ids=calib[:4]).logits.log_softmax(-1)

    def kl(model):
        with torch.no_grad():
            lp = model(input_ids=calib[:4]).logits.log_softmax(-1)
        return float((dense.exp() * (dense - lp)).sum(-1).mean())

    m1 = tiny_model("llama", seed=2)
    prune(m1, TyrConfig(sparsity=0.5, **FAST), calib)
    m2 = tiny_model("llama", seed=2)
    prune(m2, MagnitudeConfig(sparsity=0.5), calib)
    assert kl(m1) < kl(m2)


def test_supernet_dir_is_kept_when_given(tmp_path):
    model = tiny_model("llama")
    r = prune(model, TyrConfig(sparsity=0.3, supernet_dir=str(tmp_path / "sn"), **FAST), _calib(model))
    files = sorted((tmp_path / "sn").rglob("*.safetensors"))
    assert files and r.plan.meta["tyr"]["supernet_dir"] == str(tmp_path / "sn")
    assert {p.parent.name for p in files} == {"iteration1", "iteration2"}


@pytest.mark.parametrize(
    "bad",
    [
        dict(levels=4),
        dict(stage_tokens=(512,), survivors=(3, 1)),
        dict(survivors=(3, 2)),
        dict(step=0.9),
        dict(offspring=0),
    ],
)
def test_config_errors(bad):
    with pytest.raises(InputError):
        TyrConfig(sparsity=0.5, **bad)


def test_offloaded_runner_is_refused():
    from prunecli.calibrate import Runner
    from prunecli.errors import UnsupportedModelError

    model = tiny_model("llama")
    with pytest.raises(UnsupportedModelError, match="in memory"):
        prune(
            model,
            TyrConfig(sparsity=0.5, **FAST),
            _calib(model),
            graph=build_graph(model),
            runner=Runner(weights=object()),
        )


def test_cli_compress_tyr_writes_plot_and_reloads(tiny_llama_dir, tiny_text_file, tmp_path):
    from typer.testing import CliRunner

    from prunecli.cli import app

    out = tmp_path / "tyr"
    res = CliRunner().invoke(
        app,
        [
            "compress", str(tiny_llama_dir), "--method", "tyr", "--sparsity", "0.4",
            "--calib", str(tiny_text_file), "--nsamples", "8", "--seqlen", "32",
            "--set", "generations=2", "--set", "offspring=3", "--set", "stage_tokens=64,128",
            "--set", "survivors=2,1", "--set", "iterations=1", "-o", str(out),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "per-layer sparsity found by the Týr search" in res.output
    assert (out / "tyr_sparsity.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "prunecli.json").read_text())
    assert record["plan"]["meta"]["tyr"]["per_layer_sparsity"]
    assert record["verify"]["check"] == "logits"
