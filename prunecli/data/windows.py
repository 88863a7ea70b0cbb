"""Token windows for calibration and evaluation.

The whole source is tokenised once: documents joined with ``"\\n\\n"``, one tokenizer call with
the tokenizer's own defaults. A tokenizer that adds BOS by default (Llama-2 style) therefore
puts one BOS at position 0 of the stream, and none is inserted inside windows; one that does not
(SmolLM2, GPT-2) gives a stream of text tokens only. This is the convention of the reference
implementations (Wanda, SparseGPT, FLAP: ``tokenizer("\\n\\n".join(texts))``).

Why one call and not chunks: byte-level BPE pre-tokenisers merge runs of newlines and
SentencePiece tokenizers add a dummy prefix to each call, so splitting at paragraph boundaries
changes the token stream (on *Emma* with the SmolLM2 tokenizer: 219,635 tokens in paragraph
chunks vs 221,849 in one pass). One pass over a 900 KB novel takes about a second, and
``verbose=False`` silences the "longer than the maximum sequence length" warning.

Beginning-of-sequence token per window. Models whose tokenizer adds a BOS token by default
(Gemma, Llama-2/3, Mistral) were trained with one at the start of every sequence, and some of
them leave that regime badly without it: Gemma-3-270M's dense perplexity on 16 windows of
128 tokens of *Persuasion* is 97.7 with BOS and over 10x that without, and statistics gathered
without it describe activations the model never produces in use. So by default (``bos=None``,
"auto") every window of such a model is ``[BOS] + seqlen - 1`` text tokens; tokenizers that
add no BOS (SmolLM2, GPT-2, Qwen) are unchanged. ``bos=False`` gives the reference
implementations' windows cut from the middle of the stream (the Wanda/SparseGPT/FLAP
protocol, whose LLaMA perplexities were measured that way); ``bos=True`` forces a BOS.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from prunecli.data.sources import load_texts
from prunecli.errors import DataError, InputError
from prunecli.progress import Progress, resolve

__all__ = [
    "calibration_windows",
    "data_hash",
    "eval_windows",
    "tokenize_source",
    "tokenize_texts",
    "window_bos",
]


def window_bos(tokenizer: Any, bos: bool | None = None) -> int | None:
    """The token id to put at position 0 of every window, or None for none.

    Args:
        tokenizer: a Hugging Face tokenizer.
        bos: ``None`` (auto: the BOS id when the tokenizer adds it by default), ``True``
            (the tokenizer's BOS id; an error if it has none) or ``False`` (never).

    Returns:
        A token id or None.
    """
    if bos is False:
        return None
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos is True:
        if not isinstance(bos_id, int):
            raise InputError("bos=True but the tokenizer has no BOS token", hint="use bos=None or False")
        return bos_id
    if not isinstance(bos_id, int):
        return None
    try:
        ids = tokenizer("a", verbose=False, return_attention_mask=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer we cannot probe adds nothing we know of
        return None
    return bos_id if len(ids) > 0 and ids[0] == bos_id else None


def _with_bos(tokens: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """The text stream without its leading BOS (when windows get their own)."""
    if bos_id is not None and tokens.numel() and int(tokens[0]) == bos_id:
        return tokens[1:]
    return tokens


def tokenize_texts(tokenizer: Any, texts: list[str], *, progress: Progress | None = None) -> torch.Tensor:
    """Tokenise documents joined with ``"\\n\\n"`` into one 1-D stream of token ids.

    Args:
        tokenizer: a Hugging Face tokenizer (anything callable as ``tokenizer(text)`` returning
            ``{"input_ids": list[int]}``); its default special tokens are kept (see module docs).
        texts: the documents.
        progress: reports one "tokenising" step.

    Returns:
        ``torch.LongTensor`` of shape ``[n_tokens]``.
    """
    if not callable(tokenizer):
        raise InputError(
            f"tokenizer must be callable like a Hugging Face tokenizer, got {type(tokenizer).__name__}",
            hint="pass AutoTokenizer.from_pretrained(...)",
        )
    text = "\n\n".join(texts)
    with resolve(progress).task("tokenising", total=1) as task:
        encoded = tokenizer(text, verbose=False, return_attention_mask=False)
        task.advance()
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def tokenize_source(
    tokenizer: Any,
    source: str | Path | None,
    *,
    text_field: str = "text",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Read ``source`` with :func:`~prunecli.data.load_texts` and tokenise it into one stream.

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: see :func:`~prunecli.data.load_texts` (``None`` = the shipped sample).
        text_field: JSON field holding the text for ``.jsonl`` sources.
        progress: reports the tokenising step.

    Returns:
        ``torch.LongTensor`` of shape ``[n_tokens]``.
    """
    return tokenize_texts(tokenizer, load_texts(source, text_field=text_field), progress=progress)


def calibration_windows(
    tokenizer: Any,
    source: str | Path | None,
    *,
    nsamples: int = 128,
    seqlen: int = 128,
    seed: int = 0,
    text_field: str = "text",
    bos: bool | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens from the tokenised source.

    Window starts are uniform over every position where a full window fits, drawn with a
    ``torch.Generator`` seeded by ``seed``, so equal inputs give equal windows on any machine.
    Windows may overlap (the Wanda/SparseGPT/FLAP convention).

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: see :func:`~prunecli.data.load_texts` (``None`` = the shipped sample).
        nsamples: number of windows.
        seqlen: tokens per window.
        seed: seed of the generator that places the windows.
        text_field: JSON field holding the text for ``.jsonl`` sources.
        bos: BOS token at position 0 of every window (see the module docs; ``None`` = auto).
        progress: reports the tokenising step.

    Returns:
        ``torch.LongTensor`` of shape ``[nsamples, seqlen]``.

    Raises:
        DataError: the source has fewer than ``seqlen`` tokens (the count is in the message).

    Example:
        >>> calib = calibration_windows(tok, None, nsamples=32, seqlen=128)  # doctest: +SKIP
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    bos_id = window_bos(tokenizer, bos)
    tokens = _with_bos(tokenize_source(tokenizer, source, text_field=text_field, progress=progress), bos_id)
    text_len = _text_len(seqlen, bos_id)
    _check_length(tokens, max(text_len, 1), source)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - text_len + 1, (nsamples,), generator=generator)
    index = starts[:, None] + torch.arange(text_len)  # (nsamples, text_len)
    return _prepend(tokens[index], bos_id)


def _text_len(seqlen: int, bos_id: int | None) -> int:
    if bos_id is not None and seqlen < 2:
        raise InputError(
            "seqlen must be at least 2 when every window starts with a BOS token",
            hint="use a longer sequence length, or bos=False",
        )
    return seqlen - (bos_id is not None)


def _prepend(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=windows.dtype), windows], dim=1)


