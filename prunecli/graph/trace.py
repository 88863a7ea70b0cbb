"""Channel dependencies from a traced graph.

The model is traced with ``torch.export`` and its ATen graph is executed twice in one
walk: once on real values (to resolve index tensors and shapes) and once on *channel-id
tensors*. Every parameter dimension index gets an integer id; an activation tensor
carries, for each element, the id of the channel it belongs to (``-1`` for values that
belong to no channel: token positions, masks, input ids). Data-movement ops (view,
transpose, cat, slice, expand, ...) are applied to the id tensor itself, so ids move
exactly as the data does. Ops that combine tensors record *pair constraints* between
the ids they line up:

* ``linear``/``conv``/``mm`` with a weight: input channel ids are united with the weight's
  input-dimension ids; the output carries the weight's output-dimension ids.
* elementwise ops (add, mul, ...): ids meeting at the same position are paired. A pairing
  that is one-to-one unites the two ids; one id meeting many (a broadcast norm weight, a
  key/value head repeated for several query heads) becomes their *parent*: it can only go
  when all of its children go.
* reductions over channels (the mean in RMSNorm, ``layer_norm``): all reduced ids are
  united, because removing a part of them changes the result.
* attention (``scaled_dot_product_attention`` or a matmul of two activations): each head
  slice is one unit; query heads pair with key/value heads (one-to-many with GQA).

Union-find over these constraints gives *atoms*: the smallest sets of parameter slices
that must be removed together. Atoms with the same parameter/dimension signature form a
:class:`~prunecli.graph.groups.Group`.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from prunecli.errors import UnsupportedModelError

aten = torch.ops.aten

NONE = -1


class UnionFind:
    """Union-find over non-negative integer ids with path halving."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra < rb:
            ra, rb = rb, ra
        self.parent[ra] = rb
        return rb

    def union_many(self, ids: list[int]) -> None:
        if len(ids) > 1:
            first = ids[0]
            for i in ids[1:]:
                self.union(first, i)


