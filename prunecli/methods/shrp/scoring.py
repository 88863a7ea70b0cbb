"""SHRP's maths as plain tensor functions (router gates, losses, usage, expander folding).

Shapes: ``p`` is ``[N, n]`` router probabilities of ``N`` tokens over a layer's ``n`` heads;
``mask`` is ``[N]`` (1 on real tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor


def router_gates(logits: Tensor) -> Tensor:
    """Head gates ``g = n * softmax(logits)``: uniform logits give every head gate 1 (the dense model).

    Example:
        >>> router_gates(torch.zeros(1, 4)).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """
    return logits.softmax(dim=-1) * logits.shape[-1]


def top1_usage(p: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[n]`` how many (real) tokens select each head as their top-1 expert.

    Example:
        >>> top1_usage(torch.tensor([[0.7, 0.3], [0.2, 0.8], [0.9, 0.1]])).tolist()
        [2.0, 1.0]
    """
    onehot = torch.nn.functional.one_hot(p.argmax(dim=-1), p.shape[-1]).to(p.dtype)
    if mask is not None:
        onehot = onehot * mask.to(p.dtype)[:, None]
    return onehot.sum(dim=0).detach()


def _masked_mean(p: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return p.mean(dim=0)
    w = mask.to(p.dtype)[:, None]
    return (p * w).sum(dim=0) / w.sum().clamp_min(1.0)


def balance_loss(p: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer load balancing ``n * sum_h f_h * P_h`` (1 when perfectly balanced).

    ``f_h`` is the share of tokens whose top-1 head is ``h`` (no gradient), ``P_h`` the mean
    router probability of ``h``.

    Example:
        >>> float(balance_loss(torch.full((4, 2), 0.5)))
        1.0
    """
    n = p.shape[-1]
    f = top1_usage(p, mask)
    f = f / f.sum().clamp_min(1.0)
    return n * (f * _masked_mean(p, mask)).sum()


def specialisation_loss(p: Tensor, pruned: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean router probability that tokens still give to the heads marked for pruning.

    Args:
        p: ``[N, n]`` router probabilities.
        pruned: ``[n]`` bool, the heads with the lowest running usage (the prune target).
        mask: ``[N]`` real tokens.

    Example:
        >>> float(specialisation_loss(torch.tensor([[0.25, 0.75]]), torch.tensor([True, False])))
        0.25
    """
    return _masked_mean(p, mask)[pruned].sum()


def keep_scores(usage: Tensor, mean_prob: Tensor) -> Tensor:
    """Score to keep a head: its top-1 usage count, ties broken by its mean router probability.

    ``mean_prob < 1``, so a head selected more often always ranks above one selected less
    often; among never-selected heads the one the router leans to more ranks higher.

    Example:
        >>> keep_scores(torch.tensor([0.0, 3.0, 0.0]), torch.tensor([0.1, 0.5, 0.4])).tolist()
        [0.1, 3.5, 0.4]
    """
    return usage.double() + mean_prob.double().clamp(0, 1 - 1e-9)


def fold_head_output(weight: Tensor, expander: Tensor, gate: Tensor, head_dim: int, perm: Tensor) -> Tensor:
    """Fold the shared linear expander and the constant deployment gates into the output projection.

    During routing, head ``h``'s output ``c_h`` (a row of ``head_dim``) becomes
    ``g_h * (c_h + c_h @ M)`` before the output projection ``y = sum_h c'_h @ W_h^T``; the same
    map at deployment is ``W_h <- g_h * W_h @ (I + M)^T`` with ``W_h = W[:, perm_h]``.

    Args:
        weight: ``[out, C]`` output projection.
        expander: ``[d, d]`` the layer's shared expander ``M``.
        gate: ``[n]`` constant gate per head.
        head_dim: ``d``.
        perm: ``[n * d]`` channels of the heads in head order.

    Returns:
        The new ``[out, C]`` weight.

    Example:
        >>> w = torch.eye(2)
        >>> fold_head_output(w, torch.zeros(1, 1), torch.tensor([2.0, 1.0]), 1, torch.tensor([0, 1])).tolist()
        [[2.0, 0.0], [0.0, 1.0]]
    """
    w = weight.clone()
    n = perm.numel() // head_dim
    eye = torch.eye(head_dim, dtype=weight.dtype, device=weight.device)
    t = (eye + expander.to(weight.dtype)).T
    for h in range(n):
        cols = perm[h * head_dim : (h + 1) * head_dim].to(weight.device)
        w[:, cols] = gate[h].to(weight.dtype) * (weight[:, cols] @ t)
    return w


def layer_skip_losses(skip: Tensor, target: float, dropped: Tensor | None) -> tuple[Tensor, Tensor]:
    """Balance and specialisation losses of the layer-skip routers.

    Args:
        skip: ``[L]`` mean skip probability of each layer over the batch's real tokens.
        target: share of layers to drop.
        dropped: ``[L]`` bool, the layers with the highest running skip usage (the drop target),
            or ``None`` before there is one.

    Returns:
        ``(balance, specialisation)``: the squared gap between the mean skip rate and
        ``target``; and the mean of ``1 - skip`` on the layers to drop plus the mean ``skip``
        on the others (0 when the routers agree with the target).

    Example:
        >>> b, s = layer_skip_losses(torch.tensor([1.0, 0.0]), 0.5, torch.tensor([True, False]))
        >>> float(b), float(s)
        (0.0, 0.0)
    """
    balance = (skip.mean() - target) ** 2
    if dropped is None or not bool(dropped.any()) or bool(dropped.all()):
        return balance, skip.new_zeros(())
    spec = (1 - skip[dropped]).mean() + skip[~dropped].mean()
    return balance, spec
