"""Mixture-of-Experts blocks: routed experts as units of an ``experts`` group.

transformers 5 stores the routed experts of a MoE block as fused 3-D parameters
(``experts.gate_up_proj`` ``[E, 2I, H]``, ``experts.down_proj`` ``[E, H, I]``, optional
per-expert biases ``[E, ...]``) beside a router whose weight has one row per expert
(``gate.weight`` ``[E, H]``, optional ``[E]`` bias or DeepSeek's
``e_score_correction_bias``). The tracer sees the fused tensors only through a grouped
matmul and the router's ``topk``, so it locks them; this module finds the pattern in the
module tree instead and turns each block's experts into one group whose unit ``e`` is
index ``e`` along dimension 0 of every one of those tensors.

The pattern, checked on the module tree only (no family names):

- an **experts module** has an integer ``num_experts`` attribute ``E >= 2``, at least one
  3-D parameter, and every direct parameter and buffer has leading dimension ``E``;
- its parent is the **MoE block**; a sibling whose direct parameters and buffers all have
  leading dimension ``E`` and whose ``weight`` is 2-D is the **router**;
- every other child of the block (shared experts, their gate) is left alone.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from prunecli.graph.groups import Group, Member


@dataclasses.dataclass(frozen=True)
class MoeSite:
    """One MoE block found in the model.

    Args:
        block: the MoE block (e.g. ``model.layers.1.mlp``).
        experts: its fused experts module.
        router: its router module.
        group: name of the ``experts`` group (``<block>:experts``).
        num_experts: routed experts before pruning.
    """

    block: str
    experts: str
    router: str
    group: str
    num_experts: int


def _direct(mod: nn.Module) -> list[tuple[str, object]]:
    return list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))


def _leading(mod: nn.Module, e: int) -> bool:
    tensors = _direct(mod)
    return bool(tensors) and all(t.dim() >= 1 and t.shape[0] == e for _, t in tensors)  # type: ignore[attr-defined]


def find_moe_sites(model: nn.Module) -> list[MoeSite]:
    """Every MoE block of ``model`` that follows the fused-experts pattern, in model order."""
    named = dict(model.named_modules())
    sites: list[MoeSite] = []
    for name, mod in named.items():
        e = getattr(mod, "num_experts", None)
        if not isinstance(e, int) or isinstance(e, bool) or e < 2 or "." not in name:
            continue
        if not any(p.dim() == 3 for _, p in mod.named_parameters(recurse=False)) or not _leading(mod, e):
            continue
        block = name.rpartition(".")[0]
        parent = named[block]
        routers = [
            f"{block}.{c}"
            for c, child in parent.named_children()
            if child is not mod
            and _leading(child, e)
            and isinstance(getattr(child, "weight", None), nn.Parameter)
            and child.weight.dim() == 2
        ]
        if len(routers) != 1:
            continue
        sites.append(MoeSite(block, name, routers[0], f"{block}:experts", e))
    return sites


def expert_group(model: nn.Module, site: MoeSite, layer: int | None) -> Group:
    """The ``experts`` group of one MoE block: index ``e`` of dimension 0 of every expert
    tensor and of every router row/bias is unit ``e``."""
    members: list[Member] = []
    for mod_name, role in ((site.experts, "producer"), (site.router, "other")):
        mod = model.get_submodule(mod_name)
        for leaf, t in _direct(mod):
            members.append(
                Member(
                    param=f"{mod_name}.{leaf}",
                    dim=0,
                    index=[[u] for u in range(site.num_experts)],
                    role=role,  # type: ignore[arg-type]
                    module=mod_name,
                    shape=tuple(t.shape),  # type: ignore[attr-defined]
                )
            )
    return Group(
        name=site.group,
        kind="experts",
        module=site.block,
        layer=layer,
        num_units=site.num_experts,
        members=members,
    )


def add_expert_groups(model: nn.Module, groups: dict[str, Group], layer_of) -> list[MoeSite]:  # noqa: ANN001
    """Replace the traced (locked) groups on dimension 0 of the expert and router tensors
    with one ``experts`` group per MoE block; returns the sites found.

    A traced group that couples those rows to anything else stays, and the expert group is
    then locked with the reason.
    """
    sites = find_moe_sites(model)
    for site in sites:
        g = expert_group(model, site, layer_of(site.block))
        mine = {(m.param, 0) for m in g.members}
        overlapping = [
            name for name, other in groups.items() if any((m.param, m.dim) in mine for m in other.members)
        ]
        foreign = [n for n in overlapping if any((m.param, m.dim) not in mine for m in groups[n].members)]
        if foreign:
            g.prunable = False
            g.reason = f"the expert rows are coupled to other channels by the trace ({foreign[0]})"
        else:
            for name in overlapping:
                del groups[name]
        groups[g.name] = g
    return sites
