"""Pruned configs that transformers' own validation would refuse are caught before saving.

transformers 5 validates a config when it is built (``from_pretrained`` included):
``hidden_size % num_attention_heads`` for Llama/Gemma 2/Gemma 3, ``len(layer_types) ==
num_hidden_layers`` for models with per-layer attention types, Phi-3's rope factor lengths.
The engine records head counts those validators refuse per layer instead (see
tests/test_widths.py); these tests cover what is left: layer dropping, and the checks that
stop a refused config before anything is written.
"""

from __future__ import annotations

import json

import pytest
import torch
from archs import example_input, mixed_layers_model, model_output, tiny_model

from prunecli.errors import CheckpointError, PrunedModelError

TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def test_drop_layers_keeps_layer_types_in_step(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint
    from prunecli.engine.layers import drop_layers
    from prunecli.models.hf import config_problem

    model = mixed_layers_model("gemma3_text", TYPES)
    x = example_input("gemma3_text")
    assert drop_layers(model, [1]) == [0, 2]
    # was: layer_types kept 3 entries for 2 layers, and saving raised transformers' error
    assert model.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert config_problem(model.config) is None
    expected = model_output(model, x)

    out = save_checkpoint(model, None, tmp_path / "dropped", provenance={})
    saved = json.loads((out / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2 and len(saved["layer_types"]) == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock class: no per-layer widths
    torch.testing.assert_close(model_output(reloaded, x), expected, atol=1e-5, rtol=0)


def test_engine_stops_at_a_config_transformers_refuses(monkeypatch) -> None:
    """If the engine ever records widths globally that the validator refuses, apply_plan says so."""
    from prunecli.engine import Plan, apply_plan
    from prunecli.engine import apply as apply_module
    from prunecli.graph import build_graph

    # An engine that skips its validity check before recording a uniform head count globally.
    monkeypatch.setattr(apply_module, "_global_ok", lambda *args: True)
    model = tiny_model("gemma3_text", num_key_value_heads=1)  # hidden 64, 4 heads of 16
    graph = build_graph(model)
    plan = Plan({g.name: [1] for g in graph.prunable("heads")}, fingerprint=graph.fingerprint)
    with pytest.raises(PrunedModelError, match=r"hidden size \(64\) is not a multiple .* heads \(3\)"):
        apply_plan(model, graph, plan)


def test_save_refuses_a_config_transformers_refuses(tmp_path) -> None:
    from prunecli.checkpoint import save_checkpoint

    model = mixed_layers_model("gemma3_text", TYPES)
    model.config.num_hidden_layers = 2  # as a layer dropper that forgets layer_types would leave it
    with pytest.raises(CheckpointError, match="num_hidden_layers.*layer_types.*nothing was written"):
        save_checkpoint(model, None, tmp_path / "ckpt", provenance={})
    assert list(tmp_path.iterdir()) == []
