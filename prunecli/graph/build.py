"""From traced channel constraints to groups: :func:`build_graph`."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import nn

from prunecli.errors import UnsupportedModelError
from prunecli.graph.experts import MoeSite, add_expert_groups
from prunecli.graph.groups import AttentionSite, Group, Member
from prunecli.graph.repeat import NotRepeating, repeated_blocks, trace_truncated
from prunecli.graph.trace import _Tracer, trace_channels


class DependencyGraph:
    """The groups of coupled channels of one model.

    Attributes:
        groups: group name -> :class:`Group`, in model order.
        attention: the attention computations found (module, head groups, head counts).
        fingerprint: hash of the model's parameter names and shapes when traced.
        unknown_ops: ops the tracer does not model (their channels were locked).
        moe: the Mixture-of-Experts blocks (:class:`~prunecli.graph.experts.MoeSite`), whose
            routed experts are ``experts`` groups.
        example_inputs: the inputs the model was traced with (``apply_plan`` runs a probe
            forward on them); ``input_name`` is the keyword they are passed as to a
            transformers model (``None``: positional, a plain module).
    """

    def __init__(
        self,
        groups: dict[str, Group],
        attention: list[AttentionSite],
        fingerprint: str,
        unknown_ops: dict[str, int],
        example_inputs: tuple[Any, ...] | None = None,
        input_name: str | None = None,
    ) -> None:
        self.groups = groups
        self.attention = attention
        self.fingerprint = fingerprint
        self.unknown_ops = unknown_ops
        self.example_inputs = example_inputs
        self.input_name = input_name
        self.moe: list[MoeSite] = []

    def prunable(self, kind: str | None = None) -> list[Group]:
        """Groups that methods may remove units from (optionally of one kind)."""
        return [g for g in self.groups.values() if g.prunable and (kind is None or g.kind == kind)]

    def __getitem__(self, name: str) -> Group:
        return self.groups[name]

    def to_dict(self, with_index: bool = False) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "groups": [g.to_dict(with_index) for g in self.groups.values()],
            "attention": [vars(a) for a in self.attention],
            "unknown_ops": dict(self.unknown_ops),
        }


def model_fingerprint(model: nn.Module) -> str:
    """Hash of parameter names and shapes (what a plan must match)."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


class _Wrapper(nn.Module):
    """Calls a transformers model without cache and returns plain tensors."""

    def __init__(self, model: nn.Module, input_name: str) -> None:
        super().__init__()
        self.m = model
        self.input_name = input_name

    def forward(self, x: torch.Tensor) -> Any:
        kwargs: dict[str, Any] = {self.input_name: x}
        if _accepts(self.m, "use_cache"):
            kwargs["use_cache"] = False
        out = self.m(**kwargs)
        if isinstance(out, torch.Tensor):
            return out
        values = out.values() if hasattr(out, "values") else out
        # every tensor the model returns is an output whose width must not change
        return tuple(v for v in values if isinstance(v, torch.Tensor))


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor, str]:
    """A small input for tracing: 6 tokens, or one image at the config's size."""
    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        ch = getattr(cfg, "num_channels", 3)
        g = torch.Generator().manual_seed(0)
        return torch.randn(1, ch, size, size, generator=g), name
    vocab = int(getattr(cfg, "vocab_size", 100) or 100)
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, max(2, min(vocab, 1000)), (1, 6), generator=g), "input_ids"


