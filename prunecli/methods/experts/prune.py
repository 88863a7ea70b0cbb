"""Expert pruning through the shared runner and engine: observe, score, select."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from prunecli.calibrate import Observe, Runner
from prunecli.config import register_method
from prunecli.engine import Plan
from prunecli.engine.apply import expert_routing
from prunecli.engine.select import select_experts
from prunecli.errors import UnsupportedModelError
from prunecli.graph import DependencyGraph
from prunecli.graph.experts import MoeSite
from prunecli.methods.experts.config import (
    EasyEpConfig,
    ExpertConfig,
    FrequencyConfig,
    RandomExpertsConfig,
    ReapConfig,
)
from prunecli.methods.experts.scoring import easy_ep_scores, frequency_scores, mixed_domain, reap_scores
from prunecli.progress import Progress


def moe_sites(graph: DependencyGraph, ignore: tuple[str, ...] = ()) -> list[MoeSite]:
    """The MoE blocks whose experts may be pruned (not matched by ``ignore``)."""
    sites = [
        s
        for s in graph.moe
        if graph.groups[s.group].prunable
        and not any(fnmatch.fnmatch(s.block, p) or fnmatch.fnmatch(s.group, p) for p in ignore)
    ]
    if not sites:
        raise UnsupportedModelError(
            "unsupported: no Mixture-of-Experts blocks with prunable routed experts found",
            hint="expert pruning needs a MoE model (fused experts + router); run `prunecli graph MODEL`",
        )
    return sites


def expert_scores(
    model: nn.Module,
    graph: DependencyGraph,
    config: ExpertConfig,
    calib: Tensor | Sequence[Tensor] | None,
    *,
    runner: Runner | None = None,
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """``experts`` group name -> score per expert (higher = keep) for ``config.method``.

    Args:
        model: the MoE model.
        graph: its dependency graph.
        config: an expert-method config.
        calib: demonstration windows ``[n, seqlen]``, or one such tensor per domain
            (mixed-domain selection: per-layer normalised scores are added).
        runner: the calibration runner (whole-model, layer-sequential, offloaded).
        progress: progress reporter.
    """
    sites = moe_sites(graph, config.ignore)
    if isinstance(config, RandomExpertsConfig):
        gen = torch.Generator().manual_seed(config.seed)
        return {s.group: torch.rand(s.num_experts, generator=gen, dtype=torch.float64) for s in sites}
    runner = runner or Runner()
    domains = [calib] if isinstance(calib, Tensor) else list(calib or [])
    per_domain: list[dict[str, Tensor]] = []
    for d, windows in enumerate(domains):
        requests = {s.group: Observe(s.block, "experts", "moe") for s in sites}
        label = f"{config.method}: demonstrations" + (
            f" (domain {d + 1}/{len(domains)})" if len(domains) > 1 else ""
        )
        obs = runner.observe(model, list(requests.values()), windows, progress=progress, label=label)
        scores: dict[str, Tensor] = {}
        for group, req in requests.items():
            st = obs[req]
            if isinstance(config, EasyEpConfig):
                scores[group] = easy_ep_scores(st.weighted.cpu())
            elif isinstance(config, ReapConfig):
                scores[group] = reap_scores(st.importance.cpu(), st.routed.cpu())
            else:
                scores[group] = frequency_scores(st.routed.cpu())
        per_domain.append(scores)
    return per_domain[0] if len(per_domain) == 1 else mixed_domain(per_domain)


def prune_experts(
    model: nn.Module,
    graph: DependencyGraph,
    config: ExpertConfig,
    calib: Tensor | Sequence[Tensor] | None = None,
    progress: Progress | None = None,
    runner: Runner | None = None,
) -> Plan:
    """Plan removing each MoE layer's lowest-scored routed experts (see :mod:`.scoring`)."""
    scores = expert_scores(model, graph, config, calib, runner=runner, progress=progress)
    routing = expert_routing(model, graph)
    keep = {g: config.keep_count(routing[g].num_experts) for g in scores}
    removals = select_experts(scores, keep, routing, selection=config.selection)
    meta = {"selection": f"experts-{config.selection}", "keep_experts": config.keep_experts}
    meta["expert_scores"] = {g: [float(v) for v in s] for g, s in scores.items()}
    return Plan(removals, fingerprint=graph.fingerprint, meta=meta)


for _cls in (EasyEpConfig, ReapConfig, FrequencyConfig, RandomExpertsConfig):
    register_method(_cls)(prune_experts)
