"""CFSP maths as plain tensor functions (no model, no hooks).

Coarse step (between blocks)
    Block importance is the angular distance between a block's input and output hidden
    states, averaged over the calibration tokens::

        d_l = mean_t  arccos( <x_t^l, x_t^{l+1}> / (|x_t^l| |x_t^{l+1}|) ) / pi

    (``lib/block_metrics.py: block_influence(metrics="angular")`` in the public code; a zero
    vector gives cosine NaN, which the code replaces by 0.5 before the arccos.)

    The sparsity budget is split across blocks as the public code does
    (``lib/prune.py: prune_cfsp``): centred importances go through a sigmoid,
    ``w_l = sigmoid(alpha * (d_l - mean d))``, and block ``l`` keeps the fraction
    ``k_l = (1 - p) * w_l / mean(w)`` of its channels, so the mean kept fraction is ``1 - p``.
    When a block would keep more than 100 %, the deviations ``k_l - (1 - p)`` are shrunk by a
    common factor (divided by a margin of 1.05) until every block is within bounds; shrinking
    towards the mean leaves the total unchanged. The code sums the distances over all
    calibration tokens and divides the centred sums by ``1e4`` (slope ``a = 1``); its default
    calibration is 128 windows of 1024 tokens, so on per-token means that is
    ``alpha = 1 * 128 * 1024 / 1e4 = 13.1072`` (:data:`CODE_ALPHA`, our default). We apply it
    to per-token means, so the slope does not change with the calibration size; the code's
    slope does (doubling its tokens doubles its slope). Blocks of different sizes are
    weighted by their parameter counts (the code's blocks are all the same size).

Fine step (inside a block)
    The score of MLP channel ``i`` combines the three MLP weights and the activation norm
    ``a_i = ||X_i||`` of the input of the down projection over the calibration tokens. Two
    criteria are offered (``criterion``):

    ``"code"`` (default): exactly what the authors' public code computes
    (``prune_cfsp`` with ``--local_metrics three_w_one_wa``)::

        F_i = [ mean_j |Wd_ji| a_i^b / sum_j' |Wd_j'i| a_i^b
                + sum_p mean_j |Wp_ij| / sum_j' |Wp_ij'| ] * a_i^c

    with ``Wd`` the down projection ``[hidden, m]``, ``Wp`` each producer (gate, up)
    ``[m, hidden]``, ``b = c = 1``. Each channel's weights are normalised by *its own* sum over
    the hidden units, so every weight term averages to one over the hidden size and the score
    reduces to ``(1 / d_out + P / d_in) * a_i^c`` (P producers): a ranking by activation norm
    alone (proved in ``tests/test_cfsp.py``). This is the default because it is what the
    authors published and ran.

    ``"across-channels"`` (prunecli's own, not published by the authors): each weight is
    normalised by the weights of *all channels* that touch the same hidden unit (a relative
    importance across channels, as in RIA), times the same activation factor::

        F_i = [ sum_j |Wd_ji| a_i^b / sum_k |Wd_jk| a_k^b
                + sum_p sum_j |Wp_ij| / sum_k |Wp_kj| ] * a_i^c

    It was prunecli's reading of the paper's Eq. 8 (earlier named ``"paper"``), but it is not
    the published equation: the paper's relative importance (RIA-style) normalises each
    Wanda-style score ``|W|·||X||`` by the sum of its row *and* of its column, while this
    criterion normalises by one direction only, and its outer ``a_i^c`` factor comes from the
    code, not from the paper.

    Measured on SmolLM2-135M (16 x 128 Emma calibration windows, perplexity on 8 x 256
    Persuasion windows, dense 45.16, 20 % of the MLP channels): ``code`` 60.79,
    ``across-channels`` 60.34 (within noise of each other); ``code`` with a uniform allocation
    (``alpha=0``) 66.22, so the coarse allocation is what matters most. (The previous default,
    ``across-channels`` with ``alpha=26.2144``: 60.08.)

    The paper's own equation is not implemented: its full text was not reachable from this
    machine, so its exact form (which norms, which exponents) could not be checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prunecli.calibrate.stats import angular_distance  # noqa: F401  (CFSP Eq. 2, shared with the runner)
from prunecli.errors import InputError, SparsityError

# The public code's allocation settings: slope ``a = 1`` on the distances summed over its
# default calibration (128 windows of 1024 tokens), divided by 1e4.
CODE_A = 1.0
CODE_NSAMPLES = 128
CODE_SEQLEN = 1024
CODE_SCALE = 1e4
CODE_ALPHA = CODE_A * CODE_NSAMPLES * CODE_SEQLEN / CODE_SCALE
"""Sigmoid slope on per-token mean distances that reproduces the public code at its default
calibration (128 x 1024 tokens): 13.1072."""

CRITERIA: tuple[str, ...] = ("code", "across-channels")
RENAMED: dict[str, str] = {"paper": "across-channels"}
"""Criteria renamed since an earlier release: old name -> new name (rejected with a hint)."""


def check_criterion(criterion: str) -> None:
    """Raise :class:`InputError` unless ``criterion`` is one of :data:`CRITERIA`.

    Args:
        criterion: the name to check.
    """
    if criterion in CRITERIA:
        return
    if criterion in RENAMED:
        raise InputError(
            f"CFSP criterion {criterion!r} was renamed to {RENAMED[criterion]!r} (it is not the paper's equation)",
            hint=f"use criterion={RENAMED[criterion]} for the old scores, or the default 'code'",
        )
    raise InputError(f"unknown CFSP criterion {criterion!r}", hint=f"choose one of: {', '.join(CRITERIA)}")


def allocate_sparsity(
    importances: Sequence[float] | torch.Tensor,
    target: float,
    *,
    sizes: Sequence[float] | torch.Tensor | None = None,
    alpha: float = CODE_ALPHA,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
    margin: float = 1.05,
) -> torch.Tensor:
    """Split a sparsity budget across blocks: more important blocks keep more.

    Args:
        importances: one coarse importance per block (higher = more important).
        target: overall fraction to remove, in (0, 1).
        sizes: prunable parameters per block (weights of the average); equal when ``None``.
        alpha: sigmoid slope applied to the centred importances.
        min_sparsity: lowest sparsity any block may get.
        max_sparsity: highest sparsity any block may get (e.g. ``1 - 1/num_units`` so that a
            block keeps at least one unit).
        margin: when the raw allocation breaks a bound, the deviations from the mean are shrunk
            to ``1/margin`` of the largest factor that would just fit (the code's 1.05).

    Returns:
        float64 tensor of per-block sparsities ``s_l`` with ``sum(sizes * s) == target *
        sum(sizes)`` (to rounding) and ``min_sparsity <= s_l <= max_sparsity``.

    Example:
        >>> [round(s, 12) for s in allocate_sparsity([1.0, 1.0], 0.3).tolist()]
        [0.3, 0.3]
    """
    imp = torch.as_tensor(importances, dtype=torch.float64).flatten()
    n = imp.numel()
    if n == 0:
        raise InputError("allocate_sparsity needs at least one block")
    if not 0.0 < float(target) < 1.0:
        raise SparsityError(f"sparsity must be strictly between 0 and 1, got {target}")
    if not 0.0 <= min_sparsity <= target <= max_sparsity <= 1.0:
        raise SparsityError(
            f"sparsity {target} is outside the per-block bounds [{min_sparsity}, {max_sparsity}]",
            hint="lower the sparsity or relax the per-block bounds",
        )
    if margin < 1.0:
        raise InputError(f"margin must be >= 1, got {margin}")
    w_size = (
        torch.ones(n, dtype=torch.float64) if sizes is None else torch.as_tensor(sizes, dtype=torch.float64)
    )
    if w_size.shape != (n,) or bool((w_size <= 0).any()):
        raise InputError("sizes must hold one positive number per block")
    w_size = w_size / w_size.sum()

    keep_mean = 1.0 - float(target)
    centred = imp - (w_size * imp).sum()
    w = torch.sigmoid(alpha * centred)
    keep = keep_mean * w / (w_size * w).sum()
    dev = keep - keep_mean  # sum(w_size * dev) == 0

    hi, lo = 1.0 - min_sparsity, 1.0 - max_sparsity  # bounds on the kept fraction
    room = torch.where(
        dev > 0, (hi - keep_mean) / dev.clamp(min=1e-300), (keep_mean - lo) / (-dev).clamp(min=1e-300)
    )
    room = torch.where(dev == 0, torch.full_like(room, math.inf), room)
    factor = float(room.min()) if n else math.inf
    if factor < 1.0:
        dev = dev * (factor / margin)
    keep = (keep_mean + dev).clamp(lo, hi)
    return 1.0 - keep


def allocate_units(
    sparsities: Sequence[float] | torch.Tensor,
    num_units: Sequence[int],
    unit_params: Sequence[int],
    target_params: float,
    *,
    round_to: int = 1,
) -> list[int]:
    """Turn per-block sparsities into whole numbers of units to remove.

    Each block keeps a multiple of ``round_to`` units (its full width when that is smaller than
    ``round_to``) and at least one unit. Starting from the kept widths nearest below each block's
    ideal, widths are grown ``round_to`` units at a time, in order of the largest shortfall from
    the ideal, while that brings the total removed parameters closer to ``target_params``.

    Args:
        sparsities: fraction of each block's units to remove (ideal, real-valued).
        num_units: units per block.
        unit_params: parameters removed with one unit of each block.
        target_params: parameters to remove in total.
        round_to: kept widths are multiples of this number.

    Returns:
        number of units to remove from each block.

    Example:
        >>> allocate_units([0.5, 0.25], [8, 8], [10, 10], 60.0, round_to=2)
        [4, 2]
    """
    s = [float(x) for x in torch.as_tensor(sparsities, dtype=torch.float64).flatten().tolist()]
    if not (len(s) == len(num_units) == len(unit_params)):
        raise InputError("sparsities, num_units and unit_params must have the same length")
    if round_to < 1:
        raise InputError(f"round_to must be a positive integer, got {round_to}")
    q = int(round_to)
    ideal_keep = [(1.0 - si) * n for si, n in zip(s, num_units, strict=True)]

    def grow(k: int, n: int) -> int:
        """Next allowed kept width above ``k``: the next multiple of q, or the full width."""
        nxt = (k // q + 1) * q
        return nxt if nxt <= n else n

    keep: list[int] = []
    for n, k in zip(num_units, ideal_keep, strict=True):
        if n <= q:  # too narrow to round: keep it whole
            keep.append(n)
        else:
            keep.append(min(n, max(q, int(math.floor(k / q + 1e-9)) * q)))
    removed = sum((n - k) * u for n, k, u in zip(num_units, keep, unit_params, strict=True))
    while True:
        best, best_gap = -1, -math.inf
        for i, (n, k) in enumerate(zip(num_units, keep, strict=True)):
            if k < n:
                gap = (ideal_keep[i] - k) / (grow(k, n) - k)
                if gap > best_gap:
                    best, best_gap = i, gap
        if best < 0:
            break
        k_new = grow(keep[best], num_units[best])
        new_removed = removed - (k_new - keep[best]) * unit_params[best]
        if abs(new_removed - target_params) >= abs(removed - target_params):
            break
        keep[best] = k_new
        removed = new_removed
    return [n - k for n, k in zip(num_units, keep, strict=True)]


def channel_importance(
    producers: Sequence[torch.Tensor],
    consumer: torch.Tensor,
    act_norm: torch.Tensor,
    *,
    criterion: str = "code",
    b: float = 1.0,
    c: float = 1.0,
    eps: float = 1e-12,
) -> torch.Tensor:
    """CFSP fine-grained score of each MLP channel (higher = more important).

    Args:
        producers: weights whose *rows* are the channels, each ``[m, d_in]`` (gate, up).
        consumer: weight whose *columns* are the channels, ``[d_out, m]`` (down).
        act_norm: ``[m]`` norm of each channel's input to the consumer over the calibration
            tokens (any positive scale; only ratios within a block matter).
        criterion: ``"code"`` (the public code's) or ``"across-channels"`` (prunecli's own);
            see the module docstring.
        b: exponent of the activation inside the consumer term.
        c: exponent of the activation factor outside the sum.
        eps: guards divisions by zero.

    Returns:
        float32 ``[m]``.
    """
    check_criterion(criterion)
    wd = consumer.detach().to(torch.float32).abs()  # (d_out, m)
    m = wd.shape[1]
    a = act_norm.detach().to(torch.float32).flatten()
    if a.numel() != m:
        raise InputError(f"act_norm has {a.numel()} entries for {m} channels")
    wps = [p.detach().to(torch.float32).abs() for p in producers]  # (m, d_in) each
    for p in wps:
        if p.shape[0] != m:
            raise InputError(f"producer has {p.shape[0]} rows for {m} channels")
    wd_a = wd * a.pow(b)  # (d_out, m)
    if criterion == "across-channels":
        # normalise across channels: every hidden unit's weights to/from the m channels sum to 1
        score = (wd_a / (wd_a.sum(dim=1, keepdim=True) + eps)).sum(dim=0)  # (m,)
        for p in wps:
            score = score + (p / (p.sum(dim=0, keepdim=True) + eps)).sum(dim=1)
    else:
        # public code: normalise each channel by its own sum over the hidden units, then average
        score = (wd_a / (wd_a.sum(dim=0, keepdim=True) + eps)).mean(dim=0)
        for p in wps:
            pt = p.t()  # (d_in, m), as the code transposes W_up / W_gate
            score = score + (pt / (pt.sum(dim=0, keepdim=True) + eps)).mean(dim=0)
    return score * a.pow(c)