def build_graph(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> DependencyGraph:
    """Trace ``model`` and find its groups of coupled channels.

    Args:
        model: a transformers model or a plain ``nn.Module``.
        example_inputs: positional inputs for a plain module; transformers models get a
            small token (or image) batch automatically.

    Returns:
        The :class:`DependencyGraph`.

    Raises:
        UnsupportedModelError: the model cannot be traced or has no prunable structure.

    Example:
        >>> graph = build_graph(model)                      # doctest: +SKIP
        >>> [g.name for g in graph.prunable("heads")][:1]    # doctest: +SKIP
        ['model.layers.0.self_attn:heads']
    """
    was_training = model.training
    model.eval()
    try:
        if example_inputs is None and hasattr(model, "config"):
            x, input_name = default_example_inputs(model)
            wrapper: nn.Module = _Wrapper(model, input_name)
            args: tuple[Any, ...] = (x,)
            prefix = "m."
            probe_name: str | None = input_name
        else:
            if example_inputs is None:
                raise UnsupportedModelError(
                    "unsupported: a plain nn.Module needs example_inputs to be traced",
                    hint="pass example_inputs=(torch.randn(1, 3, 32, 32),) or similar",
                )
            wrapper, args, prefix = model, tuple(example_inputs), ""
            probe_name = None
        fingerprint = model_fingerprint(model)
        blocks = repeated_blocks(model) if example_inputs is None else None
        table = None
        with torch.no_grad():
            if blocks is not None:
                try:
                    table = trace_truncated(model, wrapper, args, prefix, blocks)
                except NotRepeating:
                    table = None
            if table is None:
                table = _table_from_trace(trace_channels(wrapper, args, prefix)[0])
    finally:
        model.train(was_training)
    graph = _groups_from_table(model, table, fingerprint)
    modules = _module_types(model)
    graph.moe = add_expert_groups(model, graph.groups, lambda m: _layer_of(m, modules))
    graph.example_inputs, graph.input_name = args, probe_name
    return graph


def probe_forward(model: nn.Module, graph: DependencyGraph) -> list[tuple[int, ...]]:
    """Run ``model`` once on the graph's trace inputs (no grad, eval); return output shapes.

    The call is the one the tracer made (the same input kind, no KV cache). Exceptions
    propagate to the caller.
    """
    if graph.example_inputs is None:
        x, name = default_example_inputs(model)
        args: tuple[Any, ...] = (x,)
    else:
        args, name = graph.example_inputs, graph.input_name
    p = next(iter(model.parameters()), None)
    if p is not None:
        args = tuple(
            a.to(p.device, p.dtype if a.is_floating_point() else a.dtype)
            if isinstance(a, torch.Tensor)
            else a
            for a in args
        )
    call = _Wrapper(model, name) if name is not None else model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call(*args)
    finally:
        model.train(was_training)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]


# ---------------------------------------------------------------------------------------
def _resolve_sites(tr: _Tracer) -> dict[int, set[int]]:
    """Turn pair constraints into unions and parent links; return parent -> children roots.

    The shape of each pairing is judged on the raw ids the op lined up, not on the atoms
    they belong to by then: a broadcast (one id meeting many) is a parent link, a
    position-by-position match is a union, anything else unites everything it touched.
    """
    uf = tr.uf
    raw_parents: dict[int, set[int]] = defaultdict(set)
    for site in tr.sites:
        a = site.pairs[:, 0].tolist()
        b = site.pairs[:, 1].tolist()
        for left, right in _components(a, b):
            if len(left) == 1 and len(right) == 1:
                uf.union(next(iter(left)), next(iter(right)))
            elif len(left) == 1:
                raw_parents[next(iter(left))].update(right)
            elif len(right) == 1:
                raw_parents[next(iter(right))].update(left)
            else:
                uf.union_many(list(left | right))
    # a parent whose children are all one atom is that atom; parents with the same
    # children (a key head and its value head) go together (repeat until stable)
    changed = True
    while changed:
        changed = False
        by_children: dict[frozenset[int], int] = {}
        for p, ch in raw_parents.items():
            roots = frozenset(uf.find(c) for c in ch)
            rp = uf.find(p)
            if len(roots) == 1:
                r = next(iter(roots))
                if rp != r:
                    uf.union(p, r)
                    changed = True
                continue
            other = by_children.setdefault(roots, rp)
            if uf.find(other) != rp:
                uf.union(other, rp)
                changed = True
    out: dict[int, set[int]] = defaultdict(set)
    for p, ch in raw_parents.items():
        rp = uf.find(p)
        for c in ch:
            rc = uf.find(c)
            if rc != rp:
                out[rp].add(rc)
    return out


