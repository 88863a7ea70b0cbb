"""FLAP's maths as plain tensor functions: metrics, standardisation, selection, bias.

Paper: Y. An, X. Zhao, T. Yu, M. Tang, J. Wang, "Fluctuation-based Adaptive Structured
Pruning for Large Language Models", AAAI 2024 (arXiv 2312.11983). Reference code:
github.com/CASIA-IVA-Lab/FLAP, ``lib/prune.py`` (``metrics``, ``prune_flap``, ``compress``)
and ``lib/layerwrapper.py`` (``BiasGPT``). Definitions below, for an output projection
``W`` of shape ``[out, in]`` (``o_proj`` for attention, ``down_proj`` for the MLP) whose
input channel ``j`` takes the values ``x_j`` over the calibration tokens:

* ``IFV``  (input feature variance): ``S_j = Var(x_j)`` (unbiased, over all tokens).
* ``WIFV`` (weighted IFV, the default): ``S_j = Var(x_j) * ||W[:, j]||_2^2``
  (``metrics['WIFV']``: ``fluc_inp * torch.sum(W.pow(2), dim=0)``).
* ``WIFN`` (weighted input feature norm): ``S_j = sqrt(E[x_j^2]) * mean_i |W[i, j]|``
  (``metrics['WIFN']``: ``(|W| * sqrt(scaler_inp)).mean(axis=0)`` where ``scaler_inp`` is the
  per-sequence sum of ``x_j^2`` averaged over sequences, i.e. ``seqlen * E[x_j^2]``; the
  constant ``sqrt(seqlen)`` is dropped here, which standardisation removes anyway).
* Attention channels: ``prune_flap`` squares the metric of ``o_proj`` (``W_metric = metrics[..]
  ** 2``) before anything else; we do the same (``square=True`` for head groups).
* Standardisation (``standarlization`` in ``prune_flap``): channel scores are standardised
  *within one layer and one module kind* -- the population is all input channels of that
  layer's ``o_proj`` (resp. ``down_proj``): ``(S - mean(S)) / std(S)``, ``std`` unbiased. This
  is what makes attention and MLP scores of every layer comparable under one threshold.
* Head score: the mean of the head's ``head_dim`` standardised channel scores
  (``attn_metric.reshape(len(layers), -1, 128).mean(dim=2)``). The uniform ``UL-UM`` branch of
  the reference code sums raw channel scores instead; within a layer the two rank heads
  identically (standardisation is an increasing affine map), so one definition serves both.
* ``AL-AM``: one global threshold over the standardised scores of every head and MLP channel,
  placed where the parameters removed below it are closest to ``sparsity`` times the
  parameters of all attention and MLP blocks (``torch.argmin(|cumsum(weight) - total * (1 -
  ratio)|)``). The reference code weights a head as ``512 / 3`` channels, true for LLaMA-7B
  only; here every unit costs the parameters it really removes, read from the group shapes.
* Bias compensation (``compress``): after removing input channels ``R`` of ``W``, add
  ``W[:, R] @ mean(x[R])`` to the output bias, so the removed channels are replaced by their
  calibration mean (exact when they are constant).

Departures from the reference code (all listed in ``docs/methods.md``): textbook variance over
all tokens instead of the per-sequence update; every unit at its real parameter cost; every
group keeps at least one unit (the reference can empty a layer); kept heads legalised to
grouped-query layouts; calibration windows of models whose tokenizer adds BOS start with it
(the reference cuts windows mid-stream; on Gemma-3-270M that regime is 8x worse dense and
made FLAP at 20% 8.8x dense instead of 1.9x); default calibration 1024 x 128 as in the paper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch

from prunecli.errors import SparsityError

Metric = Literal["WIFV", "IFV", "WIFN"]
METRICS: tuple[str, ...] = ("WIFV", "IFV", "WIFN")


# --------------------------------------------------------------------------- metrics


def channel_metric(
    metric: str,
    weight: torch.Tensor,
    var: torch.Tensor | None = None,
    mean_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of every input channel of an output projection (higher = more important).

    Args:
        metric: ``WIFV`` (``Var(x_j) * ||W[:, j]||^2``), ``IFV`` (``Var(x_j)``) or ``WIFN``
            (``sqrt(E[x_j^2]) * mean_i |W[i, j]|``).
        weight: the projection's weight, ``[out, in]``.
        var: unbiased per-channel variance of the input, ``[in]`` (IFV, WIFV).
        mean_sq: per-channel mean of squares of the input, ``[in]`` (WIFN).

    Returns:
        float64 tensor ``[in]``.

    Example:
        >>> w = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
        >>> channel_metric("WIFV", w, var=torch.tensor([1.0, 0.5, 2.0])).tolist()
        [10.0, 2.0, 2.0]
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if metric in ("WIFV", "IFV"):
        if var is None:
            raise ValueError(f"metric {metric} needs the input variance")
        v = var.to(device="cpu", dtype=torch.float64)
        return v * w.square().sum(dim=0) if metric == "WIFV" else v.clone()
    if metric == "WIFN":
        if mean_sq is None:
            raise ValueError("metric WIFN needs the input mean of squares")
        return mean_sq.to(device="cpu", dtype=torch.float64).clamp_min(0).sqrt() * w.abs().mean(dim=0)
    raise ValueError(f"unknown FLAP metric {metric!r}; expected one of {', '.join(METRICS)}")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean(x)) / std(x)`` over all elements, ``std`` unbiased; zeros if ``std == 0``.

    Args:
        x: scores of one population (one layer's channels of one module kind).
    """
    x = x.to(torch.float64)
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    if not torch.isfinite(std) or std.item() == 0.0:
        return torch.zeros_like(x)
    return (x - x.mean()) / std


