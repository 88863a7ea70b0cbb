"""LoRAPrune (Zhang et al., Findings of ACL 2024, arXiv 2305.18403): prune while LoRA fine-tuning.

Unit importance comes from the LoRA gradients only: the frozen weight's gradient is estimated
as ``gB @ A + B @ gA - gB @ gA`` and a weight's importance is ``|(W + s B A) * G|``, summed per
head / MLP channel and smoothed over steps. Units are masked on a cubic schedule while the
adapters train; at the end the adapters are merged and the masked units removed by the engine.
Formulas and their sources: :mod:`prunecli.methods.loraprune.scoring`.

Example:
    >>> from prunecli.methods.loraprune import LorapruneConfig
    >>> LorapruneConfig(sparsity=0.2, steps=40, prune_every=5).method
    'loraprune'
"""

from prunecli.methods.loraprune.config import LorapruneConfig
from prunecli.methods.loraprune.prune import group_importance, prune_loraprune, run_loraprune
from prunecli.methods.loraprune.scoring import (
    cubic_sparsity,
    estimate_weight_grad,
    lora_weight_importance,
    moving_average,
    unit_sums,
)

__all__ = [
    "LorapruneConfig",
    "cubic_sparsity",
    "estimate_weight_grad",
    "group_importance",
    "lora_weight_importance",
    "moving_average",
    "prune_loraprune",
    "run_loraprune",
    "unit_sums",
]
