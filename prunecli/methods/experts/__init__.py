"""Mixture-of-Experts expert pruning: EASY-EP, REAP, frequency and random.

Each method scores the routed experts of every MoE block (:mod:`prunecli.graph.experts`)
from one pass of a few demonstrations through the shared runner
(``Observe(block, "experts", "moe")``); the engine's :func:`~prunecli.engine.select.select_experts`
keeps the best experts per layer (the same number in every layer, or one global threshold,
prunecli's variant) and :func:`~prunecli.engine.apply_plan` removes the others: expert
tensors, router rows, per-expert biases, renumbered, with the config's expert counts.

Formulas and papers: :mod:`prunecli.methods.experts.scoring`.

Example:
    >>> import prunecli
    >>> from prunecli.methods.experts import EasyEpConfig                     # doctest: +SKIP
    >>> prunecli.prune(model, EasyEpConfig(keep_experts=0.5), demos)          # doctest: +SKIP
"""

from prunecli.methods.experts.config import (
    EasyEpConfig,
    ExpertConfig,
    FrequencyConfig,
    RandomExpertsConfig,
    ReapConfig,
)
from prunecli.methods.experts.prune import expert_scores, prune_experts

__all__ = [
    "EasyEpConfig",
    "ExpertConfig",
    "FrequencyConfig",
    "RandomExpertsConfig",
    "ReapConfig",
    "expert_scores",
    "prune_experts",
]