class ParamRef:
    """A parameter (or a transposed view of one) flowing through the graph.

    ``dims[k]`` is the parameter dimension that dimension ``k`` of this view shows.
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        bases: list[int],
        dims: tuple[int, ...],
        used: set[tuple[str, int]],
    ):
        self.name = name
        self.used = used  # (param, dim) pairs the traced computation touched
        self.shape = shape  # of the parameter itself
        self.bases = bases  # first id of each parameter dimension
        self.dims = dims

    @property
    def view_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[d] for d in self.dims)

    def dim_ids(self, k: int) -> Tensor:
        d = self.dims[k]
        self.used.add((self.name, d))
        return torch.arange(self.bases[d], self.bases[d] + self.shape[d], dtype=torch.long)

    def permuted(self, order: list[int]) -> ParamRef:
        return ParamRef(self.name, self.shape, self.bases, tuple(self.dims[i] for i in order), self.used)


class PairSite:
    """Ids lined up by one op: ``a[i]`` meets ``b[i]`` (distinct pairs only)."""

    __slots__ = ("pairs", "op")

    def __init__(self, pairs: Tensor, op: str):
        self.pairs = pairs  # (P, 2) long
        self.op = op


# Ops that only move data: applied to id tensors as they are.
_MOVE_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.transpose.int,
    aten.permute.default,
    aten.t.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.slice.Tensor,
    aten.select.int,
    aten.flatten.using_ints,
    aten.unflatten.int,
    aten.narrow.default,
    aten.movedim.int,
    aten.expand.default,
    aten.repeat.default,
    aten.index_select.default,
    aten.index.Tensor,
    aten.roll.default,
    aten.flip.default,
    aten.pixel_shuffle.default,
    aten.unfold.default,
}
_MULTI_OUT_MOVE_OPS = {
    aten.split.Tensor,
    aten.split_with_sizes.default,
    aten.chunk.default,
    aten.unbind.int,
    aten.tensor_split.sections,
    aten.tensor_split.indices,
}
# Ops that keep each element's channel (unary elementwise, casts, dropout in eval).
_IDENTITY_OPS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten._to_copy.default,
    aten.type_as.default,
    aten.contiguous.default,
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
    aten.dropout.default,
    aten.feature_dropout.default,
    aten.silu.default,
    aten.gelu.default,
    aten.relu.default,
    aten.relu6.default,
    aten.leaky_relu.default,
    aten.elu.default,
    aten.selu.default,
    aten.hardtanh.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.mish.default,
    aten.softplus.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.neg.default,
    aten.abs.default,
    aten.exp.default,
    aten.log.default,
    aten.sqrt.default,
    aten.rsqrt.default,
    aten.reciprocal.default,
    aten.sin.default,
    aten.cos.default,
    aten.erf.default,
    aten.square.default,
    aten.pow.Tensor_Scalar,
    aten.mul.Scalar,
    aten.add.Scalar,
    aten.sub.Scalar,
    aten.div.Scalar,
    aten.rsub.Scalar,
    aten.clamp.default,
    aten.clamp_min.default,
    aten.clamp_max.default,
    aten.nan_to_num.default,
    aten.fill.Scalar,
    aten.masked_fill.Scalar,
    aten.scalar_tensor.default,
    aten.silu_.default,
    aten.relu_.default,
    aten.gelu_.default,
    aten.tanh_.default,
    aten.zeros_like.default,
    aten.ones_like.default,
}
_ELEMENTWISE_OPS = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.div.Tensor_mode,
    aten.maximum.default,
    aten.minimum.default,
    aten.pow.Tensor_Tensor,
    aten.where.self,
    aten.masked_fill.Tensor,
    aten.rsub.Tensor,
    aten.add_.Tensor,
    aten.mul_.Tensor,
    aten.copy_.default,
    aten.copy.default,
    aten.lerp.Scalar,
    aten.addcmul.default,
}
# Reductions along explicit dims (dim argument at position 1).
_REDUCE_OPS = {
    aten.mean.dim,
    aten.sum.dim_IntList,
    aten.amax.default,
    aten.amin.default,
    aten.var.correction,
    aten.var.dim,
    aten.std.correction,
    aten.std.dim,
    aten.norm.ScalarOpt_dim,
    aten.linalg_vector_norm.default,
    aten.logsumexp.default,
    aten.max.dim,
    aten.min.dim,
    aten.var_mean.correction,
    aten.argmax.default,
}
# Ops along one dim that mix values of that dim but keep the shape.
_MIX_ALONG_DIM_OPS = {
    aten.softmax.int,
    aten._softmax.default,
    aten.log_softmax.int,
    aten._log_softmax.default,
    aten.cumsum.default,
}
# sort/topk reorder (and topk drops) values by their magnitude: which channel lands where
# depends on the data, so they are never modelled and lock what flows through them
# (they fall through to ``_unknown`` with the op's name as the reason).
# Ops whose outputs never carry channels (shapes, masks, constants).
_NO_CHANNEL_OPS = {
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.empty.memory_format,
    aten.new_ones.default,
    aten.new_zeros.default,
    aten.new_full.default,
    aten.eq.Tensor,
    aten.eq.Scalar,
    aten.ne.Tensor,
    aten.ne.Scalar,
    aten.lt.Tensor,
    aten.lt.Scalar,
    aten.le.Tensor,
    aten.le.Scalar,
    aten.gt.Tensor,
    aten.gt.Scalar,
    aten.ge.Tensor,
    aten.ge.Scalar,
    aten.__and__.Tensor,
    aten.__or__.Tensor,
    aten.logical_and.default,
    aten.logical_or.default,
    aten.logical_not.default,
    aten.bitwise_not.default,
    aten.diff.default,
    aten.tril.default,
    aten.triu.default,
    aten.isnan.default,
    aten.isinf.default,
    aten.any.default,
    aten.all.default,
    aten.sym_size.int,
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
    aten.scalar_tensor.default,
}


class _Tracer:
    """Walks an exported graph on real values and channel-id tensors at once."""

    def __init__(self, ep: torch.export.ExportedProgram, prefix: str) -> None:
        self.ep = ep
        self.prefix = prefix
        self.uf = UnionFind()
        self.param_bases: dict[str, list[int]] = {}
        self.param_shapes: dict[str, tuple[int, ...]] = {}
        self.sites: list[PairSite] = []
        self.locked: set[int] = set()
        self.lock_reasons: dict[int, str] = {}
        self.attention: list[dict[str, Any]] = []
        self.unknown_ops: dict[str, int] = defaultdict(int)
        self.used: set[tuple[str, int]] = set()
        self.current_module = ""
        self._by_storage: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}

    # -- ids -----------------------------------------------------------------------
    def register_param(self, name: str, value: Tensor) -> ParamRef:
        """Ids for every index of every dimension; tied tensors share one set of ids."""
        key = (value.data_ptr(), tuple(value.shape), tuple(value.stride()))
        name = self._by_storage.setdefault(key, name)
        shape = tuple(int(s) for s in value.shape)
        if name not in self.param_bases:
            self.param_bases[name] = [self.uf.add(s) for s in shape]
            self.param_shapes[name] = shape
        return ParamRef(name, shape, self.param_bases[name], tuple(range(len(shape))), self.used)

    def lock(self, ids: Tensor, reason: str) -> None:
        for i in torch.unique(ids).tolist():
            if i >= 0:
                self.locked.add(i)
                self.lock_reasons.setdefault(i, reason)

    @staticmethod
    def _distinct_pairs(a: Tensor, b: Tensor) -> Tensor | None:
        """Distinct (a, b) id pairs where both are channels, as an ``(P, 2)`` tensor."""
        a = a.reshape(-1)
        b = b.reshape(-1)
        keep = (a >= 0) & (b >= 0)
        if not bool(keep.any()):
            return None
        code = torch.unique(a[keep] * (1 << 31) + b[keep])  # ids stay below 2**31
        return torch.stack([code // (1 << 31), code % (1 << 31)], dim=1)

    def pair(self, a: Tensor, b: Tensor, op: str) -> None:
        """Record that ``a`` and ``b`` (same shape) meet position by position."""
        pairs = self._distinct_pairs(a, b)
        if pairs is not None:
            self.sites.append(PairSite(pairs, op))

    def unite_pairs(self, a: Tensor, b: Tensor) -> None:
        """Unconditional union of ids meeting position by position."""
        pairs = self._distinct_pairs(a, b)
        if pairs is not None:
            for x, y in pairs.tolist():
                self.uf.union(x, y)

    def unite_all(self, ids: Tensor) -> int:
        u = torch.unique(ids)
        u = u[u >= 0].tolist()
        self.uf.union_many(u)
        return u[0] if u else NONE

    # -- helpers -------------------------------------------------------------------
    def materialize(self, v: Any, like: Tensor | None = None) -> Tensor:
        """Id tensor for a value used where an activation is expected."""
        if isinstance(v, ParamRef):
            shape = v.view_shape
            big = [k for k, s in enumerate(shape) if s > 1]
            if len(big) == 1:
                k = big[0]
            elif like is not None and len(big) > 1:
                k = self._channel_dim_from_context(v, like)
            else:
                k = len(shape) - 1
            ids = v.dim_ids(k)
            view = [1] * len(shape)
            view[k] = shape[k]
            return ids.reshape(view).expand(shape).clone()
        if isinstance(v, Tensor) and v.dtype == torch.long and getattr(v, "_is_ids", False):
            return v
        raise TypeError("not an id value")

    def _channel_dim_from_context(self, ref: ParamRef, like: Tensor) -> int:
        shape = ref.view_shape
        offset = like.dim() - len(shape)
        for k in range(len(shape) - 1, -1, -1):
            if shape[k] <= 1 or k + offset < 0:
                continue
            moved = like.movedim(k + offset, -1).reshape(-1, like.shape[k + offset])
            rows = torch.unique(moved, dim=0)
            if bool((rows >= 0).any()) and bool((rows != rows[:, :1]).any()):
                return k
        return len(shape) - 1


def _ids(t: Tensor) -> Tensor:
    t = t.to(torch.long)
    t._is_ids = True  # type: ignore[attr-defined]
    return t


def _none_like(shape: torch.Size | tuple[int, ...]) -> Tensor:
    return _ids(torch.full(tuple(shape), NONE, dtype=torch.long))


def _is_ids(v: Any) -> bool:
    return isinstance(v, Tensor) and getattr(v, "_is_ids", False)


def _has_channels(v: Any) -> bool:
    if isinstance(v, ParamRef):
        return True
    if _is_ids(v):
        return bool((v >= 0).any())
    if isinstance(v, (list, tuple)):
        return any(_has_channels(x) for x in v)
    return False


def _tree_map(fn: Callable[[Any], Any], x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return type(x)(_tree_map(fn, y) for y in x)
    if isinstance(x, dict):
        return {k: _tree_map(fn, v) for k, v in x.items()}
    return fn(x)


def _val_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    v = node.meta.get("val")
    if isinstance(v, Tensor):
        return tuple(int(s) for s in v.shape)
    return None


def trace_channels(
    module: torch.nn.Module, args: tuple[Any, ...], prefix: str = ""
) -> tuple[_Tracer, torch.export.ExportedProgram]:
    """Export ``module`` and propagate channel ids through its graph.

    Args:
        module: a module whose forward takes ``args`` and returns tensors.
        args: example inputs (small: batch 1, a few tokens).
        prefix: qualified-name prefix to strip from parameter names (a wrapper's attribute).
    """
    try:
        ep = torch.export.export(module, args, strict=False)
    except Exception as e:  # noqa: BLE001 - export raises many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(
            f"unsupported: torch.export could not trace this model ({type(e).__name__}: {first[:200]})",
            hint="set PRUNECLI_DEBUG=1 for the full error",
        ) from e
    tr = _Tracer(ep, prefix)
    sig = ep.graph_signature
    to_param = dict(sig.inputs_to_parameters)
    to_param.update(sig.inputs_to_buffers)
    state = dict(ep.state_dict)
    state.update(getattr(ep, "constants", {}) or {})
    gm = ep.graph_module
    real: dict[torch.fx.Node, Any] = {}
    ids: dict[torch.fx.Node, Any] = {}
    user_args = list(args)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in to_param:
                fqn = to_param[node.name]
                value = state[fqn]
                name = fqn[len(prefix) :] if prefix and fqn.startswith(prefix) else fqn
                real[node] = value
                if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
                    ids[node] = tr.register_param(name, value)
                else:
                    ids[node] = _none_like(value.shape) if isinstance(value, Tensor) else None
            elif node.name in getattr(sig, "inputs_to_lifted_tensor_constants", {}):
                value = state[sig.inputs_to_lifted_tensor_constants[node.name]]
                real[node] = value
                ids[node] = _none_like(value.shape)
            else:
                value = user_args.pop(0)
                real[node] = value
                ids[node] = _none_like(value.shape) if isinstance(value, Tensor) else None
            continue
        if node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
            for v in (ids.get(a) for a in outs if isinstance(a, torch.fx.Node)):
                if _is_ids(v):
                    tr.lock(v, "reaches the model output")
                elif isinstance(v, ParamRef):
                    for k in range(len(v.dims)):
                        tr.lock(v.dim_ids(k), "reaches the model output")
            continue
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            real[node] = value
            ids[node] = None
            continue
        if node.op != "call_function":
            raise UnsupportedModelError(f"unsupported: graph node kind {node.op!r}")
        rargs = torch.fx.node.map_arg(node.args, lambda n: real[n])
        rkwargs = torch.fx.node.map_arg(node.kwargs, lambda n: real[n])
        iargs = torch.fx.node.map_arg(node.args, lambda n: ids.get(n))
        ikwargs = torch.fx.node.map_arg(node.kwargs, lambda n: ids.get(n))
        target = node.target
        if target is operator.getitem:
            real[node] = rargs[0][rargs[1]]
            src = iargs[0]
            ids[node] = src[rargs[1]] if isinstance(src, (list, tuple)) else None
            continue
        if _is_higher_order(target):
            tr.unknown_ops[str(target)] += 1
            raise UnsupportedModelError(
                f"unsupported: control flow or higher-order op {target} in the traced graph",
            )
        out = target(*rargs, **rkwargs)
        real[node] = out
        tr.current_module = _module_of(node)
        ids[node] = _propagate(tr, node, target, rargs, rkwargs, iargs, ikwargs, out)
    return tr, ep


def _is_higher_order(target: Any) -> bool:
    return type(target).__name__ in {"HigherOrderOperator"} or "higher_order" in str(type(target))


def _out_none(out: Any) -> Any:
    if isinstance(out, Tensor):
        return _none_like(out.shape)
    if isinstance(out, (list, tuple)):
        return type(out)(_out_none(o) for o in out)
    return None


def _sub_ids(tr: _Tracer, iargs: Any, rargs: Any, like: Tensor | None = None) -> Any:
    """Replace real tensors in an argument tree by id tensors (``-1`` where none)."""

    def conv(pair: tuple[Any, Any]) -> Any:
        i, r = pair
        if _is_ids(i):
            return i
        if isinstance(i, ParamRef):
            return tr.materialize(i, like)
        if isinstance(r, Tensor):
            return _none_like(r.shape)
        return r

    def zip_tree(i: Any, r: Any) -> Any:
        if isinstance(r, (list, tuple)) and not isinstance(i, Tensor):
            ii = i if isinstance(i, (list, tuple)) else [None] * len(r)
            return type(r)(zip_tree(a, b) for a, b in zip(ii, r))
        return conv((i, r))

    return zip_tree(iargs, rargs)


def _propagate(
    tr: _Tracer,
    node: torch.fx.Node,
    target: Any,
    rargs: tuple[Any, ...],
    rkwargs: dict[str, Any],
    iargs: tuple[Any, ...],
    ikwargs: dict[str, Any],
    out: Any,
) -> Any:
    if not _has_channels(list(iargs) + list(ikwargs.values())):
        return _out_none(out)
    if target in _NO_CHANNEL_OPS:
        return _out_none(out)
    name = str(target)

    # Views of parameters stay parameter references.
    if isinstance(iargs[0], ParamRef) and target in {
        aten.t.default,
        aten.transpose.int,
        aten.permute.default,
    }:
        ref: ParamRef = iargs[0]
        n = len(ref.dims)
        if target is aten.permute.default:
            order = [d % n for d in rargs[1]]
        else:
            order = list(range(n))
            if target is aten.t.default:
                order = order[::-1]
            else:
                a, b = rargs[1] % n, rargs[2] % n
                order[a], order[b] = order[b], order[a]
        return ref.permuted(order)

    if target is aten.linear.default:
        x, w = iargs[0], iargs[1]
        b = iargs[2] if len(iargs) > 2 else ikwargs.get("bias")
        if isinstance(w, ParamRef):
            return _linear(tr, x, w, b, out, in_dim_k=1, out_dim_k=0)
        return _act_matmul(
            tr, iargs[0], tr.materialize(w) if isinstance(w, ParamRef) else w, out, transpose_b=True
        )
    if target in {aten.mm.default, aten.matmul.default, aten.bmm.default, aten.addmm.default}:
        if target is aten.addmm.default:
            bias, x, w = iargs[0], iargs[1], iargs[2]
        else:
            bias, x, w = None, iargs[0], iargs[1]
        if isinstance(w, ParamRef) and len(w.dims) == 2 and not isinstance(x, ParamRef):
            return _linear(tr, x, w, bias, out, in_dim_k=0, out_dim_k=1)
        xa = _sub_ids(tr, x, rargs[1] if bias is not None else rargs[0])
        wa = _sub_ids(tr, w, rargs[2] if bias is not None else rargs[1])
        res = _act_matmul(tr, xa, wa, out, transpose_b=False)
        if bias is not None and _has_channels(bias):
            tr.pair(_sub_ids(tr, bias, rargs[0]).expand(out.shape), res, name)
        return res
    if target in {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default}:
        return _conv(tr, rargs, iargs, out)
    if target is aten.embedding.default:
        w = iargs[0]
        if not isinstance(w, ParamRef):
            return _out_none(out)
        tr.lock(w.dim_ids(0), "embedding rows (vocabulary)")
        cid = w.dim_ids(1)
        return _ids(cid.expand(out.shape).clone())
    if target in {aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default}:
        return _norm(tr, target, rargs, iargs, out)
    if target in {
        aten.batch_norm.default,
        aten._native_batch_norm_legit_no_training.default,
        aten.instance_norm.default,
    }:
        x = iargs[0]
        xi = _sub_ids(tr, x, rargs[0])
        ch = xi.movedim(1, -1).reshape(-1, xi.shape[1])
        for k in range(1, 5):
            p = iargs[k] if k < len(iargs) else None
            if isinstance(p, ParamRef):
                tr.unite_pairs(ch, p.dim_ids(0).expand_as(ch))
        res = _ids(xi.clone())
        return (res, _none_like(out[1].shape), _none_like(out[2].shape)) if isinstance(out, tuple) else res
    if target is aten.scaled_dot_product_attention.default:
        return _sdpa(tr, node, rargs, rkwargs, iargs, ikwargs, out)

    if target is aten.constant_pad_nd.default:
        # padded positions (spatial, or new channels) belong to no channel
        xi = _sub_ids(tr, iargs[0], rargs[0])
        return _ids(torch.nn.functional.pad(xi, list(rargs[1]), value=NONE))

    if target in _IDENTITY_OPS:
        src = iargs[0]
        if not _has_channels(src):
            return _out_none(out)
        xi = _sub_ids(tr, src, rargs[0])
        if isinstance(out, Tensor) and tuple(xi.shape) == tuple(out.shape):
            return _ids(xi.clone())
        if isinstance(out, Tensor) and xi.numel() == 1:
            return _ids(xi.reshape(()).expand(out.shape).clone())
        return _unknown(tr, name, iargs, rargs, out)

    if (
        target in _MOVE_OPS
        or target in _MULTI_OUT_MOVE_OPS
        or target in {aten.cat.default, aten.stack.default}
    ):
        if target in {aten.cat.default, aten.stack.default}:
            like = next((i for i in iargs[0] if _is_ids(i)), None)
            parts = [_sub_ids(tr, i, r, like) for i, r in zip(iargs[0], rargs[0])]
            res = target(parts, *rargs[1:], **rkwargs)
            return _ids(res)
        xi = _sub_ids(tr, iargs[0], rargs[0])
        res = target(xi, *rargs[1:], **rkwargs)
        if isinstance(res, (list, tuple)):
            return type(res)(_ids(r.clone()) for r in res)
        return _ids(res.clone())

    if target in _ELEMENTWISE_OPS:
        return _elementwise(tr, name, iargs, rargs, out)

    if target in _REDUCE_OPS:
        xi = _sub_ids(tr, iargs[0], rargs[0])
        dims = rargs[1] if len(rargs) > 1 else rkwargs.get("dim")
        keepdim = (
            bool(rargs[2])
            if len(rargs) > 2 and isinstance(rargs[2], bool)
            else bool(rkwargs.get("keepdim", False))
        )
        if target in {aten.var.correction, aten.std.correction, aten.var_mean.correction}:
            keepdim = bool(rkwargs.get("keepdim", False))
        res = _reduce(tr, xi, dims, keepdim)
        if isinstance(out, (list, tuple)):
            return type(out)(_ids(res.reshape(o.shape).clone()) for o in out)
        return _ids(res.reshape(out.shape))

    if target in _MIX_ALONG_DIM_OPS:
        xi = _sub_ids(tr, iargs[0], rargs[0])
        dim = rargs[1] if len(rargs) > 1 else rkwargs.get("dim", -1)
        red = _reduce(tr, xi, dim, keepdim=True)
        res = _ids(red.expand(xi.shape).clone())
        if isinstance(out, (list, tuple)):
            return (res,) + tuple(_none_like(o.shape) for o in out[1:])
        return res

    return _unknown(tr, name, iargs, rargs, out)


def _unknown(tr: _Tracer, name: str, iargs: Any, rargs: Any, out: Any) -> Any:
    """An op the tracer does not model: its channels are locked, never guessed."""
    tr.unknown_ops[name] += 1
    for v in iargs if isinstance(iargs, (list, tuple)) else [iargs]:
        if _is_ids(v):
            tr.lock(v, f"flows through unsupported op {name}")
        elif isinstance(v, ParamRef):
            for k in range(len(v.dims)):
                tr.lock(v.dim_ids(k), f"used by unsupported op {name}")
        elif isinstance(v, (list, tuple)):
            _unknown(tr, name, v, None, None)
    return _out_none(out) if out is not None else None


def _linear(tr: _Tracer, x: Any, w: ParamRef, b: Any, out: Tensor, in_dim_k: int, out_dim_k: int) -> Tensor:
    """``out[..., o] = sum_i x[..., i] * w[o, i]`` with ``w`` viewed so that ``in_dim_k`` is i."""
    in_ids = w.dim_ids(in_dim_k)
    out_ids = w.dim_ids(out_dim_k)
    if _is_ids(x):
        xi = x.reshape(-1, x.shape[-1])
        none_cols = (xi < 0).all(dim=0)
        if bool(none_cols.any()):
            tr.lock(in_ids[none_cols], "input columns fed by no prunable channel")
        tr.unite_pairs(xi, in_ids.expand_as(xi))
    else:
        tr.lock(in_ids, "input columns fed by no prunable channel")
    if isinstance(b, ParamRef):
        tr.unite_pairs(b.dim_ids(0), out_ids)
    elif _is_ids(b):
        tr.pair(b.expand(out.shape), out_ids.expand(out.shape), "linear bias")
    return _ids(out_ids.expand(out.shape).clone())


def _conv(tr: _Tracer, rargs: Any, iargs: Any, out: Tensor) -> Tensor:
    x, w = iargs[0], iargs[1]
    b = iargs[2] if len(iargs) > 2 else None
    if not isinstance(w, ParamRef):
        return _unknown(tr, "convolution with a computed weight", iargs, rargs, out)
    transposed = bool(rargs[6]) if len(rargs) > 6 and isinstance(rargs[6], bool) else False
    groups = rargs[-1] if isinstance(rargs[-1], int) else 1
    if transposed:
        return _unknown(tr, "transposed convolution", iargs, rargs, out)
    out_ids = w.dim_ids(0)
    in_ids = w.dim_ids(1)
    cin = x.shape[1] if _is_ids(x) else rargs[0].shape[1]
    if _is_ids(x):
        xc = x.movedim(1, -1).reshape(-1, cin)
        none_cols = (xc < 0).all(dim=0)
        per_in = cin // groups  # input channels each group reads (weight dim 1)
        per_out = w.shape[0] // groups  # output channels each group writes
        if groups == 1:
            if bool(none_cols.any()):
                tr.lock(in_ids[none_cols], "input channels fed by no prunable channel")
            tr.unite_pairs(xc, in_ids.expand_as(xc))
        elif per_in == 1:
            # depthwise (channel multiplier per_out): group c is input channel c and output
            # channels c*per_out .. (c+1)*per_out-1; the group is the unit, removing one
            # lowers ``groups``
            by_group = out_ids.reshape(groups, per_out)
            for k in range(per_out):
                tr.unite_pairs(xc, by_group[:, k].expand_as(xc))
            if bool(none_cols.any()):
                tr.lock(by_group[none_cols].reshape(-1), "depthwise channels fed by no prunable channel")
            tr.lock(in_ids, "depthwise kernel dimension")
        else:
            # general groups: input channel c meets weight column c % per_in and output row
            # o belongs to group o // per_out. Removing the same position from every group
            # keeps ``groups`` and is exact, so a position is one unit across all groups.
            pos_in = torch.arange(cin) % per_in
            if bool(none_cols.any()):
                tr.lock(in_ids[pos_in[none_cols]], "input channels fed by no prunable channel")
            tr.unite_pairs(xc, in_ids[pos_in].expand_as(xc))
            by_group = out_ids.reshape(groups, per_out)
            for k in range(1, groups):
                tr.unite_pairs(by_group[0], by_group[k])
    else:
        tr.lock(in_ids, "input channels fed by no prunable channel")
        if groups > 1 and cin // groups == 1:
            tr.lock(out_ids, "depthwise channels fed by no prunable channel")
    if isinstance(b, ParamRef):
        tr.unite_pairs(b.dim_ids(0), out_ids)
    shape = [1] * out.dim()
    shape[1] = out.shape[1]
    return _ids(out_ids.reshape(shape).expand(out.shape).clone())


def _norm(tr: _Tracer, target: Any, rargs: Any, iargs: Any, out: Any) -> Any:
    x = _sub_ids(tr, iargs[0], rargs[0])
    if target is aten.group_norm.default:
        groups = rargs[1]
        c = x.shape[1]
        xc = x.movedim(1, -1).reshape(-1, c)
        for g in range(groups):
            tr.unite_all(xc[:, g * (c // groups) : (g + 1) * (c // groups)])
        params = [iargs[2] if len(iargs) > 2 else None, iargs[3] if len(iargs) > 3 else None]
        for p in params:
            if isinstance(p, ParamRef):
                tr.unite_pairs(xc, p.dim_ids(0).expand_as(xc))
        return _ids(x.clone())
    shape = rargs[1]
    flat = x.reshape(-1, math.prod(shape))
    # the normalisation couples every channel it averages over
    rows = torch.unique(flat, dim=0)
    for r in rows:
        tr.unite_all(r)
    params = [iargs[2] if len(iargs) > 2 else None, iargs[3] if len(iargs) > 3 else None]
    for p in params:
        if isinstance(p, ParamRef):
            pid = tr.materialize(p).reshape(-1)
            tr.unite_pairs(flat, pid.expand_as(flat))
    res = _ids(x.clone())
    if isinstance(out, tuple):
        return (res,) + tuple(_none_like(o.shape) for o in out[1:])
    return res


def _elementwise(tr: _Tracer, name: str, iargs: Any, rargs: Any, out: Any) -> Tensor:
    tensors: list[Tensor] = []
    like = next((i for i in iargs if _is_ids(i)), None)
    for i, r in zip(iargs, rargs):
        if _is_ids(i) or isinstance(i, ParamRef):
            tensors.append(_sub_ids(tr, i, r, like))
        elif isinstance(r, Tensor):
            tensors.append(_none_like(r.shape))
    if not tensors:
        return _out_none(out)
    shape = tuple(out.shape)
    tensors = [t.expand(shape) if tuple(t.shape) != shape else t for t in tensors if t.dim() <= len(shape)]
    with_ch = [t for t in tensors if bool((t >= 0).any())]
    if len(with_ch) == 1:
        return _ids(with_ch[0].clone())
    # finer operand (more distinct channels) names the output
    with_ch.sort(key=lambda t: -int(torch.unique(t).numel()))
    res = with_ch[0].clone()
    for t in with_ch[1:]:
        tr.pair(res, t, name)
        fill = res < 0
        res[fill] = t[fill]
    return _ids(res)


def _reduce(tr: _Tracer, xi: Tensor, dims: Any, keepdim: bool) -> Tensor:
    if dims is None:
        dims = list(range(xi.dim()))
    if isinstance(dims, int):
        dims = [dims]
    dims = sorted(d % xi.dim() for d in dims) if xi.dim() else []
    if not dims:
        return xi
    keep = [d for d in range(xi.dim()) if d not in dims]
    moved = xi.permute(*keep, *dims)
    kshape = [xi.shape[d] for d in keep]
    flat = moved.reshape(math.prod(kshape) if kshape else 1, -1)
    rows, inverse = torch.unique(flat, dim=0, return_inverse=True)
    reps = []
    for r in rows:
        reps.append(tr.unite_all(r))
    rep = torch.tensor(reps, dtype=torch.long)[inverse]
    res = rep.reshape(kshape) if kshape else rep.reshape(())
    if keepdim:
        for d in dims:
            res = res.unsqueeze(d)
    return res


def _head_slices(t: Tensor) -> Tensor:
    """``[..., H, T, D]`` -> ``[B*H, T*D]`` rows, one per batch/head slice."""
    return t.reshape(-1, t.shape[-2] * t.shape[-1])


def _act_matmul(tr: _Tracer, a: Any, b: Any, out: Tensor, transpose_b: bool) -> Tensor:
    """Matmul of two activations: every batch slice (head) of each operand is one unit.

    Query slices pair with key/value slices; a key/value slice shared by several query
    slices (grouped-query attention) becomes their parent.
    """
    a = a if _is_ids(a) else _none_like(a.shape)
    b = b if _is_ids(b) else _none_like(b.shape)
    if transpose_b:
        b = b.transpose(-1, -2)
    if a.dim() < 2 or b.dim() < 2:
        return _unknown(tr, "matmul of vectors", [a, b], None, out)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    ar = a.reshape(-1, a.shape[-2] * a.shape[-1])
    br = b.reshape(-1, b.shape[-2] * b.shape[-1])
    a_rep = torch.tensor([tr.unite_all(r) for r in ar], dtype=torch.long)
    b_rep = torch.tensor([tr.unite_all(r) for r in br], dtype=torch.long)
    tr.pair(a_rep, b_rep, "attention")
    if len(batch) >= 2 and bool((a_rep >= 0).all()) and bool((b_rep >= 0).all()):
        heads = batch[-1]
        tr.attention.append(
            {
                "module": tr.current_module,
                "q": a_rep.reshape(-1, heads)[0].clone(),
                "k": b_rep.reshape(-1, heads)[0].clone(),
                "head_dim": a.shape[-1],
            }
        )
    rep = torch.where(a_rep >= 0, a_rep, b_rep)
    return _ids(rep.reshape(*batch, 1, 1).expand(out.shape).clone())


def _sdpa(tr: _Tracer, node: Any, rargs: Any, rkwargs: Any, iargs: Any, ikwargs: Any, out: Tensor) -> Tensor:
    q = _sub_ids(tr, iargs[0], rargs[0])
    k = _sub_ids(tr, iargs[1], rargs[1])
    v = _sub_ids(tr, iargs[2], rargs[2])
    hq, hk = q.shape[-3], k.shape[-3]
    if hq % hk:
        return _unknown(tr, "attention with uneven key/value heads", [q, k, v], None, out)
    rep = hq // hk
    # [B, H, T, D] -> one representative id per (batch, head)
    qs = torch.tensor([tr.unite_all(r) for r in _head_slices(q)], dtype=torch.long).reshape(q.shape[:-2])
    ks = torch.tensor([tr.unite_all(r) for r in _head_slices(k)], dtype=torch.long).reshape(k.shape[:-2])
    vs = torch.tensor([tr.unite_all(r) for r in _head_slices(v)], dtype=torch.long).reshape(v.shape[:-2])
    # a key head and its value head are one unit: they serve the same query heads
    tr.unite_pairs(ks, vs)
    ks = ks.repeat_interleave(rep, dim=-1)
    vs = vs.repeat_interleave(rep, dim=-1)
    tr.pair(qs, ks, "attention")
    tr.attention.append(
        {
            "module": _module_of(node),
            "q": qs.reshape(-1, hq)[0].clone(),
            "k": ks.reshape(-1, hq)[0].clone(),
            "head_dim": q.shape[-1],
        }
    )
    return _ids(qs.reshape(*qs.shape, 1, 1).expand(out.shape).clone())


def _module_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path
