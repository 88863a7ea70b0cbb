"""LoRAPrune on a model: fine-tune LoRA adapters, score units from their gradients, mask, plan.

During training a unit is "pruned" by zeroing its input columns in the group's consumer
(``o_proj`` for a head, ``down_proj`` for an MLP channel) with a forward pre-hook. That is
exactly what removing the unit does, so the model that is fine-tuned is the pruned model.
At the end the adapters are merged (``merge_and_unload``) and the plan that removes the
masked units is returned; the engine removes them physically.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from prunecli.calibrate import Runner, distributed
from prunecli.config import register_method
from prunecli.engine.plan import Plan
from prunecli.engine.select import select_uniform, selectable_groups
from prunecli.errors import InputError, SparsityError, UnsupportedModelError
from prunecli.graph.groups import Group, Member
from prunecli.methods._budget import all_block_params, group_cost
from prunecli.methods.loraprune.config import LorapruneConfig, protected_layers
from prunecli.methods.loraprune.scoring import (
    combine,
    cubic_sparsity,
    lora_weight_importance,
    moving_average,
    unit_sums,
)
from prunecli.progress import Progress, resolve
from prunecli.recover import attach_lora, batch_order, check_windows, detach_lora, lm_loss, lora_parameters

MASKED = -1e30
"""Score given to masked units so that every later selection removes them first."""


def _weight_members(group: Group) -> list[Member]:
    return [m for m in group.members if m.role in ("producer", "consumer") and m.param.endswith("weight")]


def _linear_members(model: nn.Module, group: Group) -> list[Member]:
    out = []
    for m in _weight_members(group):
        mod = model.get_submodule(m.module)
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, nn.Linear) and len(m.shape) == 2:
            out.append(m)
    return out


def adapter_targets(model: nn.Module, graph: Any, groups: list[Group]) -> list[str]:
    """Linear modules that hold a weight of ``groups`` (or of their key/value parent groups).

    Args:
        model: the model (before adapters are attached).
        graph: its dependency graph.
        groups: the groups to score.
    """
    names: list[str] = []
    for g in groups:
        related = [g] + ([graph.groups[g.parent]] if g.parent else [])
        for r in related:
            names.extend(m.module for m in _linear_members(model, r))
    return list(dict.fromkeys(names))


def _lora_importance(model: nn.Module, module: str) -> torch.Tensor | None:
    """Per-weight LoRAPrune importance of ``module``'s weight, or ``None`` without adapter/grad."""
    mod = model.get_submodule(module)
    lora_a = getattr(mod, "lora_A", None)
    if lora_a is None or "default" not in lora_a:
        return None
    a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
    if a.grad is None or b.grad is None:
        return None
    return lora_weight_importance(mod.base_layer.weight, a, b, a.grad, b.grad, float(mod.scaling["default"]))


