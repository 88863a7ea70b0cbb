"""The random Llama checkpoint writer (prunecli.models.random_llama) on a tiny spec."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=512)


def _build(path: Path, seed: int = 0) -> Path:
    from prunecli.models.random_llama import write_random_llama

    return write_random_llama(path, seed=seed, **TINY)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("rl") / "tiny")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_is_byte_identical_and_other_seed_differs(tiny: Path, tmp_path: Path) -> None:
    again = _files(_build(tmp_path / "again"))
    assert again == _files(tiny)
    other = _files(_build(tmp_path / "other", seed=1))
    assert other.keys() == again.keys()
    weights = [name for name in again if name.endswith(".safetensors")]
    assert len(weights) == TINY["num_layers"] + 1
    assert all(other[name] != again[name] for name in weights)


def test_tensor_does_not_depend_on_write_order(tiny: Path) -> None:
    import torch
    from safetensors import safe_open

    from prunecli.models.random_llama import random_tensor

    name = "model.layers.1.mlp.down_proj.weight"
    std = 0.02 / math.sqrt(2 * TINY["num_layers"])
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    with safe_open(str(tiny / index["weight_map"][name]), framework="pt") as f:
        stored = f.get_tensor(name)
    alone = random_tensor(0, name, tuple(stored.shape), std)
    assert torch.equal(stored, alone)
    assert stored.float().std().item() == pytest.approx(std, rel=0.1)


def test_shapes_match_the_config_on_the_meta_device(tiny: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunecli.models.random_llama import config_tensor_mismatches, header_tensors

    config = AutoConfig.from_pretrained(str(tiny))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 512)
    assert config.tie_word_embeddings is False
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: shape for k, (_, shape) in header_tensors(tiny).items()}
    assert stored == expected
    assert config_tensor_mismatches(tiny) == []


def test_index_covers_every_tensor_once_and_dtype_is_bfloat16(tiny: Path) -> None:
    from safetensors import safe_open

    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    seen: list[str] = []
    total = 0
    for path in sorted(tiny.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                seen.append(name)
                assert weight_map[name] == path.name
                sl = f.get_slice(name)
                assert sl.get_dtype() == "BF16"
                total += math.prod(sl.get_shape()) * 2
    assert sorted(seen) == sorted(set(seen)) == sorted(weight_map)
    assert set(weight_map.values()) == {p.name for p in tiny.glob("*.safetensors")}
    assert index["metadata"]["total_size"] == total
    assert json.loads((tiny / "config.json").read_text())["dtype"] == "bfloat16"


def test_tokenizer_loads_and_ids_fit_the_vocabulary(tiny: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    assert len(tok) <= TINY["vocab_size"]
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Emma Woodhouse, handsome, clever, and rich — naïve café 東京 🙂"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert 0 <= min(ids) and max(ids) < TINY["vocab_size"]
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_forward_pass_is_finite(tiny: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.bfloat16)
    ids = torch.randint(0, TINY["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.shape == (2, 32, TINY["vocab_size"])
    assert torch.isfinite(logits).all()


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path, tiny: Path) -> None:
    from prunecli.errors import InputError
    from prunecli.models.random_llama import write_random_llama

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not written by"):
        write_random_llama(foreign, overwrite=True, **TINY)
    assert (foreign / "keep.txt").read_text() == "x"
    with pytest.raises(InputError, match="already exists"):
        write_random_llama(tiny, **TINY)


def test_rejects_inconsistent_shapes() -> None:
    from prunecli.errors import InputError
    from prunecli.models.random_llama import RandomLlamaSpec

    with pytest.raises(InputError, match="multiple"):
        RandomLlamaSpec(hidden_size=64, num_heads=5)
    with pytest.raises(InputError, match="multiple"):
        RandomLlamaSpec(num_heads=32, num_kv_heads=5)
    assert RandomLlamaSpec(hidden_size=64, num_heads=4).num_kv_heads == 4
    with pytest.raises(InputError, match="vocab_size"):
        RandomLlamaSpec(vocab_size=100)
