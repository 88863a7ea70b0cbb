"""Týr's local pruning: OBS-style group removal on a consumer's input Gram matrix.

Pure tensor maths, no model. A *unit* (an MLP channel, an attention head) owns some input
columns of each consumer projection (``down_proj``, ``o_proj``). With the consumer's inputs
augmented by a constant 1 (so its bias is refitted too), ``H = X~^T X~`` (``[C+1, C+1]``),
``B = W~^T`` (``[C+1, out]``) and the dampened inverse ``Hinv = (H + λ·mean(diag H)·I)^-1``,
removing unit ``u`` (its column set ``S``) and letting every other column compensate raises
the reconstruction error by (optimal brain surgeon, group form)::

    ΔE(u) = ½ · trace( B_S^T · (Hinv_SS)^-1 · B_S )

Channels are removed greedily a few at a time (the lowest ``ΔE`` first), with ``B`` and
``Hinv`` updated after each round exactly as OBS prescribes::

    B    <- B    - Hinv[:, S] (Hinv_SS)^-1 B_S          (then B_S = 0)
    Hinv <- Hinv - Hinv[:, S] (Hinv_SS)^-1 Hinv[S, :]   (then rows/cols S = 0)

which is the reference code's ``local_prune_core`` (its ``update_iter`` rounds). Heads are
ranked once from the full inverse (the reference's single MHA round) and the legal
grouped-query layouts are chosen from that ranking. Every candidate's kept columns are then
re-solved by least squares (:func:`prunecli.refit.refit_columns`), as the reference does
after its OBS rounds.

Deviation from the code (documented in ``docs/methods.md``): the reference reruns the greedy
removal from the dense weights for every level; here one greedy path runs from dense to the
sparsest level and each level's removal set is read off that path, so the candidates are
nested (a sparser level removes a superset) and the work is one path instead of nine.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def damped_inverse(gram: Tensor, damp: float) -> Tensor:
    """``(H + damp * mean(diag H) * I)^-1`` in float64 (``H`` dead rows stay finite)."""
    h = gram.to(torch.float64)
    lam = damp * float(h.diagonal().mean()) if h.numel() else 0.0
    if lam <= 0:
        lam = 1e-8
    return torch.linalg.inv(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))


def augmented(weight: Tensor, bias: Tensor | None) -> Tensor:
    """``B = [W, b]^T`` (``[in + 1, out]``, float64)."""
    w = weight.detach().to(torch.float64)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    return torch.cat([w, b.to(w.device)[:, None]], dim=1).T.contiguous()


def unit_errors(b: Tensor, hinv: Tensor, units: list[list[int]], alive: list[bool]) -> Tensor:
    """``ΔE(u)`` for every unit (``inf`` for units already removed)."""
    out = torch.full((len(units),), math.inf, dtype=torch.float64)
    single = all(len(ix) == 1 for ix in units)
    if single:
        idx = torch.tensor([ix[0] for ix in units], dtype=torch.long)
        d = hinv.diagonal()[idx].clamp_min(1e-30)
        err = 0.5 * b[idx].pow(2).sum(dim=1) / d
        mask = torch.tensor(alive, dtype=torch.bool)
        out[mask] = err[mask]
        return out
    for u, ix in enumerate(units):
        if not alive[u]:
            continue
        s = torch.tensor(ix, dtype=torch.long)
        hs = hinv.index_select(0, s).index_select(1, s)
        bs = b.index_select(0, s)
        out[u] = 0.5 * float((bs * torch.linalg.solve(hs, bs)).sum())
    return out


def _remove(b: Tensor, hinv: Tensor, cols: list[int]) -> None:
    """OBS update of ``b`` and ``hinv`` in place for removing input columns ``cols``."""
    s = torch.tensor(cols, dtype=torch.long)
    hs = hinv.index_select(0, s).index_select(1, s)
    left = hinv.index_select(1, s)  # [C+1, |S|]
    solve_b = torch.linalg.solve(hs, b.index_select(0, s))
    solve_h = torch.linalg.solve(hs, hinv.index_select(0, s))
    b -= left @ solve_b
    hinv -= left @ solve_h
    b[s] = 0.0
    hinv[s] = 0.0
    hinv[:, s] = 0.0


def greedy_path(
    consumers: list[tuple[Tensor, Tensor, list[list[int]]]],
    remove_counts: list[int],
    round_size: int,
    damp: float,
) -> dict[int, list[int]]:
    """Remove units greedily by smallest summed ``ΔE``; the removal set at each count.

    Args:
        consumers: per consumer ``(B, gram, units)``: the augmented transposed weight
            ``[C+1, out]``, the augmented Gram ``[C+1, C+1]`` and each unit's columns.
            Every consumer lists the same number of units.
        remove_counts: the numbers of removed units to report (any order).
        round_size: units removed per round between inverse updates.
        damp: relative dampening.

    Returns:
        ``{count: sorted removed units}`` for every requested count.

    Example:
        >>> x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 2.0], [1.0, 1.0, 4.0]])
        >>> aug = torch.cat([x, torch.ones(3, 1)], 1)
        >>> w = torch.tensor([[1.0, 1.0, 0.01]])
        >>> greedy_path([(augmented(w, None), aug.T @ aug, [[0], [1], [2]])], [1], 1, 0.0)
        {1: [2]}
    """
    n_units = len(consumers[0][2])
    wanted = sorted({c for c in remove_counts if 0 <= c <= n_units})
    out: dict[int, list[int]] = {}
    if not wanted:
        return out
    state = [(b.clone(), damped_inverse(g, damp), units) for b, g, units in consumers]
    alive = [True] * n_units
    removed: list[int] = []
    if 0 in wanted:
        out[0] = []
    goal = wanted[-1]
    while len(removed) < goal:
        nxt = min(c for c in wanted if c > len(removed))
        k = min(max(1, round_size), nxt - len(removed))
        err = sum(unit_errors(b, h, units, alive) for b, h, units in state)
        assert isinstance(err, Tensor)
        order = torch.argsort(err, stable=True)
        pick = [int(u) for u in order[:k]]
        for b, h, units in state:
            _remove(b, h, sorted(c for u in pick for c in units[u]))
        for u in pick:
            alive[u] = False
        removed += pick
        if len(removed) in wanted:
            out[len(removed)] = sorted(removed)
    return out


def head_scores(consumers: list[tuple[Tensor, Tensor, list[list[int]]]], damp: float) -> Tensor:
    """Keep-scores of heads (``-ΔE`` from the full inverse; higher = keep)."""
    total = None
    for b, g, units in consumers:
        e = unit_errors(b, damped_inverse(g, damp), units, [True] * len(units))
        total = e if total is None else total + e
    assert total is not None
    return -total
