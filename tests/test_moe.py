"""Mixture-of-Experts expert pruning: expert groups, engine, scorers, runner, reload."""

from __future__ import annotations

import json

import pytest
import torch
from archs import MOE, example_input, model_output, tiny_model

from prunecli.calibrate import Observe, Runner
from prunecli.calibrate.moe import expert_outputs, token_contribution
from prunecli.calibrate.stats import ExpertStats
from prunecli.engine import Plan, apply_plan
from prunecli.engine.apply import ExpertRouting, expert_routing
from prunecli.engine.select import legal_expert_keep, select_experts
from prunecli.errors import InputError, PlanError
from prunecli.graph import build_graph
from prunecli.methods.experts import EasyEpConfig, FrequencyConfig, RandomExpertsConfig, ReapConfig
from prunecli.methods.experts.scoring import easy_ep_scores, mixed_domain, normalise, reap_scores

ARCHS = sorted(MOE)
CALIB = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(3))


def _routes(model, site, x):
    """The router's chosen experts ``[T, k]`` in ``site``'s block on input ``x``."""
    seen = []
    h = model.get_submodule(site.experts).register_forward_hook(
        lambda _m, args, _o: seen.append(args[1].clone())
    )
    try:
        model_output(model, x)
    finally:
        h.remove()
    return seen[0]


# ------------------------------------------------------------------ graph and engine
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_groups_span_experts_and_router(arch):
    model = tiny_model(arch)
    graph = build_graph(model)
    moe_layers = 1 if arch == "deepseek_v3" else 2
    assert len(graph.moe) == moe_layers
    for site in graph.moe:
        g = graph.groups[site.group]
        assert g.kind == "experts" and g.prunable and g.num_units == 8
        params = {m.param for m in g.members}
        assert f"{site.experts}.gate_up_proj" in params and f"{site.experts}.down_proj" in params
        assert f"{site.router}.weight" in params
        assert all(m.dim == 0 for m in g.members)
        assert not any("shared" in p for p in params)
        if arch == "deepseek_v3":
            assert f"{site.router}.e_score_correction_bias" in params
        # no other group still claims the expert rows
        others = [o for o in graph.groups.values() if o is not g]
        assert not any((m.param, m.dim) == (p, 0) for o in others for m in o.members for p in params)


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_checkpoint_reloads_with_stock_transformers(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint

    model = tiny_model(arch)
    x = example_input(arch)
    graph = build_graph(model)
    removals = {s.group: [1, 6] for s in graph.moe}  # one per DeepSeek expert group
    summary = apply_plan(model, graph, Plan(removals))
    for site in graph.moe:
        assert model.get_submodule(site.experts).gate_up_proj.shape[0] == 6
        assert model.get_submodule(site.router).weight.shape[0] == 6
        assert model.get_submodule(site.experts).num_experts == 6
    assert summary.params_after < summary.params_before
    y = model_output(model, x)
    out = save_checkpoint(model, None, tmp_path / "ckpt", provenance={})
    cfg = json.loads((out / "config.json").read_text())
    field = {
        "mixtral": "num_local_experts",
        "qwen3_moe": "num_local_experts",
        "deepseek_v3": "n_routed_experts",
    }
    assert cfg[field.get(arch, "num_experts")] == 6
    assert "auto_map" not in cfg  # stock transformers builds it
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(model_output(reloaded, x), y)


@pytest.mark.parametrize("arch", ARCHS)
def test_kept_experts_keep_their_tokens(arch):
    """A token routed only to kept experts goes to the same (renumbered) experts after pruning."""
    model = tiny_model(arch)
    x = example_input(arch)
    graph = build_graph(model)
    site = graph.moe[0]  # the first MoE block sees the same input before and after
    removed = [2, 5]
    before = _routes(model, site, x)
    apply_plan(model, graph, Plan({s.group: removed for s in graph.moe}))
    after = _routes(model, site, x)
    new_id = {old: new for new, old in enumerate(e for e in range(8) if e not in removed)}
    kept_tokens = [t for t in range(before.shape[0]) if not set(before[t].tolist()) & set(removed)]
    assert kept_tokens, "the probe should have tokens that use only kept experts"
    for t in kept_tokens:
        assert sorted(new_id[e] for e in before[t].tolist()) == sorted(after[t].tolist())


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe"])
def test_removing_unused_experts_is_exact(arch):
    """With top-k renormalisation, experts that no token picks can go without any change."""
    overrides = {} if arch == "mixtral" else {"norm_topk_prob": True}
    model = tiny_model(arch, **overrides)
    x = torch.tensor([[5, 17, 42]])
    graph = build_graph(model)
    y = model_output(model, x)
    removals = {}
    for site in graph.moe:
        used = set(_routes(model, site, x).flatten().tolist())
        removals[site.group] = [e for e in range(8) if e not in used]
        assert removals[site.group]
    apply_plan(model, graph, Plan(removals))
    torch.testing.assert_close(model_output(model, x), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_shared_experts_untouched(arch):
    model = tiny_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters() if "shared_expert" in n}
    assert before
    graph = build_graph(model)
    apply_plan(model, graph, Plan({s.group: [0, 4] for s in graph.moe}))
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in before.items())


