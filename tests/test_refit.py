"""Least-squares refit: the maths on hand-made cases, and end to end on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from archs import tiny_model

from prunecli.api import prune
from prunecli.calibrate import Runner
from prunecli.calibrate.stats import Gram
from prunecli.errors import DataError, UnsupportedModelError
from prunecli.methods.flap import FlapConfig
from prunecli.methods.magnitude import MagnitudeConfig
from prunecli.methods.wanda_sp import WandaSpConfig
from prunecli.refit import reconstruction_error, refit_columns


def _gram(x: torch.Tensor) -> torch.Tensor:
    g = Gram()
    g.update(x)
    return g.matrix


def test_dependent_column_is_absorbed_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=gen, dtype=torch.float64)
    x[:, 3] = 2 * x[:, 0] + x[:, 1]  # column 3 carries nothing the others do not
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    res = refit_columns(w, None, _gram(x), removed=[3], damp=0.0)
    expected = w[:, :3].clone()
    expected[:, 0] += 2 * w[:, 3]
    expected[:, 1] += w[:, 3]
    assert res.choice == "refit"
    torch.testing.assert_close(res.weight[:, :3], expected, atol=1e-8, rtol=1e-8)
    assert res.weight[:, 3].equal(w[:, 3])  # removed columns are left for the engine to slice
    assert res.bias_delta.abs().max() < 1e-8
    assert res.error_refit < 1e-12 * res.error_removed
    # the output on the calibration inputs is unchanged
    torch.testing.assert_close(x[:, :3] @ res.weight[:, :3].T, x @ w.T, atol=1e-8, rtol=1e-8)


def test_bias_only_is_flap_compensation() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 3, generator=gen, dtype=torch.float64)
    x[:, 2] = 0.7  # a constant channel: removing it is exactly a bias change
    w = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    res = refit_columns(w, b, _gram(x), removed=[2], damp=0.0)
    torch.testing.assert_close(res.bias_delta.double(), 0.7 * w[:, 2], atol=1e-10, rtol=1e-10)
    assert res.error_bias < 1e-12 and res.error_refit < 1e-12
    assert res.error_removed > 1.0


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("damp", [0.0, 0.01, 10.0])
def test_refit_never_increases_the_error(seed: int, damp: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + torch.randn(8, generator=gen)
    w = torch.randn(5, 8, generator=gen)
    b = torch.randn(5, generator=gen)
    removed = sorted(torch.randperm(8, generator=gen)[:3].tolist())
    h = _gram(x)
    res = refit_columns(w, b, h, removed, damp)
    chosen = min(res.error_refit, res.error_bias, res.error_removed)
    assert chosen <= res.error_removed and chosen <= res.error_bias
    # the error of what is returned, recomputed from the weights
    new = torch.cat([res.weight.double(), (b.double() + res.bias_delta.double())[:, None]], 1)
    new[:, removed] = 0.0
    ref = torch.cat([w.double(), b.double()[:, None]], 1)
    assert reconstruction_error(new - ref, h) == pytest.approx(chosen, rel=1e-6, abs=1e-9)
    # and it is the error measured directly on the tokens
    xa = torch.cat([x.double(), torch.ones(64, 1, dtype=torch.float64)], 1)
    direct = float(((xa @ new.T - xa @ ref.T) ** 2).sum())
    assert direct == pytest.approx(chosen, rel=1e-4, abs=1e-6)


def _logit_error(model, dense, calib) -> float:
    with torch.no_grad():
        return float((model(input_ids=calib).logits - dense(input_ids=calib).logits).square().mean())


@pytest.mark.parametrize(
    "config",
    [WandaSpConfig(sparsity=0.5), MagnitudeConfig(sparsity=0.5), FlapConfig(sparsity=0.5)],
    ids=lambda c: c.method,
)
def test_refit_brings_the_pruned_model_closer_to_the_dense_one(config) -> None:
    dense = tiny_model("llama", num_hidden_layers=3)
    calib = torch.randint(1, 128, (16, 24), generator=torch.Generator().manual_seed(0))
    plain, fitted = copy.deepcopy(dense), copy.deepcopy(dense)
    a = prune(plain, config, calib)
    b = prune(fitted, config, calib, refit=True)
    assert a.plan.removals == b.plan.removals  # refit changes weights, not the choice
    meta = b.plan.meta["refit"]
    assert meta["modules"] == len({m for g in a.plan.removals for m in [g.split(":")[0]]})
    assert meta["error_refit"] <= min(meta["error_removed"], meta["error_bias"])
    assert _logit_error(fitted, dense, calib) < _logit_error(plain, dense, calib)
    assert "refit" in b.seconds


def test_refit_refusals(tmp_path) -> None:
    from prunecli.calibrate.offload import load_offloaded

    model = tiny_model("llama")
    with pytest.raises(DataError, match="refit needs calibration"):
        prune(model, MagnitudeConfig(sparsity=0.3), refit=True)
    model.save_pretrained(tmp_path / "m")
    streamed, weights = load_offloaded(tmp_path / "m", dtype=torch.float32)
    calib = torch.randint(1, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match="--refit"):
        prune(streamed, MagnitudeConfig(sparsity=0.3), calib, runner=Runner(weights=weights), refit=True)


def test_cli_refit(tmp_path, tiny_llama_dir, tiny_text_file) -> None:
    import json

    from typer.testing import CliRunner

    from prunecli.cli import app

    base = [
        "compress",
        str(tiny_llama_dir),
        "--method",
        "magnitude",
        "--sparsity",
        "0.4",
        "--calib",
        str(tiny_text_file),
    ]
    base += ["--nsamples", "8", "--seqlen", "16", "--json"]
    result = CliRunner().invoke(app, [*base, "--refit", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["refit"]["modules"] > 0 and report["calibration"] is not None
    saved = json.loads((tmp_path / "r" / "prunecli.json").read_text())
    assert saved["verify"]["check"] == "logits" and saved["plan"]["meta"]["refit"]["modules"] > 0
    refused = CliRunner().invoke(app, [*base, "--refit", "--sequential"])
    assert refused.exit_code == 2 and "--refit" in refused.output
