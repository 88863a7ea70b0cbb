"""Shared calibration helpers: run the model over token windows with input hooks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from prunecli.progress import Progress, resolve


class StopForward(Exception):
    """Raised by a hook after the last observed block, to skip the rest of the model."""


def stop_module(model: nn.Module, modules: set[str]) -> nn.Module | None:
    """The entry of the repeated-block ModuleList after which no observed module runs.

    The decoder layers are found as the ModuleList whose entries hold every observed
    module, so no attribute name (``model.layers``, ``encoder.layer``) is assumed.
    """
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or not len(mod):
            continue
        where = []
        for m in modules:
            rest = m[len(name) + 1 :] if name and m.startswith(name + ".") else (m if not name else "")
            head = rest.split(".", 1)[0]
            if not head.isdigit() or int(head) >= len(mod):
                break
            where.append(int(head))
        else:
            return mod[max(where)]
    return None


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
        raise StopForward

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
                except StopForward:
                    pass
                task.advance(batch.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return sums


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
