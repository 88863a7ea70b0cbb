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
``propagation="pruned"``, run by the shared layer-sequential runner (each block is measured,
its units are chosen and zeroed, which is exactly what removing them does, and the block is
rerun to feed the next one: about two dense passes in all). ``propagation="dense"`` (the
default) takes every norm from the unpruned activations in one pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from prunecli.calibrate import Observe, Runner, block_list
from prunecli.calibrate.runner import block_index
from prunecli.config import DataMethodConfig, register_method
from prunecli.engine import Plan, select_uniform
from prunecli.engine.apply import zero_units
from prunecli.engine.select import selectable_groups
from prunecli.errors import InputError, UnsupportedModelError
from prunecli.graph import DependencyGraph, Group
from prunecli.methods.magnitude import unit_sums
from prunecli.progress import Progress


@dataclasses.dataclass(frozen=True)
class WandaSpConfig(DataMethodConfig):
    """Structured Wanda (scores from one dense calibration pass; see the module docstring).

    Args:
        propagation: ``dense`` (one pass over the unpruned model, the default) or ``pruned``
            (the reference: layer ``l`` is measured on the model pruned up to layer ``l - 1``).
        nsamples: calibration windows for the CLI (128, Wanda's setting).
        seqlen: tokens per calibration window (2048, Wanda's setting).
    """

    method = "wanda-sp"
    needs_data = True
    nsamples: int = 128
    seqlen: int = 2048
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
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Plan:
    """Wanda-sp plan: uniform per-layer removal of the lowest ``sum |W| * ||X||`` units.

    Args:
        model: the model (its weights are left as they came).
        graph: its dependency graph.
        config: wanda-sp options.
        calib: calibration token windows ``[n, seqlen]``.
        progress: progress reporter.
        runner: the calibration runner.

    Example:
        >>> plan = prune_wanda_sp(model, build_graph(model), WandaSpConfig(sparsity=0.5), calib)  # doctest: +SKIP
    """
    runner = runner or Runner()
    groups = selectable_groups(graph, config.ignore)
    consumers = {g.name: _consumer(g) for g in groups}
    requests = {g.name: Observe(consumers[g.name].module, "sumsq") for g in groups}

    def scores(names: list[str], obs: dict[Observe, Any]) -> dict[str, Tensor]:
        out = {}
        for name in names:
            c = consumers[name]
            out[name] = wanda_sp_scores(runner.tensor(model, c.param), obs[requests[name]].sum_sq, c.index)
        return out

    if config.propagation == "dense":
        obs = runner.observe(
            model, list(requests.values()), calib, progress=progress, label="wanda-sp calibration"
        )
        return select_uniform(
            graph,
            scores(list(requests), obs),
            config.sparsity,
            round_to=config.round_to,
            ignore=config.ignore,
        )

    # the reference: layer l is measured on the model with the units chosen for layers < l removed
    removals: dict[str, list[int]] = {}
    found = block_list(model, [r.module for r in requests.values()])
    path = found[0] if found else ""

    def after_block(index: int, _block: nn.Module, obs: dict[Observe, Any]) -> None:
        here = [g.name for g in groups if block_index(path, requests[g.name].module) == index]
        if not here:
            return
        chosen = select_uniform(
            graph, scores(here, obs), config.sparsity, round_to=config.round_to, ignore=config.ignore
        )
        removals.update(chosen.removals)
        zero_units(model, graph, chosen.removals)  # the runner restores the block afterwards

    runner.observe(
        model,
        list(requests.values()),
        calib,
        propagation="pruned",
        after_block=after_block,
        progress=progress,
        label="wanda-sp calibration",
    )
    return Plan(
        removals,
        fingerprint=graph.fingerprint,
        meta={"selection": "uniform", "sparsity": config.sparsity, "propagation": "pruned"},
    )