def unit_scores(
    channel_scores: torch.Tensor,
    index: Sequence[Sequence[int]],
    square: bool = False,
) -> torch.Tensor:
    """Standardised score of each unit of a group from its raw channel scores.

    The population for standardisation is every channel of ``channel_scores`` (all input
    channels of one layer's projection); a unit's score is the mean over its channels.

    Args:
        channel_scores: raw metric per input channel of the consumer, ``[in]``.
        index: for each unit, the consumer channels it owns (``Member.index``).
        square: square the raw scores first (the reference code does this for attention).

    Returns:
        float64 tensor ``[num_units]``.
    """
    s = channel_scores.to(torch.float64)
    if square:
        s = s.square()
    z = standardize(s)
    return torch.stack([z[torch.as_tensor(list(ix), dtype=torch.long)].mean() for ix in index])


def bias_delta(weight: torch.Tensor, mean: torch.Tensor, removed: Sequence[int]) -> torch.Tensor:
    """Bias compensation ``W[:, R] @ mean[R]`` for removed input channels ``R``.

    Args:
        weight: the projection's weight before pruning, ``[out, in]``.
        mean: calibration mean of every input channel, ``[in]``.
        removed: indices of the removed input channels.

    Returns:
        float64 tensor ``[out]`` to add to the projection's output bias.
    """
    w = weight.detach().to(device="cpu", dtype=torch.float64)
    r = torch.as_tensor(list(removed), dtype=torch.long)
    if r.numel() == 0:
        return torch.zeros(w.shape[0], dtype=torch.float64)
    return w[:, r] @ mean.to(device="cpu", dtype=torch.float64)[r]


# --------------------------------------------------------------------------- selection


