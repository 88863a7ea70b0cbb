"""Groups of coupled channels of an ONNX model: :func:`build_onnx_graph`.

The same channel-id propagation as the torch tracer (:mod:`prunecli.graph.trace`), run over
the nodes of an ONNX graph instead of an ATen graph, in the spirit of "Structurally Prune
Anything" (Wang et al., 2024): groups come from a framework-neutral graph. The model is run
once in onnxruntime with every intermediate value exposed as an extra output, which gives
the real values that shapes, slices and index tensors need; then every node is replayed on
*channel-id tensors* with a rule per ONNX op:

* ``MatMul``/``Gemm`` with an initializer weight, ``Conv`` (``group`` included): input ids
  meet the weight's input dimension, the output carries its output dimension.
* ``Add``/``Sub``/``Mul``/``Div``/``Pow``/``Where``/...: ids meeting at one position are
  united (one-to-one) or become parents (broadcast); residual additions couple streams.
* ``Concat``/``Split``/``Slice``/``Reshape``/``Transpose``/``Gather``/``Expand``/...: the ids
  move exactly as the data does (head split/merge is a Reshape + Transpose).
* ``LayerNormalization`` and ``ReduceMean``-based norms, ``Softmax``, reductions: every
  reduced id is united with the others (removing part of them changes the result).
* ``MatMul`` of two activations: each head slice is a unit; query heads pair with key/value
  heads (one-to-many with grouped-query attention), which gives an ``AttentionSite``.
* An op without a rule locks every channel reaching it, with the reason
  ``unsupported ONNX op <OpType> (<node name>)``.

Union-find over these constraints gives atoms, and atoms give the same
:class:`~prunecli.graph.groups.Group` / :class:`~prunecli.graph.build.DependencyGraph` objects
as the torch path, so methods do not know which one they run on.

Parameters are named ``<module>.<leaf>`` where ``<module>`` is the torch module the exporter
recorded for the consuming node (``pkg.torch.onnx.name_scopes`` metadata) or the node's name,
so ``model.layers.0.mlp.down_proj.weight`` reads as it does in PyTorch. Weights are seen in
PyTorch orientation: an initializer used as the right operand of ``MatMul`` (``[in, out]``) is
a ``[out, in]`` parameter whose member dims are mapped back when the file is rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from prunecli.errors import InputError, UnsupportedModelError
from prunecli.graph.build import DependencyGraph, Naming, _check_heads, _groups_from_table, _table_from_trace
from prunecli.graph.trace import (
    NONE,
    ParamRef,
    _act_matmul,
    _conv,
    _elementwise,
    _has_channels,
    _ids,
    _is_ids,
    _linear,
    _none_like,
    _norm,
    _reduce,
    _Tracer,
)

aten = torch.ops.aten

# Ops whose output keeps each element's channel (same shape as the first input).
_IDENTITY = {
    "Identity", "Cast", "CastLike", "Dropout", "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Sqrt",
    "Reciprocal", "Neg", "Exp", "Log", "Abs", "Sin", "Cos", "Softplus", "Softsign", "LeakyRelu",
    "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish", "Clip", "Floor", "Ceil", "Round",
    "Sign", "ThresholdedRelu", "Not",
}  # fmt: skip
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Mod", "Sum", "Mean", "PRelu"}
# Ops whose outputs never carry channels (shapes, masks, comparisons).
_NO_CHANNEL = {
    "Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "NonZero", "IsNaN", "IsInf", "Equal",
    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Constant", "BitShift",
    "RandomNormalLike", "RandomUniformLike",
}  # fmt: skip
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_REDUCE = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
    "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin",
}  # fmt: skip
_MIX_ALONG = {"Softmax", "LogSoftmax", "Hardmax", "CumSum"}
_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
# Ops whose initializer inputs are weights (registered as parameters): input positions.
_WEIGHT_INPUTS = {
    "MatMul": (1,),
    "Gemm": (1, 2),
    "Conv": (1, 2),
    "Gather": (0,),
    "LayerNormalization": (1, 2),
    "RMSNormalization": (1,),
    "SimplifiedLayerNormalization": (1,),
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
    "PRelu": (1,),
}
_DOTTED = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+$")


@dataclasses.dataclass
class OnnxParam:
    """Where a graph parameter lives in the ONNX file.

    Args:
        initializer: the initializer's name.
        transposed: the parameter is the initializer transposed (a ``MatMul`` right operand
            ``[in, out]``, or ``Gemm`` with ``transB=0``, seen as ``[out, in]``).
    """

    initializer: str
    transposed: bool = False

    def onnx_dim(self, dim: int) -> int:
        return 1 - dim if self.transposed else dim


class OnnxGraph(DependencyGraph):
    """A :class:`DependencyGraph` built from an ONNX model (see the module docstring).

    Extra attributes:
        params: graph parameter name -> :class:`OnnxParam`.
        observe_sites: module name -> ``(value name, channel axis)``: the activation entering
            that module's weight op, which calibration exposes as an extra graph output.
        module_nodes: module name -> the ONNX node (by name) that applies its weight.
        inputs: ``(name, numpy dtype, shape)`` of each graph input the model was traced with.
    """

    params: dict[str, OnnxParam]
    observe_sites: dict[str, tuple[str, int]]
    module_nodes: dict[str, str]
    inputs: list[tuple[str, Any, tuple[int, ...]]]
    _trace: _TraceState


def load_onnx(path: str | os.PathLike[str]) -> Any:
    """Load an ONNX file (external data included) or raise :class:`InputError`.

    Raises:
        InputError: no such file, or not a valid ONNX model.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise InputError(f"ONNX file not found: {p}")
    try:
        model = onnx.load(os.fspath(p))
        onnx.checker.check_model(model if model.ByteSize() < 2_000_000_000 else os.fspath(p))
    except Exception as e:  # noqa: BLE001 - protobuf and the checker raise many types
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(
            f"not a valid ONNX model: {p} ({type(e).__name__}: {first})",
            hint="check that the file is a complete .onnx export",
        ) from None
    if not len(model.graph.node):
        raise InputError(f"the ONNX model {p} has no nodes")
    return model


