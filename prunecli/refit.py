"""Least-squares refit of the projections that lose input columns (``--refit``).

After a method has chosen which heads and channels go, every linear that *consumes* a pruned
group (``o_proj`` for heads, ``down_proj`` for MLP channels, whatever the dependency graph
finds) is refitted so that its output on the calibration tokens changes as little as
possible. With the inputs augmented by a constant 1 (so the bias is fitted too),
``X~ = [X, 1]``, ``H = X~^T X~`` over all input columns and ``W~ = [W, b]``, the kept columns
``K`` (always including the constant) solve::

    (H_KK + lambda * mean(diag(H_KK)) * I) W~_K^T = H_K: W~^T

which minimises ``|| X~_K W~_K^T - X~ W~^T ||^2`` up to the relative dampening ``lambda``
(0.01, SparseGPT's and Tyr-the-Pruner's ``percdamp``). Refitting the bias alone gives
``b + W_R mean(x_R)``: FLAP's bias compensation is the special case. Each module keeps the best
of three candidates by its calibration reconstruction error (computed exactly from ``H``):
the least-squares refit, the bias-only compensation and plain removal, so a refit never
increases the block's calibration error.

Statistics come from the shared calibration runner with pruned propagation: block ``l``
is measured on inputs that went through the already pruned and refitted blocks ``< l``
(within block ``l`` the inputs of its output projections come from the dense block, as in
FLAP's and the reference code's per-layer statistics).

The refitted weights are written into the model (the kept columns of each consumer) and the
bias changes become the plan's ``bias_updates``, which :func:`prunecli.engine.apply_plan`
applies; the plan records ``refit`` in its metadata. Replaying such a plan without its
calibration data reproduces the structure, not the refitted values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.calibrate import Observe, Runner
from prunecli.calibrate.runner import block_index, block_list
from prunecli.engine.apply import resolve_removals
from prunecli.engine.plan import Plan
from prunecli.errors import InputError, UnsupportedModelError
from prunecli.graph import DependencyGraph
from prunecli.progress import Progress

#: relative dampening of the Gram matrix's diagonal (SparseGPT / Tyr-the-Pruner ``percdamp``)
DAMP = 0.01


@dataclasses.dataclass
class RefitResult:
    """The refit of one module.

    Attributes:
        weight: ``[out, in]`` weight whose kept columns are refitted (removed ones unchanged).
        bias_delta: change of the output bias ``[out]``.
        choice: ``refit``, ``bias`` (bias compensation was better) or ``none`` (plain removal).
        error_removed / error_bias / error_refit: summed squared output error over the
            calibration tokens of plain removal, bias-only compensation and the refit.
    """

    weight: Tensor
    bias_delta: Tensor
    choice: str
    error_removed: float
    error_bias: float
    error_refit: float


def reconstruction_error(delta: Tensor, h: Tensor) -> float:
    """``sum over tokens of || x~ delta^T ||^2 = trace(delta H delta^T)`` for ``delta = W~' - W~``."""
    return float(((delta @ h) * delta).sum())


def refit_columns(
    weight: Tensor, bias: Tensor | None, gram: Tensor, removed: list[int], damp: float = DAMP
) -> RefitResult:
    """Least-squares refit of a linear layer that loses input columns ``removed``.

    Args:
        weight: ``[out, in]``.
        bias: ``[out]`` or ``None`` (treated as zero).
        gram: ``[in + 1, in + 1]`` Gram matrix of the inputs augmented with a constant 1.
        removed: input columns that go.
        damp: relative dampening of the kept block's diagonal.

    Returns:
        A :class:`RefitResult` holding the best of refit, bias-only and plain removal.

    Example:
        >>> w = torch.tensor([[1.0, 1.0]]); x = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
        >>> aug = torch.cat([x, torch.ones(2, 1)], 1)
        >>> r = refit_columns(w, None, aug.T @ aug, removed=[1], damp=0.0)
        >>> [round(v, 4) for v in r.weight[0].tolist()], r.choice   # column 0 takes over column 1
        ([2.0, 1.0], 'refit')
    """
    out, cin = weight.shape
    h = gram.to(torch.float64)
    if h.shape != (cin + 1, cin + 1):
        raise InputError(f"Gram matrix {tuple(h.shape)} does not fit a weight with {cin} inputs")
    w = weight.detach().to(device=h.device, dtype=torch.float64)
    b = torch.zeros(out, dtype=torch.float64, device=h.device) if bias is None else bias.detach().to(w)
    w_aug = torch.cat([w, b[:, None]], dim=1)  # (out, in + 1)
    gone = sorted(set(removed))
    keep = [i for i in range(cin + 1) if i not in set(gone)]  # the constant column is always kept

    plain = w_aug.clone()
    plain[:, gone] = 0.0
    err_removed = reconstruction_error(plain - w_aug, h)
    count = float(h[cin, cin])
    bias_only = plain.clone()
    if count > 0:  # b + W_R mean(x_R): FLAP's compensation
        bias_only[:, cin] += w_aug[:, gone] @ (h[cin, gone] / count)
    err_bias = reconstruction_error(bias_only - w_aug, h)

    k = torch.tensor(keep, dtype=torch.long, device=h.device)
    h_kk = h.index_select(0, k).index_select(1, k)
    diag = h_kk.diagonal()
    lam = damp * float(diag.mean()) if diag.numel() else 0.0
    rhs = h.index_select(0, k) @ w_aug.T  # (|K|, out)
    try:
        sol = torch.linalg.solve(h_kk + lam * torch.eye(len(keep), dtype=h.dtype, device=h.device), rhs)
        refit = torch.zeros_like(w_aug)
        refit[:, keep] = sol.T
        err_refit = reconstruction_error(refit - w_aug, h)
        if not torch.isfinite(sol).all():
            err_refit = float("inf")
    except RuntimeError:  # singular even with dampening (all-zero inputs): keep the other two
        refit, err_refit = plain, float("inf")

    best = min(
        (err_refit, "refit", refit),
        (err_bias, "bias", bias_only),
        (err_removed, "none", plain),
        key=lambda t: t[0],
    )
    chosen = best[2]
    new_w = w.clone()
    new_w[:, [i for i in keep if i < cin]] = chosen[:, [i for i in keep if i < cin]]
    return RefitResult(
        weight=new_w.to(dtype=weight.dtype, device=weight.device),
        bias_delta=(chosen[:, cin] - b).to(device="cpu"),
        choice=best[1],
        error_removed=err_removed,
        error_bias=err_bias,
        error_refit=err_refit,
    )


