"""Expert scores from the per-block sums of :class:`~prunecli.calibrate.stats.ExpertStats`.

Notation, for MoE layer ``l``, routed expert ``i`` and calibration token ``t`` routed to it:
``g_{i,t}`` is the router weight the model applies to the expert's output (after its own
normalisation and scaling), ``E_i(h_t)`` the expert's output, ``x_t`` the residual stream
entering the block and ``y_t`` the routed experts' output (shared experts excluded).

- EASY-EP (Dong et al., 2025, "Domain-Specific Pruning of Large Mixture-of-Experts Models
  with Few-shot Demonstrations", arXiv:2504.06792; code RUCAIBox/EASYEP):
  ``score_i = Σ_t c_{i,t} · s_t`` with ``c_{i,t} = g_{i,t} · ‖E_i(h_t)‖₂`` (output-aware
  importance) and ``s_t = max(0, 1 − cos(x_t, x_t + y_t))`` (token contribution), summed over
  the demonstrations' tokens.
- REAP (Lasby et al., Cerebras, 2025, "REAP: Router-weighted Expert Activation Pruning"):
  ``score_i = (1 / |T_i|) Σ_{t ∈ T_i} g_{i,t} · ‖E_i(h_t)‖₂``, the mean over the tokens
  ``T_i`` routed to expert ``i``.
- Frequency: ``score_i = |T_i|``, how often the router picks expert ``i``.
- Mixed-domain selection (EASY-EP): each domain's scores are normalised per layer to sum to
  1 and the normalised scores are added.
"""

from __future__ import annotations

import torch
from torch import Tensor


def easy_ep_scores(weighted: Tensor) -> Tensor:
    """EASY-EP: ``Σ_t g·‖E(h_t)‖₂·s_t`` per expert (already summed by the observer).

    Example:
        >>> easy_ep_scores(torch.tensor([0.5, 0.0, 1.5])).tolist()
        [0.5, 0.0, 1.5]
    """
    return weighted.double().clone()


def reap_scores(importance: Tensor, routed: Tensor) -> Tensor:
    """REAP: mean of ``g·‖E(h)‖₂`` over the tokens routed to each expert (0 if none).

    Example:
        >>> reap_scores(torch.tensor([3.0, 0.0, 2.0]), torch.tensor([2.0, 0.0, 1.0])).tolist()
        [1.5, 0.0, 2.0]
    """
    routed = routed.double()
    return torch.where(routed > 0, importance.double() / routed.clamp(min=1), torch.zeros_like(routed))


def frequency_scores(routed: Tensor) -> Tensor:
    """Frequency: tokens routed to each expert."""
    return routed.double().clone()


def normalise(scores: Tensor) -> Tensor:
    """One layer's scores scaled to sum to 1 (uniform when they sum to 0).

    Example:
        >>> normalise(torch.tensor([1.0, 3.0])).tolist()
        [0.25, 0.75]
    """
    s = scores.double().clamp(min=0)
    total = s.sum()
    return s / total if total > 0 else torch.full_like(s, 1.0 / max(1, s.numel()))


def mixed_domain(per_domain: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """EASY-EP's mixed-domain scores: per layer, the sum over domains of the normalised scores.

    Example:
        >>> a = {"l0": torch.tensor([1.0, 0.0])}; b = {"l0": torch.tensor([1.0, 3.0])}
        >>> mixed_domain([a, b])["l0"].tolist()
        [1.25, 0.75]
    """
    out: dict[str, Tensor] = {}
    for scores in per_domain:
        for name, s in scores.items():
            out[name] = out.get(name, torch.zeros_like(s, dtype=torch.float64)) + normalise(s)
    return out