def onnx_fingerprint(model: Any) -> str:
    """Hash of the initializer names and shapes (what a plan must match)."""
    h = hashlib.sha256()
    for init in model.graph.initializer:
        h.update(f"{init.name}:{tuple(init.dims)};".encode())
    return h.hexdigest()[:16]


def graph_inputs(model: Any) -> list[Any]:
    """The graph inputs that are not initializers."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def example_feed(model: Any, batch: int = 1, seq: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A small input for every graph input: token ids (int), ones (``attention_mask``), or
    standard-normal floats; dynamic dimensions get ``batch`` (first) and ``seq`` (others)."""
    from onnx import helper

    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for inp in graph_inputs(model):
        tt = inp.type.tensor_type
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        shape = []
        for k, d in enumerate(tt.shape.dim):
            shape.append(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (batch if k == 0 else seq)
            )
        if np.issubdtype(dtype, np.integer):
            if "mask" in inp.name:
                feed[inp.name] = np.ones(shape, dtype=dtype)
            elif "type" in inp.name:
                feed[inp.name] = np.zeros(shape, dtype=dtype)
            else:
                feed[inp.name] = rng.integers(1, _vocab_bound(model), size=shape).astype(dtype)
        elif dtype == np.bool_:
            feed[inp.name] = np.ones(shape, dtype=dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def _vocab_bound(model: Any) -> int:
    """Upper bound for example token ids: the rows of the smallest Gather table fed by an input."""
    inputs = {i.name for i in graph_inputs(model)}
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    bound = 1000
    for n in model.graph.node:
        if n.op_type == "Gather" and len(n.input) > 1 and n.input[1] in inputs and n.input[0] in inits:
            bound = min(bound, inits[n.input[0]][0])
    return max(2, bound)


def _session(model: Any, outputs: list[str] | None = None) -> Any:
    """An onnxruntime session on ``model`` (optionally with extra outputs)."""
    import onnx
    import onnxruntime as ort

    if outputs:
        model = _with_outputs(model, outputs)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if model.ByteSize() < 2_000_000_000 else None
    if data is None:
        import tempfile

        tmp = tempfile.mkdtemp()
        path = os.path.join(tmp, "m.onnx")
        onnx.save(model, path, save_as_external_data=True)
        return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _with_outputs(model: Any, names: list[str]) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=n))
            have.add(n)
    return m