def test_group_limited_routing_stays_valid():
    model = tiny_model("deepseek_v3")
    graph = build_graph(model)
    group = graph.moe[0].group
    with pytest.raises(PlanError, match="same number of experts kept in every group"):
        apply_plan(model, graph, Plan({group: [0, 1]}))  # both from expert group 0
    with pytest.raises(PlanError, match="at least 2"):
        apply_plan(model, graph, Plan({group: [0, 1, 2, 4, 5, 6]}))
    routing = expert_routing(model, graph)[group]
    assert (routing.groups, routing.topk_groups, routing.top_k) == (2, 1, 2)
    removal = select_experts({group: torch.arange(8.0)}, {group: 3}, {group: routing})[group]
    assert removal == [0, 1, 4, 5]  # two kept per group: the best of each
    apply_plan(model, graph, Plan({group: removal}))
    gate = model.get_submodule(graph.moe[0].router)
    assert gate.num_experts == 4 and gate.e_score_correction_bias.shape == (4,)
    assert model.config.n_routed_experts == 4 and model.config.n_group == 2
    model_output(model, example_input("deepseek_v3"))


def test_top_k_lowered_to_what_is_left(tmp_path):
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint

    model = tiny_model("mixtral")
    x = example_input("mixtral")
    graph = build_graph(model)
    apply_plan(model, graph, Plan({s.group: list(range(1, 8)) for s in graph.moe}))
    assert model.config.num_experts_per_tok == 1 and model.config.num_local_experts == 1
    assert all(model.get_submodule(s.router).top_k == 1 for s in graph.moe)
    y = model_output(model, x)
    out = save_checkpoint(model, None, tmp_path / "one", provenance={})
    assert torch.equal(model_output(AutoModelForCausalLM.from_pretrained(out).eval(), x), y)


def test_per_layer_expert_counts_reload(tmp_path):
    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = tiny_model("qwen3_moe")
    x = example_input("qwen3_moe")
    graph = build_graph(model)
    a, b = graph.moe
    apply_plan(model, graph, Plan({a.group: [0, 5], b.group: [1, 2, 6, 7]}))
    y = model_output(model, x)
    out = save_checkpoint(model, None, tmp_path / "het", provenance={})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["per_layer_config"] == {"0": {"num_local_experts": 6}, "1": {"num_local_experts": 4}}
    reloaded = load_model(str(out)).model
    assert torch.equal(model_output(reloaded.eval(), x), y)


# ------------------------------------------------------------------ scorers (hand-computed)
def test_token_contribution_by_hand():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -4.0]])
    # cos((1,0),(1,1)) = 1/sqrt2; same direction -> 0; (0,2) vs (0,-2): cos -1 -> 2
    assert token_contribution(x, y).tolist() == pytest.approx([1 - 2**-0.5, 0.0, 2.0])


def test_expert_stats_and_scores_by_hand():
    st = ExpertStats()
    # two tokens, top-2 of 3 experts: token 0 -> experts 0 (c=1), 2 (c=3); token 1 -> 2 (c=2), 1 (c=4)
    st.update(
        torch.tensor([[0, 2], [2, 1]]), torch.tensor([[1.0, 3.0], [2.0, 4.0]]), torch.tensor([0.5, 0.25]), 3
    )
    assert st.count == 2
    assert st.routed.tolist() == [1.0, 1.0, 2.0]
    assert st.importance.tolist() == [1.0, 4.0, 5.0]
    assert st.weighted.tolist() == [0.5, 1.0, 2.0]  # 3*0.5 + 2*0.25 for expert 2
    assert easy_ep_scores(st.weighted).tolist() == [0.5, 1.0, 2.0]
    assert reap_scores(st.importance, st.routed).tolist() == [1.0, 4.0, 2.5]
    assert reap_scores(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])).tolist() == [0.0, 0.5]
    merged = ExpertStats()
    merged.merge(st)
    merged.merge(st)
    assert merged.routed.tolist() == [2.0, 2.0, 4.0] and merged.count == 4


