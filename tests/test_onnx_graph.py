"""ONNX pruning: groups from the ONNX graph, exact removal, onnxruntime calibration, the CLI.

Models: dynamo (``torch.onnx.export(..., dynamo=True)``) exports of the tiny Llama (dynamic
batch and sequence), BERT, ViT and the residual/concat CNN, and an MLP written with
``onnx.helper`` (a residual stream without a norm, a Concat, a Split whose halves multiply).
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")

from archs import model_output, tiny_cnn, tiny_model  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from prunecli.engine import Plan, select_uniform  # noqa: E402
from prunecli.engine.select import HeadLayout  # noqa: E402
from prunecli.onnx.apply import apply_plan_onnx, removed_params, zero_units_onnx  # noqa: E402
from prunecli.onnx.graph import (  # noqa: E402
    _session,
    build_onnx_graph,
    count_initializer_params,
    example_feed,
    load_onnx,
)

ARCHS = ["llama", "bert", "vit", "cnn", "helper"]


class _Wrap(torch.nn.Module):
    def __init__(self, m: torch.nn.Module, key: str) -> None:
        super().__init__()
        self.m, self.key = m, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kw = {self.key: x}
        if self.key == "input_ids" and hasattr(self.m.config, "use_cache"):
            kw["use_cache"] = False
        out = self.m(**kw)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _export(module: torch.nn.Module, x: torch.Tensor, path, dynamic: bool) -> None:
    kw = {}
    if dynamic:
        kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            module.eval(), (x,), dynamo=True, input_names=["x"], output_names=["y"], **kw
        )
    prog.save(str(path))


def helper_mlp(seed: int = 0):
    """A model written directly with onnx.helper (not from PyTorch).

    x[N,8] -> h0 = x Win + bin                                  (a residual stream of 12)
    a = Relu(Gemm(h0, W1^T, b1)); b = Sigmoid(h0 Cast(W2)); c = Concat(a, b)   (20 + 10 channels)
    h1 = h0 + c W3
    d = Tanh(h1 W4 + b4); d1, d2 = Split(d, [8, 8]); e = d1 * d2          (8 paired channels)
    h2 = h1 + e W5
    f = h2 W6; g = Relu(f[:, 0:6]) + Sigmoid(f[:, 6:12])                   (6 paired channels, Slice)
    h3 = h2 + g W7; y = h3 Wout
    """
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    inits = [
        w("inp.weight", 8, 12),
        w("inp.bias", 12),
        w("fc1.weight", 20, 12),
        w("fc1.bias", 20),
        w("fc2.weight", 12, 10),
        w("fc3.weight", 30, 12),
        w("fc4.weight", 12, 16),
        w("fc4.bias", 16),
        w("fc5.weight", 8, 12),
        w("out.weight", 12, 5),
        numpy_helper.from_array(np.array([8, 8], dtype=np.int64), "split_sizes"),
        w("fc6.weight", 12, 12),
        w("fc7.weight", 6, 12),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "s0"),
        numpy_helper.from_array(np.array([6], dtype=np.int64), "s6"),
        numpy_helper.from_array(np.array([12], dtype=np.int64), "s12"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "ax1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "inp.weight"], ["t0"], name="inp"),
        helper.make_node("Add", ["t0", "inp.bias"], ["h0"], name="inp_bias"),
        helper.make_node("Gemm", ["h0", "fc1.weight", "fc1.bias"], ["t1"], name="fc1", transB=1),
        helper.make_node("Relu", ["t1"], ["a"], name="relu"),
        helper.make_node("Cast", ["fc2.weight"], ["fc2.weight_f"], name="fc2_cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h0", "fc2.weight_f"], ["t2"], name="fc2"),
        helper.make_node("Sigmoid", ["t2"], ["b"], name="sigmoid"),
        helper.make_node("Concat", ["a", "b"], ["c"], name="concat", axis=1),
        helper.make_node("MatMul", ["c", "fc3.weight"], ["t3"], name="fc3"),
        helper.make_node("Add", ["h0", "t3"], ["h1"], name="res1"),
        helper.make_node("MatMul", ["h1", "fc4.weight"], ["t4"], name="fc4"),
        helper.make_node("Add", ["t4", "fc4.bias"], ["t5"], name="fc4_bias"),
        helper.make_node("Tanh", ["t5"], ["d"], name="tanh"),
        helper.make_node("Split", ["d", "split_sizes"], ["d1", "d2"], name="split", axis=1),
        helper.make_node("Mul", ["d1", "d2"], ["e"], name="gate"),
        helper.make_node("MatMul", ["e", "fc5.weight"], ["t6"], name="fc5"),
        helper.make_node("Add", ["h1", "t6"], ["h2"], name="res2"),
        helper.make_node("MatMul", ["h2", "fc6.weight"], ["f"], name="fc6"),
        helper.make_node("Slice", ["f", "s0", "s6", "ax1"], ["f1"], name="slice_lo"),
        helper.make_node("Slice", ["f", "s6", "s12", "ax1"], ["f2"], name="slice_hi"),
        helper.make_node("Relu", ["f1"], ["g1"], name="relu2"),
        helper.make_node("Sigmoid", ["f2"], ["g2"], name="sigmoid2"),
        helper.make_node("Add", ["g1", "g2"], ["g"], name="sum"),
        helper.make_node("MatMul", ["g", "fc7.weight"], ["t7"], name="fc7"),
        helper.make_node("Add", ["h2", "t7"], ["h3"], name="res3"),
        helper.make_node("MatMul", ["h3", "out.weight"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "helper_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (ModelProto, OnnxGraph, torch model or None); each export and trace done once."""
    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for arch in ARCHS:
        path = folder / f"{arch}.onnx"
        torch_model = None
        if arch == "helper":
            onnx.save(helper_mlp(), str(path))
        elif arch == "cnn":
            torch_model = tiny_cnn()
            _export(torch_model, torch.randn(1, 3, 16, 16), path, dynamic=False)
        elif arch == "vit":
            torch_model = tiny_model("vit")
            _export(_Wrap(torch_model, "pixel_values"), torch.randn(1, 3, 32, 32), path, dynamic=False)
        else:
            torch_model = tiny_model(arch)
            _export(
                _Wrap(torch_model, "input_ids"), torch.randint(1, 128, (2, 7)), path, dynamic=arch == "llama"
            )
        model = load_onnx(path)
        out[arch] = (model, build_onnx_graph(model), torch_model, path)
    return out


