"""Wanda-sp: structured Wanda, the baseline of the FLAP paper.

Wanda (Sun et al., ICLR 2024, "A Simple and Effective Pruning Approach for Large Language
Models") scores a weight by ``|W_ij| * ||X_j||_2``, the weight magnitude times the L2 norm
of its input feature over the calibration tokens. Wanda-sp (An et al., AAAI 2024, FLAP,
Sec. 5) makes it structured: a unit's score is the sum of those scores over the columns
it owns in its group's output projection (``o_proj`` for a head, ``down_proj`` for an MLP
channel)::

    S(u) = sum_{j in cols(u)} sum_i |W_ij| * ||X_j||_2

Uniform per-layer sparsity, as in the FLAP paper's baseline.

Calibration default: 128 windows of 2048 tokens, Wanda's setting (128 C4 sequences of 2048
tokens). The FLAP code runs this baseline through its own loader arguments; that setting
could not be checked from this machine.

Propagation (``propagation``): the reference code (FLAP's ``prune_wanda_sp``) calibrates
layer by layer, feeding each layer the outputs of the already pruned layers before it, so
``||X_j||`` of layer ``l`` is measured on the model pruned up to ``l - 1``: that is
``propagation="pruned"``. It is offered, not the default: here it costs about ``L / 2`` forward
passes over the calibration windows for ``L`` layers (each layer is measured after the units
chosen before it are zeroed, which is exactly what removing them does, and the pass stops
after that layer), against one pass for ``propagation="dense"`` (the default: every norm from
the unpruned activations). The shared layer-sequential calibration runner will make the
reference behaviour as cheap as one pass.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from prunecli.config import DataMethodConfig, register_method
from prunecli.engine import Plan, select_uniform
from prunecli.engine.select import selectable_groups
from prunecli.errors import InputError, UnsupportedModelError
from prunecli.graph import DependencyGraph, Group
from prunecli.methods._calib import input_sq_norms, stop_module
from prunecli.methods.magnitude import unit_sums


@dataclasses.dataclass(frozen=True)
class WandaSpConfig(DataMethodConfig):
    """Structured Wanda (scores from one dense calibration pass; see the module docstring).

    Args:
        batch_size: windows per calibration forward pass.
        propagation: ``dense`` (one pass over the unpruned model, the default) or ``pruned``
            (the reference: layer ``l`` is measured on the model pruned up to layer ``l - 1``).
        nsamples: calibration windows for the CLI (128, Wanda's setting).
        seqlen: tokens per calibration window (2048, Wanda's setting).
    """

    method = "wanda-sp"
    needs_data = True
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8
    propagation: str = "dense"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.propagation not in ("dense", "pruned"):
            raise InputError(
                f"unknown wanda-sp propagation {self.propagation!r}", hint="choose dense or pruned"
            )


def wanda_sp_scores(weight: Tensor, sq_norm: Tensor, columns: list[list[int]]) -> Tensor:
    """Per-unit Wanda-sp score.

    Args:
        weight: consumer weight ``[out, in]``.
        sq_norm: summed squares of each input feature over calibration tokens ``[in]``.
        columns: for each unit, its input columns.
    """
    col = weight.detach().double().abs().sum(0) * sq_norm.double().sqrt()  # (in,)
    return unit_sums(col, columns)


def _consumer(group: Group):
    cons = [m for m in group.consumers() if m.dim == 1 and len(m.shape) == 2]
    if not cons:
        raise UnsupportedModelError(f"unsupported: wanda-sp needs a linear consumer for {group.name}")
    return cons[0]


@register_method(WandaSpConfig)
def prune_wanda_sp(
    model: nn.Module,
    graph: DependencyGraph,
    config: WandaSpConfig,
    calib: Tensor | None = None,
    progress=None,
) -> Plan:
    groups = selectable_groups(graph, config.ignore)
    if config.propagation == "pruned":
        return _prune_layer_by_layer(model, graph, config, groups, calib, progress)
    scores = _scores(model, groups, calib, config, progress=progress)
    return select_uniform(graph, scores, config.sparsity, round_to=config.round_to, ignore=config.ignore)


def _scores(
    model: nn.Module,
    groups: list[Group],
    calib: Tensor,
    config: WandaSpConfig,
    stop_after=None,
    progress=None,
) -> dict[str, Tensor]:
    consumers = {g.name: _consumer(g) for g in groups}
    norms = input_sq_norms(
        model,
        sorted({c.module for c in consumers.values()}),
        calib,
        batch_size=config.batch_size,
        stop_after=stop_after,
        progress=progress,
    )
    params = dict(model.named_parameters(remove_duplicate=False))
    scores = {}
    for g in groups:
        c = consumers[g.name]
        scores[g.name] = wanda_sp_scores(params[c.param], norms[c.module], c.index)
    return scores


def _prune_layer_by_layer(
    model: nn.Module,
    graph: DependencyGraph,
    config: WandaSpConfig,
    groups: list[Group],
    calib: Tensor,
    progress,
) -> Plan:
    """The reference's propagation: score layer ``l`` on the model with layers ``< l`` pruned.

    Units chosen for earlier layers are zeroed in place while later layers are measured
    (zeroing a unit's weights and removing it give the same outputs), and every weight is
    restored before returning, so the model is left as it came.
    """
    from prunecli.engine.apply import zero_units

    layers = sorted({g.layer for g in groups}, key=lambda x: (x is None, x if x is not None else 0))
    touched = {m.param for g in graph.groups.values() for m in g.members}
    params = dict(model.named_parameters(remove_duplicate=False))
    saved = {n: params[n].detach().clone() for n in touched if n in params}
    removals: dict[str, list[int]] = {}
    try:
        for layer in layers:
            here = [g for g in groups if g.layer == layer]
            modules = {_consumer(g).module for g in here}
            stop = stop_module(model, modules) if layer is not None else None
            scores = _scores(model, here, calib, config, stop_after=stop, progress=progress)
            chosen = select_uniform(
                graph, scores, config.sparsity, round_to=config.round_to, ignore=config.ignore
            )
            removals.update(chosen.removals)
            zero_units(model, graph, chosen.removals)
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)
    return Plan(
        removals,
        fingerprint=graph.fingerprint,
        meta={"selection": "uniform", "sparsity": config.sparsity, "propagation": "pruned"},
    )
