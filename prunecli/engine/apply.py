"""Apply a :class:`~prunecli.engine.plan.Plan`: remove units, keep the model consistent.

This is the only place where weights are sliced. After slicing it updates every module
attribute that records a width (``in_features``, ``num_heads``, ...) and the model config,
so the pruned model runs in memory and saves a config that describes it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from prunecli.calibrate.offload import has_meta_tensors
from prunecli.engine.layers import check_config
from prunecli.engine.plan import Plan
from prunecli.errors import PlanError, PrunedModelError, UnsupportedModelError
from prunecli.graph import DependencyGraph, Group, build_graph, model_fingerprint
from prunecli.graph.build import probe_forward


@dataclasses.dataclass(frozen=True)
class AttentionWidths:
    """Which attributes of an attention module class hold which width.

    Attributes:
        heads: attributes equal to the number of query heads.
        kv_heads: attributes equal to the number of key/value heads.
        kv_groups: attributes equal to query heads per key/value head.
        width: attributes equal to ``heads * head_dim``.
        head_dim: attributes equal to the head width (never changed, only checked).
        reads_config: the module reads head counts from ``self.config`` at run time
            (Phi-3's fused qkv split): it gets its own config copy with the new counts.
    """

    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    kv_groups: tuple[str, ...] = ()
    width: tuple[str, ...] = ()
    head_dim: tuple[str, ...] = ()
    reads_config: bool = False


@dataclasses.dataclass(frozen=True)
class ExpertWidths:
    """Where a Mixture-of-Experts architecture records its routed-expert counts.

    Attributes:
        num_experts: attributes (of the experts module and the router) equal to the number
            of routed experts; set where the module has them.
        top_k: attributes (of the router and the MoE block) equal to experts per token.
        cfg_experts: config field holding the number of routed experts.
        cfg_top_k: config field holding experts per token.
        groups / topk_groups: router attributes of group-limited routing (DeepSeek's
            ``n_group`` expert groups, ``topk_group`` of them chosen per token).
    """

    cfg_experts: str
    num_experts: tuple[str, ...] = ("num_experts",)
    top_k: tuple[str, ...] = ("top_k",)
    cfg_top_k: str = "num_experts_per_tok"
    groups: str | None = None
    topk_groups: str | None = None


@dataclasses.dataclass(frozen=True)
class ArchWidths:
    """Where one architecture records its widths (module attributes and config fields).

    Attributes:
        attention: attention module class name -> its :class:`AttentionWidths`.
        mlp: class name of the module owning an MLP channel group -> attributes equal to
            the MLP width.
        cfg_heads / cfg_kv_heads / cfg_mlp: config fields holding query heads, key/value
            heads and MLP width (``None``: the architecture has no such field).
        experts: routed-expert counts of a Mixture-of-Experts architecture (``None``: none).
    """

    attention: dict[str, AttentionWidths]
    mlp: dict[str, tuple[str, ...]]
    cfg_heads: str | None = None
    cfg_kv_heads: str | None = None
    cfg_mlp: str | None = None
    experts: ExpertWidths | None = None


def _llama_like(prefix: str) -> ArchWidths:
    return ArchWidths(
        attention={
            f"{prefix}Attention": AttentionWidths(kv_groups=("num_key_value_groups",), head_dim=("head_dim",))
        },
        mlp={f"{prefix}MLP": ("intermediate_size",)},
        cfg_heads="num_attention_heads",
        cfg_kv_heads="num_key_value_heads",
        cfg_mlp="intermediate_size",
    )


def _bert_like(prefix: str) -> ArchWidths:
    return ArchWidths(
        attention={
            f"{prefix}SelfAttention": AttentionWidths(
                heads=("num_attention_heads",), width=("all_head_size",), head_dim=("attention_head_size",)
            )
        },
        mlp={f"{prefix}Layer": ()},
        cfg_heads="num_attention_heads",
        cfg_mlp="intermediate_size",
    )


#: model_type -> where its widths live. An architecture missing here is refused by
#: :func:`check_supported` (pruning it would leave stale counts in modules or config).
ARCH_WIDTHS: dict[str, ArchWidths] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "qwen3": _llama_like("Qwen3"),
    "gemma": _llama_like("Gemma"),
    "gemma2": _llama_like("Gemma2"),
    "gemma3_text": _llama_like("Gemma3"),
    "phi3": ArchWidths(
        attention={
            "Phi3Attention": AttentionWidths(
                kv_heads=("num_key_value_heads",),
                kv_groups=("num_key_value_groups",),
                head_dim=("head_dim",),
                reads_config=True,
            )
        },
        mlp={"Phi3MLP": ()},
        cfg_heads="num_attention_heads",
        cfg_kv_heads="num_key_value_heads",
        cfg_mlp="intermediate_size",
    ),
    "gpt2": ArchWidths(
        attention={
            "GPT2Attention": AttentionWidths(
                heads=("num_heads",), width=("split_size",), head_dim=("head_dim",)
            )
        },
        mlp={"GPT2MLP": ()},
        cfg_heads="n_head",
        cfg_mlp="n_inner",
    ),
    "opt": ArchWidths(
        attention={"OPTAttention": AttentionWidths(heads=("num_heads",), head_dim=("head_dim",))},
        mlp={"OPTDecoderLayer": ()},
        cfg_heads="num_attention_heads",
        cfg_mlp="ffn_dim",
    ),
    "bert": _bert_like("Bert"),
    "roberta": _bert_like("Roberta"),
    "vit": ArchWidths(
        attention={"ViTAttention": AttentionWidths(heads=("num_attention_heads",), head_dim=("head_dim",))},
        mlp={"ViTMLP": ()},
        cfg_heads="num_attention_heads",
        cfg_mlp="intermediate_size",
    ),
    # Mixture-of-Experts decoders: only their routed experts are pruned (attention and the
    # shared / dense MLPs are not in the table, so head and channel plans are refused)
    "mixtral": ArchWidths(attention={}, mlp={}, experts=ExpertWidths("num_local_experts")),
    "qwen2_moe": ArchWidths(attention={}, mlp={}, experts=ExpertWidths("num_experts")),
    "qwen3_moe": ArchWidths(attention={}, mlp={}, experts=ExpertWidths("num_local_experts")),
    "olmoe": ArchWidths(attention={}, mlp={}, experts=ExpertWidths("num_experts")),
    "deepseek_v3": ArchWidths(
        attention={},
        mlp={},
        experts=ExpertWidths("n_routed_experts", groups="num_group", topk_groups="topk_group"),
    ),
}
#: models without a config (plain ``nn.Module``: CNNs, MLPs): only the generic leaf
#: modules of ``_update_module_attrs`` record widths; attention modules are refused.
GENERIC_WIDTHS = ArchWidths(attention={}, mlp={})


@dataclasses.dataclass
class PruneSummary:
    """What :func:`apply_plan` removed.

    Attributes:
        params_before / params_after: whole-model parameter counts (tied weights once).
        block_params_before / block_params_after: parameters of the prunable blocks
            (every weight that a prunable group in a layer touches: attention + MLP).
        removed_units: group name -> number of units removed (derived groups included).
        layers: layer index -> widths after pruning (heads, kv_heads, channels).
    """

    params_before: int
    params_after: int
    block_params_before: int
    block_params_after: int
    removed_units: dict[str, int]
    layers: dict[int, dict[str, int]]

    @property
    def block_sparsity(self) -> float:
        return 1.0 - self.block_params_after / max(1, self.block_params_before)

    @property
    def model_sparsity(self) -> float:
        return 1.0 - self.params_after / max(1, self.params_before)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_sparsity"] = self.block_sparsity
        d["model_sparsity"] = self.model_sparsity
        d["layers"] = {str(k): v for k, v in self.layers.items()}
        return d


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def block_modules(graph: DependencyGraph, include_locked: bool = False) -> list[str]:
    """Modules holding weights of prunable groups inside layers (attention + MLP).

    Args:
        graph: the dependency graph.
        include_locked: count head, key/value-head and channel groups that are locked too
            (what ``sparsity`` is a fraction of: every attention and MLP block).
    """
    mods: set[str] = set()
    for g in graph.groups.values():
        if g.layer is None or g.kind == "residual":
            continue
        wanted = (
            g.kind in ("heads", "kv_heads", "channels")
            if include_locked
            else g.prunable or g.kind == "kv_heads"
        )
        if not wanted:
            continue
        for m in g.members:
            if m.role in ("producer", "consumer"):
                mods.add(m.module)
    return sorted(mods)


def block_params(model: nn.Module, graph: DependencyGraph, include_locked: bool = False) -> int:
    """Parameters of the prunable blocks (FLAP's definition of what sparsity refers to).

    Args:
        model: the model the graph was built from.
        graph: its dependency graph.
        include_locked: also count attention and MLP blocks whose groups are locked.
    """
    named = dict(model.named_modules())
    seen: dict[int, int] = {}
    for name in block_modules(graph, include_locked):
        mod = named.get(name)
        if mod is None:
            continue
        for p in mod.parameters(recurse=False):
            seen[id(p)] = p.numel()
    return sum(seen.values())


def resolve_removals(graph: DependencyGraph, plan: Plan) -> dict[str, list[int]]:
    """Validate a plan and add the derived removals (parents whose children all go).

    Raises:
        PlanError: unknown group, index out of range, a group emptied, or a grouped-query
            layout transformers cannot represent.
    """
    removals: dict[str, list[int]] = {}
    for name, units in plan.removals.items():
        if name not in graph.groups:
            raise PlanError(f"plan names group {name!r}, which this model does not have")
        g = graph.groups[name]
        if not g.prunable:
            raise PlanError(f"group {name} is not prunable: {g.reason}")
        bad = [u for u in units if not 0 <= u < g.num_units]
        if bad:
            raise PlanError(f"group {name} has {g.num_units} units; plan removes unit {bad[0]}")
        if len(set(units)) >= g.num_units:
            raise PlanError(f"plan removes every unit of {name}", hint="lower the sparsity")
        removals[name] = sorted(set(units))
    for name, units in list(removals.items()):
        g = graph.groups[name]
        if g.parent is None or g.parent_of is None:
            continue
        gone = set(units)
        children: dict[int, list[int]] = defaultdict(list)
        for u, p in enumerate(g.parent_of):
            children[p].append(u)
        kept_per_parent = {p: sum(1 for c in cs if c not in gone) for p, cs in children.items()}
        kept_counts = {k for k in kept_per_parent.values() if k > 0}
        if len(kept_counts) > 1:
            raise PlanError(
                f"{name}: every kept key/value head must keep the same number of query heads "
                f"(got {sorted(kept_per_parent.values())})"
            )
        dead = sorted(p for p, k in kept_per_parent.items() if k == 0)
        if dead:
            removals[g.parent] = dead
    return removals


def _param_removals(graph: DependencyGraph, removals: dict[str, list[int]]) -> dict[str, dict[int, set[int]]]:
    out: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for name, units in removals.items():
        g = graph.groups[name]
        for m in g.members:
            for u in units:
                out[m.param][m.dim].update(m.index[u])
    return out


def zero_units(model: nn.Module, graph: DependencyGraph, removals: dict[str, list[int]]) -> None:
    """Set every weight entry of the given units to zero (for tests of exactness)."""
    pr = _param_removals(graph, resolve_removals(graph, Plan(removals)))
    with torch.no_grad():
        for pname, dims in pr.items():
            t = _get_tensor(model, pname)
            for dim, idx in dims.items():
                t.index_fill_(dim, torch.tensor(sorted(idx), dtype=torch.long), 0.0)


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    return getattr(mod, leaf)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, old: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(old, nn.Parameter):
        setattr(mod, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        persistent = leaf not in getattr(mod, "_non_persistent_buffers_set", set())
        mod.register_buffer(leaf, value, persistent=persistent)


def apply_plan(
    model: nn.Module,
    graph: DependencyGraph,
    plan: Plan,
    *,
    check_fingerprint: bool = True,
    deferred: Any = None,
) -> PruneSummary:
    """Remove the plan's units from ``model`` in place.

    Args:
        model: the model the graph was built from (unpruned).
        graph: its dependency graph.
        plan: what to remove; derived groups follow automatically.
        check_fingerprint: refuse a plan made for a model of other shapes.
        deferred: for a model whose block weights are offloaded (on the meta device), the
            :class:`prunecli.calibrate.offload.OffloadedWeights` they are read from: the meta
            tensors get their pruned shapes and the slices and bias deltas are recorded there,
            to be applied as each tensor is read (when the checkpoint is written). The probe
            forward passes are skipped (the model is never whole in memory).

    Returns:
        A :class:`PruneSummary`.

    Example:
        >>> graph = build_graph(model)                                        # doctest: +SKIP
        >>> g = graph.prunable("channels")[0]                                  # doctest: +SKIP
        >>> apply_plan(model, graph, Plan({g.name: [0, 1]})).params_after      # doctest: +SKIP
    """
    fp = model_fingerprint(model)
    if check_fingerprint and plan.fingerprint and plan.fingerprint != fp:
        raise PlanError(
            "this plan was made for a model with other parameter shapes",
            hint="replay a plan on a fresh copy of the model it was made for",
        )
    if graph.fingerprint != fp:
        raise PlanError("the graph was built for a different state of this model; rebuild it")
    removals = resolve_removals(graph, plan)
    spec = check_supported(model, graph, removals)
    offloaded = has_meta_tensors(model)
    if offloaded and deferred is None:
        raise PlanError(
            "the model has weights on the meta device (offloaded) and no source to record the removals in",
            hint="pass deferred=<OffloadedWeights> (prunecli.prune does it when given the runner)",
        )
    shapes_before = probe_forward(model, graph) if not offloaded else []
    params_before = count_params(model)
    blocks_before = block_params(model, graph)
    per_param = _param_removals(graph, removals)

    # slice each tensor once, keeping ties (same tensor object under two names)
    done: dict[int, torch.Tensor] = {}
    all_named = dict(model.named_parameters(remove_duplicate=False))
    all_named.update(dict(model.named_buffers(remove_duplicate=False)))
    aliases: dict[int, list[str]] = defaultdict(list)
    for n, t in all_named.items():
        aliases[id(t)].append(n)
    with torch.no_grad():
        for pname, dims in per_param.items():
            old = all_named[pname]
            if id(old) in done:
                continue
            new = old.detach()
            for dim, idx in dims.items():
                keep = torch.tensor([i for i in range(new.shape[dim]) if i not in idx], dtype=torch.long)
                new = new.index_select(dim, keep.to(new.device))
                if new.device.type == "meta":
                    for alias in aliases[id(old)]:
                        deferred.record_slice(alias, dim, keep)
            new = new.contiguous()
            for alias in aliases[id(old)]:
                _set_tensor(model, alias, new, old)
            done[id(old)] = new
    _retie(model, aliases, all_named)
    _update_module_attrs(model)
    # after slicing: new zero biases of sibling projections get their pruned widths
    _apply_bias_updates(model, graph, plan.bias_updates, deferred)
    layers = _update_attention(model, graph, removals, spec)
    for layer, w in _update_experts(model, graph, removals, spec).items():
        layers.setdefault(layer, {}).update(w)
    _update_config(model, dict(sorted(layers.items())), spec)
    check_config(model)
    if not offloaded:
        _check_probe(model, graph, shapes_before)
    summary = PruneSummary(
        params_before=params_before,
        params_after=count_params(model),
        block_params_before=blocks_before,
        block_params_after=block_params(model, graph),
        removed_units={k: len(v) for k, v in removals.items()},
        layers=layers,
    )
    model._prunecli_plan = plan  # type: ignore[assignment]
    return summary


def _check_probe(model: nn.Module, graph: DependencyGraph, shapes_before: list[tuple[int, ...]]) -> None:
    """The pruned model must run on the trace input and keep its output shapes."""
    try:
        shapes = probe_forward(model, graph)
    except Exception as e:  # noqa: BLE001 - any failure of the forward is the finding
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise PrunedModelError(
            f"the pruned model's forward fails ({type(e).__name__}: {first}); "
            "the model was modified in place and must be reloaded",
            hint="report this with `prunecli graph MODEL --all`: a constraint of this model is not modelled",
        ) from e
    if shapes != shapes_before:
        raise PrunedModelError(
            f"pruning changed the model's output shapes from {shapes_before} to {shapes}",
            hint="report this with `prunecli graph MODEL --all`: a constraint of this model is not modelled",
        )


def _retie(model: nn.Module, aliases: dict[int, list[str]], before: dict[str, torch.Tensor]) -> None:
    """Make tied names point at one Parameter again after replacement."""
    for names in aliases.values():
        if len(names) < 2:
            continue
        first = _get_tensor(model, names[0])
        for n in names[1:]:
            if _get_tensor(model, n) is not first:
                mod_name, _, leaf = n.rpartition(".")
                mod = model.get_submodule(mod_name) if mod_name else model
                if isinstance(first, nn.Parameter):
                    setattr(mod, leaf, first)


def _update_module_attrs(model: nn.Module) -> None:
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = int(w.shape[0]), int(w.shape[1])
        elif type(mod).__name__ == "Conv1D" and w.dim() == 2:
            mod.nx, mod.nf = int(w.shape[0]), int(w.shape[1])
        elif isinstance(mod, nn.modules.conv._ConvNd):
            # the graph removes whole groups of a depthwise conv (one input channel each)
            # and the same positions from every group of a general grouped conv
            if mod.groups > 1 and mod.in_channels == mod.groups:
                multiplier = mod.out_channels // mod.groups
                mod.groups = mod.in_channels = int(w.shape[0]) // multiplier
            else:
                mod.in_channels = int(w.shape[1]) * mod.groups
            mod.out_channels = int(w.shape[0])
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = int(w.shape[0]), int(w.shape[1])
        elif isinstance(mod, nn.LayerNorm):
            mod.normalized_shape = (int(w.shape[0]),)
        elif isinstance(mod, nn.modules.batchnorm._NormBase):
            mod.num_features = int(w.shape[0])
        elif isinstance(mod, nn.GroupNorm):
            mod.num_channels = int(w.shape[0])


def _kept(g: Group, removals: dict[str, list[int]]) -> int:
    return g.num_units - len(removals.get(g.name, []))


def arch_widths(model: nn.Module) -> ArchWidths:
    """The :data:`ARCH_WIDTHS` entry for ``model`` (``GENERIC_WIDTHS`` without a config).

    Raises:
        UnsupportedModelError: the model has a config whose ``model_type`` is not in the table.
    """
    cfg = getattr(model, "config", None)
    if cfg is None:
        return GENERIC_WIDTHS
    model_type = getattr(cfg, "model_type", None)
    spec = ARCH_WIDTHS.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise UnsupportedModelError(
            f"unsupported: prunecli does not know where a {model_type!r} model records its head "
            "counts and MLP widths; pruning it would leave stale values in its modules and config",
            hint=f"supported model types: {', '.join(sorted(ARCH_WIDTHS))}",
        )
    return spec


def _mlp_groups(graph: DependencyGraph, removals: dict[str, list[int]] | None) -> list[Group]:
    """Channel groups inside layers that a plan removes from (or could, when ``None``)."""
    return [
        g
        for g in graph.groups.values()
        if g.kind == "channels"
        and g.layer is not None
        and (g.name in removals if removals is not None else g.prunable)
    ]


def check_supported(
    model: nn.Module, graph: DependencyGraph, removals: dict[str, list[int]] | None = None
) -> ArchWidths:
    """Refuse a model whose widths the engine cannot record exactly; cheap, no calibration.

    Every attention module whose heads may go must be a class of :data:`ARCH_WIDTHS` with
    the attributes the table names, and every channel group inside a layer must be an
    MLP the table knows (its width is a config field). Run it before calibration;
    :func:`apply_plan` runs it again before slicing anything.

    Args:
        model: the unpruned model.
        graph: its dependency graph.
        removals: the plan's removals (``None``: every prunable group counts).

    Raises:
        UnsupportedModelError: with the reason (unknown model type, attention class,
            missing attribute, or a channel group with no known width field).
    """
    spec = arch_widths(model)
    named = dict(model.named_modules())
    for site in graph.attention:
        heads = graph.groups[site.heads]
        hit = heads.name in removals if removals is not None else heads.prunable
        mod = named.get(site.module)
        if not hit or mod is None:
            continue
        cls = type(mod).__name__
        aw = spec.attention.get(cls)
        if aw is None:
            raise UnsupportedModelError(
                f"unsupported: attention module {site.module} ({cls}) is not in prunecli's width "
                "table; its head counts would not be updated",
                hint="prune only MLP channels (--ignore '*attn*') or add the class to ARCH_WIDTHS",
            )
        expected = {
            **{a: site.num_heads for a in aw.heads},
            **{a: site.num_kv_heads for a in aw.kv_heads},
            **{a: site.num_heads // max(1, site.num_kv_heads) for a in aw.kv_groups},
            **{a: site.num_heads * site.head_dim for a in aw.width},
            **{a: site.head_dim for a in aw.head_dim},
        }
        for attr, value in expected.items():
            if getattr(mod, attr, None) != value:
                raise UnsupportedModelError(
                    f"unsupported: {site.module}.{attr} is {getattr(mod, attr, None)!r}, but the traced "
                    f"graph implies {value} ({site.num_heads} heads, {site.num_kv_heads} key/value heads, "
                    f"head width {site.head_dim}); prunecli's width table does not fit this {cls}",
                )
    _check_experts(model, graph, removals, spec)
    for g in _mlp_groups(graph, removals):
        cls = type(named.get(g.module)).__name__
        if getattr(model, "config", None) is not None and cls not in spec.mlp:
            raise UnsupportedModelError(
                f"unsupported: channel group {g.name} ({cls}) is not an MLP in prunecli's width "
                "table; no config field would record its new width",
                hint=f"leave it out with --ignore '{g.module}'",
            )
    return spec


def _update_attention(
    model: nn.Module, graph: DependencyGraph, removals: dict[str, list[int]], spec: ArchWidths
) -> dict[int, dict[str, int]]:
    """Set head counts and MLP widths on modules (from the width table); return per-layer widths."""
    layers: dict[int, dict[str, int]] = defaultdict(dict)
    named = dict(model.named_modules())
    cfg = getattr(model, "config", None)
    for site in graph.attention:
        heads = graph.groups[site.heads]
        kv = graph.groups[site.kv_heads]
        h_new = _kept(heads, removals)
        k_new = _kept(kv, removals) if kv.name != heads.name else h_new
        d = site.head_dim
        mod = named.get(site.module)
        if mod is not None and (h_new != site.num_heads or k_new != site.num_kv_heads):
            aw = spec.attention[type(mod).__name__]  # check_supported vouched for it
            for attr in aw.heads:
                setattr(mod, attr, h_new)
            for attr in aw.kv_heads:
                setattr(mod, attr, k_new)
            for attr in aw.kv_groups:
                setattr(mod, attr, h_new // k_new)
            for attr in aw.width:
                setattr(mod, attr, h_new * d)
            if aw.reads_config and cfg is not None:
                local = copy.copy(getattr(mod, "config", cfg))
                local.__dict__.pop("_heterogeneity_spec", None)
                local.__dict__.pop("per_layer_config", None)
                if spec.cfg_heads:
                    local.__dict__[spec.cfg_heads] = h_new
                if spec.cfg_kv_heads:
                    local.__dict__[spec.cfg_kv_heads] = k_new
                local.__dict__["head_dim"] = d
                mod.config = local
        if heads.layer is not None:
            layers[heads.layer].update({"heads": h_new, "kv_heads": k_new, "head_dim": d})
    for g in graph.groups.values():
        if g.kind != "channels" or g.layer is None or not (g.prunable or g.name in removals):
            continue
        if g.name not in removals and "channels" in layers.get(g.layer, {}):
            continue
        kept = _kept(g, removals)
        layers[g.layer]["channels"] = kept
        layers[g.layer]["channels_before"] = g.num_units
        for attr in spec.mlp.get(type(named.get(g.module)).__name__, ()):
            setattr(named[g.module], attr, kept)
    return dict(sorted(layers.items()))


@dataclasses.dataclass(frozen=True)
class ExpertRouting:
    """How one MoE block routes (read from its router through :class:`ExpertWidths`).

    Attributes:
        group: name of the ``experts`` group.
        layer: its layer.
        num_experts: routed experts.
        top_k: experts per token.
        groups: expert groups of group-limited routing (1: none).
        topk_groups: groups chosen per token (1: none).
    """

    group: str
    layer: int | None
    num_experts: int
    top_k: int
    groups: int = 1
    topk_groups: int = 1


def expert_routing(model: nn.Module, graph: DependencyGraph) -> dict[str, ExpertRouting]:
    """``experts`` group name -> :class:`ExpertRouting` of its MoE block.

    Raises:
        UnsupportedModelError: the model has MoE blocks but its type has no expert entry in
            :data:`ARCH_WIDTHS`.
    """
    if not graph.moe:
        return {}
    spec = arch_widths(model)
    ew = spec.experts
    if ew is None:
        raise UnsupportedModelError(
            f"unsupported: prunecli does not know where a {getattr(model.config, 'model_type', '?')!r} "
            "model records its number of experts",
            hint="add an ExpertWidths entry for it to ARCH_WIDTHS",
        )
    out: dict[str, ExpertRouting] = {}
    for site in graph.moe:
        router = model.get_submodule(site.router)
        top_k = next(
            (getattr(router, a) for a in ew.top_k if isinstance(getattr(router, a, None), int)), None
        )
        if top_k is None:
            top_k = int(getattr(model.config, ew.cfg_top_k))
        groups = int(getattr(router, ew.groups, 1) or 1) if ew.groups else 1
        topk_groups = int(getattr(router, ew.topk_groups, 1) or 1) if ew.topk_groups else 1
        g = graph.groups[site.group]
        out[site.group] = ExpertRouting(
            site.group, g.layer, site.num_experts, int(top_k), groups, topk_groups
        )
    return out


def _check_experts(
    model: nn.Module, graph: DependencyGraph, removals: dict[str, list[int]] | None, spec: ArchWidths
) -> None:
    """Expert removals must leave every block's routing valid (group-limited routing included)."""
    hit = [s for s in graph.moe if (removals is not None and s.group in removals)]
    if not hit:
        return
    routing = expert_routing(model, graph)
    ew = spec.experts
    assert ew is not None
    for site in hit:
        r = routing[site.group]
        for mod_name in (site.experts, site.router):
            mod = model.get_submodule(mod_name)
            for attr in ew.num_experts:
                v = getattr(mod, attr, None)
                if v is not None and v != r.num_experts:
                    raise UnsupportedModelError(
                        f"unsupported: {mod_name}.{attr} is {v!r} but the block has {r.num_experts} experts"
                    )
        gone = set(removals[site.group]) if removals else set()
        kept = r.num_experts - len(gone)
        if r.groups > 1:
            size = r.num_experts // r.groups
            per = [sum(1 for e in range(i * size, (i + 1) * size) if e not in gone) for i in range(r.groups)]
            if len(set(per)) != 1:
                raise PlanError(
                    f"{site.group}: group-limited routing ({r.groups} expert groups, {r.topk_groups} chosen "
                    f"per token) needs the same number of experts kept in every group, got {per}",
                    hint=f"keep a multiple of {r.groups} experts per layer; the expert selectors do this",
                )
            if per[0] < 2:
                raise PlanError(
                    f"{site.group}: group-limited routing scores each expert group by its best two "
                    f"experts, so every group must keep at least 2 (this plan keeps {per[0]})",
                    hint=f"keep at least {2 * r.groups} experts per layer",
                )
            if per[0] * r.topk_groups < r.top_k:
                raise PlanError(
                    f"{site.group}: {r.topk_groups} chosen group(s) of {per[0]} experts cannot supply "
                    f"{r.top_k} experts per token",
                    hint=f"keep at least {r.groups * -(-r.top_k // r.topk_groups)} experts per layer",
                )
        elif kept < 1:
            raise PlanError(f"plan removes every expert of {site.group}")


def _update_experts(
    model: nn.Module, graph: DependencyGraph, removals: dict[str, list[int]], spec: ArchWidths
) -> dict[int, dict[str, int]]:
    """Set expert counts (and experts per token where fewer are left) on the MoE modules."""
    layers: dict[int, dict[str, int]] = {}
    ew = spec.experts
    if ew is None or not any(s.group in removals for s in graph.moe):
        return layers
    cfg = getattr(model, "config", None)
    cfg_top_k = int(getattr(cfg, ew.cfg_top_k, 0) or 0)
    for site in graph.moe:
        g = graph.groups[site.group]
        kept = _kept(g, removals)
        block, router = model.get_submodule(site.block), model.get_submodule(site.router)
        experts = model.get_submodule(site.experts)
        for mod in (experts, router):
            for attr in ew.num_experts:
                if hasattr(mod, attr):
                    setattr(mod, attr, kept)
        top_k = cfg_top_k
        for mod in (router, block):
            for attr in ew.top_k:
                if isinstance(getattr(mod, attr, None), int):
                    top_k = getattr(mod, attr)
                    if top_k > kept:
                        top_k = kept
                        setattr(mod, attr, kept)
        if g.layer is not None:
            layers[g.layer] = {"experts": kept, "experts_before": g.num_units, "top_k": min(top_k, kept)}
    return layers


def _expert_config(
    cfg: Any, layers: dict[int, dict[str, int]], spec: ArchWidths
) -> dict[int, dict[str, int]]:
    """Expert counts go to global config fields when every MoE layer keeps the same number
    (dense layers of the same model do not read them); returns ``layers`` without them then."""
    ew = spec.experts
    moe = {i: w for i, w in layers.items() if "experts" in w}
    if ew is None or not moe:
        return layers
    if len({(w["experts"], w["top_k"]) for w in moe.values()}) != 1:
        return layers
    first = next(iter(moe.values()))
    setattr(cfg, ew.cfg_experts, first["experts"])
    setattr(cfg, ew.cfg_top_k, first["top_k"])
    rest = {
        i: {k: v for k, v in w.items() if k not in ("experts", "experts_before", "top_k")}
        for i, w in layers.items()
    }
    return {i: w for i, w in rest.items() if w}


def _global_ok(cfg: Any, values: dict[str, int], spec: ArchWidths) -> bool:
    """Whether stock transformers accepts these widths as global config fields.

    transformers 5 refuses a ``hidden_size`` that is not a multiple of the head count
    (the config validator of Llama/Gemma, BERT's attention constructor), even with an
    explicit ``head_dim``; per-layer configs are not checked that way.
    """
    heads = values.get(spec.cfg_heads) if spec.cfg_heads else None
    hidden = getattr(cfg, "hidden_size", None)
    if heads and isinstance(hidden, int) and hidden % heads:
        return False
    trial = copy.deepcopy(cfg)
    try:
        for k, v in values.items():
            setattr(trial, k, v)
        if hasattr(trial, "validate"):
            trial.validate()
    except Exception:  # noqa: BLE001 - any validation failure means: not as global fields
        return False
    return True


def _update_config(model: nn.Module, layers: dict[int, dict[str, int]], spec: ArchWidths) -> None:
    """Record the new widths on ``model.config``: global when uniform and accepted, else per layer."""
    cfg = getattr(model, "config", None)
    if cfg is None or not layers:
        return
    layers = _expert_config(cfg, layers, spec)
    if not layers:
        return
    per_layer: dict[int, dict[str, int]] = {}
    for layer, w in layers.items():
        o: dict[str, int] = {}
        if "heads" in w and spec.cfg_heads:
            o[spec.cfg_heads] = w["heads"]
            if spec.cfg_kv_heads:
                o[spec.cfg_kv_heads] = w["kv_heads"]
            # stated explicitly: many configs derive it as hidden_size // heads otherwise
            o["head_dim"] = w["head_dim"]
        if "channels" in w and spec.cfg_mlp:
            o[spec.cfg_mlp] = w["channels"]
        if "experts" in w and spec.experts is not None:
            o[spec.experts.cfg_experts] = w["experts"]
            o[spec.experts.cfg_top_k] = w["top_k"]
        per_layer[layer] = o
    keys = {k for o in per_layer.values() for k in o}
    n_layers = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", len(per_layer))) or 0)
    uniform = (
        all(len({o.get(k) for o in per_layer.values()}) == 1 for k in keys) and len(per_layer) == n_layers
    )
    first = next(iter(per_layer.values()))
    if uniform and _global_ok(cfg, {k: first[k] for k in keys}, spec):
        for k in keys:
            setattr(cfg, k, first[k])
        return
    if any("head_dim" in w for w in layers.values()):
        cfg.head_dim = next(w["head_dim"] for w in layers.values() if "head_dim" in w)
    overrides = {i: o for i, o in per_layer.items() if o}
    cfg.per_layer_config = overrides
    cfg.allow_global_per_layer_attribute_access = True


def _apply_bias_updates(
    model: nn.Module, graph: DependencyGraph, updates: dict[str, list[float]], deferred: Any = None
) -> None:
    """Add ``delta`` to each named module's output bias, creating zero biases as needed.

    For configs with a per-kind bias flag (Llama's ``attention_bias`` / ``mlp_bias``) the
    flag is switched on and every sibling projection of that kind gets a zero bias, so the
    checkpoint loads in stock transformers. Configs without such a flag (Mistral, Qwen2,
    Phi-3; Gemma and Qwen3 for the MLP) keep the new biases on the named modules only;
    :func:`prunecli.checkpoint.save_checkpoint` records them in ``prunecli_modules`` and the
    checkpoint's modeling file adds them before the weights load.
    """
    if not updates:
        return
    named = dict(model.named_modules())
    cfg = getattr(model, "config", None)
    attn_modules = {s.module for s in graph.attention}
    for mod_name, delta in updates.items():
        mod = named.get(mod_name)
        conv1d = type(mod).__name__ == "Conv1D"  # GPT-2: weight [in, out], bias always present
        if not (isinstance(mod, nn.Linear) or conv1d):
            raise PlanError(f"bias update for {mod_name!r}: not a linear module of this model")
        on = mod.weight.device if mod.weight.device.type != "meta" else torch.device("cpu")
        d = torch.tensor(delta, dtype=mod.weight.dtype, device=on)
        outputs = mod.weight.shape[1] if conv1d else mod.out_features
        if d.shape != (outputs,):
            raise PlanError(f"bias update for {mod_name}: {d.numel()} values for {outputs} outputs")
        if not conv1d:
            _ensure_bias(mod)
        if mod.bias.device.type == "meta":  # offloaded: added when the tensor is read
            deferred.record_add(f"{mod_name}.bias", d)
        else:
            with torch.no_grad():
                mod.bias.add_(d)
        if cfg is None:
            continue
        in_attention = any(mod_name.startswith(a + ".") for a in attn_modules)
        flag = "attention_bias" if in_attention else "mlp_bias"
        if flag in cfg.__dict__ and not cfg.__dict__[flag]:
            setattr(cfg, flag, True)
            _bias_siblings(model, named, attn_modules, in_attention)


def _ensure_bias(mod: nn.Linear) -> None:
    if mod.bias is None:
        mod.bias = nn.Parameter(
            torch.zeros(mod.out_features, dtype=mod.weight.dtype, device=mod.weight.device)
        )


def _bias_siblings(
    model: nn.Module, named: dict[str, nn.Module], attn_modules: set[str], attention: bool
) -> None:
    """Give every linear of the flagged kind (inside attention, or in the MLPs) a zero bias."""
    layers = [n for n, m in named.items() if isinstance(m, nn.ModuleList)]
    for name, mod in named.items():
        if not isinstance(mod, nn.Linear) or not any(name.startswith(layer + ".") for layer in layers):
            continue
        inside = any(name.startswith(a + ".") for a in attn_modules)
        if inside == attention:
            _ensure_bias(mod)


def replay_plan(model: nn.Module, plan: Plan, example_inputs: tuple[Any, ...] | None = None) -> PruneSummary:
    """Apply a saved plan to a fresh copy of the original model (traces its graph first)."""
    graph = build_graph(model, example_inputs)
    return apply_plan(model, graph, plan)
