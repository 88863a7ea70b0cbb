"""Configuration of the LoRAPrune method."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from prunecli.config import DataMethodConfig
from prunecli.errors import InputError

KINDS: tuple[str, ...] = ("heads", "channels")


@dataclasses.dataclass(frozen=True)
class LorapruneConfig(DataMethodConfig):
    """LoRAPrune: iterative structured pruning guided by LoRA gradients (Zhang et al., ACL 2024).

    Fine-tunes LoRA adapters on the calibration windows while it prunes: every ``prune_every``
    steps it masks the least important heads / MLP channels (importance from the adapter
    gradients only, smoothed over steps) following a cubic schedule up to ``sparsity``. The
    adapters are merged into the model at the end, so the model's weights change; the returned
    plan removes the masked units.

    Args:
        sparsity: fraction of the attention + MLP parameters of *all* layers to remove. The
            pruned blocks (those of the chosen ``kinds`` outside ``protect_layers``) each lose
            the same, larger fraction (the code's local pruning) so that the total reaches it.
        steps: optimiser steps.
        prune_every: steps between two pruning updates (the code's ``prune_freq``, 10).
        lora_rank: LoRA rank (8 in the paper).
        lora_alpha: LoRA alpha (16 in the code).
        lora_dropout: adapter dropout (0.05 in the code).
        lr: AdamW learning rate (1e-4 in the code's script), decayed linearly to zero.
        batch_size: windows per step.
        nsamples: training windows the CLI draws (128; not the paper's size, see
            ``docs/methods.md``).
        seqlen: tokens per training window: the CLI draws windows of this length and longer
            windows given to the library are split into pieces of this length (128).
        beta: moving-average factor of the importances (0.9).
        warmup: fraction of the steps before the first pruning (0.1).
        cooldown: fraction of the steps fine-tuned at the final sparsity (0.1).
        normalize: divide each weight's unit importances by their L2 norm before summing.
        kinds: which groups to prune: ``heads``, ``channels`` or both.
        protect_layers: layer indices never pruned (negative counts from the end). ``None``
            (default): the reference code's rule, the first ``floor(0.1 * L)`` layers and the
            last layer of ``L``; ``()``: prune every layer. Protected layers still get adapters.
        max_grad_norm: gradient clipping (0 disables).
        round_to: keep head counts and MLP widths multiples of this number where possible.
        seed: seed for the adapter initialisation and the batch order.
        ignore: glob patterns of module names whose groups are never pruned.

    Example:
        >>> LorapruneConfig(sparsity=0.2, steps=50).prune_every
        10
    """

    method: ClassVar[str] = "loraprune"
    needs_data: ClassVar[bool] = True

    steps: int = 100
    prune_every: int = 10
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lr: float = 1e-4
    batch_size: int = 2
    nsamples: int = 128
    seqlen: int = 128
    beta: float = 0.9
    warmup: float = 0.1
    cooldown: float = 0.1
    normalize: bool = True
    kinds: tuple[str, ...] = KINDS
    max_grad_norm: float = 1.0
    protect_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.protect_layers, list):
            object.__setattr__(self, "protect_layers", tuple(self.protect_layers))
        if self.protect_layers is not None and (
            not isinstance(self.protect_layers, tuple)
            or any(isinstance(i, bool) or not isinstance(i, int) for i in self.protect_layers)
        ):
            raise InputError(f"protect_layers must be layer indices, got {self.protect_layers!r}")
        if isinstance(self.kinds, (list, str)):
            object.__setattr__(
                self, "kinds", (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
            )
        for name in ("steps", "prune_every", "lora_rank", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if self.seqlen < 2:
            raise InputError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        for name, lo, hi in (
            ("lora_dropout", 0.0, 1.0),
            ("beta", 0.0, 1.0),
            ("warmup", 0.0, 1.0),
            ("cooldown", 0.0, 1.0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi:
                raise InputError(f"{name} must be in [{lo}, {hi}), got {v!r}")
        if self.warmup + self.cooldown >= 1.0:
            raise InputError(
                f"warmup + cooldown must leave steps to prune in, got {self.warmup} + {self.cooldown}",
                hint="e.g. warmup 0.1 and cooldown 0.1",
            )
        for name in ("lr", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise InputError(f"{name} must be a positive number, got {v!r}")
        if isinstance(self.max_grad_norm, bool) or not self.max_grad_norm >= 0:
            raise InputError(f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise InputError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
        if not isinstance(self.normalize, bool):
            raise InputError(f"normalize must be true or false, got {self.normalize!r}")


def protected_layers(config: LorapruneConfig, num_layers: int) -> list[int]:
    """Indices of the layers LoRAPrune never prunes.

    Args:
        config: the options (``protect_layers``).
        num_layers: layers in the model.

    Example:
        >>> protected_layers(LorapruneConfig(protect_layers=(0, -1)), 12)
        [0, 11]
    """
    if config.protect_layers is None:  # the reference code: first 10 % and the last layer
        chosen = set(range(int(0.1 * num_layers))) | {num_layers - 1}
    else:
        bad = [i for i in config.protect_layers if not -num_layers <= i < num_layers]
        if bad:
            raise InputError(f"protect_layers names layer {bad[0]}, but the model has {num_layers} layers")
        chosen = {i % num_layers for i in config.protect_layers}
    return sorted(chosen)
