"""Each data method's config carries its paper's calibration size; the CLI uses it unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunecli.cli.compress import resolve_options
from prunecli.errors import InputError
from prunecli.methods.cfsp import CfspConfig
from prunecli.methods.flap.config import FlapConfig
from prunecli.methods.loraprune import LorapruneConfig
from prunecli.methods.magnitude import MagnitudeConfig
from prunecli.methods.wanda_sp import WandaSpConfig


def _given(**overrides):
    given = {
        "model": "some/model", "method": None, "sparsity": 0.2, "output": None, "overwrite": False,
        "calib": None, "text_field": "text", "nsamples": None, "seqlen": None, "seed": 0, "round_to": 1,
        "ignore": [], "set": [], "eval_data": None, "eval_seqlen": 512, "max_windows": None,
        "dtype": "float32", "device": "cpu", "allow_pickle": False, "trust_remote_code": False,
    }  # fmt: skip
    given.update(overrides)
    return given


def test_configs_carry_the_papers_calibration_size() -> None:
    # FLAP: 1024 WikiText-2 windows of 128 tokens; wanda-sp: Wanda's 128 x 2048;
    # CFSP: the public code's 128 x 1024; LoRAPrune: prunecli's 128 x 128 (see docs/methods.md)
    sizes = {
        cls.method: (cls().nsamples, cls().seqlen)
        for cls in (FlapConfig, WandaSpConfig, CfspConfig, LorapruneConfig)
    }
    assert sizes == {
        "flap": (1024, 128),
        "wanda-sp": (128, 2048),
        "cfsp": (128, 1024),
        "loraprune": (128, 128),
    }
    assert not hasattr(MagnitudeConfig(), "nsamples")
    with pytest.raises(InputError):
        FlapConfig(nsamples=0)
    with pytest.raises(InputError):
        WandaSpConfig(seqlen=True)


@pytest.mark.parametrize(
    ("method", "expected"), [("flap", (1024, 128)), ("wanda-sp", (128, 2048)), ("cfsp", (128, 1024))]
)
def test_cli_uses_the_methods_default_when_nothing_is_given(method: str, expected: tuple[int, int]) -> None:
    opts, config = resolve_options(_given(method=method), {"model", "method", "sparsity"}, None)
    assert (opts.nsamples, opts.seqlen) == expected == (config.nsamples, config.seqlen)
    assert opts.to_recipe()["nsamples"] == expected[0] and "nsamples" not in opts.to_recipe().get("set", {})


def test_cli_flags_and_recipe_override_the_methods_default(tmp_path: Path) -> None:
    opts, config = resolve_options(
        _given(method="flap", nsamples=64, seqlen=256),
        {"model", "method", "sparsity", "nsamples", "seqlen"},
        None,
    )
    assert (opts.nsamples, opts.seqlen, config.nsamples, config.seqlen) == (64, 256, 64, 256)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: cfsp\nnsamples: 16\n")
    opts, config = resolve_options(_given(), {"model", "sparsity"}, recipe)
    assert (config.nsamples, config.seqlen) == (16, 1024)  # the recipe's count, the method's length
    # a method without data keeps the old defaults (recovery uses --seqlen)
    opts, config = resolve_options(_given(method="magnitude"), {"model", "method", "sparsity"}, None)
    assert (opts.nsamples, opts.seqlen) == (128, 128)


def test_compress_calibrates_with_the_methods_default(tiny_llama_dir: Path, tiny_text_file: Path) -> None:
    from typer.testing import CliRunner

    from prunecli.cli import app

    args = [
        "compress",
        str(tiny_llama_dir),
        "-m",
        "flap",
        "-s",
        "0.2",
        "--calib",
        str(tiny_text_file),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    calib = json.loads(result.stdout)["calibration"]
    assert (calib["nsamples"], calib["seqlen"]) == (1024, 128)
    result = CliRunner().invoke(app, [*args, "--nsamples", "8", "--seqlen", "32"])
    assert result.exit_code == 0, result.output
    calib = json.loads(result.stdout)["calibration"]
    assert (calib["nsamples"], calib["seqlen"]) == (8, 32)
