"""SHRP: Specialized Head Routing and Pruning for encoders (Su et al., 2025, arXiv:2512.20635).

The paper treats every attention head as an expert ("Expert Attention"), followed by a light
shared expander feed-forward network that refines the heads' outputs; one Top-1
usage-driven mechanism routes tokens to heads during a short task fine-tuning and becomes a
deterministic pruning decision at deployment: heads the router never selects are removed.
In its extreme setting whole layers go (11 of 12 on BERT-base: 84% of the accuracy at 4.2x
throughput). Only the abstract is public here; the details below are prunecli's choices.

Routing (per layer ``l`` with ``n`` heads, token hidden state ``x`` entering the attention):

    p(x)   = softmax(R_l x + b_l)                 (router, zero-initialised: p = 1/n)
    c'_h   = n * p_h(x) * (c_h + c_h @ M_l)        (head output c_h, shared expander M_l, d x d)

so the routed model starts as the dense model exactly (uniform gates 1, ``M_l = 0``).

Fine-tuning in two stages (``steps`` optimiser steps on the task's cross-entropy):

1. load balancing (the first ``balance_share`` of the steps):
   ``+ balance_weight * n * sum_h f_h P_h`` (Switch Transformer; ``f_h`` the share of tokens
   whose top-1 head is ``h``, ``P_h`` the mean router probability), so every head is tried;
2. specialisation (the rest): ``+ specialise_weight * sum_{h in S} P_h``, where ``S`` holds the
   ``round(sparsity * n)`` heads with the lowest running top-1 usage (an exponential
   average over the steps): the router moves the tokens' mass off the heads that will be pruned,
   and the model learns to do without them while they still exist.

Deployment: each head's score is its top-1 usage count in the specialisation stage (ties broken
by the mean router probability, :func:`scoring.keep_scores`); the ``round(sparsity * n)``
lowest of every layer are removed by the engine (heads never selected go first;
``plan.meta["never_selected"]`` counts how many of the removed heads the router never chose).
The router is dropped: each kept head's gate becomes the constant ``n * mean p_h`` over the
specialisation stage, and gate and expander fold into the output projection
(``W_h <- g_h W_h (I + M_l)^T``), so the deployed model is a plain encoder with fewer heads.

Choices where the paper is silent: the expander is *linear* (a ``d x d`` map shared by a
layer's heads) so that it folds into the output projection and the checkpoint keeps the stock
architecture; the router reads the layer's input hidden state per token; heads are pruned
in the same number in every layer (``sparsity`` is the share of heads removed, not of
parameters); the specialisation loss targets the prune set instead of a generic entropy.

Layer dropping (``drop_layers > 0``): each layer also gets a skip router
``s(x) = sigmoid(r_l . x + c_l)`` (``c_l = -3``: the dense model almost exactly) and outputs
``(1 - s) * layer(x) + s * x``. Stage 1 pulls the mean skip rate to ``drop_layers / L``; stage 2
pushes the ``drop_layers`` layers with the highest running skip usage (tokens with ``s > 0.5``)
to skip and the others to run. Those layers are then removed whole
(:func:`prunecli.engine.layers.drop_layers`, recorded as ``plan.meta["drop_layers"]``); the
skip routers of kept layers are dropped (their mean skip rate is small, not folded).

Example:
    >>> from prunecli import prune                                            # doctest: +SKIP
    >>> from prunecli.tasks import as_classifier, load_task, finetune        # doctest: +SKIP
    >>> task = load_task("train.jsonl", tok, text_field="review", label_field="score")  # doctest: +SKIP
    >>> model = as_classifier(encoder, task.label_names)                     # doctest: +SKIP
    >>> prune(model, ShrpConfig(sparsity=0.5, steps=100), task=task)        # doctest: +SKIP
    >>> finetune(model, task, steps=100)                                     # recovery, same budget
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunecli.config import TaskMethodConfig, register_method
from prunecli.engine import Plan
from prunecli.engine.select import selectable_groups
from prunecli.errors import DataError, InputError, UnsupportedModelError
from prunecli.graph import DependencyGraph
from prunecli.methods._heads import HeadSite, gated_heads, head_sites, token_mask, uniform_head_removal
from prunecli.methods.shrp import scoring
from prunecli.progress import Progress, resolve


@dataclasses.dataclass(frozen=True)
class ShrpConfig(TaskMethodConfig):
    """SHRP head routing and pruning for encoders (needs a labelled task, not calibration text).

    Args:
        sparsity: share of each layer's attention heads to remove (``0`` with ``drop_layers``:
            drop layers only).
        drop_layers / batch_size / max_length: see :class:`~prunecli.config.TaskMethodConfig`
            (``batch_size``: examples per step).
        steps: routing fine-tuning steps (balance + specialisation).
        balance_share: share of ``steps`` spent on load balancing.
        balance_weight / specialise_weight: weights of the two auxiliary losses.
        lr: learning rate of the model's weights; router_lr: of the routers and expanders.
    """

    method: ClassVar[str] = "shrp"

    steps: int = 100
    balance_share: float = 0.5
    balance_weight: float = 0.01
    specialise_weight: float = 1.0
    lr: float = 1e-4
    router_lr: float = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise InputError(f"steps must be a positive integer, got {self.steps!r}")
        if not 0.0 <= self.balance_share <= 1.0:
            raise InputError(f"balance_share must be in [0, 1], got {self.balance_share}")
        for name in ("balance_weight", "specialise_weight", "lr", "router_lr"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")


class _Routers(nn.Module):
    """The trainable routing state: per-layer head routers, expanders and (optionally) skip routers."""

    def __init__(self, sites: list[HeadSite], hidden: int, skip: bool) -> None:
        super().__init__()
        self.head = nn.ModuleList(nn.Linear(hidden, s.num_heads) for s in sites)
        self.expander = nn.ParameterList(nn.Parameter(torch.zeros(s.head_dim, s.head_dim)) for s in sites)
        self.skip = nn.ModuleList(nn.Linear(hidden, 1) for _ in sites) if skip else None
        for lin in self.head:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.skip is not None:
            for lin in self.skip:
                nn.init.zeros_(lin.weight)
                nn.init.constant_(lin.bias, -3.0)


def _hidden_size(model: nn.Module) -> int:
    h = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(h, int):
        raise UnsupportedModelError("SHRP needs a config with hidden_size")
    return h


@register_method(ShrpConfig)
def prune_shrp(
    model: nn.Module,
    graph: DependencyGraph,
    config: ShrpConfig,
    calib: Tensor | None = None,
    progress: Progress | None = None,
    task: Any = None,
) -> Plan:
    """Route, specialise, fold and return the plan of never-selected heads (and dropped layers).

    The model's weights are fine-tuned in place (the routing stage is part of the method).

    Raises:
        DataError: no task given.
        UnsupportedModelError: the model is not a sequence classifier or has no head groups.
    """
    from prunecli.checkpoint.modeling_prunecli import find_decoder_layers
    from prunecli.tasks import finetune, is_classifier

    if task is None:
        raise DataError("shrp fine-tunes on a labelled task", hint="pass --task FILE --label-field NAME")
    if not is_classifier(model):
        raise UnsupportedModelError(
            f"shrp needs a sequence classifier, got {type(model).__name__}",
            hint="wrap the encoder with prunecli.tasks.as_classifier(model, labels)",
        )
    sites = head_sites(graph, [g for g in selectable_groups(graph, config.ignore) if g.kind == "heads"])
    n_layers = len(sites)
    routers = _Routers(sites, _hidden_size(model), skip=config.drop_layers > 0)
    ref = next(model.parameters())
    routers.to(device=ref.device, dtype=ref.dtype)
    n_prune = {s.group.name: min(s.num_heads - 1, int(round(config.sparsity * s.num_heads))) for s in sites}
    balance_steps = int(round(config.balance_share * config.steps))

    usage_ema = [torch.zeros(s.num_heads, dtype=torch.float64) for s in sites]
    usage = [torch.zeros(s.num_heads, dtype=torch.float64) for s in sites]
    prob_sum = [torch.zeros(s.num_heads, dtype=torch.float64) for s in sites]
    skip_ema = torch.zeros(n_layers, dtype=torch.float64)
    tokens = [0.0]
    probs: dict[int, tuple[Tensor, Tensor]] = {}
    skips: dict[int, Tensor] = {}
    index = {id(s): i for i, s in enumerate(sites)}

    def transform(site: HeadSite, xh: Tensor, hidden: Tensor | None) -> Tensor:
        i = index[id(site)]
        xh = xh + xh @ routers.expander[i]
        if hidden is None:
            return xh
        logits = routers.head[i](hidden)  # (B, T, n)
        p = logits.softmax(dim=-1)
        probs[i] = (p.flatten(0, -2), token_mask(state, hidden.shape[:2]).flatten().to(p.device))
        return xh * scoring.router_gates(logits).unsqueeze(-1)

    def aux(step: int) -> Tensor | None:
        loss = None
        specialising = step >= balance_steps
        for i, s in enumerate(sites):
            if i not in probs:
                continue
            p, mask = probs.pop(i)
            u = scoring.top1_usage(p.detach(), mask).double().cpu()
            usage_ema[i].mul_(0.9).add_(0.1 * u / max(1.0, float(mask.sum())))
            if specialising:
                usage[i] += u
                prob_sum[i] += (p.detach() * mask[:, None]).sum(dim=0).double().cpu()
                if i == 0:
                    tokens[0] += float(mask.sum())
            if n_prune[s.group.name] > 0:
                if not specialising:
                    term = config.balance_weight * scoring.balance_loss(p, mask)
                else:
                    target = torch.zeros(s.num_heads, dtype=torch.bool)
                    target[torch.argsort(usage_ema[i], stable=True)[: n_prune[s.group.name]]] = True
                    term = config.specialise_weight * scoring.specialisation_loss(
                        p, target.to(p.device), mask
                    )
                loss = term if loss is None else loss + term
        if routers.skip is not None and skips:
            mean_skip = torch.stack([skips.pop(i) for i in range(n_layers)])
            skip_ema.mul_(0.9).add_(0.1 * mean_skip.detach().double().cpu())
            dropped = None
            if specialising:
                dropped = torch.zeros(n_layers, dtype=torch.bool)
                dropped[torch.argsort(skip_ema, descending=True, stable=True)[: config.drop_layers]] = True
            balance, spec = scoring.layer_skip_losses(
                mean_skip,
                config.drop_layers / n_layers,
                dropped.to(mean_skip.device) if dropped is not None else None,
            )
            term = (
                config.balance_weight * 100 * balance if not specialising else config.specialise_weight * spec
            )
            loss = term if loss is None else loss + term
        return loss

    handles = []
    if routers.skip is not None:
        _, layer_list = find_decoder_layers(model, model.config.num_hidden_layers)
        if len(layer_list) != n_layers:
            raise UnsupportedModelError("layer dropping needs one head group per layer")

        def skip_hook(i: int):
            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
                x = args[0] if args else kwargs.get("hidden_states")
                y = out[0] if isinstance(out, tuple) else out
                s = torch.sigmoid(routers.skip[i](x))  # (B, T, 1)
                mask = token_mask(state, x.shape[:2]).to(s.device)
                skips[i] = (s.squeeze(-1) * mask).sum() / mask.sum().clamp_min(1.0)
                mixed = (1 - s) * y + s * x
                return (mixed, *out[1:]) if isinstance(out, tuple) else mixed

            return hook

        handles = [
            layer_list[i].register_forward_hook(skip_hook(i), with_kwargs=True) for i in range(n_layers)
        ]

    with resolve(progress).task("SHRP routing fine-tuning", total=config.steps) as bar:
        try:
            with gated_heads(model, sites, transform) as state:
                finetune(
                    model,
                    task,
                    steps=config.steps,
                    lr=config.lr,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    extra_params=list(routers.parameters()),
                    extra_lr=config.router_lr,
                    aux_loss=aux,
                    step_hook=lambda _s: bar.advance(),
                )
        finally:
            for h in handles:
                h.remove()

    # deployment: scores from specialisation-stage usage, constant gates, folded expanders
    scores: dict[str, Tensor] = {}
    never = 0
    with torch.no_grad():
        for i, s in enumerate(sites):
            mean_p = (
                prob_sum[i] / max(tokens[0], 1.0)
                if tokens[0] > 0
                else torch.full((s.num_heads,), 1 / s.num_heads)
            )
            u = usage[i] if tokens[0] > 0 else usage_ema[i]
            scores[s.group.name] = scoring.keep_scores(u, mean_p)
            consumer = model.get_submodule(s.consumer)
            gate = (mean_p * s.num_heads).to(consumer.weight.dtype)
            consumer.weight.copy_(
                scoring.fold_head_output(
                    consumer.weight, routers.expander[i].detach(), gate, s.head_dim, s.perm
                )
            )
    removals = uniform_head_removal(scores, sites, config.sparsity) if config.sparsity > 0 else {}
    for i, s in enumerate(sites):
        never += sum(1 for h in removals.get(s.group.name, []) if usage[i][h] == 0)
    meta: dict[str, Any] = {
        "selection": "shrp-usage",
        "never_selected": never,
        "usage": {s.group.name: [int(x) for x in usage[i].tolist()] for i, s in enumerate(sites)},
    }
    if config.drop_layers > 0:
        order = torch.argsort(skip_ema, descending=True, stable=True)
        meta["drop_layers"] = sorted(int(i) for i in order[: min(config.drop_layers, n_layers - 1)])
        meta["skip_rate"] = [round(float(x), 4) for x in skip_ema.tolist()]
        dropped = set(meta["drop_layers"])
        removals = {k: v for k, v in removals.items() if graph.groups[k].layer not in dropped}
    if not math.isfinite(sum(float(v.sum()) for v in scores.values())):
        raise DataError(
            "SHRP routing diverged (non-finite router probabilities)", hint="lower --set lr / router_lr"
        )
    return Plan(removals, fingerprint=graph.fingerprint, meta=meta)


prune_shrp.needs_grad = True  # type: ignore[attr-defined]  # prunecli.api: do not wrap in no_grad