def test_mixed_domain_normalises_each_domain_per_layer():
    a = {"l": torch.tensor([100.0, 0.0, 0.0, 100.0])}
    b = {"l": torch.tensor([0.0, 1.0, 1.0, 2.0])}
    assert normalise(a["l"]).tolist() == [0.5, 0.0, 0.0, 0.5]
    assert mixed_domain([a, b])["l"].tolist() == [0.5, 0.25, 0.25, 1.0]


def test_selection_layer_and_global():
    r = ExpertRouting("a", 0, 4, 1)
    scores = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    routing = {"a": r, "b": ExpertRouting("b", 1, 4, 1)}
    keep = {"a": 2, "b": 2}
    assert select_experts(scores, keep, routing) == {"a": [2, 3], "b": [2, 3]}
    # normalised: a = [.4,.3,.2,.1], b = [.25]*4; the best 4 overall: .4, .3, .25, .25
    glob = select_experts(scores, keep, routing, selection="global")
    assert glob == {"a": [2, 3], "b": [2, 3]}
    scores["a"] = torch.tensor([10.0, 0.0, 0.0, 0.0])
    glob = select_experts(scores, {"a": 2, "b": 2}, routing, selection="global")
    assert glob["a"] == [1, 2, 3] and glob["b"] == [3]  # a keeps 1, b keeps 3
    assert legal_expert_keep(0, r) == 1 and legal_expert_keep(9, r) == 4


def test_config_validation():
    assert EasyEpConfig(keep_experts=0.25).keep_count(64) == 16
    assert ReapConfig(keep_experts=16).keep_count(64) == 16
    with pytest.raises(InputError):
        EasyEpConfig(keep_experts=0)
    with pytest.raises(InputError):
        EasyEpConfig(keep_experts=2.5)
    with pytest.raises(InputError):
        EasyEpConfig(selection="sideways")


# ------------------------------------------------------------------ observation
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_outputs_match_the_experts_module(arch):
    model = tiny_model(arch)
    site = build_graph(model).moe[0]
    experts = model.get_submodule(site.experts)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 64, generator=g)
    index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(5)])
    weights = torch.rand(5, 2, generator=g)
    with torch.no_grad():
        ref = experts(h, index, weights)
        mine = (expert_outputs(experts, h, index) * weights[..., None]).sum(1)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_runner_expert_stats_whole_equals_sequential():
    model = tiny_model("qwen2_moe")
    graph = build_graph(model)
    reqs = [Observe(s.block, "experts", "moe") for s in graph.moe]
    whole = Runner().observe(model, reqs, CALIB)
    seq = Runner(mode="sequential").observe(model, reqs, CALIB)
    for r in reqs:
        assert whole[r].count == CALIB.numel()
        assert whole[r].routed.sum().item() == CALIB.numel() * 2  # top-2
        torch.testing.assert_close(whole[r].weighted, seq[r].weighted)
        torch.testing.assert_close(whole[r].importance, seq[r].importance)
        assert (whole[r].weighted <= whole[r].importance * 2 + 1e-9).all()  # s <= 2


def test_runner_token_contribution_matches_a_manual_pass():
    """EASY-EP's sum for one block, recomputed from hooks on the layer by hand."""
    model = tiny_model("mixtral")
    graph = build_graph(model)
    site = graph.moe[1]
    layer = model.model.layers[1]
    got = {}

    def grab(name):
        def hook(_m, args, kwargs, out):
            got.setdefault(name, (args, kwargs, out))

        return hook

    hs = [
        model.get_submodule(site.experts).register_forward_hook(grab("experts"), with_kwargs=True),
        model.get_submodule(site.block).register_forward_hook(grab("block"), with_kwargs=True),
        layer.register_forward_hook(grab("layer"), with_kwargs=True),
        layer.post_attention_layernorm.register_forward_hook(grab("norm"), with_kwargs=True),
    ]
    x = CALIB[:1]
    model_output(model, x)
    for h in hs:
        h.remove()
    (h_in, index, weights), _, y = got["experts"]
    residual = got["norm"][0][0].reshape(-1, 64)  # the residual stream entering the MoE sublayer
    s = token_contribution(residual, y)
    norms = expert_outputs(model.get_submodule(site.experts), h_in, index).norm(dim=-1)
    want = torch.zeros(8, dtype=torch.float64)
    want.index_add_(0, index.flatten(), (weights * norms).double().flatten() * s.repeat_interleave(2))
    obs = Runner().observe(model, [Observe(site.block, "experts", "moe")], x)
    torch.testing.assert_close(
        obs[Observe(site.block, "experts", "moe")].weighted, want, rtol=1e-5, atol=1e-7
    )


