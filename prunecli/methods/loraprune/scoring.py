"""LoRAPrune maths as plain tensor functions.

Zhang et al., Findings of ACL 2024, "LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning" (arXiv 2305.18403); public code github.com/aim-uofa/LoRAPrune
(``loraprune/utils.py``). With a LoRA adapter the effective weight is ``W + s * B @ A``
(``A: [r, in]``, ``B: [out, r]``, ``s = alpha / r``), and only ``A`` and ``B`` get gradients.

Gradient estimate (paper Sec. 3.2; ``compute_sensitivity(prune_metric="lora")``): one SGD step
on the adapters changes the effective weight by ``(B - gB)(A - gA) - BA``, so the weight
gradient is approximated from the adapter gradients alone as::

    G ~= gB @ A + B @ gA - gB @ gA

Importance of every weight (first-order Taylor on the merged weight)::

    I = | (W + s * B @ A) * G |

A group's unit importance is the sum of ``I`` over every weight slice the unit owns, one
vector per weight, each divided by its L2 norm before the weights are summed (the code's
``norm=True``). Across steps the unit importances are smoothed with a moving average
``I_t = beta * I_{t-1} + (1 - beta) * I_new``, ``beta = 0.9``.

Pruning schedule (``schedule_sparsity_ratio``): no pruning during the first ``warmup``
fraction of the steps, the target sparsity during the last ``cooldown`` fraction, and a cubic
ramp in between: ``s_t = final + (initial - final) * (1 - progress)^3``.
"""

from __future__ import annotations

import torch

from prunecli.errors import InputError


def estimate_weight_grad(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
) -> torch.Tensor:
    """LoRAPrune's estimate of the gradient of the frozen weight from the adapter gradients.

    Args:
        a: LoRA ``A`` ``[r, in]``.
        b: LoRA ``B`` ``[out, r]``.
        grad_a: gradient of the loss w.r.t. ``A``.
        grad_b: gradient of the loss w.r.t. ``B``.

    Returns:
        ``gB @ A + B @ gA - gB @ gA``, shape ``[out, in]``.
    """
    if a.shape != grad_a.shape or b.shape != grad_b.shape or a.shape[0] != b.shape[1]:
        raise InputError(
            f"LoRA shapes do not fit: A {tuple(a.shape)}, B {tuple(b.shape)}, "
            f"gA {tuple(grad_a.shape)}, gB {tuple(grad_b.shape)}"
        )
    return grad_b @ a + b @ grad_a - grad_b @ grad_a


def lora_weight_importance(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Per-weight importance ``|(W + s * B @ A) * G|`` with ``G`` from :func:`estimate_weight_grad`.

    Args:
        weight: frozen weight ``[out, in]``.
        a: LoRA ``A`` ``[r, in]``.
        b: LoRA ``B`` ``[out, r]``.
        grad_a: gradient w.r.t. ``A``.
        grad_b: gradient w.r.t. ``B``.
        scaling: the adapter scaling ``alpha / r``.
    """
    a32, b32 = a.detach().float(), b.detach().float()
    g = estimate_weight_grad(a32, b32, grad_a.detach().float(), grad_b.detach().float())
    merged = weight.detach().float() + scaling * (b32 @ a32)
    if merged.shape != g.shape:
        raise InputError(f"weight {tuple(weight.shape)} does not match the adapter {tuple(g.shape)}")
    return (merged * g).abs()


def unit_sums(values: torch.Tensor, dim: int, index: list[list[int]]) -> torch.Tensor:
    """Sum ``values`` over every dimension but ``dim``, then over each unit's indices.

    Args:
        values: per-weight quantities shaped like the parameter.
        dim: the sliced dimension.
        index: for each unit, its indices along ``dim``.

    Returns:
        float32 ``[len(index)]``.

    Example:
        >>> unit_sums(torch.ones(4, 3), 0, [[0, 1], [3]]).tolist()
        [6.0, 3.0]
    """
    other = [d for d in range(values.dim()) if d != dim]
    per_index = values.float().sum(dim=other) if other else values.float()
    sizes = [len(u) for u in index]
    flat = torch.tensor([i for u in index for i in u], dtype=torch.long, device=per_index.device)
    picked = per_index.index_select(0, flat)
    if all(s == 1 for s in sizes):
        return picked.cpu()
    return torch.stack([c.sum() for c in torch.split(picked, sizes)]).cpu()


def combine(vectors: list[torch.Tensor], *, normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Sum per-weight unit vectors into the group's unit importance.

    Args:
        vectors: one ``[num_units]`` vector per weight of the group.
        normalize: divide each vector by its L2 norm first (the code's ``norm=True``).
        eps: added to the norm.
    """
    if not vectors:
        raise InputError("a group needs at least one weight with an adapter to be scored")
    out = torch.zeros_like(vectors[0], dtype=torch.float32)
    for v in vectors:
        v = v.float()
        out = out + (v / (torch.linalg.vector_norm(v) + eps) if normalize else v)
    return out


def moving_average(prev: torch.Tensor, new: torch.Tensor, beta: float) -> torch.Tensor:
    """``beta * prev + (1 - beta) * new``; ``prev`` is returned unchanged when ``new`` has a NaN.

    Args:
        prev: running importance.
        new: this step's importance.
        beta: smoothing factor in [0, 1).
    """
    if not bool(torch.isfinite(new).all()):
        return prev
    return beta * prev + (1.0 - beta) * new


def cubic_sparsity(
    step: int, total: int, warmup: float, cooldown: float, initial: float, final: float
) -> float:
    """Scheduled sparsity at ``step`` (LoRAPrune's ``schedule_sparsity_ratio``).

    Args:
        step: current step, from 0.
        total: number of steps.
        warmup: fraction of the steps held at ``initial`` at the start.
        cooldown: fraction of the steps held at ``final`` at the end.
        initial: starting sparsity.
        final: target sparsity.

    Example:
        >>> cubic_sparsity(0, 100, 0.1, 0.1, 0.0, 0.5), cubic_sparsity(95, 100, 0.1, 0.1, 0.0, 0.5)
        (0.0, 0.5)
    """
    if step <= warmup * total:
        return initial
    if step > total - cooldown * total:
        return final
    ramp = total - (warmup + cooldown) * total
    progress = 1.0 - (step - warmup * total) / ramp
    return final + (initial - final) * progress**3
