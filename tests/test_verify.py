"""Every architecture's pruned checkpoint reloads as the saved model, and save_checkpoint checks it."""

from __future__ import annotations

import json

import pytest
import torch
from archs import ALL, example_input, model_output, tiny_model

from prunecli.engine import Plan, apply_plan, select_uniform
from prunecli.errors import VerifyError
from prunecli.graph import build_graph

pytestmark = pytest.mark.usefixtures("one_thread_module")


def random_plan(graph, frac: float = 0.3, seed: int = 0) -> Plan:
    gen = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.num_units, generator=gen) for g in graph.prunable()}
    plan = select_uniform(graph, scores, frac)
    plan.fingerprint = graph.fingerprint
    return plan


def mixed_plan_with_biases(graph, seed: int = 0) -> Plan:
    """Uniform 30%, then one more MLP channel off layer 0 (widths differ by layer), and a bias
    update on every MLP output projection (what FLAP's compensation writes)."""
    plan = random_plan(graph, seed=seed)
    channels = sorted((g for g in graph.prunable("channels") if g.layer is not None), key=lambda g: g.layer)
    first = channels[0]
    kept = [u for u in range(first.num_units) if u not in plan.removals.get(first.name, [])]
    plan.removals[first.name] = sorted([*plan.removals.get(first.name, []), kept[0]])
    gen = torch.Generator().manual_seed(seed + 1)
    for g in channels:
        for m in g.members:
            if m.role == "consumer" and m.param.endswith("weight") and m.module not in plan.bias_updates:
                mod = graph_model_module(graph, m.module)
                outputs = mod.weight.shape[1] if type(mod).__name__ == "Conv1D" else mod.weight.shape[0]
                plan.bias_updates[m.module] = (0.1 * torch.randn(outputs, generator=gen)).tolist()
    return plan


_MODELS: dict[int, torch.nn.Module] = {}


def graph_model_module(graph, name: str):
    return _MODELS[id(graph)].get_submodule(name)


def pruned(arch: str, mixed: bool):
    model = tiny_model(arch)
    graph = build_graph(model)
    _MODELS[id(graph)] = model
    plan = mixed_plan_with_biases(graph) if mixed else random_plan(graph)
    apply_plan(model, graph, plan)
    return model


def reload_as_claimed(folder):
    """What a user of the folder would do: stock from_pretrained, or remote code when it says so."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    auto = next(k for k in config.get("auto_map", {"AutoModel": None}) if k != "AutoConfig")
    cls = getattr(transformers, auto if "auto_map" in config else config["architectures"][0])
    return cls.from_pretrained(folder, trust_remote_code="auto_map" in config).eval()


@pytest.mark.parametrize("mixed", [False, True], ids=["uniform", "mixed-widths+biases"])
@pytest.mark.parametrize("arch", ALL)
def test_pruned_checkpoint_reloads_as_saved(arch, mixed, tmp_path):
    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = pruned(arch, mixed)
    x = example_input(arch)
    expected = model_output(model, x)
    out = save_checkpoint(model, None, tmp_path / arch, provenance={})
    verify = json.loads((out / "prunecli.json").read_text())["verify"]
    assert verify["check"] in ("logits", "hidden_state") and verify["max_abs_diff"] <= 1e-5
    config = json.loads((out / "config.json").read_text())
    assert (
        ("auto_map" in config)
        == (verify["route"] == "remote-code")
        == (out / "modeling_prunecli.py").exists()
    )
    for reloaded in (reload_as_claimed(out), load_model(out).model):
        torch.testing.assert_close(model_output(reloaded, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gemma3_text"])
def test_biases_without_config_flag_claim_remote_code(arch, tmp_path):
    """No mlp_bias flag: stock loading would drop the compensation, so the folder says remote code."""
    from prunecli.checkpoint import save_checkpoint

    model = pruned(arch, mixed=True)
    out = save_checkpoint(model, None, tmp_path / arch, provenance={})
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" in config
    biased = [k for k, v in config["prunecli_modules"].items() if "bias" in v.get("params", {})]
    assert biased and all(("mlp" in k) for k in biased)


def test_corrupted_tensor_is_caught_and_nothing_published(tmp_path, monkeypatch):
    import transformers.modeling_utils

    from prunecli.checkpoint import save_checkpoint

    real = transformers.modeling_utils.safe_save_file

    def corrupting(tensors, filename, *args, **kwargs):
        tensors = dict(tensors)
        name = next(k for k in sorted(tensors) if k.endswith("mlp.down_proj.weight"))
        tensors[name] = tensors[name] + 0.5
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", corrupting)
    model = pruned("llama", mixed=False)
    with pytest.raises(VerifyError, match="logits differ"):
        save_checkpoint(model, None, tmp_path / "bad", provenance={})
    assert list(tmp_path.iterdir()) == []

    out = save_checkpoint(model, None, tmp_path / "unchecked", provenance={}, verify=False)
    assert json.loads((out / "prunecli.json").read_text())["verify"]["check"] == "none"


def test_large_checkpoints_get_the_shape_check(tmp_path):
    from prunecli.checkpoint import save_checkpoint

    model = pruned("bert", mixed=True)
    out = save_checkpoint(model, None, tmp_path / "big", provenance={}, verify_max_bytes=1000)
    verify = json.loads((out / "prunecli.json").read_text())["verify"]
    assert (
        verify["check"] == "shapes" and verify["max_abs_diff"] is None and "reload limit" in verify["reason"]
    )


def test_wrong_shape_in_config_is_caught_by_the_shape_check(tmp_path, monkeypatch):
    import prunecli.checkpoint.save as save_mod

    real = save_mod.apply_umask

    def wrong_width(folder):  # runs after the folder is written, before it is verified
        real(folder)
        data = json.loads((folder / "config.json").read_text())
        data["intermediate_size"] += 1
        (folder / "config.json").write_text(json.dumps(data))

    monkeypatch.setattr(save_mod, "apply_umask", wrong_width)
    model = pruned("llama", mixed=False)
    with pytest.raises(VerifyError, match="does not load"):
        save_mod.save_checkpoint(model, None, tmp_path / "bad", provenance={}, verify_max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("structure", ["AL-AM", "UL-UM"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "phi3", "gemma3_text", "qwen3", "llama"])
def test_flap_compensation_survives_reload(arch, structure, tmp_path):
    """FLAP at 0.3 with bias compensation: the reloaded model has the compensation biases."""
    from prunecli.api import prune
    from prunecli.checkpoint import save_checkpoint
    from prunecli.methods.flap.config import FlapConfig
    from prunecli.models import load_model

    model = tiny_model(arch)
    calib = torch.randint(1, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    result = prune(model, FlapConfig(sparsity=0.3, structure=structure), calib=calib)
    assert result.plan.bias_updates
    x = example_input(arch)
    expected = model_output(model, x)
    out = save_checkpoint(model, None, tmp_path / arch, provenance={})
    for reloaded in (reload_as_claimed(out), load_model(out).model):
        torch.testing.assert_close(model_output(reloaded, x), expected, atol=1e-5, rtol=0)