@dataclasses.dataclass
class Candidate:
    """One prunable group as the selection sees it.

    Args:
        name: group name (key of the returned removals).
        kind: ``heads`` (coarse; legalised per layer) or ``channels`` (fine; fills the budget).
        scores: standardised score per unit, higher = more important.
        unit_cost: parameters removed with each unit (its own members only).
        parent_of: for grouped-query heads, the key/value head of each query head.
        parent_cost: parameters removed with one key/value head (when its last query head goes).
        round_to: kept widths must be multiples of this where possible.
        min_keep: never keep fewer units than this (at least one head / channel).
    """

    name: str
    kind: Literal["heads", "channels"]
    scores: torch.Tensor
    unit_cost: list[int]
    parent_of: list[int] | None = None
    parent_cost: int = 0
    round_to: int = 1
    min_keep: int = 1

    @property
    def num_units(self) -> int:
        return len(self.unit_cost)

    def total_cost(self) -> int:
        """Parameters of this group plus its key/value heads."""
        n_par = len(set(self.parent_of)) if self.parent_of is not None else 0
        return sum(self.unit_cost) + n_par * self.parent_cost


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """A legal way to keep heads: ``groups`` key/value heads with ``per_group`` query heads each
    (``groups`` query heads and ``per_group == 1`` without grouped-query attention)."""

    groups: int
    per_group: int
    removed_cost: int


def _kv_layout(c: Candidate) -> tuple[dict[int, list[int]], int]:
    """Query heads of each key/value head, and the (uniform) number per key/value head."""
    assert c.parent_of is not None
    members: dict[int, list[int]] = {}
    for u, p in enumerate(c.parent_of):
        members.setdefault(p, []).append(u)
    sizes = {len(v) for v in members.values()}
    if len(sizes) != 1:
        raise ValueError(f"{c.name}: key/value heads own different numbers of query heads")
    return members, sizes.pop()


def head_configs(c: Candidate) -> list[HeadConfig]:
    """Every legal kept-heads configuration of a head group, honouring ``round_to``.

    With grouped-query attention transformers repeats each key/value head ``n_rep`` times,
    so every kept key/value head must keep the same number ``r`` of query heads: the legal
    states are ``g`` kept key/value heads with ``r`` query heads each (``1 <= g <= n_kv``,
    ``1 <= r <= n_rep``), the layer keeping ``g * r`` query heads. Configurations whose kept
    query-head count is a multiple of ``round_to`` are preferred; if none is, all are legal.

    Args:
        c: a ``heads`` candidate.
    """
    qcost = max(c.unit_cost) if c.unit_cost else 0
    if c.parent_of is None:
        h = c.num_units
        pairs = [(k, 1) for k in range(max(c.min_keep, 1), h + 1)]
        full_g, full_r, pcost = h, 1, 0
    else:
        members, rep = _kv_layout(c)
        n_kv = len(members)
        pairs = [(g, r) for g in range(1, n_kv + 1) for r in range(1, rep + 1) if g * r >= c.min_keep]
        full_g, full_r, pcost = n_kv, rep, c.parent_cost
    rounded = [(g, r) for g, r in pairs if (g * r) % c.round_to == 0 or (g == full_g and r == full_r)]
    if len(rounded) > 1 or c.round_to == 1:
        pairs = rounded
    total_q = full_g * full_r
    return [HeadConfig(g, r, (total_q - g * r) * qcost + (full_g - g) * pcost) for g, r in pairs]


def _heads_for_config(c: Candidate, cfg: HeadConfig) -> list[int]:
    """Query heads to remove for ``cfg``: keep the best ``r`` heads in each of the best ``g``
    key/value groups (a group is worth the sum of its best ``r`` scores)."""
    s = c.scores.to(torch.float64)
    if c.parent_of is None:
        order = torch.argsort(s, descending=True, stable=True).tolist()
        keep = set(order[: cfg.groups])
    else:
        members, _ = _kv_layout(c)
        best: list[tuple[float, int, list[int]]] = []
        for p, units in members.items():
            ranked = sorted(units, key=lambda u: (-float(s[u]), u))[: cfg.per_group]
            best.append((sum(float(s[u]) for u in ranked), p, ranked))
        best.sort(key=lambda t: (-t[0], t[1]))
        keep = {u for _, _, ranked in best[: cfg.groups] for u in ranked}
    return [u for u in range(c.num_units) if u not in keep]


def legalize_heads(c: Candidate, target_removed_cost: float) -> tuple[list[int], int]:
    """Nearest legal head configuration to a removal target, and the heads it removes.

    Args:
        c: a ``heads`` candidate.
        target_removed_cost: parameters the threshold wanted to remove from this group
            (key/value heads included).

    Returns:
        (removed query-head indices, parameters removed).
    """
    cfgs = head_configs(c)
    cfg = min(cfgs, key=lambda k: (abs(k.removed_cost - target_removed_cost), k.removed_cost))
    return _heads_for_config(c, cfg), cfg.removed_cost


