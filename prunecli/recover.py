"""Recovery fine-tuning: LoRA (through ``peft``) on the causal-LM loss, merged back.

After pruning, a short LoRA fine-tune on a few token windows recovers part of the lost
quality. The adapters are merged into the weights at the end (``merge_and_unload``), so the
model keeps its (pruned) shapes and is a plain ``transformers`` model again: it saves and
reloads like any other checkpoint.

The helpers :func:`attach_lora`, :func:`detach_lora` and :func:`lora_targets` are shared with
the LoRAPrune method, which fine-tunes with the same adapters while it prunes.

Example:
    >>> stats = recover(model, tokenizer, windows, steps=50, lr=2e-4)  # doctest: +SKIP
    >>> stats["loss_first"] > stats["loss_last"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunecli.errors import DataError, DependencyMissingError, InputError, UnsupportedModelError
from prunecli.progress import Progress, resolve


def lora_targets(model: nn.Module) -> list[str]:
    """Qualified names of every ``nn.Linear`` inside the repeated blocks (transformer layers).

    Embeddings, the LM head and anything outside an ``nn.ModuleList`` are left out.

    Args:
        model: the model.
    """
    lists = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList)]
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and any(name.startswith(f"{p}.") if p else True for p in lists):
            out.append(name)
    return out


def attach_lora(
    model: nn.Module,
    targets: Iterable[str],
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
) -> tuple[Any, dict[str, bool]]:
    """Wrap ``model`` with LoRA adapters on ``targets``; base weights get no gradients.

    The adapters are injected into ``model`` in place (its ``nn.Linear`` modules become
    ``peft`` LoRA layers); :func:`detach_lora` merges them and restores the model.

    Args:
        model: the model to adapt.
        targets: qualified names of the linear modules that get an adapter.
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha`` (scaling ``alpha / r``); ``2 * rank`` when ``None``.
        dropout: dropout on the adapter input.

    Returns:
        ``(peft_model, requires_grad)``: the ``peft`` wrapper and the original
        ``requires_grad`` flag of every parameter (for :func:`detach_lora`).
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a declared dependency
        raise DependencyMissingError(
            "LoRA fine-tuning needs the 'peft' package", hint="pip install peft"
        ) from e
    names = list(dict.fromkeys(targets))
    if not names:
        raise UnsupportedModelError("no linear layer to attach LoRA adapters to")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InputError(f"lora rank must be a positive integer, got {rank!r}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if getattr(model, "supports_gradient_checkpointing", False):
        # recompute each layer's activations in the backward pass instead of keeping them:
        # training memory stays close to inference memory plus the adapters
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(
        r=rank,
        lora_alpha=float(2 * rank if alpha is None else alpha),
        lora_dropout=float(dropout),
        target_modules=names,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing`; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, cfg)
    for n, p in peft_model.named_parameters():
        p.requires_grad = "lora_" in n
    return peft_model, flags


def detach_lora(peft_model: Any, requires_grad: dict[str, bool]) -> nn.Module:
    """Merge the adapters into the weights and give back the plain model.

    Args:
        peft_model: the wrapper returned by :func:`attach_lora`.
        requires_grad: the flags returned by :func:`attach_lora`, restored here.
    """
    model = peft_model.merge_and_unload()
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    for n, p in model.named_parameters():
        p.requires_grad = requires_grad.get(n, p.requires_grad)
    return model


def lora_parameters(peft_model: Any) -> list[nn.Parameter]:
    """The trainable adapter parameters of a model wrapped by :func:`attach_lora`."""
    return [p for n, p in peft_model.named_parameters() if "lora_" in n and p.requires_grad]


def check_windows(windows: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Validate a LongTensor ``[n, seqlen]`` of token windows (at least 2 tokens each).

    Args:
        windows: the token windows.
        vocab_size: when given, every token id must be below it.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        raise DataError("training data must be a non-empty LongTensor of shape [n, seqlen]")
    if windows.shape[1] < 2:
        raise DataError("training windows need at least 2 tokens for a next-token loss")
    if windows.dtype != torch.long:
        windows = windows.long()
    if vocab_size is not None and int(windows.max()) >= vocab_size:
        raise DataError(
            f"token id {int(windows.max())} is outside the model's vocabulary of {vocab_size}",
            hint="tokenize the data with the model's own tokenizer",
        )
    return windows


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on ``ids`` ``[B, T]``."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def batch_order(n: int, steps: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Window indices for each step: shuffled epochs over ``n`` windows, ``batch_size`` per step.

    Args:
        n: number of windows.
        steps: number of steps.
        batch_size: windows per step (at most ``n``).
        seed: shuffling seed.
    """
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, n)
    pool: list[int] = []
    out = []
    for _ in range(steps):
        if len(pool) < bs:
            pool.extend(torch.randperm(n, generator=gen).tolist())
        out.append(torch.tensor(pool[:bs], dtype=torch.long))
        pool = pool[bs:]
    return out


def _vocab(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None


def recover(
    model: nn.Module,
    tokenizer: Any,
    windows: torch.Tensor,
    *,
    steps: int = 100,
    lr: float = 2e-4,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    batch_size: int = 4,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    targets: Iterable[str] | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """LoRA fine-tune ``model`` in place on next-token prediction, then merge the adapters.

    Only the adapters train (AdamW, linear learning-rate decay to zero, gradient clipping);
    the base weights get no gradients, so memory is close to inference plus the adapters,
    their optimiser state and the activations of one batch. The model keeps its shapes.

    Args:
        model: a causal LM (pruned or not); modified in place and returned in ``eval`` mode.
        tokenizer: the model's tokenizer, only used to check that the token ids fit it; may
            be ``None``.
        windows: LongTensor ``[n, seqlen]`` of training token windows.
        steps: optimiser steps.
        lr: peak learning rate.
        lora_rank: LoRA rank.
        lora_alpha: LoRA alpha (``2 * lora_rank`` when ``None``).
        lora_dropout: dropout on the adapter inputs.
        batch_size: windows per step.
        weight_decay: AdamW weight decay on the adapters.
        max_grad_norm: gradient clipping norm (0 disables clipping).
        targets: linear modules that get adapters; every linear in the transformer layers
            when ``None``.
        seed: seed for the window order and the adapter initialisation.
        progress: optional progress reporter.

    Returns:
        ``{"losses": [...], "loss_first", "loss_last", "steps", "seconds", "trainable_params"}``
        (losses per step, before each update).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0 or not math.isfinite(lr):
        raise InputError(f"learning rate must be a positive number, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    vocab = _vocab(model)
    if tokenizer is not None and hasattr(tokenizer, "__len__"):
        vocab = min(vocab, len(tokenizer)) if vocab is not None else len(tokenizer)
    windows = check_windows(windows, vocab)
    names = list(targets) if targets is not None else lora_targets(model)

    torch.manual_seed(seed)
    peft_model, flags = attach_lora(model, names, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)
    params = lora_parameters(peft_model)
    device = next(model.parameters()).device
    losses: list[float] = []
    start = time.perf_counter()
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
        peft_model.train()
        with torch.enable_grad(), resolve(progress).task("recovery fine-tuning", total=steps) as task:
            for idx in batch_order(windows.shape[0], steps, batch_size, seed):
                loss = lm_loss(peft_model, windows[idx].to(device))
                if not torch.isfinite(loss):
                    raise InputError(
                        f"recovery loss became {float(loss)} at step {len(losses)}",
                        hint="lower the learning rate",
                    )
                loss.backward()
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                task.advance()
    finally:
        model = detach_lora(peft_model, flags)
        model.eval()
    return {
        "losses": losses,
        "loss_first": losses[0] if losses else math.nan,
        "loss_last": losses[-1] if losses else math.nan,
        **smoothed_losses(losses),
        "steps": len(losses),
        "seconds": round(time.perf_counter() - start, 3),
        "trainable_params": sum(p.numel() for p in params),
    }


def recover_on_text(
    model: nn.Module,
    tokenizer: Any,
    source: str | None,
    *,
    steps: int = 100,
    batch_size: int = 4,
    seqlen: int = 128,
    seed: int = 0,
    text_field: str = "text",
    lr: float = 2e-4,
    lora_rank: int = 8,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Draw ``steps * batch_size`` windows from a text, run :func:`recover`, describe the run.

    Args:
        model: the (pruned) model, fine-tuned and merged in place.
        tokenizer: its tokenizer.
        source: training text (see :func:`prunecli.data.calibration_windows`); ``None`` is the
            shipped sample.
        steps, batch_size, seqlen, seed, text_field, lr, lora_rank, progress: as in
            :func:`recover` and :func:`prunecli.data.calibration_windows`.

    Returns:
        The provenance record of the recovery: source, options, data hash, first/last loss,
        trainable parameters and seconds.
    """
    from prunecli.data import calibration_windows, data_hash

    train = calibration_windows(
        tokenizer, source, nsamples=steps * batch_size, seqlen=seqlen, seed=seed, text_field=text_field,
        progress=progress,
    )  # fmt: skip
    log = recover(
        model, tokenizer, train, steps=steps, lr=lr, lora_rank=lora_rank, batch_size=batch_size, seed=seed,
        progress=progress,
    )  # fmt: skip
    return {
        "source": source if source is not None else "prunecli/data/sample.txt",
        "steps": steps,
        "lr": lr,
        "lora_rank": lora_rank,
        "batch_size": batch_size,
        "seqlen": seqlen,
        "seed": seed,
        "hash": data_hash(train),
        "loss_first": log["loss_first"],
        "loss_last": log["loss_last"],
        "loss_start": log["loss_start"],
        "loss_end": log["loss_end"],
        "loss_window": log["loss_window"],
        "trainable_params": log["trainable_params"],
        "seconds": log["seconds"],
    }


def smoothed_losses(losses: list[float]) -> dict[str, Any]:
    """Mean loss over the first and the last tenth of the steps (at least one step each).

    One batch's loss swings by more than recovery changes it; the means are what a report
    should compare. Returns ``{"loss_start", "loss_end", "loss_window"}`` (NaN when empty).

    Example:
        >>> smoothed_losses([5.0, 4.0, 3.0, 2.0, 9.0, 1.0, 1.0, 1.0, 1.0, 3.0])["loss_end"]
        3.0
    """
    if not losses:
        return {"loss_start": math.nan, "loss_end": math.nan, "loss_window": 0}
    k = max(1, len(losses) // 10)
    return {"loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k, "loss_window": k}
