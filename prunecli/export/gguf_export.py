"""Export a (pruned) Llama-family causal LM to GGUF for llama.cpp, with the ``gguf`` package.

Layout (what llama.cpp 0.3.36's loader reads; tensor names as ``convert_hf_to_gguf.py`` writes):

- Same widths in every layer: the standard ``llama`` architecture, scalar
  ``llama.attention.head_count`` / ``head_count_kv`` / ``feed_forward_length``.
- Widths that differ by layer: llama.cpp's ``deci`` architecture (Nemotron/DeciLM), whose
  ``deci.attention.head_count``, ``deci.attention.head_count_kv`` and
  ``deci.feed_forward_length`` are arrays with one entry per layer (read by
  ``llama_model_loader::get_key_or_arr``; every layer's tensors are then created with its own
  widths). Its graph is Llama's: RMSNorm, RoPE of the "normal" (pairwise) kind, GQA attention,
  SwiGLU MLP, optional ``attn_output.bias`` and ``ffn_*.bias``.
- A layer whose heads (or MLP channels) were all removed keeps one head (one channel) with
  zero weights: ``deci`` treats ``head_count == 0`` as an attention-free layer and
  ``feed_forward_length == 0`` by skipping the rest of the layer (the attention output is then
  lost), and neither adds an output bias there. A zero head or channel contributes exactly
  zero, so the bias (e.g. FLAP's compensation) is kept and the function is unchanged.
- Q and K projections are permuted from Hugging Face's half-split rotary layout to llama.cpp's
  pairwise one, per layer with that layer's head counts (``LlamaModel.permute`` in the
  converter).
- The tokenizer is carried over from the Hugging Face tokenizer: a byte-level BPE (GPT-2 style,
  SmolLM2, Llama 3) becomes ``tokenizer.ggml.model = "gpt2"`` with its merges and the
  pre-tokenizer name llama.cpp knows it by (recognised, as the converter does, from the hash
  of the token ids of a fixed check text; an unknown hash writes ``"default"`` and a warning);
  a byte-fallback BPE (Llama 2, Mistral) becomes ``"llama"`` via ``gguf.LlamaHfVocab``. Special
  token ids, ``add_bos_token`` and the chat template come from ``gguf.SpecialVocab``.

Out types: ``f32``; ``f16`` (2-D weights in half precision, norms and biases in f32); ``q8_0``
(2-D weights whose rows are a multiple of 32 in 8-bit blocks via ``gguf.quants``, the rest f16,
as the converter does).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from prunecli.errors import DependencyMissingError, InputError, UnsupportedModelError, VerifyError
from prunecli.export._files import atomic_output, check_output_file

OUTTYPES = ("f32", "f16", "q8_0")
# llama.cpp vs PyTorch, f32 weights and an f32 KV cache: both compute in f32 in a different order
# (blocked matmuls, fused softmax); measured 2-4e-6 x max|logit| on SmolLM2 dense and FLAP 50%
# (30 layers), so 1e-4 (the checkpoint verification bound) leaves a 25x margin. llama.cpp's
# default f16 KV cache alone moves logits by ~1.5e-3 x max|logit|, hence kv_f32 for the check.
GGUF_F32_TOLERANCE = 1e-4  # x max(1, max |logits|)

# sha256 of str(tokenizer.encode(CHECK_TEXT)) -> llama.cpp pre-tokenizer name, for the byte-level
# BPE tokenizers of Llama-family models (a subset of convert_hf_to_gguf.py's table).
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}
_LLAMA_TYPES = ("llama",)


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise DependencyMissingError(
            "GGUF export needs the 'gguf' package", hint="pip install gguf"
        ) from None
    return gguf


def layer_widths(model: Any) -> list[dict[str, int]]:
    """Per layer: ``n_head``, ``n_head_kv``, ``n_ff`` and ``head_dim`` read from the modules themselves."""
    widths = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        head_dim = int(attn.head_dim)
        widths.append(
            {
                "n_head": int(attn.q_proj.weight.shape[0]) // head_dim,
                "n_head_kv": int(attn.k_proj.weight.shape[0]) // head_dim,
                "n_ff": int(mlp.gate_proj.weight.shape[0]),
                "head_dim": head_dim,
            }
        )
    return widths


def _check_model(model: Any) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _LLAMA_TYPES:
        raise UnsupportedModelError(
            f"GGUF export handles Llama-family checkpoints (model_type llama); got {model_type!r}",
            hint="export it to ONNX instead (--format onnx)",
        )
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not hasattr(layer.self_attn, name):
                raise UnsupportedModelError(f"GGUF export: a layer has no self_attn.{name}")
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not hasattr(layer.mlp, name):
                raise UnsupportedModelError(f"GGUF export: a layer has no mlp.{name}")
    head_dims = {w["head_dim"] for w in layer_widths(model)}
    if len(head_dims) != 1:
        raise UnsupportedModelError(
            f"GGUF export needs one head size in every layer; got {sorted(head_dims)}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"GGUF export: llama.cpp's Llama graph uses SiLU, got {config.hidden_act!r}"
        )


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = str(params.get("rope_type", params.get("type", "default")) or "default")
    if kind not in ("default", "llama3", "linear"):
        raise UnsupportedModelError(
            f"GGUF export: rope type {kind!r} is not supported (default, llama3, linear)"
        )
    return float(theta), {**params, "rope_type": kind}


def _llama3_rope_factors(params: dict[str, Any], head_dim: int, theta: float) -> Any:
    """The ``rope_freqs`` tensor llama.cpp multiplies into Llama 3 RoPE (as the converter computes it)."""
    import numpy as np

    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def permute_rotary(w: Any, n_head: int) -> Any:
    """Rows of a Q/K projection from the half-split rotary layout to llama.cpp's pairwise one.

    ``w``: ``(n_head * head_dim, ...)``; inside each head, row ``j < head_dim/2`` and row
    ``j + head_dim/2`` form a rotary pair in Hugging Face, and become rows ``2j``, ``2j+1``.
    """
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _pad_rows(w: Any, rows: int) -> Any:
    import numpy as np

    return np.concatenate([w, np.zeros((rows, *w.shape[1:]), dtype=w.dtype)], axis=0)


def _pad_cols(w: Any, cols: int) -> Any:
    import numpy as np

    return np.concatenate([w, np.zeros((w.shape[0], cols), dtype=w.dtype)], axis=1)


def gguf_tensors(model: Any) -> tuple[list[tuple[str, Any]], list[dict[str, int]]]:
    """The GGUF tensors (name, float32 numpy array in PyTorch's row-major shape) and the written widths."""
    import numpy as np

    def arr(t: Any) -> Any:
        return t.detach().to("cpu").float().numpy()

    tensors: list[tuple[str, Any]] = [("token_embd.weight", arr(model.model.embed_tokens.weight))]
    written = []
    for i, (layer, w) in enumerate(zip(model.model.layers, layer_widths(model), strict=True)):
        attn, mlp, d = layer.self_attn, layer.mlp, w["head_dim"]
        q, k, v, o = (arr(getattr(attn, n).weight) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        biases = {
            n: arr(getattr(attn, n).bias)
            for n in ("q_proj", "k_proj", "v_proj")
            if attn.q_proj.bias is not None
        }
        n_head, n_kv = w["n_head"], w["n_head_kv"]
        if n_head == 0:  # one zero head: contributes nothing, keeps the layer an attention layer
            q, k, v, o = _pad_rows(q, d), _pad_rows(k, d), _pad_rows(v, d), _pad_cols(o, d)
            biases = {n: np.zeros(d, dtype=np.float32) for n in biases}
            n_head = n_kv = 1
        gate, up, down = (arr(getattr(mlp, n).weight) for n in ("gate_proj", "up_proj", "down_proj"))
        n_ff = w["n_ff"]
        mlp_bias = {
            n: arr(getattr(mlp, n).bias) for n in ("gate_proj", "up_proj") if getattr(mlp, n).bias is not None
        }
        if n_ff == 0:  # one zero channel: silu(0) * 0 = 0
            gate, up, down = _pad_rows(gate, 1), _pad_rows(up, 1), _pad_cols(down, 1)
            mlp_bias = {n: np.zeros(1, dtype=np.float32) for n in mlp_bias}
            n_ff = 1
        p = f"blk.{i}"
        tensors += [
            (f"{p}.attn_norm.weight", arr(layer.input_layernorm.weight)),
            (f"{p}.attn_q.weight", permute_rotary(q, n_head)),
            (f"{p}.attn_k.weight", permute_rotary(k, n_kv)),
            (f"{p}.attn_v.weight", v),
            (f"{p}.attn_output.weight", o),
        ]
        if "q_proj" in biases:
            tensors += [
                (f"{p}.attn_q.bias", permute_rotary(biases["q_proj"], n_head)),
                (f"{p}.attn_k.bias", permute_rotary(biases["k_proj"], n_kv)),
                (f"{p}.attn_v.bias", biases["v_proj"]),
            ]
        if attn.o_proj.bias is not None:
            tensors.append((f"{p}.attn_output.bias", arr(attn.o_proj.bias)))
        tensors += [
            (f"{p}.ffn_norm.weight", arr(layer.post_attention_layernorm.weight)),
            (f"{p}.ffn_gate.weight", gate),
            (f"{p}.ffn_up.weight", up),
            (f"{p}.ffn_down.weight", down),
        ]
        tensors += [(f"{p}.ffn_{n[:-5]}.bias", b) for n, b in mlp_bias.items()]
        if mlp.down_proj.bias is not None:
            tensors.append((f"{p}.ffn_down.bias", arr(mlp.down_proj.bias)))
        written.append({"n_head": n_head, "n_head_kv": n_kv, "n_ff": n_ff, "head_dim": d})
    tensors.append(("output_norm.weight", arr(model.model.norm.weight)))
    head = model.get_output_embeddings()
    if head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        tensors.append(("output.weight", arr(head.weight)))
    return tensors, written


def _encode(gguf: Any, name: str, data: Any, outtype: str) -> tuple[Any, Any]:
    """``(array, raw_dtype)`` for ``add_tensor``: 1-D tensors stay f32; 2-D follow ``outtype``."""
    import numpy as np

    q = gguf.GGMLQuantizationType
    if data.ndim < 2 or outtype == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), None
    if outtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), q.Q8_0), q.Q8_0
    return np.ascontiguousarray(data, dtype=np.float16), None