# ------------------------------------------------------------------ library
@pytest.mark.parametrize(
    "arch,cfg",
    [
        ("mixtral", ReapConfig(keep_experts=4)),
        ("qwen2_moe", FrequencyConfig()),
        ("qwen3_moe", EasyEpConfig(keep_experts=0.5)),
        ("olmoe", ReapConfig(keep_experts=0.5)),
        ("deepseek_v3", EasyEpConfig(keep_experts=4)),
        ("deepseek_v3", FrequencyConfig(keep_experts=0.5, selection="global")),
    ],
)
def test_prune_library_all_methods(arch, cfg):
    import prunecli

    model = tiny_model(arch)
    result = prunecli.prune(model, cfg, CALIB)
    d = result.to_dict()
    assert d["method"] == cfg.method
    assert all(v == {"kept": 4, "before": 8} for v in d["experts"].values())
    assert not result.warnings
    model_output(model, example_input(arch))


def test_random_experts_is_seeded_and_data_free():
    import prunecli

    plans = [
        prunecli.prune(tiny_model("olmoe"), RandomExpertsConfig(keep_experts=0.5, seed=s)).plan.removals
        for s in (1, 1, 2)
    ]
    assert plans[0] == plans[1] != plans[2]


def test_sequential_runner_gives_the_same_plan_and_mixed_domains():
    import prunecli

    a = prunecli.prune(tiny_model("mixtral"), EasyEpConfig(keep_experts=0.5), CALIB)
    b = prunecli.prune(
        tiny_model("mixtral"), EasyEpConfig(keep_experts=0.5), CALIB, runner=Runner(mode="sequential")
    )
    assert a.plan.removals == b.plan.removals
    other = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(9))
    mixed = prunecli.prune(tiny_model("mixtral"), EasyEpConfig(keep_experts=0.5), [CALIB, other])
    scores = mixed.plan.meta["expert_scores"]
    assert all(abs(sum(v) - 2.0) < 1e-9 for v in scores.values())  # two domains, each summing to 1


def test_global_selection_reloads(tmp_path):
    import prunecli
    from prunecli.checkpoint import save_checkpoint

    model = tiny_model("mixtral")
    x = example_input("mixtral")
    prunecli.prune(model, EasyEpConfig(keep_experts=0.5, selection="global"), CALIB)
    y = model_output(model, x)
    out = save_checkpoint(model, None, tmp_path / "g", provenance={})
    verify = json.loads((out / "prunecli.json").read_text())["verify"]
    assert verify["check"] == "logits" and verify["max_abs_diff"] == 0.0
    assert y.shape[-1] == 128


# ------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    """A saved tiny Mixtral (vocabulary of the tiny word-level tokenizer) with that tokenizer."""
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    path = tmp_path_factory.mktemp("tiny-moe")
    tiny_model("mixtral").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("extra", [[], ["--sequential"]])
def test_cli_compress_easy_ep(tiny_moe_dir, tiny_text_file, tmp_path, extra):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from prunecli.cli import app

    out = tmp_path / "pruned"
    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        "".join(json.dumps({"text": line}) + "\n" for line in tiny_text_file.read_text().splitlines())
    )
    args = [
        "compress",
        str(tiny_moe_dir),
        "--method",
        "easy-ep",
        "--demos",
        str(demos),
        "--keep-experts",
        "0.5",
    ]
    args += ["--nsamples", "4", "--seqlen", "16", "-o", str(out), "--json", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["experts"] == {"0": {"kept": 4, "before": 8}, "1": {"kept": 4, "before": 8}}
    assert report["sparsity"]["target"] is None and report["params"]["after"] < report["params"]["before"]
    assert report["memory"]["mode"] == ("sequential" if extra else "whole")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_local_experts == 4
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4


def test_cli_refuses_sparsity_with_expert_methods(tiny_moe_dir, tmp_path):
    from typer.testing import CliRunner

    from prunecli.cli import app

    result = CliRunner().invoke(
        app,
        ["compress", str(tiny_moe_dir), "--method", "reap", "--sparsity", "0.3", "-o", str(tmp_path / "x")],
    )
    assert result.exit_code != 0 and "--keep-experts" in result.output
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ moefy
def test_balanced_clusters_by_hand():
    from prunecli.models.moefy import balanced_clusters

    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05], [0.05, 1.0]])
    assert balanced_clusters(rows, 2) == [[0, 2, 4], [1, 3, 5]]
    with pytest.raises(InputError):
        balanced_clusters(rows, 4)


