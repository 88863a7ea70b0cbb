"""Rewrite an ONNX model without the units a plan removes: :func:`apply_plan_onnx`.

Every initializer a removed unit touches is sliced (in its own orientation: a ``MatMul``
weight is ``[in, out]``); every node whose output shape depends on the removed channels gets
its shape operands rewritten: ``Reshape``/``Expand`` target shapes (the literal entries; ``-1``
and entries computed from ``Shape`` follow by themselves), ``Slice`` bounds and ``Split`` sizes
on a channel axis, and ``Conv``'s ``group``. How many indices a dimension keeps is read off the
channel-id tensors of the trace: an index goes when every element of its slice belongs to a
removed unit. Bias compensation (``plan.bias_updates``) is added to the bias that follows the
module's ``MatMul``/``Gemm`` (an ``Add`` with a vector initializer), or a new ``Add`` is
inserted. The opset is kept; shape inference and ``onnx.checker`` run on the result, and
onnxruntime runs it on the trace inputs, whose output shapes must not change.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import numpy as np

from prunecli.engine.apply import _param_removals, resolve_removals
from prunecli.engine.plan import Plan
from prunecli.errors import PlanError, UnsupportedModelError
from prunecli.onnx.graph import OnnxGraph, _attr, _session, count_initializer_params


@dataclasses.dataclass
class OnnxPruneSummary:
    """What :func:`apply_plan_onnx` removed.

    Attributes:
        params_before / params_after: scalars in floating-point initializers.
        removed_units: group name -> units removed (derived key/value heads included).
        rewritten_nodes: nodes whose shape operands or attributes were changed.
    """

    params_before: int
    params_after: int
    removed_units: dict[str, int]
    rewritten_nodes: list[str]

    @property
    def model_sparsity(self) -> float:
        return 1.0 - self.params_after / max(1, self.params_before)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_sparsity"] = self.model_sparsity
        return d


def _removed_roots(graph: OnnxGraph, removals: dict[str, list[int]]) -> set[int]:
    tr = graph._trace.tracer
    out: set[int] = set()
    for name, units in removals.items():
        for m in graph.groups[name].members:
            base = tr.param_bases[m.param][m.dim]
            for u in units:
                out.update(tr.uf.find(base + i) for i in m.index[u])
    return out


def _gone(ids: np.ndarray, roots: np.ndarray, removed: set[int]) -> np.ndarray:
    """Boolean mask: the element belongs to a removed unit."""
    mask = np.zeros(ids.shape, dtype=bool)
    ch = ids >= 0
    if ch.any() and removed:
        mask[ch] = np.isin(roots[ids[ch]], np.fromiter(removed, dtype=np.int64))
    return mask


def _kept_along(gone: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` that keep at least one element."""
    other = tuple(d for d in range(gone.ndim) if d != axis)
    return ~gone.all(axis=other) if other else ~gone


