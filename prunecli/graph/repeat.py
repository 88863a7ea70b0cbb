"""Trace a few of N blocks, then replicate what was found to all N.

Exporting a 30-layer model costs about 30 times as much as a 2-layer one, while its
layers are the same module class with the same parameter shapes. Blocks are grouped by
*signature*: class, parameter shapes, submodule classes, plain settings (``is_sliding``,
``sliding_window``, ``layer_type``, ...) and the layer's entry in every per-layer config
list (``layer_types``, ``no_rope_layers``). We temporarily cut the block list to the first
two blocks of every signature (the real modules, not copies; Gemma 3's 5-sliding-1-global
pattern gives blocks 0, 1, 5 and 11), trace, check that the second block of each pair
shows exactly the first one's structure (renamed), and replicate each pair's first block
to every layer of its signature. Two blocks per signature, not one, so that couplings
between blocks (the residual stream) are seen and checked. A signature held by one layer
only is traced as that layer. Anything irregular falls back to tracing the whole model.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Hashable
from typing import Any

from torch import nn

from prunecli.graph.trace import trace_channels

KEEP = 2


class NotRepeating(Exception):
    """A sampled block does not mirror its twin: trace the full model instead."""


# attributes that number a block rather than configure it
_INDEX_ATTRS = {"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx"}
_SIMPLE = (int, float, str, bool, type(None))


def _block_signature(block: nn.Module) -> tuple[Any, ...]:
    """Class, parameter shapes, submodule classes and plain attributes of one block.

    Plain attributes (``is_sliding``, ``sliding_window``, ``layer_type``, ``use_rope``,
    a shared-cache flag, ...) are part of it: layers that differ by config run different
    code even with identical weights, so they are never replicated from another layer.
    """
    attrs = tuple(
        (name, k, v)
        for name, m in block.named_modules()
        for k, v in sorted(vars(m).items())
        if not k.startswith("_") and k not in _INDEX_ATTRS and isinstance(v, _SIMPLE)
    )
    return (
        type(block).__name__,
        tuple((n, tuple(t.shape)) for n, t in block.state_dict().items()),
        tuple(type(m).__name__ for m in block.modules()),
        attrs,
    )


def _per_layer_lists(model: nn.Module, n: int) -> dict[str, list[Any]]:
    """Config lists with one entry per layer (``layer_types``, ``no_rope_layers``, ...)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return {}
    return {
        key: list(value)
        for key, value in vars(cfg).items()
        if not key.endswith("token_id") and isinstance(value, (list, tuple)) and len(value) == n
    }


@dataclasses.dataclass
class BlockSample:
    """Which blocks of a ``ModuleList`` to trace, and what each of the others copies.

    Attributes:
        path: qualified name of the ``ModuleList``.
        blocks: the full list.
        traced: real indices of the blocks kept for tracing, ascending.
        pairs: (first, second) positions in ``traced`` of every signature with two or more blocks.
        template: real layer -> position in ``traced`` of the block it replicates.
    """

    path: str
    blocks: nn.ModuleList
    traced: list[int]
    pairs: list[tuple[int, int]]
    template: dict[int, int]