def random_plan(graph, frac: float, seed: int) -> Plan:
    """About ``frac`` of every prunable group, random; grouped-query layers also lose a whole
    key/value head (keeping 1 or all query heads per remaining one, by seed parity)."""
    gen = torch.Generator().manual_seed(seed)
    scores = {g.name: torch.rand(g.num_units, generator=gen) for g in graph.prunable()}
    plan = select_uniform(graph, scores, frac)
    for g in graph.prunable("heads"):
        layout = HeadLayout(graph, g)
        if layout.kv is not None and layout.num_kv > 1:
            plan.removals[g.name] = layout.removal(
                scores[g.name], layout.num_kv - 1, layout.rep if seed % 2 else 1
            )
    for g in graph.prunable():
        if g.name not in plan.removals and g.num_units > 1:
            k = max(1, int(frac * g.num_units))
            plan.removals[g.name] = sorted(torch.randperm(g.num_units, generator=gen)[:k].tolist())
    plan.fingerprint = graph.fingerprint
    return plan


def _run(model, feed):
    return _session(model).run(None, feed)[0]


def _feed(arch: str, model, graph):
    # the dynamic Llama export runs on another batch and length than it was traced with
    return example_feed(model, batch=2, seq=5, seed=3) if arch == "llama" else graph.example_inputs[0]


def test_groups_match_the_torch_graph(exported) -> None:
    """The ONNX graph finds the same prunable groups (names, kinds, units) as the torch tracer."""
    from prunecli.graph import build_graph

    for arch in ("llama", "bert", "vit", "cnn"):
        model, graph, torch_model, _ = exported[arch]
        tg = (
            build_graph(torch_model, (torch.randn(1, 3, 16, 16),))
            if arch == "cnn"
            else build_graph(torch_model)
        )
        want = {(g.name, g.kind, g.num_units) for g in tg.prunable()}
        got = {(g.name, g.kind, g.num_units) for g in graph.prunable()}
        assert got == want, arch
        sites = [
            (a.module, a.heads, a.kv_heads, a.num_heads, a.num_kv_heads, a.head_dim) for a in graph.attention
        ]
        assert sites == [
            (a.module, a.heads, a.kv_heads, a.num_heads, a.num_kv_heads, a.head_dim) for a in tg.attention
        ]
    llama = exported["llama"][1]
    assert [(a.num_heads, a.num_kv_heads, a.head_dim) for a in llama.attention] == [(4, 2, 16)] * 2
    assert all(llama.groups[a.kv_heads].kind == "kv_heads" for a in llama.attention)