def zero_units_onnx(model: Any, graph: OnnxGraph, removals: dict[str, list[int]]) -> Any:
    """A copy of ``model`` with every weight entry of the given units set to zero (tests)."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    pr = _param_removals(graph, resolve_removals(graph, Plan(removals)))
    inits = {i.name: i for i in out.graph.initializer}
    for pname, dims in pr.items():
        info = graph.params[pname]
        arr = numpy_helper.to_array(inits[info.initializer]).copy()
        for dim, idx in dims.items():
            sl = [slice(None)] * arr.ndim
            sl[info.onnx_dim(dim)] = sorted(idx)
            arr[tuple(sl)] = 0
        inits[info.initializer].CopyFrom(numpy_helper.from_array(arr, info.initializer))
    return out


def apply_plan_onnx(
    model: Any, graph: OnnxGraph, plan: Plan, check: bool = True
) -> tuple[Any, OnnxPruneSummary]:
    """Remove the plan's units from an ONNX model.

    Args:
        model: the ``onnx.ModelProto`` the graph was built from (not modified).
        graph: its :class:`~prunecli.onnx.graph.OnnxGraph`.
        plan: what to remove (its fingerprint must match the model's).
        check: run ``onnx.checker`` and onnxruntime on the result.

    Returns:
        ``(pruned ModelProto, summary)``.

    Raises:
        PlanError: the plan does not fit this model.
        UnsupportedModelError: a shape operand that must change is computed at run time,
            or the rewritten model does not run.

    Example:
        >>> pruned, summary = apply_plan_onnx(model, graph, plan)  # doctest: +SKIP
    """
    import onnx
    from onnx import numpy_helper

    if plan.fingerprint and plan.fingerprint != graph.fingerprint:
        raise PlanError("the plan was made for another model (fingerprint mismatch)")
    removals = resolve_removals(graph, plan)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    before = count_initializer_params(model)

    # 1. slice initializers
    inits = {i.name: i for i in g.initializer}
    for pname, dims in _param_removals(graph, removals).items():
        info = graph.params[pname]
        arr = numpy_helper.to_array(inits[info.initializer])
        for dim, idx in sorted(dims.items()):
            arr = np.delete(arr, sorted(idx), axis=info.onnx_dim(dim))
        inits[info.initializer].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), info.initializer))

    # 2. shape operands and attributes
    state = graph._trace
    roots = state.roots()
    removed = _removed_roots(graph, removals)
    producers = {o: n for n in g.node for o in n.output}
    rewritten: list[str] = []
    fresh = _Fresh(g)

    def new_sizes(value: str, broadcast: set[int]) -> tuple[list[int], list[int]] | None:
        ids = state.value_ids.get(value)
        if ids is None:
            return None
        gone = _gone(ids.numpy(), roots, removed)
        old = list(ids.shape)
        # a broadcast axis of Expand (repeat_kv) keeps, in every row, as many copies as
        # each kept key/value head keeps query heads
        new = [
            int((~gone).sum(axis=k).max())
            if k in broadcast and gone.size
            else int(_kept_along(gone, k).sum())
            for k in range(ids.dim())
        ]
        return old, new

    for node in list(g.node):
        op = node.op_type
        if op in ("Reshape", "Expand") and len(node.input) > 1:
            broadcast: set[int] = set()
            if op == "Expand":
                out_shape = state.shapes[node.output[0]]
                rank_out = len(out_shape)
                in_shape = (1,) * (rank_out - len(state.shapes[node.input[0]])) + state.shapes[node.input[0]]
                broadcast = {k for k in range(rank_out) if in_shape[k] == 1 and out_shape[k] > 1}
            sizes = new_sizes(node.output[0], broadcast)
            if sizes is None or sizes[0] == sizes[1]:
                continue
            changed = {k: n for k, (o, n) in enumerate(zip(*sizes)) if o != n}
            _rewrite_shape(node, 1, changed, producers, state.shapes, fresh, g)
            rewritten.append(node.name)
        elif op == "Slice":
            ids = state.value_ids.get(node.input[0])
            if ids is None:
                continue
            gone = _gone(ids.numpy(), roots, removed)
            if _rewrite_slice(node, gone, producers, state.real, fresh, g):
                rewritten.append(node.name)
        elif op == "Split":
            ids = state.value_ids.get(node.input[0])
            if ids is None:
                continue
            axis = int(_attr(node, "axis", 0)) % ids.dim()
            kept = _kept_along(_gone(ids.numpy(), roots, removed), axis)
            old = [state.shapes[o][axis] for o in node.output]
            bounds = np.cumsum([0] + old)
            new = [int(kept[bounds[j] : bounds[j + 1]].sum()) for j in range(len(old))]
            if new != old:
                name = fresh.const(np.array(new, dtype=np.int64), f"{node.name}_split")
                if len(node.input) > 1 and node.input[1]:
                    node.input[1] = name
                else:
                    while len(node.input) < 2:
                        node.input.append("")
                    node.input[1] = name
                for a in list(node.attribute):
                    if a.name in ("num_outputs", "split"):
                        node.attribute.remove(a)
                rewritten.append(node.name)
        elif op == "Conv" and int(_attr(node, "group", 1)) > 1:
            ids = state.value_ids.get(node.input[0])
            w = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
            if ids is None or w is None:
                continue
            cin = int(_kept_along(_gone(ids.numpy(), roots, removed), 1).sum())
            group = cin // w.shape[1]
            if group != int(_attr(node, "group", 1)):
                for a in node.attribute:
                    if a.name == "group":
                        a.i = group
                rewritten.append(node.name)

    # 3. bias compensation
    for module, delta in plan.bias_updates.items():
        _add_bias(out, graph, module, np.asarray(delta, dtype=np.float64), fresh)

    # 4. stale shapes go; the model must check and run
    del g.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    after = count_initializer_params(out)
    summary = OnnxPruneSummary(before, after, {k: len(v) for k, v in removals.items()}, rewritten)
    if check:
        _check_runs(model, out, graph)
    return out, summary


class _Fresh:
    """Adds uniquely named int64 initializers."""

    def __init__(self, g: Any) -> None:
        self.g = g
        self.names = {i.name for i in g.initializer} | {o for n in g.node for o in n.output}

    def name(self, hint: str) -> str:
        base = f"{hint}_pruned"
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}{k}"
        self.names.add(name)
        return name

    def const(self, arr: np.ndarray, hint: str) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.g.initializer.append(numpy_helper.from_array(arr, name))
        return name


def _literal(name: str, producers: dict[str, Any], g: Any) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or a Constant node's output."""
    from onnx import numpy_helper

    for i in g.initializer:
        if i.name == name:
            return numpy_helper.to_array(i)
    p = producers.get(name)
    if p is not None and p.op_type == "Constant":
        for a in p.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def _rewrite_shape(
    node: Any,
    index: int,
    changed: dict[int, int],
    producers: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    fresh: _Fresh,
    g: Any,
) -> None:
    """Set entries ``changed`` (position -> new size) of the shape operand ``node.input[index]``."""
    src = node.input[index]
    lit = _literal(src, producers, g)
    if lit is not None:
        arr = lit.astype(np.int64).copy()
        for k, n in changed.items():
            if arr[k] > 0:
                arr[k] = n
        node.input[index] = fresh.const(arr, node.name or "shape")
        return
    p = producers.get(src)
    if p is not None and p.op_type == "Concat":
        # a private copy of the Concat (another node may share it) with rewritten pieces
        pieces = list(p.input)
        offset = 0
        for j, piece in enumerate(p.input):
            length = int(np.prod(shapes[piece]))
            mine = {k - offset: n for k, n in changed.items() if offset <= k < offset + length}
            if mine:
                plit = _literal(piece, producers, g)
                if plit is not None:
                    arr = plit.astype(np.int64).reshape(-1).copy()
                    for k, n in mine.items():
                        if arr[k] > 0:
                            arr[k] = n
                    pieces[j] = fresh.const(arr.reshape(plit.shape), p.name or "shape")
                elif not _from_shape(piece, producers):
                    raise UnsupportedModelError(
                        f"{node.op_type} {node.name}: a pruned dimension's size is computed at run time"
                    )
            offset += length
        if pieces != list(p.input):
            from onnx import helper

            out = fresh.name(src)
            concat = helper.make_node("Concat", pieces, [out], name=fresh.name(p.name or "concat"), axis=0)
            g.node.insert(list(g.node).index(node), concat)
            node.input[index] = out
        return
    if not _from_shape(src, producers):
        raise UnsupportedModelError(
            f"{node.op_type} {node.name}: a pruned dimension's size is computed at run time"
        )


def _from_shape(name: str, producers: dict[str, Any], depth: int = 0) -> bool:
    """The value is read off a tensor's shape (it follows the pruned tensor by itself)."""
    p = producers.get(name)
    if p is None or depth > 8:
        return False
    if p.op_type == "Shape":
        return True
    if p.op_type in ("Gather", "Slice", "Squeeze", "Unsqueeze", "Concat", "Cast", "Identity"):
        return _from_shape(p.input[0], producers, depth + 1)
    return False


def _rewrite_slice(
    node: Any, gone: np.ndarray, producers: dict[str, Any], real: dict[str, np.ndarray], fresh: _Fresh, g: Any
) -> bool:
    ndim = gone.ndim
    starts = np.asarray(real[node.input[1]], dtype=np.int64).reshape(-1)
    ends = np.asarray(real[node.input[2]], dtype=np.int64).reshape(-1)
    axes = (
        np.asarray(real[node.input[3]], dtype=np.int64).reshape(-1)
        if len(node.input) > 3 and node.input[3]
        else np.arange(len(starts))
    )
    steps = (
        np.asarray(real[node.input[4]], dtype=np.int64).reshape(-1)
        if len(node.input) > 4 and node.input[4]
        else np.ones(len(starts), dtype=np.int64)
    )
    new_s, new_e = starts.copy(), ends.copy()
    touched = False
    for j, (s, e, a, st) in enumerate(zip(starts, ends, axes, steps)):
        kept = _kept_along(gone, int(a) % ndim)
        if kept.all():
            continue
        if st != 1:
            raise UnsupportedModelError(f"Slice {node.name}: a strided slice over pruned channels")
        n = len(kept)
        lo, hi = slice(int(s), int(e)).indices(n)[:2]
        new_s[j] = int(kept[:lo].sum())
        new_e[j] = int(kept[:hi].sum())
        touched = True
    if not touched:
        return False
    for k, arr in ((1, new_s), (2, new_e)):
        if _literal(node.input[k], producers, g) is None:
            raise UnsupportedModelError(
                f"Slice {node.name}: bounds over pruned channels are computed at run time"
            )
        node.input[k] = fresh.const(arr, node.name or "slice")
    return True


def _add_bias(model: Any, graph: OnnxGraph, module: str, delta: np.ndarray, fresh: _Fresh) -> None:
    """Add ``delta`` to the output of the module's weight op (FLAP's bias compensation)."""
    from onnx import helper, numpy_helper

    g = model.graph
    name = graph.module_nodes.get(module)
    node = next((n for n in g.node if n.name == name), None) if name else None
    if node is None:
        raise PlanError(f"bias update for {module!r}, which has no weight node in this model")
    inits = {i.name: i for i in g.initializer}
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
        init = inits[node.input[2]]
        arr = numpy_helper.to_array(init).astype(np.float64)
        init.CopyFrom(
            numpy_helper.from_array((arr + delta).astype(numpy_helper.to_array(init).dtype), init.name)
        )
        return
    consumers = [n for n in g.node if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0].op_type == "Add":
        add = consumers[0]
        other = [i for i in add.input if i != node.output[0]]
        if len(other) == 1 and other[0] in inits and len(inits[other[0]].dims) == 1:
            init = inits[other[0]]
            arr = numpy_helper.to_array(init)
            if arr.shape[0] != delta.shape[0]:
                raise PlanError(
                    f"bias update for {module!r} has {delta.shape[0]} entries, the bias {arr.shape[0]}"
                )
            init.CopyFrom(
                numpy_helper.from_array((arr.astype(np.float64) + delta).astype(arr.dtype), init.name)
            )
            return
    # no bias: insert one after the weight op
    out_name = node.output[0]
    new_out = fresh.name(f"{node.name}_out")
    bias = fresh.const(delta.astype(np.float32), f"{module}.bias_compensation")
    node.output[0] = new_out  # the Add takes over the old output name: consumers stay as they are
    add = helper.make_node("Add", [new_out, bias], [out_name], name=f"{node.name}_bias_compensation")
    idx = list(g.node).index(node)
    g.node.insert(idx + 1, add)


def _check_runs(original: Any, pruned: Any, graph: OnnxGraph) -> None:
    import onnx

    try:
        if pruned.ByteSize() < 2_000_000_000:
            onnx.checker.check_model(pruned)
        feed = graph.example_inputs[0] if graph.example_inputs else {}
        got = _session(pruned).run(None, feed)
        # the trace ran the original on the same inputs
        want_shapes = [graph._trace.shapes[o.name] for o in original.graph.output]
    except Exception as e:  # noqa: BLE001 - checker and onnxruntime raise many types
        first = " ".join(str(e).split())[:300]
        raise UnsupportedModelError(f"the pruned ONNX model does not run: {first}") from None
    if [tuple(np.shape(v)) for v in got] != want_shapes:
        raise UnsupportedModelError("the pruned ONNX model's output shapes differ from the original's")


def removed_params(graph: OnnxGraph, plan: Plan) -> int:
    """Initializer scalars the plan removes (derived key/value heads included)."""
    removals = resolve_removals(graph, plan)
    per: dict[str, dict[int, set[int]]] = defaultdict(lambda: defaultdict(set))
    for pname, dims in _param_removals(graph, removals).items():
        per[pname] = dims
    total = 0
    for pname, dims in per.items():
        shape = graph._trace.tracer.param_shapes[pname]
        kept = [s - len(dims.get(d, ())) for d, s in enumerate(shape)]
        total += int(np.prod(shape)) - int(np.prod(kept))
    return total
