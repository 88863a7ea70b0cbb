"""Configuration of the FLAP method."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from prunecli.config import DataMethodConfig
from prunecli.errors import InputError

STRUCTURES: tuple[str, ...] = ("AL-AM", "UL-UM")
METRIC_NAMES: tuple[str, ...] = ("WIFV", "IFV", "WIFN")


@dataclasses.dataclass(frozen=True)
class FlapConfig(DataMethodConfig):
    """FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024).

    Args:
        sparsity: fraction of the attention + MLP parameters to remove, in (0, 1).
        metric: channel importance: ``WIFV`` (input variance x squared weight-column norm,
            the paper's default), ``IFV`` (input variance) or ``WIFN`` (input RMS x mean
            absolute weight of the column).
        structure: ``AL-AM`` (adaptive: one global threshold over the standardised scores of
            every layer's heads and MLP channels) or ``UL-UM`` (uniform: each layer's attention
            and MLP lose the same fraction).
        bias_compensation: add ``W[:, R] @ mean(x[R])`` to the bias of each output projection
            whose input channels ``R`` are removed.
        nsamples: calibration windows for the CLI (1024, FLAP's default: 1024 WikiText-2
            samples of 128 tokens).
        seqlen: tokens per calibration window (128, FLAP's default).
        round_to: keep head counts and MLP widths multiples of this number where possible.
        seed: unused by FLAP (deterministic), kept for a uniform interface.
        ignore: glob patterns of module names whose groups are never pruned.

    Example:
        >>> FlapConfig(sparsity=0.2).structure
        'AL-AM'
    """

    method: ClassVar[str] = "flap"
    needs_data: ClassVar[bool] = True

    nsamples: int = 1024
    seqlen: int = 128
    metric: str = "WIFV"
    structure: str = "AL-AM"
    bias_compensation: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in METRIC_NAMES:
            raise InputError(
                f"unknown FLAP metric {self.metric!r}",
                hint=f"choose one of: {', '.join(METRIC_NAMES)}",
            )
        if self.structure not in STRUCTURES:
            raise InputError(
                f"unknown FLAP structure {self.structure!r}",
                hint=f"choose one of: {', '.join(STRUCTURES)}",
            )
        if not isinstance(self.bias_compensation, bool):
            raise InputError(f"bias_compensation must be true or false, got {self.bias_compensation!r}")