def test_helper_model_groups(exported) -> None:
    graph = exported["helper"][1]
    units = {g.name: g.num_units for g in graph.prunable()}
    # the residual stream (no norm couples it), the concat's two halves, the split's and the
    # slices' pairs
    assert units == {
        "inp:channels": 12,
        "fc1:channels": 20,
        "fc2:channels": 10,
        "fc4:channels": 8,
        "fc6:channels": 6,
    }
    pairs = graph.groups["fc4:channels"]
    w4 = next(m for m in pairs.members if m.param == "fc4.weight")
    assert w4.dim == 0 and w4.index[0] == [0, 8]  # torch orientation: [out, in], out c pairs with c + 8
    w2 = next(m for m in graph.groups["fc2:channels"].members if m.param == "fc2.weight")
    assert w2.role == "producer" and w2.dim == 0  # seen through its Cast as [out, in]
    fc3 = next(m for m in graph.groups["fc2:channels"].members if m.param == "fc3.weight")
    assert fc3.role == "consumer" and fc3.index[0] == [20]  # offset of the second Concat operand


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_then_remove_equal(exported, arch: str) -> None:
    """Zeroing the plan's units and removing them give the same onnxruntime outputs."""
    model, graph, _, _ = exported[arch]
    feed = _feed(arch, model, graph)
    for seed in (0, 1):
        plan = random_plan(graph, 0.3, seed)
        pruned, summary = apply_plan_onnx(model, graph, plan)
        zeroed = zero_units_onnx(model, graph, plan.removals)
        a, b = _run(zeroed, feed), _run(pruned, feed)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-5, arch
        assert summary.params_after < summary.params_before
        if arch == "helper":  # the Split sizes and both Slices' bounds were rewritten
            assert {"split", "slice_lo", "slice_hi"} <= set(summary.rewritten_nodes)
        assert {o.domain: o.version for o in pruned.opset_import} == {
            o.domain: o.version for o in model.opset_import
        }


@pytest.mark.parametrize("arch", ARCHS)
def test_random_30_percent_param_count(exported, arch: str) -> None:
    """onnxruntime runs the pruned model, whose parameter count is what the plan says."""
    model, graph, _, _ = exported[arch]
    plan = random_plan(graph, 0.3, seed=5)
    assert set(plan.removals) == {g.name for g in graph.prunable()}
    pruned, summary = apply_plan_onnx(model, graph, plan)
    onnx.checker.check_model(pruned)
    before = count_initializer_params(model)
    assert count_initializer_params(pruned) == before - removed_params(graph, plan) == summary.params_after
    feed = _feed(arch, model, graph)
    assert _run(pruned, feed).shape == _run(model, feed).shape


def test_unknown_op_locks_with_its_name() -> None:
    """An op without a rule (Einsum here) locks the channels that reach it, named in the reason."""
    model = helper_mlp()
    g = model.graph
    node = next(n for n in g.node if n.name == "relu")
    node.output[0] = "a0"
    g.node.insert(
        list(g.node).index(node) + 1,
        helper.make_node("Einsum", ["a0"], ["a"], name="my_einsum", equation="ij->ij"),
    )
    graph = build_onnx_graph(model)
    fc1 = graph.groups["fc1:channels"]
    assert not fc1.prunable and fc1.reason == "unsupported ONNX op Einsum (my_einsum)"
    assert graph.unknown_ops == {"Einsum": 1}
    assert graph.groups["fc2:channels"].prunable  # the other Concat operand is untouched