def eval_windows(
    tokenizer: Any,
    source: str | Path | None,
    *,
    seqlen: int = 512,
    max_windows: int | None = None,
    text_field: str = "text",
    bos: bool | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Cut the tokenised source into consecutive non-overlapping windows from its start.

    Window ``i`` is ``tokens[i * seqlen:(i + 1) * seqlen]``; the ragged tail is dropped (the
    standard perplexity protocol). With a BOS (see the module docs) each window is the BOS
    followed by the next ``seqlen - 1`` text tokens, so every text token is predicted once.

    Args:
        tokenizer: a Hugging Face tokenizer.
        source: see :func:`~prunecli.data.load_texts` (``None`` = the shipped sample).
        seqlen: tokens per window.
        max_windows: keep at most this many windows (the first ones); ``None`` keeps all.
        text_field: JSON field holding the text for ``.jsonl`` sources.
        bos: BOS token at position 0 of every window (see the module docs; ``None`` = auto).
        progress: reports the tokenising step.

    Returns:
        ``torch.LongTensor`` of shape ``[n, seqlen]``.

    Raises:
        DataError: the source has fewer than ``seqlen`` tokens.
    """
    _check_positive(seqlen=seqlen)
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    bos_id = window_bos(tokenizer, bos)
    tokens = _with_bos(tokenize_source(tokenizer, source, text_field=text_field, progress=progress), bos_id)
    text_len = _text_len(seqlen, bos_id)
    _check_length(tokens, max(text_len, 1), source)
    n = tokens.numel() // text_len
    if max_windows is not None:
        n = min(n, max_windows)
    return _prepend(tokens[: n * text_len].reshape(n, text_len), bos_id).clone()


def data_hash(windows: torch.Tensor) -> str:
    """SHA-256 hex digest of a tensor of token ids, with its dtype and shape.

    Args:
        windows: typically the ``[n, seqlen]`` output of :func:`calibration_windows`.

    Returns:
        64 hex characters; equal tensors (same values, dtype and shape) give equal digests.
    """
    t = windows.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}", hint=f"pass {name} >= 1")


def _check_length(tokens: torch.Tensor, seqlen: int, source: str | Path | None) -> None:
    if tokens.numel() < seqlen:
        label = "the built-in sample" if source is None else str(source)
        raise DataError(
            f"{label} has {tokens.numel()} tokens, fewer than one window of {seqlen}",
            hint="give a longer text or a smaller sequence length",
        )