def _scope(node: Any) -> str:
    """The torch module the exporter recorded for ``node``, else its sanitised name."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                import ast

                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                break
            cur = ""
            for e in scopes:
                if not e:
                    continue
                if cur == "" or e.startswith(cur + "."):
                    cur = e
                else:
                    break
            if cur:
                return cur
    return _clean(node.name or node.output[0])


def _clean(name: str) -> str:
    parts = [re.sub(r"[^\w/:-]", "_", p) for p in re.split(r"[./]", name) if p]
    return ".".join(parts) or "node"


_SMALL = 4096  # initializers and values up to this size are kept as arrays


@dataclasses.dataclass
class _Shaped:
    """A large initializer seen only through its shape and dtype (its data stays in the proto)."""

    shape: tuple[int, ...]
    dtype: Any

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _is_float_init(arr: Any) -> bool:
    return np.issubdtype(arr.dtype, np.floating) and arr.ndim > 0 and arr.size > 1


class _OnnxTracer(_Tracer):
    def __init__(self) -> None:
        super().__init__(None, "")  # type: ignore[arg-type]
        self.roles: dict[tuple[str, int], str] = {}

    def register_param(self, name: str, value: Tensor) -> ParamRef:
        """Ids for every index of every dimension (an initializer used twice is one name)."""
        shape = tuple(int(s) for s in value.shape)
        if name not in self.param_bases:
            self.param_bases[name] = [self.uf.add(s) for s in shape]
            self.param_shapes[name] = shape
        return ParamRef(name, shape, self.param_bases[name], tuple(range(len(shape))), self.used)


def build_onnx_graph(model: Any, feed: dict[str, np.ndarray] | None = None) -> OnnxGraph:
    """Find the groups of coupled channels of an ONNX model.

    Args:
        model: an ``onnx.ModelProto`` (see :func:`load_onnx`).
        feed: the inputs to trace with (default: :func:`example_feed`, batch 1, 6 positions).

    Returns:
        The :class:`OnnxGraph`.

    Raises:
        UnsupportedModelError: onnxruntime cannot run the model.

    Example:
        >>> graph = build_onnx_graph(load_onnx("model.onnx"))  # doctest: +SKIP
        >>> [g.name for g in graph.prunable()][:1]             # doctest: +SKIP
        ['model.layers.0.mlp:channels']
    """
    from onnx import helper, numpy_helper

    feed = feed if feed is not None else example_feed(model)
    g = model.graph
    values = [o for n in g.node for o in n.output if o]
    try:
        sess = _session(model, values)
        out_names = [o.name for o in sess.get_outputs()]
        real_list = sess.run(out_names, feed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = " ".join(str(e).split())[:200]
        raise UnsupportedModelError(f"onnxruntime cannot run this model: {first}") from None
    real: dict[str, Any] = dict(zip(out_names, real_list))
    real.update(feed)
    # weights are only needed for their shapes; small initializers (shape operands) are read
    inits: dict[str, Any] = {
        i.name: numpy_helper.to_array(i)
        if math.prod(i.dims) <= _SMALL
        else _Shaped(tuple(i.dims), helper.tensor_dtype_to_np_dtype(i.data_type))
        for i in g.initializer
    }
    real.update(inits)

    params, module_of_init, prefix = _name_params(model, inits)
    tr = _OnnxTracer()
    refs: dict[str, ParamRef] = {}
    for init_name, (pname, info) in params.items():
        arr = inits[init_name]
        shape = arr.shape[::-1] if info.transposed else arr.shape
        ref = tr.register_param(pname, torch.empty(shape, device="meta"))
        refs[init_name] = ref.permuted([1, 0]) if info.transposed else ref
    ids: dict[str, Any] = {}
    for name in real:
        if name in refs:
            ids[name] = refs[name]
    observe: dict[str, tuple[str, int]] = {}
    module_nodes: dict[str, str] = {}
    opset = {o.domain or "": o.version for o in model.opset_import}.get("", 13)
    for node in g.node:
        tr.current_module = _scope(node)
        for name in node.input:
            if name and name not in ids and name in real:
                ids[name] = _none_like(np.shape(real[name]))  # a constant or a non-channel input
        rin = [real.get(i) if i else None for i in node.input]
        rout = [real.get(o) if o else None for o in node.output]
        iin = [ids.get(i) if i else None for i in node.input]
        if any(r is None for r, o in zip(rout, node.output) if o):
            outs = _unknown(tr, node, iin, rout)
        else:
            outs = _propagate(tr, node, rin, iin, rout, opset, observe, module_nodes)
        for o, v in zip(node.output, outs):
            if o:
                ids[o] = v
    for out in g.output:
        v = ids.get(out.name)
        if _is_ids(v):
            tr.lock(v, "reaches the model output")
        elif isinstance(v, ParamRef):
            for k in range(len(v.dims)):
                tr.lock(v.dim_ids(k), "reaches the model output")

    table = _table_from_trace(tr)
    order = {pname: i for i, (pname, _) in enumerate(params.values())}
    naming = Naming(order=order, role=_role_fn(tr), layer=_layer_of)
    dep = _groups_from_table(None, table, onnx_fingerprint(model), naming)
    _check_heads(dep.groups, dep.attention)
    _dedupe_sites(dep)
    for a in dep.attention:
        a.module = a.module.removeprefix(prefix + ".") if prefix else a.module
    graph = OnnxGraph(dep.groups, dep.attention, dep.fingerprint, dep.unknown_ops)
    graph.params = {pname: info for pname, info in params.values()}
    graph.observe_sites = observe
    graph.module_nodes = module_nodes
    graph.inputs = [(k, v.dtype, tuple(v.shape)) for k, v in feed.items()]
    graph.example_inputs = (feed,)
    graph._trace = _TraceState(
        tr,
        {k: v for k, v in ids.items() if _is_ids(v)},
        {k: v for k, v in real.items() if np.size(v) <= _SMALL and isinstance(v, np.ndarray)},
        {k: tuple(int(d) for d in np.shape(v)) for k, v in real.items()},
        module_of_init,
    )
    return graph


@dataclasses.dataclass
class _TraceState:
    """What :func:`~prunecli.onnx.apply.apply_plan_onnx` needs from the trace."""

    tracer: _OnnxTracer
    value_ids: dict[str, Tensor]  # value name -> raw id tensor
    real: dict[str, np.ndarray]  # small real values (shape operands, slice bounds)
    shapes: dict[str, tuple[int, ...]]  # the shape of every value
    module_of_init: dict[str, str]

    def roots(self) -> np.ndarray:
        uf = self.tracer.uf
        return np.array([uf.find(i) for i in range(len(uf.parent))], dtype=np.int64)


def _dedupe_sites(dep: DependencyGraph) -> None:
    """The score and value matmuls of one attention are one site (same head group); with
    grouped-query attention the key/value heads are the parent group of the query heads
    (the repeated copies that the matmuls see are the query heads' own), named ``:kv_heads``."""
    renames: dict[str, str] = {}
    for name, g in list(dep.groups.items()):
        if g.kind == "kv_heads" and not name.endswith(":kv_heads"):
            new = f"{g.module}:kv_heads"
            if new not in dep.groups:
                renames[name] = new
    if renames:
        dep.groups = {renames.get(k, k): v for k, v in dep.groups.items()}
        for name, g in dep.groups.items():
            g.name = name
            if g.parent in renames:
                g.parent = renames[g.parent]
    seen: set[str] = set()
    kept = []
    for a in dep.attention:
        if a.heads in seen:
            continue
        seen.add(a.heads)
        parent = dep.groups[a.heads].parent
        if parent is not None and dep.groups[parent].kind == "kv_heads":
            a.kv_heads, a.num_kv_heads = parent, dep.groups[parent].num_units
            dep.groups[parent].head_dim = a.head_dim
        kept.append(a)
    dep.attention = kept


def _layer_of(module: str) -> int | None:
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return None


def _role_fn(tr: _OnnxTracer) -> Any:
    def role(pname: str, dim: int, shape: tuple[int, ...]) -> str:
        r = tr.roles.get((pname, dim))
        if r is not None:
            return r
        if len(shape) == 1:
            return tr.roles.get((pname, -1), "other")
        return "other"

    return role


def _name_params(
    model: Any, inits: dict[str, Any]
) -> tuple[dict[str, tuple[str, OnnxParam]], dict[str, str], str]:
    """Which initializers are parameters, their torch-like names and orientation, and the
    export wrapper's prefix that was dropped from every name (``""`` if none)."""
    consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in model.graph.node:
        for k, i in enumerate(node.input):
            consumers[i].append((node, k))

    def uses_of(value: str, depth: int = 0) -> list[tuple[Any, int]]:
        """Consumers of ``value``, looking through casts (a float16 weight cast to float32)."""
        found = []
        for n, k in consumers.get(value, []):
            if n.op_type in ("Cast", "CastLike", "Identity") and k == 0 and depth < 4:
                found += uses_of(n.output[0], depth + 1)
            else:
                found.append((n, k))
        return found

    out: dict[str, tuple[str, OnnxParam]] = {}
    used: set[str] = set()
    module_of: dict[str, str] = {}
    for name, arr in inits.items():
        if not _is_float_init(arr) or name not in consumers:
            continue
        uses = uses_of(name)
        if not uses:
            continue
        weightish = [(n, k) for n, k in uses if k in _WEIGHT_INPUTS.get(n.op_type, ())]
        dotted = bool(_DOTTED.match(name))
        if not (weightish or arr.ndim == 1 or dotted):
            continue  # a constant (mask, rotary table): carries no channel
        first, k = (weightish or uses)[0]
        transposed = arr.ndim == 2 and (
            (first.op_type == "MatMul" and k == 1)
            or (first.op_type == "Gemm" and k == 1 and not _attr(first, "transB", 0))
        )
        module = _scope(first)
        module_of[name] = module
        if dotted and name not in used:
            pname = name
        else:
            leaf = "weight" if (weightish and k in (0, 1) and arr.ndim >= 2) or arr.ndim >= 2 else "bias"
            if first.op_type in _NORMS | {"BatchNormalization", "InstanceNormalization"} and k == 1:
                leaf = "weight"
            pname = f"{module}.{leaf}"
            if pname in used or pname in inits:
                pname = f"{module}.{_clean(name).replace('.', '_')}"
        used.add(pname)
        out[name] = (pname, OnnxParam(name, transposed))
    # an export wrapper's attribute (``m.``, ``inner.``) in front of every name goes, so that
    # names (and plans) read as the PyTorch model's
    firsts = {p.split(".", 1)[0] for p, _ in out.values()}
    prefix = next(iter(firsts)) if len(firsts) == 1 else ""
    if prefix and len(out) > 1 and all(p.count(".") >= 2 for p, _ in out.values()):
        out = {k: (p[len(prefix) + 1 :], info) for k, (p, info) in out.items()}
        module_of = {k: v.removeprefix(prefix + ".") for k, v in module_of.items()}
    else:
        prefix = ""
    return out, module_of, prefix


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _meta(shape: Any) -> Tensor:
    return torch.empty(tuple(int(s) for s in shape), device="meta")


def _unknown(tr: _OnnxTracer, node: Any, iin: list[Any], rout: list[Any]) -> list[Any]:
    reason = f"unsupported ONNX op {node.op_type} ({node.name or node.output[0]})"
    if _has_channels([v for v in iin if v is not None]):
        tr.unknown_ops[node.op_type] += 1
    for v in iin:
        if _is_ids(v):
            tr.lock(v, reason)
        elif isinstance(v, ParamRef):
            for k in range(len(v.dims)):
                tr.lock(v.dim_ids(k), reason)
    return [_none_like(np.shape(r)) if r is not None else None for r in rout]


def _as_ids(tr: _OnnxTracer, v: Any, r: Any, like: Tensor | None = None) -> Tensor:
    if _is_ids(v):
        return v
    if isinstance(v, ParamRef):
        return tr.materialize(v, like)
    return _none_like(np.shape(r))


def _propagate(
    tr: _OnnxTracer,
    node: Any,
    rin: list[Any],
    iin: list[Any],
    rout: list[Any],
    opset: int,
    observe: dict[str, tuple[str, int]],
    module_nodes: dict[str, str],
) -> list[Any]:
    op = node.op_type
    none_out = [_none_like(np.shape(r)) if r is not None else None for r in rout]
    present = [v for v in iin if v is not None]
    if node.domain not in ("", "ai.onnx"):
        return _unknown(tr, node, iin, rout) if _has_channels(present) else none_out
    if not _has_channels(present) or op in _NO_CHANNEL:
        return none_out
    out0 = rout[0]
    oshape = tuple(np.shape(out0))

    # parameter views stay parameter references
    if isinstance(iin[0], ParamRef) and op in ("Transpose", "Identity", "Cast", "CastLike"):
        ref: ParamRef = iin[0]
        if op != "Transpose":  # a cast weight (float16 storage) is the same parameter
            return [ref]
        perm = list(_attr(node, "perm", list(range(len(ref.dims)))[::-1]))
        return [ref.permuted(perm)]

    if op == "MatMul":
        a, b = iin[0], iin[1]
        if isinstance(b, ParamRef) and len(b.dims) == 2 and not isinstance(a, ParamRef):
            _weight_roles(tr, b, in_k=0, out_k=1)
            _site(b, node, 0, -1, observe, module_nodes)
            return [_linear(tr, _as_ids(tr, a, rin[0]), b, None, _meta(oshape), in_dim_k=0, out_dim_k=1)]
        if isinstance(a, ParamRef) or isinstance(b, ParamRef):
            return _unknown(tr, node, iin, rout)
        return [_act_matmul(tr, _as_ids(tr, a, rin[0]), _as_ids(tr, b, rin[1]), _meta(oshape), False)]
    if op == "Gemm":
        a, w = iin[0], iin[1]
        bias = iin[2] if len(iin) > 2 else None
        if not isinstance(w, ParamRef) or _attr(node, "transA", 0) or isinstance(a, ParamRef):
            return _unknown(tr, node, iin, rout)
        tb = bool(_attr(node, "transB", 0))
        in_k, out_k = (1, 0) if tb else (0, 1)
        _weight_roles(tr, w, in_k=in_k, out_k=out_k)
        _site(w, node, 0, -1, observe, module_nodes)
        if isinstance(bias, ParamRef) and len(bias.dims) == 1:
            tr.roles[(bias.name, -1)] = "bias"
        elif isinstance(bias, ParamRef):
            return _unknown(tr, node, iin, rout)
        return [_linear(tr, _as_ids(tr, a, rin[0]), w, bias, _meta(oshape), in_dim_k=in_k, out_dim_k=out_k)]
    if op == "Conv":
        w = iin[1]
        if not isinstance(w, ParamRef) or isinstance(iin[0], ParamRef):
            return _unknown(tr, node, iin, rout)
        bias = iin[2] if len(iin) > 2 else None
        if bias is not None and not (isinstance(bias, ParamRef) and len(bias.dims) == 1):
            return _unknown(tr, node, iin, rout)
        if bias is not None:
            tr.roles[(bias.name, -1)] = "bias"
        _weight_roles(tr, w, in_k=1, out_k=0)
        _site(w, node, 0, 1, observe, module_nodes)
        group = int(_attr(node, "group", 1))
        x = iin[0] if _is_ids(iin[0]) else None
        rargs = [_meta(np.shape(rin[0])), None, None, None, None, None, False, [0], group]
        return [_conv(tr, rargs, [x, w, bias], _meta(oshape))]
    if op == "Gather":
        data, axis = iin[0], int(_attr(node, "axis", 0))
        if isinstance(data, ParamRef):
            if len(data.dims) != 2 or axis != 0 or _has_channels(iin[1]):
                return _unknown(tr, node, iin, rout)
            tr.lock(data.dim_ids(0), "embedding rows (vocabulary)")
            tr.roles[(data.name, data.dims[1])] = "producer"
            return [_ids(data.dim_ids(1).expand(oshape).clone())]
        if _has_channels(iin[1]):
            return _unknown(tr, node, iin, rout)
        xi = _as_ids(tr, data, rin[0])
        axis %= xi.dim()
        if _varies(xi, axis):
            tr.lock(xi, f"Gather along a channel axis ({node.name})")
        res = np.take(xi.numpy(), np.asarray(rin[1], dtype=np.int64), axis=axis)
        return [_ids(torch.from_numpy(np.ascontiguousarray(res)))]
    if op in _NORMS:
        x = _as_ids(tr, iin[0], rin[0])
        axis = int(_attr(node, "axis", -1)) % x.dim()
        scale = iin[1] if len(iin) > 1 else None
        bias = iin[2] if len(iin) > 2 else None
        for p in (scale, bias):
            if isinstance(p, ParamRef):
                tr.roles[(p.name, -1)] = "norm"
        res = _norm(tr, aten.layer_norm.default, [x, list(x.shape[axis:])], [x, None, scale, bias], None)
        return [res] + none_out[1:]
    if op in ("BatchNormalization", "InstanceNormalization"):
        x = _as_ids(tr, iin[0], rin[0])
        ch = x.movedim(1, -1).reshape(-1, x.shape[1])
        for p in iin[1:]:
            if isinstance(p, ParamRef):
                tr.roles[(p.name, -1)] = "norm"
                tr.unite_pairs(ch, p.dim_ids(0).expand_as(ch))
        return [_ids(x.clone())] + none_out[1:]

    if op == "Concat":
        like = next((v for v in iin if _is_ids(v)), None)
        parts = [_as_ids(tr, v, r, like) for v, r in zip(iin, rin) if r is not None]
        return [_ids(torch.cat(parts, dim=int(_attr(node, "axis", 0))))]
    if any(isinstance(v, ParamRef) for v in iin) and op not in _ELEMENTWISE:
        return _unknown(tr, node, iin, rout)
    if op in _IDENTITY:
        x = _as_ids(tr, iin[0], rin[0])
        if tuple(x.shape) != oshape:
            return _unknown(tr, node, iin, rout)
        return [_ids(x.clone())] + none_out[1:]
    if op in _ELEMENTWISE:
        for v in iin:
            if isinstance(v, ParamRef) and len(v.dims) == 1:
                tr.roles.setdefault((v.name, -1), "bias" if op in ("Add", "Sub") else "norm")
        items = [(v, torch.empty(np.shape(r), device="meta")) for v, r in zip(iin, rin) if r is not None]
        return [_elementwise(tr, op, [v for v, _ in items], [r for _, r in items], _meta(oshape))]
    if op in _RESHAPES:
        x = _as_ids(tr, iin[0], rin[0])
        return [_ids(x.reshape(oshape).clone())]
    if op == "Transpose":
        x = _as_ids(tr, iin[0], rin[0])
        perm = list(_attr(node, "perm", list(range(x.dim()))[::-1]))
        return [_ids(x.permute(*perm).contiguous())]
    if op == "Expand":
        x = _as_ids(tr, iin[0], rin[0])
        return [_expand(tr, x, oshape)]
    if op == "Tile":
        x = _as_ids(tr, iin[0], rin[0])
        return [_ids(torch.from_numpy(np.tile(x.numpy(), np.asarray(rin[1], dtype=np.int64))))]
    if op == "Split":
        x = _as_ids(tr, iin[0], rin[0])
        axis = int(_attr(node, "axis", 0)) % x.dim()
        sizes = [np.shape(r)[axis] for r in rout]
        return [_ids(t.clone()) for t in torch.split(x, sizes, dim=axis)]
    if op == "Slice":
        x = _as_ids(tr, iin[0], rin[0])
        res = x.numpy()[_slices(x.dim(), rin)]
        if tuple(res.shape) != oshape:
            return _unknown(tr, node, iin, rout)
        return [_ids(torch.from_numpy(np.ascontiguousarray(res)))]
    if op == "Pad":
        mode = _attr(node, "mode", b"constant")
        if mode not in (b"constant", "constant"):
            return _unknown(tr, node, iin, rout)
        x = _as_ids(tr, iin[0], rin[0])
        pads = np.asarray(rin[1], dtype=np.int64).tolist()
        axes = list(range(x.dim())) if len(rin) < 4 or rin[3] is None else [int(a) % x.dim() for a in rin[3]]
        width = [(0, 0)] * x.dim()
        n = len(axes)
        for j, a in enumerate(axes):
            width[a] = (pads[j], pads[j + n])
        if min(min(w) for w in width) < 0:
            return _unknown(tr, node, iin, rout)
        res = np.pad(x.numpy(), width, constant_values=NONE)
        return [_ids(torch.from_numpy(res))]
    if op in _REDUCE:
        x = _as_ids(tr, iin[0], rin[0])
        axes = _attr(node, "axes", None)
        if axes is None and len(rin) > 1 and rin[1] is not None:
            axes = np.asarray(rin[1]).tolist()
        if op in ("ArgMax", "ArgMin"):
            axes = [int(_attr(node, "axis", 0))]
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return [_ids(x.clone())]
            axes = None
        res = _reduce(tr, x, axes, keep)
        return [_ids(res.reshape(oshape).clone())]
    if op in _MIX_ALONG:
        x = _as_ids(tr, iin[0], rin[0])
        axis = int(_attr(node, "axis", -1 if opset >= 13 or op == "CumSum" else 1))
        if op == "CumSum":
            axis = int(np.asarray(rin[1]).reshape(-1)[0])
        axis %= x.dim()
        dims = [axis] if opset >= 13 or op == "CumSum" else list(range(axis, x.dim()))
        red = _reduce(tr, x, dims, keepdim=True)
        return [_ids(red.expand(x.shape).clone())]
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        x = _as_ids(tr, iin[0], rin[0])
        return [_ids(_reduce(tr, x, list(range(2, x.dim())), True).reshape(oshape).clone())]
    if op in ("AveragePool", "MaxPool", "LpPool"):
        x = _as_ids(tr, iin[0], rin[0])
        per = x.reshape(x.shape[0], x.shape[1], -1)
        if bool((per != per[..., :1]).any()):
            return _unknown(tr, node, iin, rout)
        chan = per[..., 0].reshape(*x.shape[:2], *([1] * (len(oshape) - 2)))
        return [_ids(chan.expand(oshape).clone())] + none_out[1:]
    return _unknown(tr, node, iin, rout)


def _expand(tr: _OnnxTracer, x: Tensor, oshape: tuple[int, ...]) -> Tensor:
    """Broadcast ids; a head axis repeated along a new axis (grouped-query ``repeat_kv``:
    ``[B, kv, 1, T, D] -> [B, kv, rep, T, D]``) gets fresh ids per copy, each the child of
    the id it copies, so that each copy can follow the query head it serves."""
    xe = x.reshape((1,) * (len(oshape) - x.dim()) + tuple(x.shape))
    out = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(xe.numpy(), oshape)))
    bdims = [k for k in range(len(oshape)) if xe.shape[k] == 1 and oshape[k] > 1]
    if len(bdims) != 1 or bdims[0] == 0 or not _varies(xe, bdims[0] - 1):
        return _ids(out.clone())
    k = bdims[0]
    slot = torch.arange(oshape[k]).reshape([-1 if d == k else 1 for d in range(len(oshape))]).expand(oshape)
    has = out >= 0
    keys = out[has] * oshape[k] + slot[has]
    uniq, inverse = torch.unique(keys, return_inverse=True)
    base = tr.uf.add(int(uniq.numel()))
    copies = torch.full(oshape, NONE, dtype=torch.long)
    copies[has] = base + inverse
    tr.pair(out, copies, "repeat")
    return _ids(copies)


