"""Configs of the expert-pruning methods (EASY-EP, REAP, frequency, random)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from prunecli.config import DataMethodConfig
from prunecli.errors import InputError

SELECTIONS = ("layer", "global")


@dataclasses.dataclass(frozen=True)
class ExpertConfig(DataMethodConfig):
    """Options shared by the expert-pruning methods.

    Args:
        keep_experts: routed experts to keep in every MoE layer: a fraction in (0, 1) of each
            layer's experts, or a count (an integer >= 1).
        selection: ``layer`` (the same number kept in every layer, as in EASY-EP) or
            ``global`` (prunecli's variant: per-layer normalised scores, one threshold across
            layers, the same total).
        nsamples / seqlen: demonstration windows and their length (the demonstrations are
            tokenised, concatenated and cut into windows).
        sparsity: not used by expert methods (they keep ``keep_experts``).

    Example:
        >>> EasyEpConfig(keep_experts=0.5).keep_count(8)
        4
    """

    units: ClassVar[str] = "experts"

    keep_experts: float = 0.5
    selection: str = "layer"
    nsamples: int = 16
    seqlen: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.keep_experts
        if isinstance(k, bool) or not isinstance(k, (int, float)) or k <= 0:
            raise InputError(
                f"keep_experts must be a fraction in (0, 1) or a count >= 1, got {k!r}",
                hint="e.g. --keep-experts 0.5 (half of each layer's experts) or --keep-experts 16",
            )
        if k >= 1 and float(k) != int(k):
            raise InputError(f"keep_experts above 1 is a count of experts and must be an integer, got {k}")
        if self.selection not in SELECTIONS:
            raise InputError(
                f"unknown expert selection {self.selection!r}", hint=f"choose one of {SELECTIONS}"
            )

    def keep_count(self, num_experts: int) -> int:
        """Experts to keep in a layer of ``num_experts`` (before routing legalisation)."""
        k = self.keep_experts
        if k < 1:
            return max(1, int(round(k * num_experts)))
        return min(num_experts, int(k))


@dataclasses.dataclass(frozen=True)
class EasyEpConfig(ExpertConfig):
    """EASY-EP: output-aware expert importance times token contribution, on a few demonstrations."""

    method = "easy-ep"


@dataclasses.dataclass(frozen=True)
class ReapConfig(ExpertConfig):
    """REAP: mean router-weighted expert output norm over the tokens routed to each expert."""

    method = "reap"


@dataclasses.dataclass(frozen=True)
class FrequencyConfig(ExpertConfig):
    """Keep the experts the router picks most often on the demonstrations."""

    method = "frequency"


@dataclasses.dataclass(frozen=True)
class RandomExpertsConfig(ExpertConfig):
    """Keep a random subset of experts (``seed`` fixes it); needs no data."""

    method = "random-experts"
    needs_data: ClassVar[bool] = False