def _calib(n: int = 8, seqlen: int = 12) -> torch.Tensor:
    return torch.randint(1, 128, (n, seqlen), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("method", ["wanda-sp", "flap"])
def test_data_methods_match_torch(exported, method: str) -> None:
    """wanda-sp and FLAP calibrated through onnxruntime give the torch path's plan, and FLAP's
    bias compensation (a new Add after each down_proj) gives the torch-pruned model's logits."""
    import prunecli
    from prunecli.graph import build_graph
    from prunecli.onnx.compress import compress_onnx

    model, graph, torch_model, path = exported["llama"]
    calib = _calib()
    report = compress_onnx(path, method, 0.3, calib=calib.numpy())
    tmodel = tiny_model("llama")
    tgraph = build_graph(tmodel)
    config = prunecli.FlapConfig(sparsity=0.3) if method == "flap" else prunecli.WandaSpConfig(sparsity=0.3)
    tplan = prunecli.prune(tmodel, config, calib, graph=tgraph).plan  # tmodel is pruned in place
    assert report["plan"]["removals"] == tplan.removals and tplan.removals
    if method == "flap":
        got = {k: np.array(v) for k, v in report["plan"]["bias_updates"].items()}
        assert set(got) == set(tplan.bias_updates)
        for k, v in tplan.bias_updates.items():
            assert np.allclose(got[k], v, atol=1e-6)
        pruned, _ = apply_plan_onnx(model, graph, Plan.from_dict(report["plan"]))
        ids = calib[:2, :9]
        want = model_output(tmodel, ids).numpy()
        assert np.abs(_run(pruned, {"x": ids.numpy()}) - want).max() <= 1e-4


def test_image_model_calibrates_on_random_inputs(exported) -> None:
    """A floating-point input (ViT) calibrates on seeded normal samples when no data is given,
    and the same seed gives the same plan."""
    from prunecli.onnx.compress import compress_onnx

    path = exported["vit"][3]
    a = compress_onnx(path, "wanda-sp", 0.3, options={"nsamples": 4})
    b = compress_onnx(path, "wanda-sp", 0.3, options={"nsamples": 4})
    assert a["calibration"]["samples"] == 4 and a["params"]["removed"] > 0
    assert a["plan"]["removals"] == b["plan"]["removals"]
    assert any(k.endswith(":heads") for k in a["plan"]["removals"])


def test_pruned_propagation_refused(exported) -> None:
    from prunecli.errors import UnsupportedModelError
    from prunecli.onnx.compress import compress_onnx

    with pytest.raises(UnsupportedModelError, match="dense propagation only"):
        compress_onnx(
            exported["llama"][3], "wanda-sp", 0.3, calib=_calib().numpy(), options={"propagation": "pruned"}
        )


def test_cli_graph_and_compress(exported, tmp_path) -> None:
    from typer.testing import CliRunner

    from prunecli.cli import app

    runner = CliRunner()
    path = tmp_path / "helper.onnx"
    onnx.save(helper_mlp(), str(path))
    res = runner.invoke(app, ["graph", str(path), "--json"])
    assert res.exit_code == 0, res.output
    names = {g["name"] for g in json.loads(res.stdout)}
    assert names == {"inp:channels", "fc1:channels", "fc2:channels", "fc4:channels", "fc6:channels"}

    out = tmp_path / "pruned.onnx"
    res = runner.invoke(
        app, ["compress", str(path), "-m", "magnitude", "-s", "0.3", "-o", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    pruned = onnx.load(str(out))
    assert report["output"] == str(out) and report["kind"] == "onnx"
    assert count_initializer_params(pruned) == report["params"]["after"] < report["params"]["before"]
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert _run(pruned, {"x": x}).shape == (3, 5)

    calib = tmp_path / "calib.npy"
    np.save(calib, _calib().numpy())
    res = runner.invoke(
        app,
        ["compress", str(exported["llama"][3]), "-m", "flap", "-s", "0.2", "--calib", str(calib), "--json"],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["params"]["removed"] > 0 and abs(report["sparsity"]["blocks"] - 0.2) < 0.02  # FLAP: global


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["graph", "{bad}"], "not a valid ONNX model"),
        (["compress", "{bad}", "-m", "magnitude", "-s", "0.3"], "not a valid ONNX model"),
        (["compress", "{good}", "-m", "cfsp", "-s", "0.3"], "not supported on ONNX"),
        (["compress", "{good}", "-m", "magnitude", "-s", "1.5"], "sparsity"),
        (["compress", "{good}", "-m", "wanda-sp", "-s", "0.3"], "needs calibration token ids"),
        (
            ["compress", "{good}", "-m", "magnitude", "-s", "0.3", "--no-verify"],
            "--no-verify is not supported",
        ),
        (["run", "{recipe}"], "ONNX models are pruned without a recipe"),
        (["compress", "--recipe", "{recipe}"], "ONNX models are pruned without a recipe"),
    ],
)
def test_cli_bad_input(exported, tmp_path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from prunecli.cli import app

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not an onnx file")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {exported['llama'][3]}\nmethod: magnitude\nsparsity: 0.3\noutput: {tmp_path / 'o'}\n"
    )
    argv = [a.format(bad=bad, good=exported["llama"][3], recipe=recipe) for a in args]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0]


def test_external_data_model(tmp_path) -> None:
    """A model whose weights live in an external-data file is read and pruned like any other."""
    from prunecli.onnx.compress import compress_onnx

    path = tmp_path / "ext.onnx"
    onnx.save(helper_mlp(), str(path), save_as_external_data=True, location="ext.data", size_threshold=0)
    assert (tmp_path / "ext.data").stat().st_size > 0
    out = tmp_path / "small.onnx"
    report = compress_onnx(path, "random", 0.3, output=out)
    pruned = onnx.load(str(out))
    assert count_initializer_params(pruned) == report["params"]["after"] < report["params"]["before"]
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    assert _run(pruned, {"x": x}).shape == (2, 5)