def test_moefy_all_experts_active_is_the_dense_model():
    from conftest import build_tiny_llama

    from prunecli.models.moefy import moefy

    dense = build_tiny_llama(vocab_size=128)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    y = model_output(dense, x)
    exact = moefy(dense, experts=4, top_k=4, router_scale=0.0)
    torch.testing.assert_close(model_output(exact, x), y, rtol=0, atol=1e-5)
    # channels are partitioned: every dense gate row sits in exactly one expert
    gu = exact.model.layers[0].mlp.experts.gate_up_proj  # [E, 2I/E, H]
    half = gu.shape[1] // 2
    gates = gu[:, :half].reshape(-1, gu.shape[-1])
    dense_gate = dense.model.layers[0].mlp.gate_proj.weight
    assert gates.shape == dense_gate.shape
    assert torch.equal(gates[torch.argsort(gates[:, 0])], dense_gate[torch.argsort(dense_gate[:, 0])])
    # a small router scale: still close to dense with every expert active, and routing matters at k < E
    near = moefy(dense, experts=4, top_k=4)
    torch.testing.assert_close(model_output(near, x), y, rtol=0, atol=1e-2)
    sparse = moefy(dense, experts=4, top_k=1)
    site = build_graph(sparse).moe[0]
    chosen = _routes(sparse, site, x)
    assert len(set(chosen.flatten().tolist())) > 1  # different tokens pick different experts


def test_cli_moefy_then_prune(tmp_path, tiny_llama_dir, tiny_text_file):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from prunecli.cli import app

    moe_dir = tmp_path / "moe"
    r = CliRunner().invoke(
        app, ["models", "moefy", str(tiny_llama_dir), "-o", str(moe_dir), "--experts", "4"]
    )
    assert r.exit_code == 0, r.output
    moe = AutoModelForCausalLM.from_pretrained(moe_dir)
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    out = tmp_path / "pruned"
    args = ["compress", str(moe_dir), "-m", "reap", "--demos", str(tiny_text_file), "--keep-experts", "2"]
    r = CliRunner().invoke(app, [*args, "--nsamples", "4", "--seqlen", "16", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 2


def test_pipeline_recipe_with_expert_keys_runs_and_replays(tiny_moe_dir, tiny_text_file, tmp_path):
    """keep_experts / demos as recipe keys: relative demos resolve, two domains, the report's recipe replays."""
    import yaml

    from prunecli import pipeline

    lines = tiny_text_file.read_text().splitlines()
    (tmp_path / "a.txt").write_text("\n".join(lines))
    (tmp_path / "b.txt").write_text("\n".join(reversed(lines)))
    recipe = tmp_path / "moe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_moe_dir),
                "method": "frequency",
                "keep_experts": 2,
                "demos": ["a.txt", "b.txt"],
                "nsamples": 4,
                "seqlen": 16,
            }
        )
    )
    report = pipeline.compress(recipe, output=str(tmp_path / "out"), speed=False)
    assert report.experts == {"0": {"kept": 2, "before": 8}, "1": {"kept": 2, "before": 8}}
    assert report.sparsity["target"] is None and report.params["after"] < report.params["before"]
    assert isinstance(report.calibration["hash"], list) and len(report.calibration["hash"]) == 2
    assert report.calibration["nsamples"] == 8
    demos = [str((tmp_path / n).resolve()) for n in ("a.txt", "b.txt")]
    assert report.recipe["demos"] == demos and report.recipe["keep_experts"] == 2
    opts, config = pipeline.options_and_config(report.recipe, output=None)
    assert opts.demos == demos and config.keep_experts == 2 and opts.sparsity is None


def test_pipeline_refuses_expert_options_for_other_methods(tiny_moe_dir, tmp_path):
    from prunecli import pipeline

    given = {"model": str(tiny_moe_dir), "method": "magnitude", "sparsity": 0.2}
    for extra in ({"keep_experts": 2}, {"demos": [str(tmp_path / "d.txt")]}):
        with pytest.raises(InputError, match="--keep-experts and --demos are for the expert methods"):
            pipeline.resolve_options({**given, **extra})
    with pytest.raises(InputError, match="keeps experts, not a sparsity"):
        pipeline.resolve_options({**given, "method": "easy-ep"})
