"""Shared calibration helpers: run the model over token windows with input hooks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from prunecli.progress import Progress, resolve


class _StopForward(Exception):
    """Raised after the last observed block to skip the rest of the model."""


@torch.no_grad()
def input_sq_norms(
    model: nn.Module,
    modules: Iterable[str],
    calib: Tensor,
    *,
    batch_size: int = 8,
    stop_after: nn.Module | None = None,
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """Sum over all calibration tokens of ``x_j**2`` for each input channel ``j`` of each module.

    Args:
        model: the model (run in eval mode, no cache).
        modules: qualified names of linear modules whose inputs are observed.
        calib: token windows ``[n, seqlen]``.
        batch_size: windows per forward pass.
        stop_after: a module after which the forward pass is cut short (the last block holding
            an observed module), so later layers and the head are never computed.

    Returns:
        module name -> float64 tensor ``[in_features]`` of summed squares.
    """
    named = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # (tokens, C)
            s = (x * x).sum(0)
            sums[name] = sums[name] + s if name in sums else s

        return fn

    def stop(_mod: nn.Module, _args: object, _out: object) -> None:
        raise _StopForward

    for name in modules:
        handles.append(named[name].register_forward_pre_hook(hook(name)))
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    was_training = model.training
    model.eval()
    try:
        with resolve(progress).task("calibration", total=calib.shape[0]) as task:
            for start in range(0, calib.shape[0], batch_size):
                batch = calib[start : start + batch_size].to(_device(model))
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
                task.advance(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
