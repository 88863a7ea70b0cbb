"""Offloaded (layer-sequential, streamed) runs: same plan, same tensors, smaller memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from archs import mixed_layers_model, tiny_model
from safetensors.torch import load_file
from typer.testing import CliRunner

from prunecli.api import prune
from prunecli.calibrate import Runner
from prunecli.calibrate.memory import parse_size, plan_memory
from prunecli.calibrate.offload import has_meta_tensors, load_offloaded
from prunecli.checkpoint import save_checkpoint
from prunecli.cli import app
from prunecli.errors import InputError
from prunecli.methods.cfsp import CfspConfig
from prunecli.methods.flap import FlapConfig
from prunecli.methods.magnitude import MagnitudeConfig
from prunecli.methods.wanda_sp import WandaSpConfig


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text"])
@pytest.mark.parametrize(
    "config",
    [
        FlapConfig(sparsity=0.3),
        CfspConfig(sparsity=0.3, round_to=1),
        WandaSpConfig(sparsity=0.3),
        MagnitudeConfig(sparsity=0.3),
    ],
    ids=lambda c: c.method,
)
def test_offloaded_run_writes_the_in_memory_checkpoint(tmp_path: Path, arch: str, config) -> None:
    model = mixed_layers_model(arch, ["sliding_attention", "full_attention", "sliding_attention"])
    model.save_pretrained(tmp_path / "dense")
    before = {k: v.clone() for k, v in _tensors(tmp_path / "dense").items()}
    calib = torch.randint(1, 128, (6, 16), generator=torch.Generator().manual_seed(0))

    ref = prune(model, config, calib)
    save_checkpoint(model, None, tmp_path / "a", provenance={})

    streamed, weights = load_offloaded(tmp_path / "dense", dtype=torch.float32)
    assert has_meta_tensors(streamed)
    res = prune(streamed, config, calib, runner=Runner(mode="sequential", weights=weights))
    assert res.plan.removals == ref.plan.removals
    assert res.plan.bias_updates == ref.plan.bias_updates
    assert res.summary.params_after == ref.summary.params_after
    save_checkpoint(streamed, None, tmp_path / "b", provenance={}, weights=weights)

    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg_a == cfg_b
    assert json.loads((tmp_path / "b" / "prunecli.json").read_text())["verify"]["check"] == "shapes"
    # the input checkpoint is untouched
    after = _tensors(tmp_path / "dense")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_parse_size() -> None:
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    for bad in ("", "4XB", "-1GB", "0", "GB"):
        with pytest.raises(InputError):
            parse_size(bad)


def test_plan_memory_chooses_by_the_bound() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    big = plan_memory(cfg, dtype=torch.bfloat16, max_memory=5 * 10**9, nsamples=16, seqlen=128)
    assert big.mode == "sequential" and big.offload and "above --max-memory" in big.reason
    assert 13e9 < big.weight_bytes < 14e9 and big.sequential_bytes < 5e9
    roomy = plan_memory(cfg, dtype=torch.bfloat16, max_memory=64 * 10**9, nsamples=16, seqlen=128)
    assert roomy.mode == "whole" and not roomy.offload
    with pytest.raises(InputError, match="even layer by layer"):
        plan_memory(cfg, dtype=torch.bfloat16, max_memory=10**8, nsamples=16, seqlen=128)
    with pytest.raises(InputError, match="not safetensors"):
        plan_memory(
            cfg, dtype=torch.bfloat16, max_memory=5 * 10**9, nsamples=16, seqlen=128, can_offload=False
        )


def test_cli_sequential_matches_whole(tmp_path: Path, tiny_llama_dir: Path, tiny_text_file: Path) -> None:
    runner = CliRunner()
    plans, ppls = [], []
    for extra, name in (([], "whole"), (["--sequential"], "seq"), (["--max-memory", "1MB"], "bounded")):
        out = tmp_path / name
        args = [
            "compress", str(tiny_llama_dir), "--method", "flap", "--sparsity", "0.3", "--calib", str(tiny_text_file),
            "--nsamples", "8", "--seqlen", "16", "-o", str(out), "--json", *extra,
            "--eval-data", str(tiny_text_file), "--eval-seqlen", "16", "--max-windows", "4",
        ]  # fmt: skip
        result = runner.invoke(app, args)
        if name == "bounded":  # 1 MB cannot hold even one block: a one-line refusal, exit code 2
            assert result.exit_code == 2 and "even layer by layer" in result.output
            continue
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        assert report["memory"]["mode"] == ("sequential" if extra else "whole")
        assert report["memory"]["offload"] == bool(extra)
        plans.append(json.loads((out / "prunecli.json").read_text())["plan"]["removals"])
        ppls.append(report["perplexity"])
    assert plans[0] == plans[1]
    # perplexity of the streamed model (blocks read one at a time) is that of the whole model
    assert ppls[1]["before"] == pytest.approx(ppls[0]["before"], rel=1e-5)
    assert ppls[1]["after"] == pytest.approx(ppls[0]["after"], rel=1e-5)
    a, b = _tensors(tmp_path / "whole"), _tensors(tmp_path / "seq")
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


def test_cli_offloaded_refuses_recovery(tiny_llama_dir: Path, tiny_text_file: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "compress", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.3", "--sequential",
            "--recover-steps", "2", "--calib", str(tiny_text_file),
        ],
    )  # fmt: skip
    assert result.exit_code == 2 and "--recover-steps" in result.output


def test_recipe_carries_the_memory_options(tmp_path: Path) -> None:
    from prunecli.cli._recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nmethod: flap\nsparsity: 0.5\nsequential: true\nmax-memory: 5GB\n")
    assert load_recipe(recipe) == {
        "model": "m", "method": "flap", "sparsity": 0.5, "sequential": True, "max_memory": "5GB",
    }  # fmt: skip
    recipe.write_text("sequential: 3\n")
    with pytest.raises(InputError, match="sequential"):
        load_recipe(recipe)


def test_offloaded_pruned_propagation_matches_in_memory(tmp_path: Path) -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "dense")
    calib = torch.randint(1, 128, (6, 16), generator=torch.Generator().manual_seed(0))
    config = WandaSpConfig(sparsity=0.4, propagation="pruned")
    ref = prune(model, config, calib)
    streamed, weights = load_offloaded(tmp_path / "dense", dtype=torch.float32)
    res = prune(streamed, config, calib, runner=Runner(mode="sequential", weights=weights))
    assert res.plan.removals == ref.plan.removals


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_offloaded_perplexity_equals_in_memory(tmp_path: Path, arch: str) -> None:
    from prunecli.evaluate import perplexity

    model = mixed_layers_model(arch, ["sliding_attention", "full_attention", "sliding_attention"])
    model.save_pretrained(tmp_path / "dense")
    windows = torch.randint(1, 128, (5, 12), generator=torch.Generator().manual_seed(1))
    streamed, weights = load_offloaded(tmp_path / "dense", dtype=torch.float32)
    runner = Runner(mode="sequential", weights=weights, batch_tokens=24)
    assert perplexity(streamed, windows, runner=runner) == pytest.approx(perplexity(model, windows), rel=1e-5)
    # and after pruning: the blocks are read pruned and compensated
    config = FlapConfig(sparsity=0.3)
    prune(model, config, windows)
    prune(streamed, config, windows, runner=runner)
    assert perplexity(streamed, windows, runner=runner) == pytest.approx(perplexity(model, windows), rel=1e-5)
