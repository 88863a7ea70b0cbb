"""save_checkpoint: atomic writes, provenance, stock reload, per-layer widths, shards, biases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from prunecli.errors import InputError, OutputExistsError

ARCHS = ("llama", "qwen2", "mistral")


def tiny_config(arch: str, **overrides):
    """Config for a tiny decoder: hidden 64, 2 layers, 4 query / 2 key-value heads of 16, MLP 128."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,  # explicit, as the engine records it: Qwen2 would derive hidden/heads per layer
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def randomise(model, seed: int = 0):
    """Give every parameter (norm weights and biases included) distinct random values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def build(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    return randomise(AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)), seed)


def build_hetero(arch: str = "llama", seed: int = 0):
    """Layer 0: MLP 96, 2 query heads / 1 key-value head; layer 1 keeps MLP 128, 4 / 2 heads."""
    from prunecli.checkpoint.modeling_prunecli import heterogeneous_class, stock_class_name

    config = tiny_config(arch)
    config.per_layer_config = {
        0: {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
    }
    return randomise(heterogeneous_class(stock_class_name(config))(config), seed)


def ids():
    import torch

    return torch.randint(4, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model):
    import torch

    with torch.no_grad():
        return model(ids()).logits


def leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("arch", ARCHS)
def test_roundtrip_stock_reload(arch, tmp_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunecli.checkpoint import save_checkpoint

    model = build(arch)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", provenance={"method": "magnitude"})
    assert out == (tmp_path / "ckpt").absolute()
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "prunecli.json", "tokenizer.json"} <= names
    assert "modeling_prunecli.py" not in names and not leftovers(tmp_path, "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and "auto_map" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=0)
    if arch == "llama":
        # (For qwen2/mistral, AutoTokenizer picks the model type's own tokenizer class over the
        # generic word-level one saved here; real checkpoints ship their own tokenizer class.)
        tok = AutoTokenizer.from_pretrained(out)
        text = "the weather was fine"
        assert tok(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    prov = json.loads((out / "prunecli.json").read_text())
    assert prov["method"] == "magnitude"
    assert prov["torch_version"] == torch.__version__
    assert {"prunecli_version", "transformers_version", "created"} <= set(prov)
    assert prov["created"].endswith("Z")


def test_tied_embeddings_stay_tied(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint

    model = build("llama", tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = save_checkpoint(model, None, tmp_path / "tied", provenance={})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=0)


def test_biases_survive(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint

    model = build("llama", attention_bias=True, mlp_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    assert model.model.layers[1].mlp.down_proj.bias is not None
    out = save_checkpoint(model, None, tmp_path / "bias", provenance={})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(
        reloaded.model.layers[1].mlp.down_proj.bias, model.model.layers[1].mlp.down_proj.bias
    )
    torch.testing.assert_close(logits(reloaded), logits(model), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ("llama", "qwen2", "phi3"))
def test_heterogeneous_widths_reload_both_ways(arch, tmp_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = build_hetero(arch)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if arch == "phi3":  # fused projections: qkv = (2 + 2 * 1) heads of 16, gate_up = 2 * 96
        assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == (64, 64)
        assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (192, 64)
        assert shapes["model.layers.1.mlp.gate_up_proj.weight"] == (256, 64)
    else:
        assert shapes["model.layers.0.mlp.up_proj.weight"] == (96, 64)
        assert shapes["model.layers.0.self_attn.q_proj.weight"] == (2 * 16, 64)
        assert shapes["model.layers.0.self_attn.k_proj.weight"] == (1 * 16, 64)
        assert shapes["model.layers.1.mlp.up_proj.weight"] == (128, 64)
    expected = logits(model)
    out = save_checkpoint(model, tiny_tokenizer, tmp_path / "hetero", provenance={"method": "flap"})

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["architectures"] == [type(model).__mro__[1].__name__]
    assert config["per_layer_config"] == {
        "0": {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
    }
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_prunecli.PruneCli")
    modeling = (out / "modeling_prunecli.py").read_text()
    assert "prunecli" not in {line.split()[1] for line in modeling.splitlines() if line.startswith("import ")}
    assert "from prunecli" not in modeling and "import prunecli" not in modeling

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert remote.config.model_type == arch
    assert {n: tuple(p.shape) for n, p in remote.named_parameters()} == shapes
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=0)

    again = save_checkpoint(remote, None, tmp_path / "again", provenance={})  # re-save a remote-code model
    assert json.loads((again / "config.json").read_text())["auto_map"] == config["auto_map"]
    torch.testing.assert_close(logits(load_model(again).model), expected, atol=1e-5, rtol=0)

    loaded = load_model(out)
    assert loaded.model.config.model_type == arch and loaded.tokenizer is not None
    torch.testing.assert_close(logits(loaded.model), expected, atol=1e-5, rtol=0)

    prompt = ids()[:1]
    gen_remote = remote.generate(prompt, max_new_tokens=3, do_sample=False)
    gen_local = loaded.model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert gen_remote.shape == (1, prompt.shape[1] + 3)
    assert torch.equal(gen_remote, gen_local)


def test_stock_model_resized_in_place(tmp_path):
    """The engine's flow: slice a stock model's layer 0, record per_layer_config, save, reload."""
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = build("llama")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    keep_q, keep_kv, keep_ch = torch.arange(0, 32), torch.arange(0, 16), torch.arange(5, 101)

    def cut(linear, rows=None, cols=None):
        w = linear.weight.data
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight.data = w.clone()
        return new

    attn.q_proj, attn.k_proj, attn.v_proj = (
        cut(attn.q_proj, keep_q),
        cut(attn.k_proj, keep_kv),
        cut(attn.v_proj, keep_kv),
    )
    attn.o_proj = cut(attn.o_proj, cols=keep_q)
    mlp.gate_proj, mlp.up_proj = cut(mlp.gate_proj, keep_ch), cut(mlp.up_proj, keep_ch)
    mlp.down_proj = cut(mlp.down_proj, cols=keep_ch)
    model.config.per_layer_config = {
        0: {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
    }
    model.config.allow_global_per_layer_attribute_access = True  # as the engine leaves it
    expected = logits(model)

    out = save_checkpoint(model, None, tmp_path / "engine", provenance={})
    # needed by AutoConfig.from_pretrained: LlamaConfig's validation reads the global head count
    assert json.loads((out / "config.json").read_text())["allow_global_per_layer_attribute_access"] is True
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.architectures in (
        None,
        ["LlamaForCausalLM"],
    )
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_model(out).model), expected, atol=1e-5, rtol=0)


def test_fused_phi3_resized_in_place_with_bound_configs(tmp_path):
    """Phi-3 reads config.num_attention_heads in forward: bind_layer_configs makes it work."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.heterogeneity import AmbiguousGlobalPerLayerAttributeError

    from prunecli.checkpoint import save_checkpoint
    from prunecli.checkpoint.modeling_prunecli import bind_layer_configs
    from prunecli.models import load_model

    model = build("phi3")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    # qkv rows: q 0:64 (4 heads), k 64:96, v 96:128 (2 heads) -> keep q heads 0-1, kv head 0.
    qkv_rows = torch.cat([torch.arange(0, 32), torch.arange(64, 80), torch.arange(96, 112)])
    gate_up_rows = torch.cat([torch.arange(0, 96), torch.arange(128, 224)])  # gate 0:128, up 128:256
    with torch.no_grad():
        attn.qkv_proj.weight = torch.nn.Parameter(attn.qkv_proj.weight[qkv_rows].clone())
        attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, :32].clone())
        mlp.gate_up_proj.weight = torch.nn.Parameter(mlp.gate_up_proj.weight[gate_up_rows].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[:, :96].clone())
    attn.num_key_value_heads = 1  # the module attribute the engine updates with the widths
    model.config.per_layer_config = {
        0: {"intermediate_size": 96, "num_attention_heads": 2, "num_key_value_heads": 1}
    }
    with pytest.raises(AmbiguousGlobalPerLayerAttributeError):
        logits(model)
    assert bind_layer_configs(model) > 0
    expected = logits(model)

    out = save_checkpoint(model, None, tmp_path / "phi3", provenance={})
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(logits(remote), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_model(out).model), expected, atol=1e-5, rtol=0)


