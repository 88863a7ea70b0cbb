"""Týr-the-Pruner: structural pruning by global sparsity-distribution search.

Li, Xu, Li, Liu, Yin, Li, Barsoum, "Týr-the-Pruner: Structural Pruning LLMs via Global
Sparsity Distribution Optimization", NeurIPS 2025 (arXiv:2503.09657); reference code
AMD-AGI/Tyr-the-Pruner (``prune_to_supernet.py``, ``search_sparsity_dist.py``).

1. **Supernet** (:mod:`.supernet`, :mod:`.local`): every layer's attention (its heads) and
   MLP (its channels) is pruned locally at ``levels`` widths around a centre, each candidate
   chosen by OBS-style group removal on the consumer's input Gram matrix
   ``ΔE(u) = ½ tr(B_S^T (H^-1_SS)^-1 B_S)`` and re-solved by least squares (with the bias),
   and stored on disk. Block ``l`` is measured on inputs that went through blocks ``< l`` at
   their centre widths (expectation error accumulation).
2. **Search** (:mod:`.search`): an elitist evolutionary search over one level per block, with
   budget-exact mutations (one block a level denser, another sparser by exactly the same
   number of parameters), staged selection on growing numbers of calibration tokens, and the
   sparse KL fitness ``mean_t KL(softmax(z_dense[top-k]) || softmax(z_cand[top-k]))``.
3. **Coarse-to-fine**: ``iterations`` rounds; each rebuilds the supernet around the best
   distribution so far with the level step halved.

The result is a plan (the chosen units of every block) whose consumer projections carry the
refitted weights and bias changes of the chosen candidates; the engine removes the units.
Where we differ from the code (one greedy OBS path per block instead of one per level; a
fixed set of windows for the last selection stage; head layouts legal for grouped-query
attention; CPU-sized defaults) is listed in ``docs/methods.md``.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prunecli.calibrate import Runner
from prunecli.config import register_method
from prunecli.engine.plan import Plan
from prunecli.engine.select import HeadLayout, _round_keep, selectable_groups
from prunecli.errors import InputError, UnsupportedModelError
from prunecli.graph import DependencyGraph
from prunecli.methods._budget import all_block_params
from prunecli.methods.tyr.config import TyrConfig
from prunecli.methods.tyr.search import (
    State,
    Variable,
    channel_ladder,
    cost,
    evolve,
    head_ladder,
    proxy_start,
    split_starts,
)
from prunecli.methods.tyr.supernet import Evaluator, PrefixCache, TokenSet, build, teacher_topk, write_level
from prunecli.progress import Progress, resolve

__all__ = ["TyrConfig", "prune_tyr", "variables_of", "initial_widths"]


def variables_of(model: nn.Module, graph: DependencyGraph, ignore: tuple[str, ...] = ()) -> list[Variable]:
    """One search variable per selectable head / channel group, with its consumer projections."""
    out: list[Variable] = []
    owner: dict[str, str] = {}
    for g in selectable_groups(graph, ignore):
        consumers = sorted(
            {
                m.module
                for m in g.consumers()
                if m.dim == 1
                and m.param.endswith(".weight")
                and isinstance(model.get_submodule(m.module), nn.Linear)
            }
        )
        if not consumers:
            raise UnsupportedModelError(
                f"tyr needs a linear projection consuming {g.name}", hint="use another method for this model"
            )
        for c in consumers:
            if c in owner:
                raise UnsupportedModelError(
                    f"tyr: {c} consumes both {owner[c]} and {g.name}",
                    hint="use another method for this model (its blocks share an output projection)",
                )
            owner[c] = g.name
        total = HeadLayout(graph, g).total() if g.kind == "heads" else g.num_units * g.unit_params(0)
        out.append(
            Variable(name=g.name, kind=g.kind, layer=int(g.layer or 0), consumers=consumers, total=total)
        )
    if not out:
        raise UnsupportedModelError("tyr found no prunable attention or MLP groups")
    return out


def _head_options(
    graph: DependencyGraph, var: Variable, round_to: int
) -> list[tuple[int, list[tuple[int, int]]]]:
    """Distinct kept costs of the legal head layouts, densest first, with their layouts."""
    layout = HeadLayout(graph, graph.groups[var.name])
    by_cost: dict[int, list[tuple[int, int]]] = {}
    for g, r in layout.options(round_to):
        by_cost.setdefault(layout.kept_cost(g, r), []).append((g, r))
    full = (layout.num_kv, layout.rep)
    by_cost.setdefault(layout.kept_cost(*full), [full])
    return sorted(by_cost.items(), key=lambda t: -t[0])


def initial_widths(
    graph: DependencyGraph, variables: list[Variable], sparsity: float, round_to: int
) -> list[int]:
    """Uniform starting point (kept cost per variable), repaired to the budget.

    Every block starts at ``1 - sparsity`` of its parameters (heads: the nearest legal
    layout); then MLP widths move one ``round_to`` step at a time, round-robin over the layers,
    while that brings the total closer to ``(1 - sparsity)`` of all block parameters (legal
    grouped-query head layouts are coarse: SmolLM2 at 20% keeps 9 of 12 head units).
    """
    centers: list[int] = []
    for v in variables:
        g = graph.groups[v.name]
        if v.kind == "channels":
            centers.append(
                _round_keep(g.num_units, (1 - sparsity) * g.num_units, round_to) * g.unit_params(0)
            )
        else:
            opts = _head_options(graph, v, round_to)
            target = (1 - sparsity) * v.total
            centers.append(min((abs(c - target), -c) for c, _ in opts)[1] * -1)
    budget = (1 - sparsity) * sum(v.total for v in variables)
    chans = [i for i, v in enumerate(variables) if v.kind == "channels"]
    moved = True
    while moved and chans:
        moved = False
        for i in chans:
            g = graph.groups[variables[i].name]
            unit = g.unit_params(0) * max(1, round_to)
            r = sum(centers) - budget
            new = centers[i] - unit if r > 0 else centers[i] + unit
            if abs(sum(centers) - centers[i] + new - budget) < abs(r) and unit <= new <= variables[i].total:
                centers[i] = new
                moved = True
    return centers


def _exchange_channels(graph: DependencyGraph, variables: list[Variable], unit: int) -> int | None:
    """Fewest MLP channels whose parameters equal a whole number of head-cost units (so that a
    budget-exact mutation can move parameters between attention and MLP), or None."""
    heads = [HeadLayout(graph, graph.groups[v.name]) for v in variables if v.kind == "heads"]
    if not heads:
        return None
    h = math.gcd(heads[0].q_cost, heads[0].kv_cost) if heads[0].kv_cost else heads[0].q_cost
    return (unit * h // math.gcd(unit, h)) // unit


def _ladders(
    graph: DependencyGraph, variables: list[Variable], centers: list[int], config: TyrConfig, it: int
) -> None:
    """This iteration's ladders around ``centers``.

    MLP steps are ``step / 2**it`` of the width, rounded to a multiple of the smallest channel
    count that costs a whole number of head units when that is within 1.5x of the plain step
    (SmolLM2: 128 channels = 3 query heads), so that mutations can trade attention for MLP
    parameters exactly; otherwise the plain step (trades stay within a kind).
    """
    frac = config.step / (2**it)
    for v, center in zip(variables, centers):
        g = graph.groups[v.name]
        if v.kind == "channels":
            unit = g.unit_params(0)
            rt = max(1, config.round_to)
            plain = g.num_units * frac
            ex = _exchange_channels(graph, variables, unit)
            if ex is not None and ex <= 1.5 * plain:
                ex = ex * rt // math.gcd(ex, rt)
                step = max(1, int(round(plain / ex))) * ex
            else:
                step = max(rt, int(round(plain / rt)) * rt)
            widths = channel_ladder(g.num_units, unit, center // unit, step, config.levels, rt)
            v.widths, v.costs = widths, [k * unit for k in widths]
            v.center = widths.index(center // unit)
        else:
            opts = _head_options(graph, v, config.round_to)
            step = max(1, int(round(len(opts) * frac)))
            idx = head_ladder([(c, 0, 0) for c, _ in opts], center, step, config.levels)
            v.widths = [opts[i][1] for i in idx]
            v.costs = [opts[i][0] for i in idx]
            v.center = v.costs.index(min(v.costs, key=lambda c: abs(c - center)))


@register_method(TyrConfig)
def prune_tyr(
    model: nn.Module,
    graph: DependencyGraph,
    config: TyrConfig,
    calib: Tensor | None = None,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Plan:
    """Týr plan: supernet + evolutionary search; the chosen candidates' refitted weights are
    written into the consumer projections and their bias changes into ``plan.bias_updates``."""
    runner = runner or Runner()
    if runner.weights is not None:
        raise UnsupportedModelError(
            "tyr needs the model's weights in memory (the refitted projections are rewritten)",
            hint="drop --sequential / --max-memory, or use flap / wanda-sp for offloaded models",
        )
    assert calib is not None
    variables = variables_of(model, graph, config.ignore)
    # --sparsity is a share of every attention + MLP block; locked or ignored groups (Gemma-3's
    # single key/value head, --ignore) keep theirs, so the searchable blocks give up more
    blocks = all_block_params(model, graph)
    searchable = sum(v.total for v in variables)
    share = float(config.sparsity) * blocks / searchable
    if share >= 1.0:
        raise InputError(
            f"tyr cannot remove {config.sparsity:g} of the attention + MLP parameters: only "
            f"{searchable / blocks:.1%} of them are in groups it may prune",
            hint="lower --sparsity or --ignore fewer modules",
        )
    centers = initial_widths(graph, variables, share, config.round_to)
    rng = random.Random(config.seed)
    order = list(range(calib.shape[0]))
    random.Random(config.seed + 1).shuffle(order)
    seqlen = calib.shape[1]
    stage_windows = [max(1, min(len(order), math.ceil(t / seqlen))) for t in config.stage_tokens]
    seconds = {"supernet": 0.0, "teacher": 0.0, "search": 0.0}
    history: list[dict[str, Any]] = []
    own_dir = config.supernet_dir is None
    root = Path(tempfile.mkdtemp(prefix="prunecli-tyr-")) if own_dir else Path(str(config.supernet_dir))
    root.mkdir(parents=True, exist_ok=True)
    evaluator: Evaluator | None = None
    best: State = ()
    try:
        t0 = time.perf_counter()
        search_model = _search_model(model, config.search_dtype)
        teacher = teacher_topk(runner, search_model, calib, config.kl_topk)
        seconds["teacher"] = time.perf_counter() - t0
        fixed_idx = sorted(order[: stage_windows[-1]])
        for it in range(config.iterations):
            _ladders(graph, variables, centers, config, it)
            directory = root / f"iteration{it + 1}"
            directory.mkdir(parents=True, exist_ok=True)
            t1 = time.perf_counter()
            build(
                model,
                graph,
                variables,
                calib,
                runner,
                directory,
                obs_rounds=config.obs_rounds,
                damp=float(config.damp),
                progress=progress,
            )
            seconds["supernet"] += time.perf_counter() - t1
            t2 = time.perf_counter()
            evaluator = Evaluator(search_model, graph, variables, directory, runner)
            ev = evaluator
            fixed = ev.tokens(calib[fixed_idx], [teacher[i] for i in fixed_idx])
            best, log = _search(
                ev, variables, calib, teacher, fixed, order, stage_windows, config, rng, progress, it
            )
            seconds["search"] += time.perf_counter() - t2
            history.append(
                {
                    "iteration": it + 1,
                    "step": config.step / (2**it),
                    "start_fitness": log.start_fitness,
                    "start_candidates": log.starts,
                    "best_fitness": log.best_fitness,
                    "evaluations": log.evaluations,
                    "tokens": log.tokens,
                }
            )
            centers = [v.costs[s] for v, s in zip(variables, best)]
            if it < config.iterations - 1:
                ev.restore()
        assert evaluator is not None
        final: dict[str, Any] = {}
        plan = None
        if config.final_refit:
            t3 = time.perf_counter()
            plan, final = _final_refit(
                model, graph, variables, best, evaluator, fixed, calib, runner, progress
            )
            seconds["final_refit"] = time.perf_counter() - t3
        if plan is None:
            plan = _final_plan(model, graph, variables, best, evaluator)
    finally:
        if evaluator is not None:
            evaluator.hooks.remove()
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    per_layer: dict[int, dict[str, float]] = {}
    for v, s in zip(variables, best):
        per_layer.setdefault(v.layer, {})["attention" if v.kind == "heads" else "mlp"] = (
            1.0 - v.costs[s] / v.total
        )
    plan.meta["tyr"] = {
        "per_layer_sparsity": {str(k): per_layer[k] for k in sorted(per_layer)},
        "kept_params": cost(variables, best),
        "block_params": searchable,
        "searchable_share": searchable / blocks,
        "search": history,
        "seconds": seconds,
        "supernet_dir": None if own_dir else str(root),
        "final": final,
    }
    if final.get("chosen") == "refit":
        plan.meta["refit"] = {"by": "tyr final refit", **plan.meta["refit"]}
    else:
        plan.meta["refit"] = {
            "by": "tyr",
            "modules": sum(len(v.consumers) for v in variables),
            "damp": config.damp,
        }
    plan.meta["selection"] = "tyr"
    plan.meta["sparsity"] = config.sparsity
    return plan


def _search_model(model: nn.Module, dtype: str) -> nn.Module:
    """The model the search evaluates: ``model`` itself, or a copy in ``dtype``."""
    if dtype == "model":
        return model
    target = getattr(torch, dtype)
    if all(p.dtype == target for p in model.parameters() if p.is_floating_point()):
        return model
    import copy

    return copy.deepcopy(model).to(target).eval()


def _search(
    ev: Evaluator,
    variables: list[Variable],
    calib: Tensor,
    teacher: list[tuple[Tensor, Tensor]],
    fixed: TokenSet,
    order: list[int],
    stage_windows: list[int],
    config: TyrConfig,
    rng: random.Random,
    progress: Progress | None,
    it: int,
) -> tuple[State, Any]:
    """One iteration's evolutionary search; fitness evaluations reuse the parent's block
    inputs up to the first block a child changes (prefix cache per token set)."""
    last = len(config.survivors) - 1
    caches: dict[State, PrefixCache] = {}  # last stage (fixed windows): per evaluated state
    stage_sets: dict[tuple[int, int], tuple[TokenSet, PrefixCache]] = {}

    def fitness(states: list[State], stage: int, gen: int, parent: State) -> list[float]:
        if stage == last:
            base = caches.get(parent)
            vals, fresh = [], {}
            for s in states:
                f, c = ev.fitness(fixed, s, base, keep=True)
                vals.append(f)
                if c is not None:
                    fresh[s] = c
            caches.clear()
            if base is not None:
                caches[parent] = base
            caches.update(fresh)
            return vals
        key = (stage, gen)
        if key not in stage_sets:
            pick = sorted(rng.sample(order, stage_windows[stage]))
            ts = ev.tokens(calib[pick], [teacher[i] for i in pick])
            _, pc = ev.fitness(ts, parent, None, keep=True)
            assert pc is not None
            stage_sets.clear()
            stage_sets[key] = (ts, pc)
        ts, pc = stage_sets[key]
        return [ev.fitness(ts, s, pc)[0] for s in states]

    centre = tuple(v.center for v in variables)
    proxy = proxy_start(variables, centre, ev.errors(), max_moves=4 * len(variables))
    starts = {"centre": ev.fitness(fixed, centre)[0]}
    candidates = {"centre": centre, "proxy": proxy, **split_starts(variables, centre)}
    for label, state in candidates.items():
        if label != "centre" and state != centre:
            starts[label] = ev.fitness(fixed, state)[0]
    start = candidates[min(starts, key=lambda k: (starts[k], k != "centre"))]
    with resolve(progress).task(f"tyr search {it + 1}/{config.iterations}", total=config.generations) as task:
        best, log = evolve(
            variables,
            start,
            fitness,
            generations=config.generations,
            offspring=config.offspring,
            survivors=config.survivors,
            stage_tokens=config.stage_tokens,
            max_flips=config.max_flips,
            rng=rng,
            on_generation=lambda _gen, _fit: task.advance(),
        )
    log.starts = starts
    return best, log


def _final_plan(
    model: nn.Module, graph: DependencyGraph, variables: list[Variable], state: State, ev: Evaluator
) -> Plan:
    removals: dict[str, list[int]] = {}
    bias: dict[str, list[float]] = {}
    ev.restore()
    for i, (v, level) in enumerate(zip(variables, state)):
        removed, per = ev.load(i, level)
        removals[v.name] = removed
        write_level(model, graph, v, removed, per)
        for c, (_, b) in per.items():
            bias[c] = b.double().tolist()
    return Plan(removals, bias_updates=bias, fingerprint=graph.fingerprint)


def _final_refit(
    model: nn.Module,
    graph: DependencyGraph,
    variables: list[Variable],
    state: State,
    ev: Evaluator,
    fixed: Any,
    calib: Tensor,
    runner: Runner,
    progress: Progress | None,
) -> tuple[Plan | None, dict[str, Any]]:
    """Re-solve ``state``'s kept columns on its own activations; the plan when that lowers
    the fitness on ``fixed`` (``model``'s consumers then hold the refit), else ``None``
    (``model`` dense again, for :func:`_final_plan`)."""
    from prunecli.engine.apply import resolve_removals
    from prunecli.refit import consumer_columns, refit_plan

    f_super = ev.fitness(fixed, state)[0]
    plan = Plan({v.name: ev.load(i, lv)[0] for i, (v, lv) in enumerate(zip(variables, state))})
    plan.fingerprint = graph.fingerprint
    ev.reset()  # the search model dense (it may be ``model`` itself)
    consumers = sorted({c for v in variables for c in v.consumers})
    dense = {c: model.get_submodule(c).weight.detach().clone() for c in consumers}
    refit_plan(model, graph, plan, calib, runner=runner, progress=progress)
    weights = {}
    for c, gone in consumer_columns(model, graph, resolve_removals(graph, plan)).items():
        w = model.get_submodule(c).weight.detach().clone()
        w[:, gone] = 0.0
        weights[c] = w
    ev.put(weights, {c: torch.tensor(b) for c, b in plan.bias_updates.items()})
    f_refit = ev.fitness(fixed, None)[0]
    chosen = "refit" if f_refit < f_super else "supernet"
    out = {"fitness_supernet": f_super, "fitness_refit": f_refit, "chosen": chosen}
    if chosen == "refit":
        return plan, out
    with torch.no_grad():
        for c, w in dense.items():
            model.get_submodule(c).weight.copy_(w)
    return None, out


def sparsity_series(meta: dict[str, Any]) -> dict[str, list[float]]:
    """Per-layer sparsity series (``attention``, ``mlp``) from a Týr plan's ``meta["tyr"]``."""
    per = meta.get("per_layer_sparsity", {})
    layers = sorted(per, key=int)
    kinds = [k for k in ("attention", "mlp") if any(k in per[x] for x in layers)]
    return {k: [float(per[x].get(k, 0.0)) for x in layers] for k in kinds}


def write_plot(path: str | Path, meta: dict[str, Any]) -> Path:
    """PNG bar plot of the per-layer sparsity Týr found (written atomically)."""
    from prunecli.plot import save_png

    target = meta.get("block_params", 0)
    kept = meta.get("kept_params", 0)
    overall = 1 - kept / target if target else float("nan")
    return save_png(
        path, sparsity_series(meta), f"Týr per-layer sparsity (blocks overall {overall:.1%})", "sparsity"
    )