def group_importance(
    model: nn.Module,
    graph: Any,
    groups: list[Group],
    *,
    normalize: bool = True,
    weight_importance: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Unit importance of each group from per-weight importances (one step, not smoothed).

    A head group also collects the importance of its key/value heads (``k_proj``/``v_proj``
    rows), each query head receiving its key/value head's share, as every head owns its own
    k/v in the multi-head case the paper treats.

    Args:
        model: the model with LoRA adapters whose gradients are populated (after backward).
        graph: the dependency graph (of the model without adapters; names are the same).
        groups: groups to score.
        normalize: L2-normalise each weight's unit vector before summing (the code's default).
        weight_importance: module name -> per-weight importance to use instead of the LoRA
            estimate (e.g. the true ``|W * dL/dW|``, for comparison).

    Returns:
        group name -> float32 ``[num_units]``.
    """
    # Only the per-index sums are kept (one full importance matrix is alive at a time).
    cache: dict[tuple[str, int], torch.Tensor | None] = {}

    def per_index(m: Member) -> torch.Tensor | None:
        key = (m.module, m.dim)
        if key not in cache:
            if weight_importance is not None:
                imp = weight_importance.get(m.module)
            else:
                imp = _lora_importance(model, m.module)
            if imp is None:
                cache[key] = None
            else:
                other = [d for d in range(imp.dim()) if d != m.dim]
                cache[key] = imp.float().sum(dim=other) if other else imp.float()
        return cache[key]

    out: dict[str, torch.Tensor] = {}
    for g in groups:
        vectors = []
        for m in _linear_members(model, g):
            v = per_index(m)
            if v is not None:
                vectors.append(unit_sums(v, 0, m.index))
        if g.parent and g.parent_of is not None:
            parent = graph.groups[g.parent]
            child_of = torch.tensor(g.parent_of, dtype=torch.long)
            for m in _linear_members(model, parent):
                v = per_index(m)
                if v is not None:
                    vectors.append(unit_sums(v, 0, m.index).index_select(0, child_of))
        if not vectors:
            raise UnsupportedModelError(f"group {g.name} has no linear weight with a LoRA adapter")
        out[g.name] = combine(vectors, normalize=normalize)
    return out


class UnitMasks:
    """Zero the input columns of removed units in each group's consumer linears (forward pre-hooks).

    Args:
        model: the model (with or without adapters; module names are the same).
        groups: the groups that may be masked.
    """

    def __init__(self, model: nn.Module, groups: list[Group]) -> None:
        self.model = model
        self.groups = {g.name: g for g in groups}
        self.removed: dict[str, list[int]] = {g.name: [] for g in groups}
        self.masks: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        self._consumers: dict[str, list[Member]] = {}
        for g in groups:
            cons = [m for m in g.consumers() if len(m.shape) == 2 and m.dim == 1]
            if not cons:
                raise UnsupportedModelError(
                    f"group {g.name} has no linear consumer to mask",
                    hint="LoRAPrune masks units at their consumer",
                )
            self._consumers[g.name] = cons
            for m in cons:
                if m.module not in self.masks:
                    mod = model.get_submodule(m.module)
                    w = getattr(mod, "base_layer", mod).weight
                    self.masks[m.module] = torch.ones(m.shape[1], dtype=w.dtype, device=w.device)
                    self.handles.append(mod.register_forward_pre_hook(self._hook(m.module)))

    def _hook(self, name: str):
        def fn(mod: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (x * self.masks[name].to(x.dtype), *args[1:])

        return fn

    def set(self, removals: dict[str, list[int]]) -> None:
        """Mask exactly ``removals`` (group name -> removed units); other units are live."""
        for name in self.masks:
            self.masks[name].fill_(1)
        for gname, units in removals.items():
            if gname not in self.groups:
                continue
            self.removed[gname] = sorted(units)
            for m in self._consumers[gname]:
                cols = [i for u in units for i in m.index[u]]
                if cols:
                    self.masks[m.module][cols] = 0
        for gname in self.groups:
            if gname not in removals:
                self.removed[gname] = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _windows(calib: torch.Tensor, seqlen: int | None) -> torch.Tensor:
    if seqlen is None or seqlen >= calib.shape[1]:
        return calib
    n_chunks = calib.shape[1] // seqlen
    return calib[:, : n_chunks * seqlen].reshape(-1, seqlen)


def _select(
    graph: Any,
    groups: list[Group],
    scores: dict[str, torch.Tensor],
    masks: UnitMasks,
    ratio: float,
    config: LorapruneConfig,
    scale: float = 1.0,
) -> dict[str, list[int]]:
    """Legal uniform removal at block sparsity ``ratio``; units masked earlier stay removed.

    Every pruned group loses ``ratio * scale`` of its parameters, ``scale`` being all block
    parameters over those of the pruned groups (so the total removed is ``ratio`` of all blocks).
    """
    forced = {}
    for g in groups:
        s = scores[g.name].clone()
        if masks.removed[g.name]:
            s[masks.removed[g.name]] = MASKED
        forced[g.name] = s
    plan = select_uniform(graph, forced, ratio * scale, round_to=config.round_to, ignore=config.ignore)
    return {k: v for k, v in plan.removals.items() if k in forced}


def pruned_groups(graph: Any, config: LorapruneConfig) -> tuple[list[Group], list[Group], list[int]]:
    """The groups that get adapters, the subset that is pruned, and the protected layers.

    Args:
        graph: the dependency graph.
        config: LoRAPrune options (``kinds``, ``ignore``, ``protect_layers``).

    Returns:
        ``(adapted, pruned, protected)``: groups of the chosen kinds, those outside the
        protected layers, and the protected layer indices.
    """
    adapted = [g for g in selectable_groups(graph, config.ignore) if g.kind in config.kinds]
    layers = [g.layer for g in graph.groups.values() if g.layer is not None]
    protected = protected_layers(config, max(layers) + 1) if layers else []
    pruned = [g for g in adapted if g.layer not in protected]
    return adapted, pruned, protected


def run_loraprune(
    model: nn.Module,
    graph: Any,
    config: LorapruneConfig,
    calib: torch.Tensor,
    progress: Progress | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """Fine-tune with LoRA while pruning; merge the adapters; return the plan and a log.

    Args:
        model: the model; its weights change (the fine-tuned adapters are merged in place).
        graph: its dependency graph.
        config: LoRAPrune options.
        calib: LongTensor ``[n, seqlen]`` of training token windows.
        progress: optional progress reporter.

    Returns:
        ``(plan, log)``; ``log`` has ``losses``, ``prune_steps`` (step, sparsity, removed
        units), ``seconds``, ``trainable_params`` and the final ``scores`` per group.
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    windows = check_windows(calib, int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None)
    windows = _windows(windows, config.seqlen)
    adapted, groups, protected = pruned_groups(graph, config)
    if not groups:
        raise UnsupportedModelError(
            "LoRAPrune found no prunable head or MLP channel group"
            + (f" outside the protected layers {protected}" if protected else ""),
            hint="check --ignore patterns and the 'kinds' and 'protect_layers' options",
        )
    # --sparsity is a share of every layer's attention + MLP: the pruned groups lose more
    scale = all_block_params(model, graph) / sum(group_cost(graph, g) for g in groups)
    if config.sparsity * scale >= 1.0:
        raise SparsityError(
            f"sparsity {config.sparsity} of all blocks would empty the pruned groups "
            f"({config.sparsity * scale:.2f} of each; protected layers {protected}, kinds {list(config.kinds)})",
            hint="lower --sparsity, prune both kinds, or protect fewer layers (--set protect_layers=...)",
        )
    targets = adapter_targets(model, graph, adapted)
    torch.manual_seed(config.seed)
    peft_model, flags = attach_lora(
        model, targets, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout
    )
    base = peft_model.get_base_model()
    masks = UnitMasks(base, groups)
    params = lora_parameters(peft_model)
    device = next(model.parameters()).device
    ema = {g.name: torch.zeros(g.num_units) for g in groups}
    losses: list[float] = []
    prune_log: list[dict[str, Any]] = []
    current = 0.0
    start = time.perf_counter()
    try:
        opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / config.steps))
        peft_model.train()
        order = batch_order(windows.shape[0], config.steps, config.batch_size, config.seed)
        task_cm = resolve(progress).task("loraprune: fine-tuning and pruning", total=config.steps)
        with torch.enable_grad(), task_cm as task:  # enable_grad: callers may run methods under no_grad
            for step, idx in enumerate(order):
                loss = lm_loss(peft_model, windows[idx].to(device))
                if not torch.isfinite(loss):
                    raise InputError(
                        f"LoRAPrune loss became {float(loss)} at step {step}", hint="lower the learning rate"
                    )
                loss.backward()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                new = group_importance(base, graph, groups, normalize=config.normalize)
                for name, v in new.items():
                    ema[name] = moving_average(ema[name], v, config.beta)
                ratio = cubic_sparsity(
                    step, config.steps, config.warmup, config.cooldown, 0.0, config.sparsity
                )
                final = ratio >= config.sparsity and current < config.sparsity
                if ratio > current and (step % config.prune_every == 0 or final):
                    removals = _select(graph, groups, ema, masks, ratio, config, scale)
                    masks.set(removals)
                    current = ratio
                    prune_log.append(
                        {
                            "step": step,
                            "sparsity": round(ratio, 6),
                            "removed": sum(map(len, removals.values())),
                        }
                    )
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                task.advance()
        if current < config.sparsity:  # too few steps to reach the cooldown: prune to the target now
            removals = _select(graph, groups, ema, masks, config.sparsity, config, scale)
            masks.set(removals)
            prune_log.append(
                {
                    "step": config.steps,
                    "sparsity": config.sparsity,
                    "removed": sum(map(len, removals.values())),
                }
            )
    finally:
        masks.remove()
        detach_lora(peft_model, flags)
        model.eval()
    removals = {k: v for k, v in masks.removed.items() if v}
    plan = Plan(
        removals,
        fingerprint=str(getattr(graph, "fingerprint", "")),
        meta={
            "method": "loraprune",
            "config": config.to_dict(),
            "prune_steps": prune_log,
            "loss_first": losses[0] if losses else math.nan,
            "loss_last": losses[-1] if losses else math.nan,
            "protected_layers": protected,
        },
    )
    log = {
        "losses": losses,
        "prune_steps": prune_log,
        "seconds": round(time.perf_counter() - start, 3),
        "trainable_params": sum(p.numel() for p in params),
        "scores": ema,
    }
    return plan, log