def _varies(x: Tensor, axis: int) -> bool:
    """Whether the ids differ along ``axis`` (it carries channels)."""
    if x.shape[axis] <= 1 or not bool((x >= 0).any()):
        return False
    first = x.narrow(axis, 0, 1)
    return bool((x != first).any())


def _slices(ndim: int, rin: list[Any]) -> tuple[slice, ...]:
    starts = np.asarray(rin[1], dtype=np.int64).tolist()
    ends = np.asarray(rin[2], dtype=np.int64).tolist()
    axes = (
        np.asarray(rin[3], dtype=np.int64).tolist()
        if len(rin) > 3 and rin[3] is not None
        else list(range(len(starts)))
    )
    steps = (
        np.asarray(rin[4], dtype=np.int64).tolist()
        if len(rin) > 4 and rin[4] is not None
        else [1] * len(starts)
    )
    sl = [slice(None)] * ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        sl[a % ndim] = slice(s, e, st)
    return tuple(sl)


def _weight_roles(tr: _OnnxTracer, w: ParamRef, in_k: int, out_k: int) -> None:
    tr.roles[(w.name, w.dims[in_k])] = "consumer"
    tr.roles[(w.name, w.dims[out_k])] = "producer"


def _site(
    w: ParamRef,
    node: Any,
    index: int,
    axis: int,
    observe: dict[str, tuple[str, int]],
    module_nodes: dict[str, str],
) -> None:
    """Record where the input of the module owning weight ``w`` can be observed."""
    module = w.name.rsplit(".", 1)[0]
    observe.setdefault(module, (node.input[index], axis))
    module_nodes.setdefault(module, node.name)


def count_initializer_params(model: Any) -> int:
    """Scalars in the model's floating-point initializers (its parameters)."""
    from onnx import helper

    total = 0
    for i in model.graph.initializer:
        if np.issubdtype(helper.tensor_dtype_to_np_dtype(i.data_type), np.floating):
            total += math.prod(i.dims)
    return total