class OutputShifts:
    """Forward hooks adding a fixed vector to some modules' outputs, for one block at a time.

    During a pruned-propagation pass the runner reruns a block after ``after_block`` has
    written its pruned weights; a bias change of a module without a bias is added by a hook
    instead. ``clear()`` (at the next block, and on exit) removes the hooks, because the
    runner restores the block afterwards.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def add(self, module: nn.Module, delta: Tensor) -> None:
        d = delta.to(device=module.weight.device, dtype=module.weight.dtype)
        self.handles.append(module.register_forward_hook(lambda _m, _a, y, d=d: y + d))

    def clear(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def consumer_columns(
    model: nn.Module, graph: DependencyGraph, removals: dict[str, list[int]]
) -> dict[str, list[int]]:
    """Linear module -> input columns it loses under ``removals``."""
    out: dict[str, set[int]] = {}
    for name, units in removals.items():
        if not units:
            continue
        for m in graph.groups[name].consumers():
            mod = model.get_submodule(m.module)
            if not isinstance(mod, nn.Linear) or m.dim != 1 or not m.param.endswith(".weight"):
                continue
            cols = out.setdefault(m.module, set())
            for u in units:
                cols.update(m.index[u])
    return {k: sorted(v) for k, v in sorted(out.items())}


def refit_plan(
    model: nn.Module,
    graph: DependencyGraph,
    plan: Plan,
    calib: Tensor,
    *,
    runner: Runner | None = None,
    damp: float = DAMP,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Refit every consumer of the plan's removals in place; put the bias changes in the plan.

    Args:
        model: the model the plan was made for (unpruned; its consumer weights change).
        graph: its dependency graph.
        plan: the plan; its ``bias_updates`` for the refitted modules are replaced by the
            refit's (the refit includes the bias), and ``meta["refit"]`` summarises it.
        calib: calibration token windows ``[n, seqlen]``.
        runner: the calibration runner (layer-sequential; offloaded weights are refused).
        damp: relative dampening.
        progress: progress reporter.

    Returns:
        A summary: per module the choice and the three calibration errors.

    Raises:
        UnsupportedModelError: the model's weights are offloaded.
    """
    runner = runner or Runner()
    if runner.weights is not None:
        raise UnsupportedModelError(
            "--refit needs the model's weights in memory (the refitted projections are rewritten)",
            hint="drop --refit, or run where the model fits (without --sequential / --max-memory)",
        )
    removals = resolve_removals(graph, plan)
    targets = consumer_columns(model, graph, removals)
    if not targets:
        plan.meta["refit"] = {"modules": 0}
        return plan.meta["refit"]
    found = block_list(model, list(targets))
    if found is None:
        raise UnsupportedModelError("--refit needs the refitted projections inside the repeated blocks")
    path = found[0]
    requests = {m: Observe(m, "gram") for m in targets}
    results: dict[str, RefitResult] = {}
    shifts = OutputShifts()

    def after_block(index: int, _block: nn.Module, obs: dict[Observe, Any]) -> None:
        shifts.clear()
        for name, cols in targets.items():
            if block_index(path, name) != index:
                continue
            mod = model.get_submodule(name)
            res = refit_columns(mod.weight, mod.bias, obs[requests[name]].matrix, cols, damp)
            results[name] = res
            with torch.no_grad():  # removed columns zeroed: the block now computes the pruned output
                w = res.weight.clone()
                w[:, cols] = 0.0
                mod.weight.copy_(w)
                if mod.bias is not None:
                    mod.bias.add_(res.bias_delta.to(mod.bias))
            if mod.bias is None:
                shifts.add(mod, res.bias_delta)

    try:
        runner.observe(
            model,
            list(requests.values()),
            calib,
            propagation="pruned",
            after_block=after_block,
            progress=progress,
            label="refit",
        )
    finally:
        shifts.clear()
    # the runner restored every block: write the refitted kept columns for good
    with torch.no_grad():
        for name, res in results.items():
            model.get_submodule(name).weight.copy_(res.weight)
    for name, res in results.items():
        plan.bias_updates[name] = res.bias_delta.double().tolist()
    summary = {
        "modules": len(results),
        "damp": damp,
        "choices": {c: sum(r.choice == c for r in results.values()) for c in ("refit", "bias", "none")},
        "error_removed": sum(r.error_removed for r in results.values()),
        "error_bias": sum(r.error_bias for r in results.values()),
        "error_refit": sum(min(r.error_refit, r.error_bias, r.error_removed) for r in results.values()),
        "per_module": {
            n: {"choice": r.choice, "removed": r.error_removed, "bias": r.error_bias, "refit": r.error_refit}
            for n, r in results.items()
        },
    }
    plan.meta["refit"] = {k: v for k, v in summary.items() if k != "per_module"}
    return summary
