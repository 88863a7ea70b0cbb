"""One forward pass over the calibration windows with hooks that record what CFSP needs.

For every repeated block (a child of an ``nn.ModuleList``, e.g. ``model.layers.3``) the hook
accumulates the angular distance between the block's input and output hidden states; for every
consumer linear (e.g. ``down_proj``) a pre-hook accumulates the sum of squares of each input
channel. Nothing is kept per token, so memory is that of inference.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from prunecli.errors import DataError, UnsupportedModelError
from prunecli.methods.cfsp.scoring import angular_distance
from prunecli.progress import Progress, resolve


def block_of(model: nn.Module, module_name: str) -> str:
    """Qualified name of the repeated block holding ``module_name`` (a child of a ModuleList).

    Args:
        model: the model.
        module_name: qualified name of a module inside a block, e.g. ``model.layers.3.mlp``.
    """
    parts = module_name.split(".")
    for cut in range(len(parts), 0, -1):
        parent = ".".join(parts[: cut - 1])
        try:
            parent_mod = model.get_submodule(parent) if parent else model
        except AttributeError:
            continue
        if isinstance(parent_mod, nn.ModuleList):
            return ".".join(parts[:cut])
    raise UnsupportedModelError(
        f"module {module_name!r} is not inside a repeated block (no nn.ModuleList parent)",
        hint="CFSP needs transformer layers held in an nn.ModuleList",
    )


class _Stats:
    def __init__(self) -> None:
        self.dist_sum: dict[str, float] = {}
        self.dist_count: dict[str, int] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}


def _first_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if hasattr(x, "last_hidden_state"):
        return x.last_hidden_state
    raise UnsupportedModelError(f"cannot find the hidden states in a block output of type {type(x).__name__}")


@torch.no_grad()
def collect(
    model: nn.Module,
    calib: torch.Tensor,
    blocks: Iterable[str],
    consumers: Iterable[str],
    *,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Run ``calib`` through ``model`` once and return the statistics CFSP uses.

    Args:
        model: a causal LM taking ``input_ids``.
        calib: LongTensor ``[n, seqlen]`` of token windows.
        blocks: qualified names of the blocks whose mean angular distance is wanted.
        consumers: qualified names of linear modules whose input channel norms are wanted.
        batch_size: windows per forward pass.
        progress: optional progress reporter.

    Returns:
        ``(distance, act_norm)``: mean angular distance per block, and per consumer the
        float64 ``[in_features]`` root-mean-square of each input channel over all tokens.
    """
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise DataError("calibration data must be a non-empty LongTensor of shape [n, seqlen]")
    stats = _Stats()
    handles = []

    def block_hook(name: str):
        def fn(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x_in = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x_in, torch.Tensor):
                raise UnsupportedModelError(f"block {name} received no hidden-state tensor")
            d = angular_distance(x_in, _first_tensor(out))
            stats.dist_sum[name] = stats.dist_sum.get(name, 0.0) + float(d.double().sum())
            stats.dist_count[name] = stats.dist_count.get(name, 0) + d.numel()

        return fn

    def consumer_hook(name: str):
        def fn(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x2 = x.reshape(-1, x.shape[-1]).to(torch.float64).square().sum(dim=0).cpu()
            stats.sq_sum[name] = stats.sq_sum[name] + x2 if name in stats.sq_sum else x2
            stats.tokens[name] = stats.tokens.get(name, 0) + x.reshape(-1, x.shape[-1]).shape[0]

        return fn

    try:
        for b in dict.fromkeys(blocks):
            handles.append(model.get_submodule(b).register_forward_hook(block_hook(b), with_kwargs=True))
        for c in dict.fromkeys(consumers):
            handles.append(model.get_submodule(c).register_forward_pre_hook(consumer_hook(c)))
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            n = calib.shape[0]
            with resolve(progress).task("cfsp: calibration pass", total=n) as task:
                for i in range(0, n, batch_size):
                    ids = calib[i : i + batch_size].to(device)
                    model(input_ids=ids, use_cache=False)
                    task.advance(ids.shape[0])
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    distance = {b: stats.dist_sum[b] / max(stats.dist_count[b], 1) for b in stats.dist_sum}
    act_norm = {c: (stats.sq_sum[c] / max(stats.tokens[c], 1)).sqrt() for c in stats.sq_sum}
    missing = [b for b in dict.fromkeys(blocks) if b not in distance] + [
        c for c in dict.fromkeys(consumers) if c not in act_norm
    ]
    if missing:
        raise UnsupportedModelError(
            f"the calibration pass never reached {', '.join(missing[:3])}",
            hint="the model's forward does not run these modules on input_ids",
        )
    return distance, act_norm
