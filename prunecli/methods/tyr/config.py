"""Configuration of the Týr-the-Pruner method."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from prunecli.config import DataMethodConfig
from prunecli.errors import InputError

SEARCH_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32", "model")


@dataclasses.dataclass(frozen=True)
class TyrConfig(DataMethodConfig):
    """Týr-the-Pruner: supernet of locally pruned blocks + evolutionary sparsity search.

    Li et al., "Týr-the-Pruner: Structural Pruning LLMs via Global Sparsity Distribution
    Optimization", NeurIPS 2025 (arXiv:2503.09657; code AMD-AGI/Tyr-the-Pruner).

    Args:
        sparsity: fraction of the attention + MLP parameters to remove, in (0, 1).
        nsamples / seqlen: calibration windows (the supernet's statistics and the search's
            fitness tokens both come from them).
        levels: candidate sparsity levels per attention / MLP block in the supernet (9 in the
            reference code: the centre and four on each side).
        step: distance between neighbouring levels in the first iteration, as a fraction of
            the block's width (0.125: 1/8 of the MLP channels); halved every iteration.
            Head blocks move by at least one legal head layout.
        iterations: coarse-to-fine rounds (supernet rebuilt around the best distribution
            with the step halved; 4 in the reference script).
        generations: evolutionary generations per iteration.
        offspring: children per generation.
        stage_tokens: calibration tokens of each selection stage (growing); the last stage
            uses one fixed set of windows for the whole search, earlier ones are redrawn every
            generation.
        survivors: candidates kept after each stage (the last is 1: the new parent).
        max_flips: at most this many budget-exact level swaps per child (the count is
            ``min`` of two uniform draws in ``[1, max_flips]``, biased to few, as in the code).
        kl_topk: the fitness is the KL divergence between the dense and the candidate
            next-token distributions restricted to the dense model's ``kl_topk`` largest logits.
        obs_rounds: greedy OBS rounds per level step when removing MLP channels (units are
            removed a few at a time with the inverse Hessian updated in between).
        damp: relative dampening of the Gram matrix diagonal (1%, the reference's value).
        supernet_dir: keep the supernet files here (default: a temporary folder that is
            deleted at the end).
        search_dtype: dtype of the model copy the search evaluates candidates with
            (``bfloat16``, as the reference runs its search; ``float32``; ``model``: the model
            itself, no copy). The supernet's statistics and refits always use the model's own
            weights and dtype.
        final_refit: after the search, re-solve the found distribution's kept columns by
            least squares on its own activations (``--refit`` with pruned propagation: each
            block sees the blocks before it as they will be), instead of on the supernet's
            centre-pruned ones; kept when it lowers the fitness on the last stage's windows
            (ours; the code assembles the supernet candidates).
        seed: seeds the children and the stage windows.

    Example:
        >>> TyrConfig(sparsity=0.5).levels
        9
    """

    method: ClassVar[str] = "tyr"
    needs_data: ClassVar[bool] = True

    nsamples: int = 64
    seqlen: int = 256
    levels: int = 9
    step: float = 0.125
    iterations: int = 2
    generations: int = 20
    offspring: int = 12
    stage_tokens: tuple[int, ...] = (512, 4096)
    survivors: tuple[int, ...] = (3, 1)
    max_flips: int = 4
    kl_topk: int = 1024
    obs_rounds: int = 4
    damp: float = 0.01
    supernet_dir: str | None = None
    search_dtype: str = "bfloat16"
    final_refit: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("stage_tokens", "survivors"):
            v = getattr(self, name)
            if isinstance(v, (int, str)):
                v = (v,) if isinstance(v, int) else tuple(int(x) for x in str(v).split(",") if x.strip())
            object.__setattr__(self, name, tuple(int(x) for x in v))
        for name in (
            "levels",
            "iterations",
            "generations",
            "offspring",
            "max_flips",
            "kl_topk",
            "obs_rounds",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"tyr option {name} must be a positive integer, got {v!r}")
        if self.levels < 3 or self.levels % 2 == 0:
            raise InputError(
                f"tyr levels must be odd and at least 3 (a centre and both sides), got {self.levels}"
            )
        if not 0.0 < float(self.step) <= 0.5:
            raise InputError(f"tyr step must be in (0, 0.5], got {self.step}")
        if not 0.0 <= float(self.damp) < 1.0:
            raise InputError(f"tyr damp must be in [0, 1), got {self.damp}")
        if self.search_dtype not in SEARCH_DTYPES:
            raise InputError(
                f"unknown tyr search_dtype {self.search_dtype!r}",
                hint=f"choose one of {', '.join(SEARCH_DTYPES)}",
            )
        if not self.stage_tokens or len(self.stage_tokens) != len(self.survivors):
            raise InputError(
                "tyr stage_tokens and survivors need one entry per selection stage",
                hint="e.g. --set stage_tokens=512,4096 --set survivors=3,1",
            )
        if any(t < 1 for t in self.stage_tokens) or list(self.stage_tokens) != sorted(self.stage_tokens):
            raise InputError(f"tyr stage_tokens must be positive and growing, got {list(self.stage_tokens)}")
        if any(s < 1 for s in self.survivors) or list(self.survivors) != sorted(self.survivors, reverse=True):
            raise InputError(f"tyr survivors must be positive and shrinking, got {list(self.survivors)}")
        if self.survivors[-1] != 1:
            raise InputError("the last tyr selection stage keeps one candidate (the next parent)")
        if self.survivors[0] > self.offspring:
            raise InputError(f"tyr keeps {self.survivors[0]} survivors of only {self.offspring} offspring")