def _channel_chunks(c: Candidate) -> list[tuple[float, list[int]]]:
    """Removal steps of a channel group in order: (score, units). Removing any prefix of the
    steps keeps a width that is a multiple of ``round_to`` and at least ``min_keep``."""
    s = c.scores.to(torch.float64)
    order = torch.argsort(s, stable=True).tolist()  # least important first
    n, rt = c.num_units, c.round_to
    min_keep = max(c.min_keep, 1)
    if rt > 1 and n >= rt:
        min_keep = max(min_keep, rt)
    first = n % rt
    sizes = ([first] if first else []) + [rt] * ((n - first) // rt)
    steps: list[tuple[float, list[int]]] = []
    pos = 0
    for size in sizes:
        if n - (pos + size) < min_keep:
            break
        units = order[pos : pos + size]
        steps.append((float(s[units].mean()), units))
        pos += size
    return steps


def _best_prefix(costs: Sequence[int], target: float) -> int:
    """Length of the prefix whose cumulated cost is closest to ``target`` (shortest on ties)."""
    best_len, best_err, acc = 0, abs(target), 0
    for i, cst in enumerate(costs):
        acc += cst
        err = abs(acc - target)
        if err < best_err:
            best_len, best_err = i + 1, err
    return best_len


def _fill_channels(chans: list[Candidate], target: float) -> dict[str, list[int]]:
    """Remove channel chunks across groups in ascending score order, nearest to ``target``."""
    steps: list[tuple[float, int, int, str, list[int], int]] = []
    for gi, c in enumerate(chans):
        for si, (score, units) in enumerate(_channel_chunks(c)):
            steps.append((score, gi, si, c.name, units, sum(c.unit_cost[u] for u in units)))
    steps.sort(key=lambda t: (t[0], t[1], t[2]))
    n = _best_prefix([t[5] for t in steps], target)
    out: dict[str, list[int]] = {}
    for _, _, _, name, units, _ in steps[:n]:
        out.setdefault(name, []).extend(units)
    return out


def max_removable(c: Candidate) -> int:
    """Most parameters this candidate can give up while staying legal."""
    if c.kind == "heads":
        return max(k.removed_cost for k in head_configs(c))
    return sum(sum(c.unit_cost[u] for u in units) for _, units in _channel_chunks(c))


def _check_budget(cands: Sequence[Candidate], budget: float) -> None:
    cap = sum(max_removable(c) for c in cands)
    if budget > cap:
        raise SparsityError(
            f"cannot remove {budget:.0f} parameters: the prunable groups can give up at most {cap}",
            hint="lower --sparsity, or remove patterns from --ignore",
        )


def select_global(cands: Sequence[Candidate], budget: float) -> dict[str, list[int]]:
    """FLAP's ``AL-AM`` search: one threshold over every head and channel of every layer.

    1. Sweep all units in ascending standardised score, counting each unit's parameters plus
       its key/value head's when the last query head of that key/value head goes; stop at the
       prefix whose removed parameters are closest to ``budget``.
    2. Per head group, move to the nearest legal configuration (:func:`head_configs`).
    3. Re-fill the budget left after step 2 with MLP channels (in ``round_to`` chunks), again
       in ascending score order, so the total is within one channel chunk of ``budget``.

    Args:
        cands: prunable groups with standardised scores.
        budget: parameters to remove.

    Returns:
        group name -> indices of the units to remove.
    """
    if budget <= 0:
        return {}
    _check_budget(cands, budget)
    heads = [c for c in cands if c.kind == "heads"]
    chans = [c for c in cands if c.kind == "channels"]
    # 1. global sweep (heads and channels together)
    units: list[tuple[float, int, int]] = []  # (score, candidate, unit)
    for ci, c in enumerate(cands):
        units += [(float(c.scores[u]), ci, u) for u in range(c.num_units)]
    units.sort()
    remaining_q: list[dict[int, int]] = []
    for c in cands:
        cnt: dict[int, int] = {}
        for p in c.parent_of or []:
            cnt[p] = cnt.get(p, 0) + 1
        remaining_q.append(cnt)
    kept = [c.num_units for c in cands]
    costs: list[int] = []
    order: list[tuple[int, int]] = []
    for _, ci, u in units:
        c = cands[ci]
        if kept[ci] <= max(c.min_keep, 1):
            continue
        cost = c.unit_cost[u]
        if c.parent_of is not None:
            p = c.parent_of[u]
            remaining_q[ci][p] -= 1
            if remaining_q[ci][p] == 0:
                cost += c.parent_cost
        kept[ci] -= 1
        costs.append(cost)
        order.append((ci, u))
    n = _best_prefix(costs, budget)
    swept = [0.0] * len(cands)
    for (ci, _), cost in zip(order[:n], costs[:n], strict=True):
        swept[ci] += cost
    # 2. legalise heads
    out: dict[str, list[int]] = {}
    removed_heads = 0
    for c in heads:
        idx, cost = legalize_heads(c, swept[cands.index(c)])
        if idx:
            out[c.name] = idx
        removed_heads += cost
    # 3. channels fill the rest
    out.update(_fill_channels(chans, budget - removed_heads))
    return {k: sorted(v) for k, v in out.items() if v}


def select_uniform(cands: Sequence[Candidate], sparsity: float) -> dict[str, list[int]]:
    """FLAP's ``UL-UM``: every group (each layer's attention, each layer's MLP) loses the same
    fraction ``sparsity`` of its parameters (nearest legal width), lowest scores first.

    Args:
        cands: prunable groups with scores (standardisation does not change the result).
        sparsity: fraction of each group's parameters to remove.

    Returns:
        group name -> indices of the units to remove.
    """
    out: dict[str, list[int]] = {}
    for c in cands:
        target = sparsity * c.total_cost()
        if c.kind == "heads":
            idx, _ = legalize_heads(c, target)
        else:
            idx = _fill_channels([c], target).get(c.name, [])
        if idx:
            out[c.name] = sorted(idx)
    return out


def removed_cost(cands: Sequence[Candidate], removals: dict[str, list[int]]) -> int:
    """Parameters removed by ``removals`` (key/value heads included when all their query heads go).

    Args:
        cands: the candidates the removals refer to.
        removals: group name -> removed unit indices.
    """
    total = 0
    for c in cands:
        rem = set(removals.get(c.name, []))
        total += sum(c.unit_cost[u] for u in rem)
        if c.parent_of is not None:
            members, _ = _kv_layout(c)
            total += c.parent_cost * sum(1 for us in members.values() if set(us) <= rem)
    return total


def is_uniform_per_kv(c: Candidate, removed: Sequence[int]) -> bool:
    """Whether every kept key/value head keeps the same number of query heads.

    Args:
        c: a ``heads`` candidate.
        removed: removed query-head indices.
    """
    if c.parent_of is None:
        return True
    members, _ = _kv_layout(c)
    rem = set(removed)
    counts = {sum(1 for u in us if u not in rem) for us in members.values()} - {0}
    return len(counts) <= 1


def budget_tolerance(cands: Sequence[Candidate]) -> int:
    """Largest cost of one removal step (a channel chunk), the precision of :func:`select_global`."""
    worst = 0
    for c in cands:
        if c.kind == "channels" and c.unit_cost:
            worst = max(worst, max(c.unit_cost) * max(c.round_to, 1))
    return worst if worst else max((max(c.unit_cost) for c in cands if c.unit_cost), default=0)


__all__ = [
    "METRICS",
    "Candidate",
    "HeadConfig",
    "bias_delta",
    "budget_tolerance",
    "channel_metric",
    "head_configs",
    "is_uniform_per_kv",
    "legalize_heads",
    "max_removable",
    "removed_cost",
    "select_global",
    "select_uniform",
    "standardize",
    "unit_scores",
]