def test_resave_of_reloaded_heterogeneous_checkpoint(tmp_path):
    import torch

    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = build_hetero("llama")
    first = save_checkpoint(model, None, tmp_path / "a", provenance={})
    loaded = load_model(first).model
    second = save_checkpoint(loaded, None, tmp_path / "b", provenance={})
    config = json.loads((second / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "modeling_prunecli.PruneCliLlamaConfig",
        "AutoModelForCausalLM": "modeling_prunecli.PruneCliLlamaForCausalLM",
    }
    torch.testing.assert_close(logits(load_model(second).model), logits(model), atol=1e-5, rtol=0)


def test_sharded_checkpoint_reloads(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    model = build("llama")
    out = save_checkpoint(model, None, tmp_path / "sharded", provenance={}, max_shard_size="40KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(model), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(logits(load_model(out).model), logits(model), atol=1e-5, rtol=0)


def test_existing_dir_refused_and_untouched(tmp_path):
    from prunecli.checkpoint import save_checkpoint

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError) as err:
        save_checkpoint(build("llama"), None, out, provenance={})
    assert err.value.hint == "pass --overwrite"
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert not leftovers(tmp_path, "exists")


def test_overwrite_replaces(tmp_path):
    from prunecli.checkpoint import save_checkpoint

    out = save_checkpoint(build("llama"), None, tmp_path / "replace", provenance={"run": 1})
    (out / "stale.txt").write_text("old")
    save_checkpoint(build("llama"), None, out, provenance={"run": 2}, overwrite=True)
    assert not (out / "stale.txt").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0o700
    assert json.loads((out / "prunecli.json").read_text())["run"] == 2
    assert not leftovers(tmp_path, "replace")


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    import prunecli.checkpoint.save as save_mod

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    # Raises after the weights are written into the temporary folder.
    monkeypatch.setattr(save_mod, "_fix_config_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_mod.save_checkpoint(build("llama"), None, tmp_path / "new", provenance={})
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    old = save_mod.save_checkpoint(build("llama"), None, tmp_path / "old", provenance={})
    (old / "keep.txt").write_text("mine")
    monkeypatch.setattr(save_mod, "_fix_config_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_mod.save_checkpoint(build("llama"), None, old, provenance={}, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "keep.txt").read_text() == "mine"


def test_recipe_yaml_and_bad_provenance(tmp_path):
    import yaml

    from prunecli.checkpoint import save_checkpoint

    recipe = {"method": "flap", "sparsity": 0.2, "ignore": ["lm_head"]}
    out = save_checkpoint(build("llama"), None, tmp_path / "r", provenance={"recipe": recipe})
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe
    assert json.loads((out / "prunecli.json").read_text())["recipe"] == recipe

    with pytest.raises(InputError, match="JSON"):
        save_checkpoint(build("llama"), None, tmp_path / "bad", provenance={"x": object()})
    assert not (tmp_path / "bad").exists() and not leftovers(tmp_path, "bad")


def test_input_folder_is_never_overwritten(tmp_path):
    from prunecli.checkpoint import save_checkpoint
    from prunecli.models import load_model

    src = save_checkpoint(build("llama"), None, tmp_path / "src", provenance={"v": 1})
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    loaded = load_model(src)
    with pytest.raises(OutputExistsError, match="loaded from"):
        save_checkpoint(loaded.model, None, src, provenance={"v": 2}, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_bad_shard_size_refused_before_writing(tmp_path):
    from prunecli.checkpoint import save_checkpoint

    with pytest.raises(InputError, match="max_shard_size"):
        save_checkpoint(build("llama"), None, tmp_path / "s", provenance={}, max_shard_size="2 parsecs")
    assert list(tmp_path.iterdir()) == []


def test_implicit_head_dim_is_written_after_head_pruning(tmp_path):
    """Qwen2 configs derive head_dim = hidden / heads; after pruning heads config.json must state it."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from prunecli.checkpoint import save_checkpoint

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    assert "head_dim" not in config.__dict__
    model = randomise(AutoModelForCausalLM.from_config(config))
    for layer in model.model.layers:  # keep query heads 0-1 and key/value head 0 (head size 16)
        attn = layer.self_attn
        attn.q_proj = _sliced(attn.q_proj, rows=slice(0, 32))
        attn.k_proj = _sliced(attn.k_proj, rows=slice(0, 16))
        attn.v_proj = _sliced(attn.v_proj, rows=slice(0, 16))
        attn.o_proj = _sliced(attn.o_proj, cols=slice(0, 32))
    model.config.num_attention_heads, model.config.num_key_value_heads = 2, 1
    expected = logits(model)

    out = save_checkpoint(model, None, tmp_path / "qwen2", provenance={})
    saved = json.loads((out / "config.json").read_text())
    assert saved["head_dim"] == 16 and saved["num_attention_heads"] == 2
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(out).eval()), expected, atol=1e-5, rtol=0
    )


def _sliced(linear, rows=slice(None), cols=slice(None)):
    import torch

    weight = linear.weight.data[rows, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight.data = weight.clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[rows].clone()
    return new
