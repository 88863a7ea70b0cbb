"""The width table: head counts and MLP widths land in modules and config, never stale."""

from __future__ import annotations

import pytest
import torch
from archs import example_input, model_output, tiny_model

from prunecli.engine import Plan, apply_plan
from prunecli.engine.apply import ARCH_WIDTHS, check_supported
from prunecli.errors import UnsupportedModelError
from prunecli.graph import build_graph


def test_unknown_model_type_is_refused_before_slicing() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    assert "granite" not in ARCH_WIDTHS
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "granite",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=128,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    graph = build_graph(model)
    with pytest.raises(UnsupportedModelError, match="'granite'"):
        check_supported(model, graph)
    mlp = graph["model.layers.0.mlp:channels"]
    with pytest.raises(UnsupportedModelError, match="stale"):
        apply_plan(model, graph, Plan({mlp.name: [0, 1]}))
    assert model.model.layers[0].mlp.down_proj.weight.shape == (64, 96)  # nothing sliced


def test_unknown_model_type_is_refused_before_calibration(monkeypatch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunecli.api import prune
    from prunecli.methods.flap import FlapConfig
    from prunecli.methods.flap import method as flap_method

    cfg = AutoConfig.for_model(
        "granite", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=128,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(cfg).eval()

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran before the architecture check")

    monkeypatch.setattr(flap_method, "collect_stats", no_calibration)
    with pytest.raises(UnsupportedModelError, match="'granite'"):
        prune(model, FlapConfig(sparsity=0.2), torch.randint(0, 128, (2, 8)))
    # the same model with attention and MLP both ignored has nothing to check and nothing to prune
    with pytest.raises(UnsupportedModelError, match="no prunable"):
        prune(model, FlapConfig(sparsity=0.2, ignore=("*",)), torch.randint(0, 128, (2, 8)))


def test_table_that_does_not_fit_the_module_is_refused() -> None:
    model = tiny_model("llama")
    graph = build_graph(model)
    model.model.layers[0].self_attn.num_key_value_groups = 3  # not what the trace shows
    with pytest.raises(UnsupportedModelError, match="num_key_value_groups"):
        check_supported(model, graph)


def test_mlp_width_attribute_and_config_follow_a_second_pruning() -> None:
    model = tiny_model("llama")
    graph = build_graph(model)
    apply_plan(model, graph, Plan({"model.layers.0.mlp:channels": list(range(10))}))
    assert model.model.layers[0].mlp.intermediate_size == 86  # module attribute, not stale
    assert model.config.per_layer_config[0].intermediate_size == 86
    # prune the already-pruned layer again: its old width (86) is not the global field (96)
    graph = build_graph(model)
    apply_plan(model, graph, Plan({"model.layers.0.mlp:channels": list(range(6))}))
    assert model.model.layers[0].mlp.intermediate_size == 80
    assert model.config.per_layer_config[0].intermediate_size == 80
    assert model.config.per_layer_config[1].intermediate_size == 96


def _roundtrip(cfg):
    return type(cfg).from_dict(cfg.to_dict())


def test_head_count_refused_by_config_validation_goes_per_layer_gemma3() -> None:
    # hidden 64 with 3 heads: transformers' validator refuses it as global fields
    model = tiny_model("gemma3_text", num_key_value_heads=1)
    graph = build_graph(model)
    heads = [g for g in graph.prunable("heads")]
    assert len(heads) == 2 and all(g.num_units == 4 for g in heads)
    plan = Plan({g.name: [1] for g in heads}, fingerprint=graph.fingerprint)
    x = example_input("gemma3_text")
    apply_plan(model, graph, plan)
    cfg = _roundtrip(model.config)  # raised StrictDataclassClassValidationError before
    assert [cfg.per_layer_config[i].num_attention_heads for i in range(2)] == [3, 3]
    assert cfg.per_layer_config[0].head_dim == 16 and cfg.head_dim == 16
    assert cfg.hidden_size % cfg.__dict__["num_attention_heads"] == 0
    assert torch.isfinite(model_output(model, x)).all()


def test_head_count_bert_cannot_build_goes_per_layer() -> None:
    from transformers import BertConfig

    model = tiny_model("bert")
    graph = build_graph(model)
    plan = Plan({g.name: [0] for g in graph.prunable("heads")}, fingerprint=graph.fingerprint)
    apply_plan(model, graph, plan)
    cfg = _roundtrip(model.config)
    assert [cfg.per_layer_config[i].num_attention_heads for i in range(2)] == [3, 3]
    # the global fields still describe a BERT that transformers can build
    assert cfg.hidden_size % cfg.__dict__["num_attention_heads"] == 0
    assert isinstance(cfg, BertConfig)
    assert model.encoder.layer[0].attention.self.all_head_size == 48


def test_uniform_legal_heads_stay_global() -> None:
    model = tiny_model("gemma3_text", num_key_value_heads=1)
    graph = build_graph(model)
    plan = Plan({g.name: [0, 3] for g in graph.prunable("heads")}, fingerprint=graph.fingerprint)
    apply_plan(model, graph, plan)
    assert not model.config.is_heterogeneous
    assert model.config.num_attention_heads == 2 and model.config.head_dim == 16
    _roundtrip(model.config)
