"""Trace two of N identical blocks, then replicate what was found to all N.

Exporting a 30-layer model costs about 30 times as much as a 2-layer one, while its
layers are the same module class with the same parameter shapes. We temporarily cut
the block list to its first two blocks (the real modules, not copies), trace, and
check that block 1 shows exactly block 0's structure (renamed) before replicating it.
Two blocks, not one, so that couplings between consecutive blocks (the residual
stream) are seen. Anything irregular falls back to tracing the whole model, including
layers that differ only by configuration (Gemma 2/3 sliding vs global attention,
``no_rope_layers``, layers reading another layer's cache): their block signatures or the
config's per-layer lists differ.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable
from typing import Any

from torch import nn

from prunecli.graph.trace import trace_channels

KEEP = 2


class NotRepeating(Exception):
    """Block 1 does not mirror block 0: trace the full model instead."""


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


def _per_layer_config_differs(model: nn.Module, n: int) -> bool:
    """A config list with one entry per layer (``layer_types``, ``no_rope_layers``, ...) that varies."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    if getattr(cfg, "is_heterogeneous", False):
        return True
    for key, value in vars(cfg).items():
        if key.endswith("token_id"):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n and len({repr(v) for v in value}) > 1:
            return True
    return False


def repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The largest ``nn.ModuleList`` of at least 3 identical blocks (structure and settings).

    Returns ``None`` (trace the whole model) when the blocks differ in any way the
    signature sees, or when the config holds a per-layer list whose entries differ.
    """
    best = None
    for path, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) <= KEEP or not path:
            continue
        if _per_layer_config_differs(model, len(mod)):
            continue
        sig = _block_signature(mod[0])
        if all(_block_signature(b) == sig for b in mod[1:]):
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, path, mod)
    return (best[1], best[2]) if best else None


def trace_truncated(
    model: nn.Module, wrapper: nn.Module, args: tuple[Any, ...], prefix: str, path: str, blocks: nn.ModuleList
):
    """Trace with only the first two blocks and return the table expanded to all blocks."""
    from prunecli.graph.build import _table_from_trace

    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    n = len(blocks)
    cfg = getattr(model, "config", None)
    saved: dict[str, Any] = {}
    if cfg is not None:
        for key, value in list(vars(cfg).items()):
            if key == "num_hidden_layers" and value == n:
                saved[key] = value
            elif isinstance(value, list) and len(value) == n and key.endswith("layer_types"):
                saved[key] = value
    setattr(parent, attr, nn.ModuleList(list(blocks)[:KEEP]))
    try:
        for key, value in saved.items():
            cfg.__dict__[key] = KEEP if key == "num_hidden_layers" else value[:KEEP]
        tr = trace_channels(wrapper, args, prefix)[0]
    finally:
        setattr(parent, attr, blocks)
        for key, value in saved.items():
            cfg.__dict__[key] = value
    return expand_table(_table_from_trace(tr), path, n)


def expand_table(table, path: str, n: int):
    """Replicate block-0 atoms to blocks 0..n-1 after checking block 1 mirrors block 0."""
    from prunecli.graph.build import AtomTable

    pre = path + "."

    def split(p: str) -> tuple[int | None, str]:
        if p.startswith(pre):
            idx, _, tail = p[len(pre) :].partition(".")
            if idx.isdigit():
                return int(idx), tail
        return None, p

    def rename(ents: list[tuple[str, int, int]], j: int) -> list[tuple[str, int, int]]:
        return [(f"{pre}{j}.{split(p)[1]}", d, i) for p, d, i in ents]

    kinds: dict[Hashable, str] = {}
    parts: dict[Hashable, dict[int | None, list[tuple[str, int, int]]]] = {}
    for key, ents in table.entries.items():
        by_layer: dict[int | None, list[tuple[str, int, int]]] = defaultdict(list)
        for e in ents:
            by_layer[split(e[0])[0]].append(e)
        layers = set(by_layer) - {None}
        parts[key] = by_layer
        if not layers:
            kinds[key] = "global"
        elif layers == {0} and None not in by_layer:
            kinds[key] = "block0"
        elif layers == {1} and None not in by_layer:
            kinds[key] = "block1"
        elif layers == {0, 1}:
            if sorted(rename(by_layer[0], 1)) != sorted(by_layer[1]):
                raise NotRepeating("a cross-block coupling differs between blocks 0 and 1")
            kinds[key] = "cross"
        else:
            raise NotRepeating("a coupling ties one block to the outside only")

    def sig(key: Hashable, layer: int) -> frozenset[tuple[str, int, int]]:
        return frozenset((split(p)[1], d, i) for p, d, i in parts[key][layer])

    template = {sig(k, 0): k for k, v in kinds.items() if v == "block0"}
    twin_of: dict[Hashable, Hashable] = {}
    for k, v in kinds.items():
        if v == "block1":
            s = sig(k, 1)
            if s not in template:
                raise NotRepeating("block 1 has a coupling that block 0 lacks")
            twin_of[k] = template[s]
    if len(twin_of) != len(template):
        raise NotRepeating("block 0 has a coupling that block 1 lacks")

    def copies(key: Hashable) -> list[tuple[Hashable, int | None]]:
        """(template key, block) pairs that the old key stands for."""
        v = kinds[key]
        if v == "block0":
            return [(key, 0)]
        if v == "block1":
            return [(twin_of[key], 1)]
        return [(key, None)]

    def new_key(t: Hashable, j: int | None) -> Hashable:
        return (t, j) if j is not None else t

    entries: dict[Hashable, list[tuple[str, int, int]]] = {}
    for key, v in kinds.items():
        if v == "block0":
            for j in range(n):
                entries[(key, j)] = rename(table.entries[key], j)
        elif v == "cross":
            ents = list(parts[key].get(None, []))
            for j in range(n):
                ents += rename(parts[key][0], j)
            entries[key] = ents
        elif v == "global":
            entries[key] = table.entries[key]

    def expand_keys(key: Hashable) -> list[Hashable]:
        t, j = copies(key)[0]
        return [new_key(t, b) for b in range(n)] if j is not None else [t]

    locked: dict[Hashable, str] = {}
    for key, reason in table.locked.items():
        for k in expand_keys(key):
            locked.setdefault(k, reason)
    heads = {k for key in table.heads for k in expand_keys(key)}
    kv = {k for key in table.kv for k in expand_keys(key)}

    parents: dict[Hashable, set[Hashable]] = defaultdict(set)
    for p, children in table.parents.items():
        (pt, pj) = copies(p)[0]
        for c in children:
            (ct, cj) = copies(c)[0]
            if pj is not None and cj is not None:
                if pj != cj:
                    raise NotRepeating("a parent link crosses blocks")
                for j in range(n):
                    parents[(pt, j)].add((ct, j))
            elif pj is not None:
                for j in range(n):
                    parents[(pt, j)].add(ct)
            elif cj is not None:
                for j in range(n):
                    parents[pt].add((ct, j))
            else:
                parents[pt].add(ct)

    attention = []
    for site in table.attention:
        layer, tail = split(site["module"])
        if layer == 1:
            continue
        if layer is None:
            attention.append(site)
            continue
        for j in range(n):
            attention.append(
                {
                    "module": f"{pre}{j}.{tail}" if tail else f"{pre}{j}",
                    "q": [new_key(copies(q)[0][0], j) for q in site["q"]],
                    "k": [new_key(copies(k)[0][0], j) for k in site["k"]],
                    "head_dim": site["head_dim"],
                }
            )
    used = set()
    for p, d in table.used:
        layer, tail = split(p)
        if layer is None:
            used.add((p, d))
        else:
            used.update((f"{pre}{j}.{tail}", d) for j in range(n))
    shapes = {}
    for p, shape in table.shapes.items():
        layer, tail = split(p)
        if layer is None:
            shapes[p] = shape
        else:
            shapes.update({f"{pre}{j}.{tail}": shape for j in range(n)})
    return AtomTable(entries, locked, heads, kv, dict(parents), attention, used, shapes, table.unknown_ops)
