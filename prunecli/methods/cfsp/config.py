"""Configuration of the CFSP method."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from prunecli.config import DataMethodConfig
from prunecli.errors import InputError
from prunecli.methods.cfsp.scoring import CODE_ALPHA, CODE_NSAMPLES, CODE_SEQLEN, check_criterion


@dataclasses.dataclass(frozen=True)
class CfspConfig(DataMethodConfig):
    """CFSP: coarse-to-fine activation-guided structured pruning (Wang et al., COLING 2025).

    CFSP prunes MLP channels only (the paper prunes the FFN intermediate dimension). As for
    every method, ``sparsity`` is the fraction of the attention + MLP parameters removed; CFSP
    takes all of it from MLP channels (on SmolLM2, 20% of the blocks is 26.7% of the MLPs),
    split across layers by the coarse block importance.

    Args:
        sparsity: fraction of the attention + MLP parameters to remove, in (0, 1), all taken
            from MLP channels.
        criterion: fine channel score, ``code`` (default: the public code's
            ``three_w_one_wa``, which reduces to the activation norm) or ``across-channels``
            (prunecli's own: weights relative to all channels times activations; formerly
            named ``paper``, but it is not the paper's equation); see
            ``prunecli.methods.cfsp.scoring``.
        alpha: slope of the sigmoid on the centred block importances (the code's ``a = 1``
            times its token-count scaling; 13.1072 reproduces it at its default 128 x 1024
            calibration tokens).
        b: exponent of the activation norm inside the down-projection term.
        c: exponent of the activation norm factor.
        nsamples: calibration windows for the CLI (128, the public code's default).
        seqlen: tokens per calibration window (1024, the public code's default).
        round_to: kept MLP widths are multiples of this number (the paper uses 128).
        seed: unused (deterministic), kept for a uniform interface.
        ignore: glob patterns of module names whose groups are never pruned.

    Example:
        >>> CfspConfig(sparsity=0.3).criterion
        'code'
    """

    method: ClassVar[str] = "cfsp"
    needs_data: ClassVar[bool] = True

    nsamples: int = CODE_NSAMPLES
    seqlen: int = CODE_SEQLEN
    criterion: str = "code"
    alpha: float = CODE_ALPHA
    b: float = 1.0
    c: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_criterion(self.criterion)
        for name in ("alpha", "b", "c"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"{name} must be a non-negative number, got {v!r}")
