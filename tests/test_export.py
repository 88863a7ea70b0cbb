"""ONNX and GGUF export of tiny Llamas (uniform and per-layer widths): onnxruntime equality, GGUF read-back.

The llama.cpp test runs only where llama-cpp-python is installed (it builds llama.cpp from
source, ~15 minutes); everything else needs onnx, onnxscript, onnxruntime and gguf.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SAMPLE_TEXT, build_tiny_llama
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.errors import InputError, OutputExistsError, UnsupportedModelError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
gguf = pytest.importorskip("gguf")

runner = CliRunner()


def bpe_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's) trained on the sample text: 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 2, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def dense(tokenizer):
    return build_tiny_llama(vocab_size=len(tokenizer))


@pytest.fixture(scope="module")
def flap_model(tokenizer):
    """A tiny Llama pruned by FLAP: widths differ by layer and o_proj/down_proj carry biases."""
    from prunecli import FlapConfig, prune

    model = build_tiny_llama(vocab_size=len(tokenizer), seed=1)
    calib = torch.randint(0, len(tokenizer), (8, 32), generator=torch.Generator().manual_seed(0))
    prune(model, FlapConfig(sparsity=0.4), calib)
    return model


@pytest.fixture(scope="module")
def flap_dir(flap_model, tokenizer, tmp_path_factory) -> Path:
    from prunecli.checkpoint import save_checkpoint

    return save_checkpoint(flap_model, tokenizer, tmp_path_factory.mktemp("flap") / "ckpt", provenance={})


def torch_logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()


# ----------------------------------------------------------------------------- ONNX
def test_onnx_dynamic_axes_equal_pytorch(dense, tmp_path: Path) -> None:
    from prunecli.export import onnxruntime_logits, to_onnx

    report = to_onnx(dense, tmp_path / "tiny.onnx")
    assert report["verify"]["check"] == "onnxruntime"
    assert report["verify"]["max_abs_diff"] <= report["verify"]["tolerance"]
    assert report["bytes"] == (tmp_path / "tiny.onnx").stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]  # no temporary left behind
    g = torch.Generator().manual_seed(5)
    for shape in ((1, 3), (3, 17)):  # batch and sequence differ from the traced example (1, 8)
        ids = torch.randint(0, dense.config.vocab_size, shape, generator=g)
        got = onnxruntime_logits(tmp_path / "tiny.onnx", ids)
        np.testing.assert_allclose(got, torch_logits(dense, ids), atol=1e-4, rtol=0)
    # a left-padded row: the real tokens' logits equal the unpadded run
    ids = torch.randint(0, dense.config.vocab_size, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    got = onnxruntime_logits(tmp_path / "tiny.onnx", ids, mask)
    np.testing.assert_allclose(got[0, 4:], torch_logits(dense, ids[:1, 4:])[0], atol=1e-4, rtol=0)


def test_onnx_per_layer_widths_from_checkpoint(flap_dir: Path, flap_model, tmp_path: Path) -> None:
    import onnx

    from prunecli.export import export_model, onnxruntime_logits

    report = export_model(flap_dir, "onnx", tmp_path / "flap.onnx")
    assert report["format"] == "onnx" and report["source"] == str(flap_dir)
    initializers = onnx.load(tmp_path / "flap.onnx").graph.initializer
    # the pruned matrices are what the file holds (1-D constants may be shared, so count 2-D ones)
    n_onnx = sum(int(np.prod(t.dims)) for t in initializers if len(t.dims) == 2)
    n_torch = sum(p.numel() for p in flap_model.parameters() if p.dim() == 2)
    assert n_onnx == n_torch
    ids = torch.randint(0, flap_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(
        onnxruntime_logits(tmp_path / "flap.onnx", ids), torch_logits(flap_model, ids), atol=1e-4, rtol=0
    )


# ----------------------------------------------------------------------------- GGUF
def read_gguf(path: Path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the converter's rotary permutation (pairwise rows back to half-split)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_gguf_uniform_is_llama_with_tokenizer(dense, tokenizer, tmp_path: Path) -> None:
    from prunecli.export import to_gguf

    report = to_gguf(dense, tokenizer, tmp_path / "tiny.gguf")
    assert report["architecture"] == "llama" and report["verify"]["check"] in ("shapes", "llama.cpp")
    fields, tensors = read_gguf(tmp_path / "tiny.gguf")
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 128 and fields["llama.embedding_length"] == 64
    assert fields["llama.attention.key_length"] == 16 and fields["llama.rope.dimension_count"] == 16
    # tokenizer: every token in id order, the merges, the special ids
    vocab = tokenizer.get_vocab()
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.get)
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    types = fields["tokenizer.ggml.token_type"]
    assert (
        types[vocab["<|im_start|>"]] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    )
    # untied head written; Q/K permuted per head, V/O as they are
    layer = dense.model.layers[1].self_attn
    assert "output.weight" in tensors
    q = np.asarray(tensors["blk.1.attn_q.weight"].data)
    k = np.asarray(tensors["blk.1.attn_k.weight"].data)
    np.testing.assert_array_equal(unpermute(q, 4), layer.q_proj.weight.detach().numpy())
    np.testing.assert_array_equal(unpermute(k, 2), layer.k_proj.weight.detach().numpy())
    np.testing.assert_array_equal(
        tensors["blk.1.attn_output.weight"].data, layer.o_proj.weight.detach().numpy()
    )


def test_gguf_per_layer_widths_are_deci_arrays(flap_model, tokenizer, tmp_path: Path) -> None:
    from prunecli.export import to_gguf

    report = to_gguf(flap_model, tokenizer, tmp_path / "flap.gguf")
    layers = flap_model.model.layers
    heads = [m.self_attn.q_proj.out_features // 16 for m in layers]
    kv = [m.self_attn.k_proj.out_features // 16 for m in layers]
    ff = [m.mlp.gate_proj.out_features for m in layers]
    assert len(set(zip(heads, kv, ff, strict=True))) > 1, "FLAP should leave different widths per layer"
    assert report["architecture"] == "deci"
    fields, tensors = read_gguf(tmp_path / "flap.gguf")
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == heads
    assert fields["deci.attention.head_count_kv"] == kv
    assert fields["deci.feed_forward_length"] == ff
    for i, layer in enumerate(layers):
        assert tuple(tensors[f"blk.{i}.ffn_down.weight"].data.shape) == tuple(
            layer.mlp.down_proj.weight.shape
        )
        assert tuple(tensors[f"blk.{i}.attn_q.weight"].data.shape) == tuple(
            layer.self_attn.q_proj.weight.shape
        )
        # FLAP's bias compensation is carried (llama.cpp adds attn_output.bias / ffn_down.bias)
        if layer.mlp.down_proj.bias is not None:
            np.testing.assert_array_equal(
                tensors[f"blk.{i}.ffn_down.bias"].data, layer.mlp.down_proj.bias.detach().numpy()
            )
        if layer.self_attn.o_proj.bias is not None:
            assert f"blk.{i}.attn_output.bias" in tensors
    assert any(layer.mlp.down_proj.bias is not None for layer in layers)


def test_gguf_layer_without_heads_keeps_one_zero_head(dense) -> None:
    import copy

    from torch import nn

    from prunecli.export.gguf_export import gguf_tensors

    model = copy.deepcopy(dense)
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, nn.Linear(64, 0, bias=False))
    attn.o_proj = nn.Linear(0, 64, bias=True)
    tensors, widths = gguf_tensors(model)
    named = dict(tensors)
    assert widths[0] == {"n_head": 1, "n_head_kv": 1, "n_ff": 128, "head_dim": 16}
    assert named["blk.0.attn_q.weight"].shape == (16, 64) and not named["blk.0.attn_q.weight"].any()
    assert named["blk.0.attn_output.weight"].shape == (64, 16) and not named["blk.0.attn_output.weight"].any()
    np.testing.assert_array_equal(named["blk.0.attn_output.bias"], attn.o_proj.bias.detach().numpy())


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_outtypes(dense, tokenizer, tmp_path: Path, outtype: str) -> None:
    from prunecli.export import to_gguf

    to_gguf(dense, tokenizer, tmp_path / "t.gguf", outtype=outtype)
    _, tensors = read_gguf(tmp_path / "t.gguf")
    q = gguf.GGMLQuantizationType
    want = q.F16 if outtype == "f16" else q.Q8_0
    assert tensors["blk.0.ffn_up.weight"].tensor_type == want
    assert tensors["blk.0.attn_norm.weight"].tensor_type == q.F32  # norms stay f32
    w = dense.model.layers[0].mlp.up_proj.weight.detach().numpy()
    back = gguf.quants.dequantize(tensors["blk.0.ffn_up.weight"].data, want).reshape(w.shape)
    # f16 rounding: 2^-11 relative; q8_0: half a step of max|block| / 127
    bound = np.abs(w).max() * (2.0**-11 if outtype == "f16" else 1 / 254) + 1e-7
    assert np.abs(back - w).max() <= bound


def test_gguf_refuses_other_families_and_bad_files(tokenizer, tmp_path: Path) -> None:
    from archs import tiny_model

    from prunecli.export import to_gguf, to_onnx

    with pytest.raises(UnsupportedModelError, match="Llama-family"):
        to_gguf(tiny_model("qwen3"), tokenizer, tmp_path / "q.gguf")
    with pytest.raises(InputError, match="must end in .gguf"):
        to_gguf(build_tiny_llama(), tokenizer, tmp_path / "q.bin")
    (tmp_path / "x.onnx").write_text("keep")
    with pytest.raises(OutputExistsError):
        to_onnx(build_tiny_llama(), tmp_path / "x.onnx")
    assert (tmp_path / "x.onnx").read_text() == "keep"


# ----------------------------------------------------------------------------- CLI
def test_cli_export_and_compress_export(flap_dir: Path, tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["export", str(flap_dir), "--format", "gguf", "-o", str(tmp_path / "f.gguf"), "--json"]
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"] == "deci" and Path(report["path"]).is_file()
    again = runner.invoke(app, ["export", str(flap_dir), "-f", "gguf", "-o", str(tmp_path / "f.gguf")])
    assert again.exit_code == 2 and "exists" in again.stderr
    bad = runner.invoke(
        app, ["export", str(flap_dir), "-f", "onnx", "--outtype", "q8_0", "-o", str(tmp_path / "f.onnx")]
    )
    assert bad.exit_code == 2 and "GGUF only" in bad.stderr

    out = tmp_path / "pruned"
    result = runner.invoke(
        app,
        [
            "compress",
            str(tiny_llama_dir),
            "-m",
            "magnitude",
            "-s",
            "0.3",
            "-o",
            str(out),
            "--export",
            "onnx",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["export"]["path"] == str(tmp_path / "pruned.onnx")
    assert report["export"]["verify"]["check"] == "onnxruntime"
    assert (tmp_path / "pruned.onnx").is_file() and (out / "config.json").is_file()
    missing = runner.invoke(
        app, ["compress", str(tiny_llama_dir), "-m", "magnitude", "-s", "0.3", "--export", "gguf"]
    )
    assert missing.exit_code == 2 and "--export needs --output" in missing.stderr


# ----------------------------------------------------------------------------- llama.cpp (optional)
def test_llamacpp_runs_uniform_and_deci_exports(dense, flap_model, tokenizer, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from prunecli.export import llamacpp_logits, to_gguf

    ids = torch.randint(0, len(tokenizer), (1, 24), generator=torch.Generator().manual_seed(3))
    for name, model in (("dense", dense), ("flap", flap_model)):
        report = to_gguf(model, tokenizer, tmp_path / f"{name}.gguf")
        assert report["verify"]["check"] == "llama.cpp"
        got = llamacpp_logits(tmp_path / f"{name}.gguf", ids[0].tolist())
        want = torch_logits(model, ids)[0]
        # f32 weights and KV cache, f32 maths in a different order: ~4e-6 relative on SmolLM2
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), name
        assert (got.argmax(-1) == want.argmax(-1)).all(), name