def pre_tokenizer_name(tokenizer: Any) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, or ``None`` when unknown."""
    ids = tokenizer.encode(CHECK_TEXT)
    return KNOWN_PRE_TOKENIZERS.get(hashlib.sha256(str(ids).encode()).hexdigest())


def _looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def _add_tokenizer(writer: Any, gguf: Any, tokenizer: Any, vocab_size: int, warnings: list[str]) -> str:
    """Write the ``tokenizer.ggml.*`` keys; returns the tokenizer model name written."""
    import json

    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            "GGUF export needs the checkpoint's fast tokenizer (tokenizer.json) to carry the vocabulary",
            hint="save the tokenizer with the checkpoint (save_pretrained) and export again",
        )
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state.get("model", {})
    decoder = (state.get("decoder") or {}).get("type")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder == "ByteLevel":
            kind = "gpt2"
            vocab = tokenizer.get_vocab()
            if max(vocab.values()) >= vocab_size:
                raise UnsupportedModelError(
                    f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's {vocab_size} embeddings"
                )
            reverse = {i: t for t, i in vocab.items()}
            added = tokenizer.get_added_vocab()
            added_decoder = tokenizer.added_tokens_decoder
            tokens, types = [], []
            for i in range(vocab_size):
                if i not in reverse:
                    tokens.append(f"[PAD{i}]")
                    types.append(gguf.TokenType.UNUSED)
                    continue
                token = reverse[i]
                if token in added:
                    if added_decoder[i].special or _looks_special(token):
                        types.append(gguf.TokenType.CONTROL)
                    else:
                        types.append(gguf.TokenType.USER_DEFINED)
                else:
                    types.append(gguf.TokenType.NORMAL)
                tokens.append(token)
            pre = pre_tokenizer_name(tokenizer)
            if pre is None:
                warnings.append(
                    "the tokenizer's pre-tokenizer is not one llama.cpp is known to name; wrote 'default' "
                    "(token ids given to llama.cpp are unaffected; its own text tokenization may differ)"
                )
                pre = "default"
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(tokens)
            writer.add_token_types(types)
        elif model.get("type") == "BPE" and model.get("byte_fallback"):
            kind = "llama"
            vocab = gguf.LlamaHfVocab(Path(folder))
            tokens, scores, types = [], [], []
            for text, score, toktype in vocab.all_tokens():
                tokens.append(text)
                scores.append(score)
                types.append(toktype)
            for i in range(len(tokens), vocab_size):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
            writer.add_tokenizer_model("llama")
            writer.add_tokenizer_pre("default")
            writer.add_token_list(tokens[:vocab_size])
            writer.add_token_scores(scores[:vocab_size])
            writer.add_token_types(types[:vocab_size])
        else:
            raise UnsupportedModelError(
                f"GGUF export: tokenizer of type {model.get('type')!r} (decoder {decoder!r}) is not supported",
                hint="byte-level BPE (GPT-2/Llama 3/SmolLM style) and byte-fallback BPE (Llama 2) are",
            )
        special = gguf.SpecialVocab(Path(folder), load_merges=(kind == "gpt2"), n_vocab=vocab_size)
        # what the tokenizer does, when its files do not say (transformers 5 omits add_bos_token)
        probe = tokenizer("a")["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        special.add_special_token.setdefault("bos", bos is not None and probe[:1] == [bos])
        special.add_special_token.setdefault(
            "eos", eos is not None and probe[-1:] == [eos] and len(probe) > 1
        )
        special.add_to_gguf(writer, quiet=True)
    return kind


def to_gguf(
    model: Any,
    tokenizer: Any,
    path: str | os.PathLike[str],
    *,
    outtype: str = "f32",
    overwrite: bool = False,
    verify: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """Write a Llama-family model (pruned or not) and its tokenizer as a GGUF file for llama.cpp.

    Args:
        model: a ``LlamaForCausalLM`` (or prunecli's per-layer-width variant of it).
        tokenizer: its fast tokenizer (carried into ``tokenizer.ggml.*``).
        path: the ``.gguf`` file; written atomically.
        outtype: ``f32``, ``f16`` or ``q8_0``.
        overwrite: replace an existing file.
        verify: read the file back (architecture, widths, every tensor's shape) and, when the
            ``llama_cpp`` package (llama-cpp-python) is installed, run it in llama.cpp (f32 KV
            cache) on a probe and compare its logits with the model's: for ``f32`` they must
            agree within ``1e-4 x max(1, max |logits|)``; for ``f16``/``q8_0`` the difference and the top-1
            agreement are reported (rounding the weights moves logits by more than a fixed bound).
        name: ``general.name`` (default: the config's ``_name_or_path``).

    Returns:
        A report: ``path``, ``bytes``, ``seconds``, ``architecture`` (``llama`` or ``deci``),
        ``outtype``, ``widths`` (per layer, as written), ``tokenizer``, ``tensors``, ``verify``
        and ``warnings``.

    Example:
        >>> from prunecli.models import load_model
        >>> lm = load_model("smollm2-flap-50", dtype="float32")  # doctest: +SKIP
        >>> to_gguf(lm.model, lm.tokenizer, "smollm2-flap-50.gguf")["architecture"]  # doctest: +SKIP
        'deci'
    """
    gguf = _require_gguf()
    if outtype not in OUTTYPES:
        raise InputError(f"outtype must be one of {', '.join(OUTTYPES)}; got {outtype!r}")
    out = check_output_file(path, overwrite=overwrite, suffix=".gguf")
    _check_model(model)
    started = time.perf_counter()
    config = model.config
    tensors, widths = gguf_tensors(model)
    uniform = len({(w["n_head"], w["n_head_kv"], w["n_ff"]) for w in widths}) == 1
    arch = "llama" if uniform else "deci"
    head_dim = widths[0]["head_dim"]
    hidden = int(model.model.embed_tokens.weight.shape[1])
    vocab_size = int(model.model.embed_tokens.weight.shape[0])
    theta, rope = _rope(config)
    warnings: list[str] = []
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[outtype]

    with atomic_output(out) as tmp:
        target = tmp / out.name
        writer = gguf.GGUFWriter(os.fspath(target), arch)
        writer.add_name(name or str(getattr(config, "_name_or_path", "") or out.stem))
        writer.add_block_count(len(widths))
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        if uniform:
            writer.add_feed_forward_length(widths[0]["n_ff"])
            writer.add_head_count(widths[0]["n_head"])
            writer.add_head_count_kv(widths[0]["n_head_kv"])
        else:
            writer.add_feed_forward_length([w["n_ff"] for w in widths])
            writer.add_head_count([w["n_head"] for w in widths])
            writer.add_head_count_kv([w["n_head_kv"] for w in widths])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(theta)
        if rope["rope_type"] == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_size)
        writer.add_file_type(ftype)
        tokenizer_kind = _add_tokenizer(writer, gguf, tokenizer, vocab_size, warnings)
        if rope["rope_type"] == "llama3":
            tensors.append(("rope_freqs.weight", _llama3_rope_factors(rope, head_dim, theta)))
        expected: dict[str, tuple[int, ...]] = {}
        for tensor_name, data in tensors:
            expected[tensor_name] = tuple(data.shape)
            array, raw = _encode(gguf, tensor_name, data, outtype)
            writer.add_tensor(tensor_name, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        del tensors
        report: dict[str, Any] = {
            "path": str(out),
            "architecture": arch,
            "outtype": outtype,
            "widths": widths,
            "tokenizer": tokenizer_kind,
            "tensors": len(expected),
        }
        structure = read_back(target, arch, widths, expected)
        if verify:
            report["verify"] = {**structure, **_verify_llamacpp(model, target, outtype)}
        else:
            report["verify"] = {"check": "none"}
        report["bytes"] = target.stat().st_size
    report["seconds"] = time.perf_counter() - started
    report["warnings"] = warnings
    return report


def read_back(
    path: Path, arch: str, widths: list[dict[str, int]], expected: dict[str, tuple[int, ...]]
) -> dict[str, Any]:
    """Re-read a written file with ``gguf.GGUFReader``: architecture, widths and every tensor's shape."""
    gguf = _require_gguf()
    reader = gguf.GGUFReader(os.fspath(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            raise VerifyError(f"the GGUF file has no {key}")
        return field.contents()

    if value("general.architecture") != arch:
        raise VerifyError(
            f"the GGUF file says architecture {value('general.architecture')!r}, expected {arch!r}"
        )
    for key, width in (
        ("attention.head_count", "n_head"),
        ("attention.head_count_kv", "n_head_kv"),
        ("feed_forward_length", "n_ff"),
    ):
        got = value(f"{arch}.{key}")
        want = [w[width] for w in widths]
        if (got if isinstance(got, list) else [got] * len(widths)) != want:
            raise VerifyError(f"{arch}.{key} reads back as {got}, expected {want}")
    shapes = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    if set(shapes) != set(expected):
        raise VerifyError(f"the GGUF file's tensors differ: {sorted(set(shapes) ^ set(expected))[:5]}")
    for tensor_name, shape in expected.items():
        if shapes[tensor_name] != shape:
            raise VerifyError(f"{tensor_name} reads back with shape {shapes[tensor_name]}, expected {shape}")
    return {"check": "shapes", "tensors": len(shapes)}


def open_llama(
    path: str | os.PathLike[str], *, kv_f32: bool = False, repack: bool = False, **kwargs: Any
) -> Any:
    """A ``llama_cpp.Llama`` for a GGUF file, quiet, with two switches the constructor lacks.

    Args:
        path: the ``.gguf`` file.
        kv_f32: keep the KV cache in float32 (llama.cpp's default is float16, which alone moves
            logits by ~1e-3 relative).
        repack: let llama.cpp repack quantised weights into its CPU "extra" buffer types
            (``llama_model_params.use_extra_bufts``). Off by default: with llama.cpp 0.3.36 built
            with ``GGML_NATIVE`` on an AVX-512/AMX machine, any repacked matmul (the SmolLM2
            Q4_1 file as well as q8_0 exports) crashed with a segmentation fault here.
        kwargs: passed to ``Llama`` (``n_ctx``, ``n_threads``, ``logits_all``, ...).
    """
    try:
        import llama_cpp
        import llama_cpp.llama as llama_module
    except ImportError:
        raise DependencyMissingError(
            "running a GGUF file needs llama-cpp-python",
            hint='CMAKE_ARGS="-DGGML_NATIVE=on" pip install llama-cpp-python (builds llama.cpp, ~15 min)',
        ) from None
    if kv_f32:
        kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32
    kwargs.setdefault("verbose", False)
    lowlevel = llama_module.llama_cpp
    defaults = lowlevel.llama_model_default_params

    def model_params() -> Any:
        params = defaults()
        params.use_extra_bufts = repack
        return params

    lowlevel.llama_model_default_params = model_params  # read once by Llama.__init__
    try:
        return llama_cpp.Llama(model_path=os.fspath(path), **kwargs)
    finally:
        lowlevel.llama_model_default_params = defaults


def llamacpp_logits(
    path: str | os.PathLike[str], ids: list[int], n_threads: int | None = None, kv_f32: bool = True
) -> Any:
    """Run a GGUF file in llama.cpp (llama-cpp-python) on one sequence; ``[len(ids), vocab]`` logits.

    Args:
        path: the ``.gguf`` file.
        ids: token ids, evaluated as given (no BOS added).
        n_threads: CPU threads (default: llama.cpp's).
        kv_f32: float32 KV cache (see :func:`open_llama`); ``False`` is llama.cpp's default.
    """
    import numpy as np

    kwargs: dict[str, Any] = {"n_threads": n_threads} if n_threads else {}
    llm = open_llama(
        path, kv_f32=kv_f32, n_ctx=max(64, len(ids)), n_batch=max(8, len(ids)), logits_all=True, **kwargs
    )
    try:
        llm.eval(list(ids))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _verify_llamacpp(model: Any, path: Path, outtype: str) -> dict[str, Any]:
    import importlib.util

    import numpy as np
    import torch

    if importlib.util.find_spec("llama_cpp") is None:
        return {"llama_cpp": "not installed"}
    from prunecli.export.onnx_export import probe_ids

    vocab = int(model.get_output_embeddings().weight.shape[0])
    ids = probe_ids(vocab, batch=1, length=16)[0]
    with torch.no_grad():
        expected = model(input_ids=ids[None], use_cache=False).logits[0].float().cpu().numpy()
    got = llamacpp_logits(path, ids.tolist())
    diff = float(np.abs(got - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    result = {"check": "llama.cpp", "max_abs_diff": diff, "top1_agreement": agree, "probe": [1, len(ids)]}
    if outtype == "f32":
        tolerance = GGUF_F32_TOLERANCE * scale
        result["tolerance"] = tolerance
        if not diff <= tolerance:
            raise VerifyError(
                f"llama.cpp's logits differ from the model's by {diff:.3g} (tolerance {tolerance:.3g})",
                hint="report this as a bug with the model's config.json",
            )
    return result
