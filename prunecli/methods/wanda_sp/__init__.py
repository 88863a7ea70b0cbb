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

Departure from the reference code (FLAP's ``prune_wanda_sp``): the reference calibrates
layer by layer, feeding each layer the outputs of the already pruned layers before it, so
``||X_j||`` is measured on the pruned model. prunecli measures every layer in one pass over the
dense model (all norms from the unpruned activations). A shared layer-sequential calibration
runner is planned; until then the dense pass is the only mode.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from prunecli.config import DataMethodConfig, register_method
from prunecli.engine import Plan, select_uniform
from prunecli.engine.select import selectable_groups
from prunecli.errors import UnsupportedModelError
from prunecli.graph import DependencyGraph, Group
from prunecli.methods._calib import input_sq_norms
from prunecli.methods.magnitude import unit_sums


@dataclasses.dataclass(frozen=True)
class WandaSpConfig(DataMethodConfig):
    """Structured Wanda (scores from one dense calibration pass; see the module docstring).

    Args:
        batch_size: windows per calibration forward pass.
        nsamples: calibration windows for the CLI (128, Wanda's setting).
        seqlen: tokens per calibration window (2048, Wanda's setting).
    """

    method = "wanda-sp"
    needs_data = True
    nsamples: int = 128
    seqlen: int = 2048
    batch_size: int = 8


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
    consumers = {g.name: _consumer(g) for g in groups}
    norms = input_sq_norms(
        model,
        sorted({c.module for c in consumers.values()}),
        calib,
        batch_size=config.batch_size,
        progress=progress,
    )
    params = dict(model.named_parameters(remove_duplicate=False))
    scores = {}
    for g in groups:
        c = consumers[g.name]
        scores[g.name] = wanda_sp_scores(params[c.param], norms[c.module], c.index)
    return select_uniform(graph, scores, config.sparsity, round_to=config.round_to, ignore=config.ignore)
