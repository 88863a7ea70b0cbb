"""What expert-pruning methods observe in a Mixture-of-Experts block, per token.

For a MoE block (:mod:`prunecli.graph.experts`) and a calibration token ``t`` routed to
experts ``i`` with router weights ``g_{i,t}`` (as the model uses them: after its
normalisation and scaling, i.e. what the block passes to its experts module):

- ``‖E_i(h_t)‖₂``: the norm of expert ``i``'s output for the block input ``h_t``, before
  the router weight (:func:`expert_outputs` recomputes it from the fused expert tensors);
- ``c_{i,t} = g_{i,t} · ‖E_i(h_t)‖₂``: output-aware importance (EASY-EP, REAP);
- ``s_t = max(0, 1 − cos(x_t, x_t + y_t))``: the token's contribution (EASY-EP), with
  ``x_t`` the residual stream entering the block and ``y_t`` the routed experts' output
  (shared experts excluded). In the pre-norm layers of every supported family the layer
  ends with ``residual + moe(norm(residual))``, so ``x_t`` is the layer's output minus the
  MoE block's output.

:class:`~prunecli.calibrate.stats.ExpertStats` sums them over the tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from prunecli.errors import UnsupportedModelError


def token_contribution(x: Tensor, y: Tensor) -> Tensor:
    """``s_t = max(0, 1 − cos(x_t, x_t + y_t))`` per token (EASY-EP's token weight).

    Args:
        x: residual stream entering the MoE block ``[..., H]``.
        y: routed experts' output ``[..., H]``.

    Returns:
        ``[...]`` float64 contributions; 0 where ``x`` or ``x + y`` is the zero vector.

    Example:
        >>> token_contribution(torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0, 1.0]])).tolist()
        [1.0]
    """
    a = x.detach().double()
    b = a + y.detach().double()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-30)
    return (1.0 - cos).clamp(min=0.0)


def expert_outputs(experts: nn.Module, h: Tensor, index: Tensor) -> Tensor:
    """Each routed expert's output ``E_i(h_t)`` (before its router weight).

    Reads the fused expert tensors of a transformers 5 experts module
    (``gate_up_proj`` ``[E, 2I, H]`` or ``up_proj``, ``down_proj`` ``[E, H, I]``, with the
    module's ``is_transposed``, ``has_bias``, ``has_gate`` flags and its ``_apply_gate``).

    Args:
        experts: the experts module.
        h: block input ``[T, H]``.
        index: routed experts ``[T, k]``.

    Returns:
        ``[T, k, H]``: the output of expert ``index[t, j]`` on ``h[t]``.
    """
    if getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            "experts with a post-expert norm are not supported by the expert observers"
        )
    transposed = bool(getattr(experts, "is_transposed", False))
    has_gate = bool(getattr(experts, "has_gate", True))
    has_bias = bool(getattr(experts, "has_bias", False))
    first = "gate_up_proj" if has_gate else "up_proj"

    def proj(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        out = x @ w if transposed else F.linear(x, w)
        return out + b if b is not None else out

    out = torch.zeros(*index.shape, h.shape[-1], dtype=h.dtype, device=h.device)
    for e in index.unique().tolist():
        if not 0 <= e < getattr(experts, first).shape[0]:
            continue  # a padding index some implementations use for "no expert"
        tok, slot = (index == e).nonzero(as_tuple=True)
        b1 = getattr(experts, f"{first}_bias")[e] if has_bias else None
        z = proj(h[tok], getattr(experts, first)[e], b1)
        a = experts._apply_gate(z) if has_gate else experts.act_fn(z)
        b2 = experts.down_proj_bias[e] if has_bias else None
        out[tok, slot] = proj(a, experts.down_proj[e], b2).to(out.dtype)
    return out