def _components(a: list[int], b: list[int]) -> list[tuple[set[int], set[int]]]:
    """Connected components of the bipartite pairing a[i] -- b[i]."""
    adj: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)
    for x, y in zip(a, b):
        adj[(0, x)].add((1, y))
        adj[(1, y)].add((0, x))
    seen: set[tuple[int, int]] = set()
    comps = []
    for start in adj:
        if start in seen:
            continue
        stack = [start]
        seen.add(start)
        left: set[int] = set()
        right: set[int] = set()
        while stack:
            n = stack.pop()
            (left if n[0] == 0 else right).add(n[1])
            for m in adj[n]:
                if m not in seen:
                    seen.add(m)
                    stack.append(m)
        comps.append((left, right))
    return comps


def _module_types(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def _layer_of(module: str, modules: dict[str, nn.Module]) -> int | None:
    """Index within the first ``nn.ModuleList`` on the module's path."""
    parts = module.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if isinstance(modules.get(parent), nn.ModuleList) and parts[i].isdigit():
            return int(parts[i])
    return None


def _common_module(names: list[str]) -> str:
    split = [n.split(".")[:-1] for n in names]
    prefix: list[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            prefix.append(parts[0])
        else:
            break
    return ".".join(prefix)


@dataclasses.dataclass
class AtomTable:
    """Atoms (smallest removable sets of parameter slices) and their relations.

    Keys are hashable atom ids. ``entries[key]`` lists ``(param, dim, index)``.
    """

    entries: dict[Hashable, list[tuple[str, int, int]]]
    locked: dict[Hashable, str]
    heads: set[Hashable]
    kv: set[Hashable]
    parents: dict[Hashable, set[Hashable]]
    attention: list[dict[str, Any]]  # module, q (key per head), k (key per head), head_dim
    used: set[tuple[str, int]]
    shapes: dict[str, tuple[int, ...]]
    unknown_ops: dict[str, int]


def _table_from_trace(tr: _Tracer) -> AtomTable:
    uf = tr.uf
    parents = _resolve_sites(tr)
    entries: dict[Hashable, list[tuple[str, int, int]]] = defaultdict(list)
    for pname, bases in tr.param_bases.items():
        shape = tr.param_shapes[pname]
        for d, base in enumerate(bases):
            for i in range(shape[d]):
                entries[uf.find(base + i)].append((pname, d, i))
    locked: dict[Hashable, str] = {}
    for i in sorted(tr.locked):
        locked.setdefault(uf.find(i), tr.lock_reasons.get(i, "locked"))
    attention = []
    heads: set[Hashable] = set()
    kv: set[Hashable] = set()
    for site in tr.attention:
        q = [uf.find(int(x)) for x in site["q"].tolist()]
        k = [uf.find(int(x)) for x in site["k"].tolist()]
        heads.update(q)
        kv.update(k)
        attention.append(
            {"module": _strip(site["module"]), "q": q, "k": k, "head_dim": int(site["head_dim"])}
        )
    return AtomTable(
        dict(entries),
        locked,
        heads,
        kv,
        dict(parents),
        attention,
        set(tr.used),
        dict(tr.param_shapes),
        dict(tr.unknown_ops),
    )


@dataclasses.dataclass
class Naming:
    """How a graph source names things: parameter order, member roles, layer of a module.

    The torch path reads them from the ``nn.Module`` (:func:`torch_naming`); the ONNX path
    (:mod:`prunecli.onnx.graph`) from the ops that consume each initializer.
    """

    order: dict[str, int]
    role: Callable[[str, int, tuple[int, ...]], str]
    layer: Callable[[str], int | None]


def torch_naming(model: nn.Module) -> Naming:
    modules = _module_types(model)
    names_in_model = dict(model.named_parameters(remove_duplicate=False))
    names_in_model.update(dict(model.named_buffers(remove_duplicate=False)))
    return Naming(
        order={n: i for i, n in enumerate(names_in_model)},
        role=lambda p, d, shape: _role(p, d, shape, modules),
        layer=lambda m: _layer_of(m, modules),
    )


def _groups_from_table(
    model: nn.Module | None, table: AtomTable, fingerprint: str, naming: Naming | None = None
) -> DependencyGraph:
    atoms = table.entries
    parents = table.parents
    naming = naming or torch_naming(model)  # type: ignore[arg-type]
    order = naming.order

    child_parent: dict[Hashable, set[Hashable]] = defaultdict(set)
    for p, chs in parents.items():
        for c in chs:
            child_parent[c].add(p)

    by_sig: dict[tuple[tuple[str, int], ...], list[Hashable]] = defaultdict(list)
    for atom, ents in atoms.items():
        by_sig[tuple(sorted({(p, d) for p, d, _ in ents}))].append(atom)

    raw_groups = []
    for sig, members in by_sig.items():
        members.sort(key=lambda a: min(i for _, _, i in atoms[a]))
        params = sorted({p for p, _ in sig})
        module = _common_module(params)
        if not module:
            # no common owner (a residual stream): name it after its first producer
            prod = [p for p, d in sig if naming.role(p, d, table.shapes[p]) == "producer"]
            first = min(prod or params, key=lambda p: order.get(p, 1 << 30))
            module = first.rsplit(".", 1)[0]
        if any(a in table.heads for a in members):
            kind = "heads"
        elif any(a in table.kv for a in members):
            kind = "kv_heads"
        else:
            kind = "channels"
        raw_groups.append((module, kind, members, sig))
    # stable model order: by first parameter's position in the state dict
    raw_groups.sort(key=lambda g: (min(order.get(p, 1 << 30) for p, _ in g[3]), g[3]))

    groups: dict[str, Group] = {}
    atom_group: dict[Hashable, tuple[str, int]] = {}
    used_names: dict[str, int] = defaultdict(int)
    for module, kind, members, sig in raw_groups:
        base = f"{module}:{kind}"
        used_names[base] += 1
        name = base if used_names[base] == 1 else f"{base}#{used_names[base]}"
        per_member: dict[tuple[str, int], list[list[int]]] = {key: [[] for _ in members] for key in sig}
        for u, a in enumerate(members):
            for p, d, i in atoms[a]:
                per_member[(p, d)][u].append(i)
        mem_list = [
            Member(
                param=pname,
                dim=dim,
                index=[sorted(ix) for ix in per_member[(pname, dim)]],
                role=naming.role(pname, dim, table.shapes[pname]),  # type: ignore[arg-type]
                module=pname.rsplit(".", 1)[0],
                shape=table.shapes[pname],
            )
            for pname, dim in sig
        ]
        reasons = [table.locked[a] for a in members if a in table.locked]
        unused = [f"{p}[dim {d}]" for p, d in sig if (p, d) not in table.used]
        if unused:
            reasons.append(f"{unused[0]} is not used by the traced computation")
        g = Group(
            name=name,
            kind=kind,  # type: ignore[arg-type]
            module=module,
            layer=naming.layer(module),
            num_units=len(members),
            members=mem_list,
        )
        if reasons:
            g.prunable, g.reason = False, reasons[0]
        elif len(members) < 2:
            g.prunable, g.reason = False, "a single unit (all channels are coupled)"
        elif not any(m.role in ("producer", "consumer") for m in mem_list):
            g.prunable, g.reason = False, "no linear or convolution weight"
        groups[name] = g
        for u, a in enumerate(members):
            atom_group[a] = (name, u)

    group_atoms: dict[str, list[Hashable]] = defaultdict(list)
    for a, (gn, _) in sorted(atom_group.items(), key=lambda t: t[1]):
        group_atoms[gn].append(a)
    # parents: link children to parent groups
    for name, g in groups.items():
        parent_groups: dict[str, list[int | None]] = {}
        for u, a in enumerate(group_atoms[name]):
            for p in child_parent.get(a, ()):
                if p in atom_group:
                    pg, pu = atom_group[p]
                    parent_groups.setdefault(pg, [None] * g.num_units)[u] = pu
        partial = {}
        for pg, mapping in parent_groups.items():
            if None in mapping:
                g.prunable, g.reason = False, f"only some units depend on {pg}"
            elif len(set(mapping)) > 1:
                partial[pg] = mapping
            # else: one parent unit shared by every unit (a broadcast norm weight, a rotary
            # table); it goes only if the whole group goes, which plans never do
        if len(partial) > 1:
            g.prunable, g.reason = False, "depends on several parent groups"
        elif len(partial) == 1:
            pg, mapping = next(iter(partial.items()))
            g.parent = pg
            g.parent_of = [int(m) for m in mapping]  # type: ignore[arg-type]
            pgroup = groups[pg]
            pgroup.prunable = False
            pgroup.reason = pgroup.reason or f"follows its children in {name}"
            if g.kind == "heads":
                pgroup.kind = "kv_heads"
    # broadcast parents (shared by several units elsewhere) are never selectable on their own
    for name, g in groups.items():
        if g.prunable and any(a in parents for a in group_atoms[name]):
            g.prunable, g.reason = False, "shared by other channels (broadcast)"

    attention: list[AttentionSite] = []
    for site in table.attention:
        q, k = site["q"], site["k"]
        if q[0] not in atom_group:
            continue
        hq_name = atom_group[q[0]][0]
        kv_name = atom_group[k[0]][0] if k[0] in atom_group else hq_name
        module = site["module"] or groups[hq_name].module
        if any(a.module == module for a in attention):
            continue  # the score and value matmuls of eager attention are one site
        attention.append(
            AttentionSite(
                module=module,
                heads=hq_name,
                kv_heads=kv_name,
                num_heads=groups[hq_name].num_units,
                num_kv_heads=groups[kv_name].num_units,
                head_dim=site["head_dim"],
            )
        )
        groups[hq_name].head_dim = site["head_dim"]
        if kv_name != hq_name:
            groups[kv_name].head_dim = site["head_dim"]
    _check_heads(groups, attention)
    return DependencyGraph(groups, attention, fingerprint, table.unknown_ops)


def _strip(path: str) -> str:
    for pre in ("L__self__m.", "m."):
        if path.startswith(pre):
            return path[len(pre) :]
    return path


def _check_heads(groups: dict[str, Group], attention: list[AttentionSite]) -> None:
    """A head group whose units are not whole heads would be pruned wrongly: lock it."""
    for site in attention:
        g = groups[site.heads]
        cons = g.consumers()
        if g.num_units != site.num_heads:
            g.prunable, g.reason = False, f"{g.num_units} units for {site.num_heads} heads"
        for m in cons:
            if any(len(ix) != site.head_dim for ix in m.index):
                g.prunable, g.reason = False, "head slices of unequal width"


def _role(pname: str, dim: int, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> str:
    mod = modules.get(pname.rsplit(".", 1)[0]) if "." in pname else None
    leaf = pname.rsplit(".", 1)[-1]
    if leaf == "bias" or len(shape) == 1:
        if (
            mod is not None
            and isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
            or "norm" in type(mod).__name__.lower()
        ):
            return "norm"
        return "bias" if leaf == "bias" else "other"
    if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
        transposed = type(mod).__name__ == "Conv1D"  # GPT-2 stores [in, out]
        out_dim = 1 if transposed else 0
        return "producer" if dim == out_dim else "consumer"
    if isinstance(mod, nn.modules.conv._ConvNd):
        return {0: "producer", 1: "consumer"}.get(dim, "other")
    if isinstance(mod, nn.Embedding):
        return "producer" if dim == 1 else "other"
    return "other"