@register_method(LorapruneConfig)
def prune_loraprune(
    model: nn.Module,
    graph: Any,
    config: LorapruneConfig,
    calib: torch.Tensor,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Plan:
    """LoRAPrune plan for ``model`` (fine-tunes and merges LoRA adapters into it first).

    Args:
        model: the model; its weights are fine-tuned in place (adapters merged).
        graph: its dependency graph.
        config: LoRAPrune options.
        calib: LongTensor ``[n, seqlen]`` of training token windows.
        progress: optional progress reporter.
        runner: the calibration runner; LoRAPrune fine-tunes the whole model with gradients,
            so it needs the model in memory in one process (``mode="whole"``, no offloaded
            weights, no data parallelism).

    Example:
        >>> plan = prune_loraprune(model, build_graph(model), LorapruneConfig(sparsity=0.2), calib)  # doctest: +SKIP
    """
    if runner is not None and (runner.mode != "whole" or runner.weights is not None or distributed.active()):
        raise UnsupportedModelError(
            "LoRAPrune fine-tunes the whole model with gradients: it cannot run layer-sequentially, "
            "with offloaded weights or over several processes",
            hint="drop --sequential, --max-memory and --nproc for loraprune (or use flap, cfsp, wanda-sp)",
        )
    plan, _ = run_loraprune(model, graph, config, calib, progress=progress)
    return plan


prune_loraprune.needs_grad = True  # type: ignore[attr-defined]  # prunecli.api: do not wrap in no_grad