def sample_blocks(model: nn.Module) -> BlockSample | None:
    """The largest ``nn.ModuleList`` worth tracing truncated, and which of its blocks to trace.

    Returns ``None`` (trace the whole model) when no list of at least 3 blocks would be cut
    to fewer blocks than it has, or the config is heterogeneous (per-layer widths).
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_heterogeneous", False):
        return None
    best = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) <= KEEP or not path:
            continue
        lists = _per_layer_lists(model, len(mod))
        members: dict[Any, list[int]] = {}
        for i, block in enumerate(mod):
            sig = (_block_signature(block), tuple(repr(v[i]) for v in lists.values()))
            members.setdefault(sig, []).append(i)
        traced = sorted(i for idx in members.values() for i in idx[:KEEP])
        if len(traced) >= len(mod):
            continue
        pos = {i: p for p, i in enumerate(traced)}
        pairs = [(pos[idx[0]], pos[idx[1]]) for idx in members.values() if len(idx) >= KEEP]
        template = {i: pos[idx[0]] for idx in members.values() for i in idx}
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[0]:
            best = (size, BlockSample(path, mod, traced, pairs, template))
    return best[1] if best else None


def repeated_blocks(model: nn.Module) -> BlockSample | None:
    """Alias of :func:`sample_blocks` (the name the graph builder imports)."""
    return sample_blocks(model)


def trace_truncated(
    model: nn.Module, wrapper: nn.Module, args: tuple[Any, ...], prefix: str, sample: BlockSample
):
    """Trace with only the sampled blocks and return the table expanded to all blocks."""
    from prunecli.graph.build import _table_from_trace

    path, blocks = sample.path, sample.blocks
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    n, k = len(blocks), len(sample.traced)
    cfg = getattr(model, "config", None)
    saved: dict[str, Any] = {}
    if cfg is not None:
        for key, value in list(vars(cfg).items()):
            if key == "num_hidden_layers" and value == n:
                saved[key] = value
            elif isinstance(value, (list, tuple)) and len(value) == n and not key.endswith("token_id"):
                saved[key] = value
    setattr(parent, attr, nn.ModuleList([blocks[i] for i in sample.traced]))
    try:
        for key, value in saved.items():
            cut = k if key == "num_hidden_layers" else type(value)(value[i] for i in sample.traced)
            cfg.__dict__[key] = cut
        tr = trace_channels(wrapper, args, prefix)[0]
    finally:
        setattr(parent, attr, blocks)
        for key, value in saved.items():
            cfg.__dict__[key] = value
    return expand_table(_table_from_trace(tr), path, n, sample.pairs, sample.template)


def expand_table(
    table,
    path: str,
    n: int,
    pairs: list[tuple[int, int]] | None = None,
    template: dict[int, int] | None = None,
):
    """Replicate the traced blocks' atoms to blocks 0..n-1.

    Args:
        table: the atom table of the truncated trace (blocks named by their position in it).
        path: qualified name of the block list.
        n: number of blocks in the full model.
        pairs: (first, second) traced positions that must mirror each other (default: (0, 1)).
        template: real layer -> traced position it copies (default: every layer copies 0).

    Raises:
        NotRepeating: a pair does not mirror, or a coupling cannot be replicated.
    """
    from prunecli.graph.build import AtomTable

    pairs = [(0, 1)] if pairs is None else pairs
    template = dict.fromkeys(range(n), 0) if template is None else template
    second = {q: p for p, q in pairs}  # second position of a pair -> its first
    layers_of: dict[int, list[int]] = defaultdict(list)  # template position -> real layers
    for j in range(n):
        layers_of[template[j]].append(j)
    pre = path + "."

    def split(p: str) -> tuple[int | None, str]:
        if p.startswith(pre):
            idx, _, tail = p[len(pre) :].partition(".")
            if idx.isdigit():
                return int(idx), tail
        return None, p

    def rename(ents: list[tuple[str, int, int]], j: int) -> list[tuple[str, int, int]]:
        return [(f"{pre}{j}.{split(p)[1]}", d, i) for p, d, i in ents]

    def tmpl(pos: int) -> int:
        return second.get(pos, pos)

    kinds: dict[Hashable, str] = {}
    local_pos: dict[Hashable, int] = {}
    parts: dict[Hashable, dict[int | None, list[tuple[str, int, int]]]] = {}
    for key, ents in table.entries.items():
        by_layer: dict[int | None, list[tuple[str, int, int]]] = defaultdict(list)
        for e in ents:
            by_layer[split(e[0])[0]].append(e)
        layers = set(by_layer) - {None}
        parts[key] = by_layer
        if not layers:
            kinds[key] = "global"
        elif len(layers) == 1 and None not in by_layer:
            kinds[key] = "local"
            local_pos[key] = next(iter(layers))
        else:
            for p, q in pairs:
                if (p in layers) != (q in layers):
                    raise NotRepeating(f"a coupling reaches block {p if p in layers else q} but not its twin")
                if p in layers and sorted(rename(by_layer[p], 1)) != sorted(rename(by_layer[q], 1)):
                    raise NotRepeating("a cross-block coupling differs between twin blocks")
            if {tmpl(p) for p in layers} != set(layers_of):
                raise NotRepeating("a cross-block coupling does not reach every kind of block")
            kinds[key] = "cross"

    def sig(key: Hashable) -> frozenset[tuple[str, int, int]]:
        return frozenset((split(p)[1], d, i) for p, d, i in parts[key][local_pos[key]])

    templates: dict[tuple[int, frozenset], Hashable] = {}
    for k, v in kinds.items():
        if v == "local" and local_pos[k] not in second:
            templates[(local_pos[k], sig(k))] = k
    twin_of: dict[Hashable, Hashable] = {}
    for k, v in kinds.items():
        if v == "local" and local_pos[k] in second:
            t = templates.get((second[local_pos[k]], sig(k)))
            if t is None:
                raise NotRepeating("a block has a coupling that its twin lacks")
            twin_of[k] = t
    sigs_at: dict[int, set[frozenset]] = defaultdict(set)
    for k, v in kinds.items():
        if v == "local":
            sigs_at[local_pos[k]].add(sig(k))
    for p, q in pairs:
        if sigs_at[p] != sigs_at[q]:
            raise NotRepeating(f"traced blocks {p} and {q} have different couplings")

    def copies(key: Hashable) -> tuple[Hashable, int | None]:
        """(template key, template position) the old key stands for (position None: not local)."""
        if kinds[key] != "local":
            return key, None
        t = twin_of.get(key, key)
        return t, local_pos[t]

    def expand_keys(key: Hashable) -> list[Hashable]:
        t, p = copies(key)
        return [(t, j) for j in layers_of[p]] if p is not None else [t]

    entries: dict[Hashable, list[tuple[str, int, int]]] = {}
    for key, v in kinds.items():
        if v == "local" and key not in twin_of:
            for j in layers_of[local_pos[key]]:
                entries[(key, j)] = rename(table.entries[key], j)
        elif v == "cross":
            ents = list(parts[key].get(None, []))
            for j in range(n):
                ents += rename(parts[key][template[j]], j)
            entries[key] = ents
        elif v == "global":
            entries[key] = table.entries[key]

    locked: dict[Hashable, str] = {}
    for key, reason in table.locked.items():
        for k in expand_keys(key):
            locked.setdefault(k, reason)
    heads = {k for key in table.heads for k in expand_keys(key)}
    kv = {k for key in table.kv for k in expand_keys(key)}

    parents: dict[Hashable, set[Hashable]] = defaultdict(set)
    for par, children in table.parents.items():
        pt, pp = copies(par)
        for c in children:
            ct, cp = copies(c)
            if pp is not None and cp is not None:
                if pp != cp:
                    raise NotRepeating("a parent link crosses blocks")
                for j in layers_of[pp]:
                    parents[(pt, j)].add((ct, j))
            elif pp is not None:
                for j in layers_of[pp]:
                    parents[(pt, j)].add(ct)
            elif cp is not None:
                for j in layers_of[cp]:
                    parents[pt].add((ct, j))
            else:
                parents[pt].add(ct)

    attention: list[tuple[int, dict[str, Any]]] = []  # (real layer, site), sorted below
    for site in table.attention:
        layer, tail = split(site["module"])
        if layer is None:
            attention.append((-1, site))
            continue
        if layer in second:
            continue
        for j in layers_of[layer]:
            attention.append(
                (
                    j,
                    {
                        "module": f"{pre}{j}.{tail}" if tail else f"{pre}{j}",
                        "q": [(copies(q)[0], j) for q in site["q"]],
                        "k": [(copies(k)[0], j) for k in site["k"]],
                        "head_dim": site["head_dim"],
                    },
                )
            )
    attention.sort(key=lambda t: t[0])
    used = set()
    for p, d in table.used:
        layer, tail = split(p)
        if layer is None:
            used.add((p, d))
        else:
            used.update((f"{pre}{j}.{tail}", d) for j in layers_of[tmpl(layer)])
    shapes = {}
    for p, shape in table.shapes.items():
        layer, tail = split(p)
        if layer is None:
            shapes[p] = shape
        else:
            shapes.update({f"{pre}{j}.{tail}": shape for j in layers_of[tmpl(layer)]})
    return AtomTable(
        entries, locked, heads, kv, dict(parents), [a for _, a in attention], used, shapes, table.unknown_ops
    )
