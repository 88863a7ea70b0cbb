"""Attention heads as gated units during task fine-tuning (SHRP's router, Michel et al.'s masks).

Head-importance methods for encoders need to scale each head's output while the model
trains or back-propagates: SHRP multiplies every head by a routed gate, Michel et al.
differentiate the loss with respect to a per-head mask. Both act on the same site: the
input of the attention output projection (``attention.output.dense`` in BERT/RoBERTa,
``o_proj`` in ViT), whose channels the dependency graph assigns to heads (the ``consumer``
member of each ``heads`` group). Nothing is sliced here; the gates are removed again when
the context exits, and the engine removes the heads afterwards.

This is a training-time mechanism (gradients flow through it), not a calibration pass: the
shared :class:`prunecli.calibrate.Runner` observes under ``no_grad`` and is used for the
statistics-based baselines (FLAP).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from prunecli.errors import UnsupportedModelError
from prunecli.graph import DependencyGraph, Group


@dataclasses.dataclass
class HeadSite:
    """Where one layer's heads live.

    Attributes:
        group: the ``heads`` group.
        layer: the layer index.
        attention: path of the attention module (its input is the router's input).
        consumer: path of the output projection whose input channels are the heads.
        perm: ``[n * d]`` consumer channels in head order (head ``h`` owns ``perm[h*d:(h+1)*d]``).
        num_heads / head_dim: the widths.
    """

    group: Group
    layer: int
    attention: str
    consumer: str
    perm: Tensor
    num_heads: int
    head_dim: int


def head_sites(graph: DependencyGraph, groups: list[Group]) -> list[HeadSite]:
    """One :class:`HeadSite` per head group (grouped-query heads are refused: encoders have none).

    Raises:
        UnsupportedModelError: a head group with key/value sharing, uneven head widths or
            no linear consumer.
    """
    sites = []
    for g in groups:
        if g.kind != "heads":
            continue
        if g.parent is not None:
            raise UnsupportedModelError(
                f"{g.name}: grouped-query heads are not supported by encoder head routing"
            )
        cons = [m for m in g.consumers() if m.dim == 1 and len(m.shape) == 2]
        if not cons:
            raise UnsupportedModelError(f"{g.name} has no linear output projection to gate")
        m = cons[0]
        widths = {len(ix) for ix in m.index}
        if len(widths) != 1:
            raise UnsupportedModelError(f"{g.name}: heads of different widths")
        perm = torch.tensor([c for ix in m.index for c in ix], dtype=torch.long)
        sites.append(
            HeadSite(
                group=g,
                layer=int(g.layer) if g.layer is not None else len(sites),
                attention=g.module,
                consumer=m.module,
                perm=perm,
                num_heads=g.num_units,
                head_dim=widths.pop(),
            )
        )
    if not sites:
        raise UnsupportedModelError("no attention-head groups to route", hint="run `prunecli graph MODEL`")
    return sorted(sites, key=lambda s: s.layer)


def split_heads(x: Tensor, site: HeadSite) -> Tensor:
    """``[..., C]`` consumer input -> ``[..., n, d]`` per-head outputs."""
    return x[..., site.perm.to(x.device)].unflatten(-1, (site.num_heads, site.head_dim))


def merge_heads(xh: Tensor, x: Tensor, site: HeadSite) -> Tensor:
    """Inverse of :func:`split_heads`, written into a copy of ``x`` (channels of no head kept)."""
    out = x.clone()
    out[..., site.perm.to(x.device)] = xh.flatten(-2)
    return out


#: ``transform(site, per_head [B, T, n, d], hidden [B, T, H]) -> per_head``
HeadTransform = Callable[[HeadSite, Tensor, Tensor | None], Tensor]


@contextlib.contextmanager
def gated_heads(
    model: nn.Module, sites: list[HeadSite], transform: HeadTransform
) -> Iterator[dict[str, Tensor]]:
    """Rewrite every layer's head outputs with ``transform`` while the context is open.

    The attention module's input (the hidden states the heads read) is captured by a
    pre-hook and handed to ``transform`` together with the per-head outputs. The yielded dict
    holds the model call's ``attention_mask`` (``"mask"``), for losses that skip padding.
    """
    hidden: dict[int, Tensor] = {}
    state: dict[str, Tensor] = {}
    handles = []

    def capture_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        state.pop("mask", None)
        if isinstance(mask, Tensor):
            state["mask"] = mask

    def capture(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, Tensor):
                hidden[i] = h

        return hook

    def rewrite(i: int, site: HeadSite) -> Callable[..., tuple]:
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            xh = transform(site, split_heads(x, site), hidden.pop(i, None))
            return (merge_heads(xh, x, site), *args[1:])

        return hook

    try:
        handles.append(model.register_forward_pre_hook(capture_mask, with_kwargs=True))
        for i, site in enumerate(sites):
            handles.append(
                model.get_submodule(site.attention).register_forward_pre_hook(capture(i), with_kwargs=True)
            )
            handles.append(model.get_submodule(site.consumer).register_forward_pre_hook(rewrite(i, site)))
        yield state
    finally:
        for h in handles:
            h.remove()


def token_mask(state: dict[str, Tensor], shape: torch.Size) -> Tensor:
    """``[B, T]`` float mask of real tokens (all ones when the call had no attention mask)."""
    mask = state.get("mask")
    if mask is None or mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        return torch.ones(shape)
    return mask.float()


def uniform_head_removal(
    scores: dict[str, Tensor], sites: list[HeadSite], fraction: float
) -> dict[str, list[int]]:
    """Remove ``round(fraction * n)`` lowest-scoring heads of every layer (at least one head kept).

    Args:
        scores: group name -> per-head score (higher = keep).
        sites: the layers' head sites.
        fraction: share of each layer's heads to remove.
    """
    removals = {}
    for s in sites:
        k = min(s.num_heads - 1, int(round(fraction * s.num_heads)))
        if k <= 0:
            continue
        order = torch.argsort(scores[s.group.name].double(), stable=True)
        removals[s.group.name] = sorted(int(i) for i in order[:k])
    return removals


def lowest_layers(layer_scores: Tensor, drop: int) -> list[int]:
    """The ``drop`` layers with the lowest scores (at least one layer kept)."""
    drop = min(int(drop), layer_scores.numel() - 1)
    if drop <= 0:
        return []
    return sorted(int(i) for i in torch.argsort(layer_scores.double(), stable=True)[:drop])
