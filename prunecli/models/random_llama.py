"""Random-weight Llama checkpoints of any size, written block by block.

A Llama-7B-shaped folder (6.7B parameters, 13.5 GB of bfloat16) lets the calibration
runner's memory limits be measured without downloading a real 7B model. The folder is a
normal Hugging Face checkpoint: ``config.json``, one safetensors shard per decoder block plus
one for the embeddings, final norm and LM head, ``model.safetensors.index.json``, and a small
byte-level BPE tokenizer, so ``prunecli compress FOLDER`` and ``from_pretrained(FOLDER)`` both
work.

Weights (std 0.02 is Llama's ``initializer_range``; ``L`` is the number of layers):

- ``embed_tokens``, ``lm_head``, ``q/k/v_proj``, ``gate/up_proj``: normal, std 0.02.
- ``o_proj`` and ``down_proj``: normal, std ``0.02 / sqrt(2 L)`` (GPT-2's scaling of the
  projections that write into the residual stream), so the residual stream grows like the
  square root of the depth instead of blowing up. Measured at 7B shapes in bfloat16 on 128
  tokens of the sample text: residual RMS 0.02 after the embeddings, 0.29 after block 1, 1.64
  after block 32; logits std 1.28, all finite.
- RMSNorm weights: 1.

Every tensor is drawn from its own ``torch.Generator`` seeded with a hash of ``(seed, name)``
(in fixed chunks of rows, in float32, then rounded to bfloat16), so the bytes do not depend on
the order in which blocks are written: the same seed gives byte-identical files with the same
torch, transformers and tokenizers versions (``config.json`` records the transformers
version). Only one shard's tensors are in memory at a time (at 7B shapes the largest is the
embeddings + LM head shard, 0.5 GB; the whole 7B build peaked at 825 MiB RSS and took 2 minutes
on 2 CPU cores), and the folder is written in a hidden sibling folder renamed into place at the
end.

Example:
    >>> from prunecli.models.random_llama import write_random_llama
    >>> write_random_llama("tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    ...                    intermediate_size=128, vocab_size=512)  # doctest: +SKIP
    PosixPath('/abs/tiny')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from prunecli.errors import InputError, OutputExistsError
from prunecli.progress import Progress, resolve

INDEX_FILE = "model.safetensors.index.json"
MARKER_FILE = "random_llama.json"
"""Written into every folder this module builds: the spec, so a folder can be recognised and reused."""
CHUNK_ROWS = 256
"""Rows drawn per ``torch.randn`` call (part of the definition of the weights: changing it changes them)."""
MIN_VOCAB = 260
"""A byte-level tokenizer needs 256 byte tokens plus ``<unk>``, ``<s>``, ``</s>`` and one merge."""


@dataclasses.dataclass(frozen=True)
class RandomLlamaSpec:
    """The shapes and seed of a random Llama; the defaults are Llama-7B's.

    Args:
        hidden_size: model width.
        num_layers: decoder blocks.
        num_heads: query heads (``hidden_size`` must be a multiple).
        num_kv_heads: key/value heads (``num_heads`` must be a multiple; default ``num_heads``).
        intermediate_size: MLP channels.
        vocab_size: embedding rows (the tokenizer's vocabulary is at most this).
        seed: defines every weight.
        max_position_embeddings: context length written to the config.
    """

    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None
    intermediate_size: int = 11008
    vocab_size: int = 32000
    seed: int = 0
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{field.name} must be an integer, got {value!r}")
            if field.name != "seed" and value < 1:
                raise InputError(f"{field.name} must be positive, got {value}")
        if self.hidden_size % self.num_heads:
            raise InputError(
                f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise InputError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.vocab_size < MIN_VOCAB:
            raise InputError(
                f"vocab_size must be at least {MIN_VOCAB} (byte-level tokenizer), got {self.vocab_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def llama_config(spec: RandomLlamaSpec) -> Any:
    """The ``LlamaConfig`` of ``spec`` (Llama-7B's settings apart from the shapes)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        dtype="bfloat16",
    )


def tensor_specs(spec: RandomLlamaSpec) -> list[list[tuple[str, tuple[int, ...], float | None]]]:
    """The tensors of each shard, in file order: ``(name, shape, std)``; std ``None`` means ones.

    Shard ``i`` (``i < num_layers``) is decoder block ``i``; the last shard holds the
    embeddings, the final norm and the LM head.
    """
    h, L = spec.hidden_size, spec.num_layers
    kv = spec.num_kv_heads * spec.head_dim
    out_std = 0.02 / math.sqrt(2 * L)
    shards: list[list[tuple[str, tuple[int, ...], float | None]]] = []
    for i in range(L):
        p = f"model.layers.{i}."
        shards.append(
            [
                (p + "input_layernorm.weight", (h,), None),
                (p + "self_attn.q_proj.weight", (h, h), 0.02),
                (p + "self_attn.k_proj.weight", (kv, h), 0.02),
                (p + "self_attn.v_proj.weight", (kv, h), 0.02),
                (p + "self_attn.o_proj.weight", (h, h), out_std),
                (p + "post_attention_layernorm.weight", (h,), None),
                (p + "mlp.gate_proj.weight", (spec.intermediate_size, h), 0.02),
                (p + "mlp.up_proj.weight", (spec.intermediate_size, h), 0.02),
                (p + "mlp.down_proj.weight", (h, spec.intermediate_size), out_std),
            ]
        )
    shards.append(
        [
            ("model.embed_tokens.weight", (spec.vocab_size, h), 0.02),
            ("model.norm.weight", (h,), None),
            ("lm_head.weight", (spec.vocab_size, h), 0.02),
        ]
    )
    return shards


def tensor_seed(seed: int, name: str) -> int:
    """The generator seed of tensor ``name``: a hash of ``(seed, name)``, so order does not matter."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_tensor(seed: int, name: str, shape: tuple[int, ...], std: float | None) -> Any:
    """One bfloat16 tensor: ones when ``std`` is None, else normal(0, std) drawn in float32.

    Rows are drawn ``CHUNK_ROWS`` at a time so that the float32 scratch stays small.
    """
    import torch

    if std is None:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = out.view(-1, shape[-1])  # (R, C)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    for r in range(0, rows.shape[0], CHUNK_ROWS):
        n = min(CHUNK_ROWS, rows.shape[0] - r)
        chunk = torch.randn((n, rows.shape[1]), generator=g, dtype=torch.float32)
        rows[r : r + n].copy_(chunk.mul_(std))
    return out


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def default_tokenizer_texts() -> list[Path]:
    """The text the tokenizer is trained on: the sample shipped in ``prunecli/data``."""
    return [Path(__file__).resolve().parent.parent / "data" / "sample.txt"]


def train_tokenizer(vocab_size: int, texts: list[Path] | None = None, model_max_length: int = 2048) -> Any:
    """A byte-level BPE tokenizer with at most ``vocab_size`` tokens, Llama-style specials.

    ``<unk>``, ``<s>``, ``</s>`` are ids 0, 1, 2 (as in Llama's config); BOS is prepended to
    every encoded text. Every byte has a token, so any text encodes to ids below ``vocab_size``.
    Training stops early when the text runs out of pairs to merge (the shipped sample gives
    about 7,700 tokens).

    Args:
        vocab_size: the most tokens to learn (at least ``MIN_VOCAB``).
        texts: UTF-8 text files to train on (default: :func:`default_tokenizer_texts`).
        model_max_length: written to ``tokenizer_config.json``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise InputError(f"the tokenizer needs a vocabulary of at least {MIN_VOCAB}, got {vocab_size}")
    docs: list[str] = []
    for path in texts or default_tokenizer_texts():
        docs.extend(d for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def is_random_llama(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` was written by :func:`write_random_llama`."""
    return (Path(folder) / MARKER_FILE).is_file()


def read_spec(folder: str | os.PathLike[str]) -> RandomLlamaSpec | None:
    """The spec a folder written by :func:`write_random_llama` was built from, or None."""
    path = Path(folder) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        return RandomLlamaSpec(**json.loads(path.read_text(encoding="utf-8"))["spec"])
    except (ValueError, KeyError, TypeError, InputError):
        return None


def write_random_llama(
    out_dir: str | os.PathLike[str],
    spec: RandomLlamaSpec | None = None,
    *,
    tokenizer_vocab: int | None = None,
    tokenizer_texts: list[Path] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    **shapes: int,
) -> Path:
    """Write a random-weight bfloat16 Llama checkpoint folder, one shard at a time.

    Args:
        out_dir: the folder to create.
        spec: shapes and seed (default: Llama-7B shapes, seed 0); or pass them as keywords
            (``hidden_size=64, num_layers=2, ...``, the fields of :class:`RandomLlamaSpec`).
        tokenizer_vocab: the tokenizer's vocabulary limit (default and maximum: ``vocab_size``).
        tokenizer_texts: text files to train the tokenizer on (default: prunecli's sample text).
        overwrite: replace ``out_dir`` if it is a folder this function wrote (anything else is refused).
        progress: progress reporter (one step per shard).

    Returns:
        The absolute path of the folder.

    Example:
        >>> write_random_llama("/tmp/llama7b-random")  # doctest: +SKIP
        PosixPath('/tmp/llama7b-random')
    """
    from safetensors.torch import save_file

    from prunecli.models.files import apply_umask, sibling_temp_dir

    if spec is None:
        spec = RandomLlamaSpec(**shapes)
    elif shapes:
        spec = dataclasses.replace(spec, **shapes)
    tok_vocab = spec.vocab_size if tokenizer_vocab is None else tokenizer_vocab
    if not MIN_VOCAB <= tok_vocab <= spec.vocab_size:
        raise InputError(
            f"tokenizer_vocab must be between {MIN_VOCAB} and vocab_size {spec.vocab_size}, got {tok_vocab}"
        )
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        if not overwrite:
            raise OutputExistsError(
                f"{out} already exists", hint="pass overwrite=True (--overwrite) to replace it"
            )
        if not is_random_llama(out):
            raise OutputExistsError(
                f"refusing to replace {out}: it was not written by write_random_llama (no {MARKER_FILE})"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_dir(out)
    try:
        shards = tensor_specs(spec)
        weight_map: dict[str, str] = {}
        total = 0
        with resolve(progress).task(f"writing random Llama to {out}", total=len(shards)) as task:
            for i, tensors in enumerate(shards):
                name = shard_name(i, len(shards))
                block = {n: random_tensor(spec.seed, n, shape, std) for n, shape, std in tensors}
                save_file(block, str(tmp / name), metadata={"format": "pt"})
                for n, t in block.items():
                    weight_map[n] = name
                    total += t.numel() * t.element_size()
                del block
                task.advance()
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        llama_config(spec).save_pretrained(tmp)
        tokenizer = train_tokenizer(tok_vocab, tokenizer_texts, spec.max_position_embeddings)
        tokenizer.save_pretrained(tmp)
        marker = {"spec": spec.to_dict(), "tokenizer_vocab": tok_vocab, "dtype": "bfloat16"}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        apply_umask(tmp)
        if out.exists():
            old = sibling_temp_dir(out)
            old.rmdir()
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def header_tensors(folder: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor in a folder's safetensors files: name -> (dtype, shape), read from headers only.

    Raises:
        CheckpointError: a tensor appears in two files.
    """
    from prunecli.errors import CheckpointError
    from prunecli.models.files import weight_files

    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in weight_files(Path(folder)):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if name in found:
                raise CheckpointError(f"tensor {name} is stored twice (again in {path.name})")
            found[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
    return found


def meta_model(folder: str | os.PathLike[str]) -> Any:
    """The model ``folder``'s ``config.json`` describes, built on the meta device (no weights).

    Checkpoints with layers of different widths (prunecli's ``auto_map``) are built with
    prunecli's copy of their modeling code, so no code from the folder runs.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from prunecli.checkpoint import modeling_prunecli
    from prunecli.models.files import read_json

    raw = read_json(Path(folder) / "config.json")
    config = AutoConfig.from_pretrained(str(folder))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # per-layer config notices are expected here
    try:
        with torch.device("meta"):
            if raw.get("auto_map"):
                cls = modeling_prunecli.heterogeneous_class(modeling_prunecli.stock_class_name(config))
                return cls(config)
            return AutoModelForCausalLM.from_config(config)
    finally:
        hf_logging.set_verbosity(level)


def config_tensor_mismatches(folder: str | os.PathLike[str]) -> list[str]:
    """Differences between the tensors ``config.json`` implies and those in the safetensors headers.

    Builds the model on the meta device and compares its state dict (persistent tensors) with
    the headers, without reading any tensor data. An empty list means they match.

    Args:
        folder: a checkpoint folder with ``config.json`` and safetensors weights.
    """
    stored = header_tensors(folder)
    model = meta_model(folder)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        stored = {k: v for k, v in stored.items() if k != "lm_head.weight"}
    problems = [f"missing from the files: {k} {expected[k]}" for k in sorted(set(expected) - set(stored))]
    problems += [f"not in the config: {k} {stored[k][1]}" for k in sorted(set(stored) - set(expected))]
    problems += [
        f"{k}: config says {expected[k]}, file has {stored[k][1]}"
        for k in sorted(set(expected) & set(stored))
        if expected[k] != stored[k][1]
    ]
    return problems
