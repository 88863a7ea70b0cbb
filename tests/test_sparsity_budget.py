"""``sparsity`` is a share of every attention + MLP block, locked or ignored ones included."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
from conftest import build_tiny_llama

from prunecli.api import PruneResult, SparsityWarning, prune, sparsity_warning
from prunecli.graph import build_graph
from prunecli.methods._budget import all_block_params, largest_step
from prunecli.methods.magnitude import MagnitudeConfig

# tiny Llama, per layer: q, o 64x64; k, v 32x64; gate, up, down 64x128 -> 12288 + 24576
ATTN, MLP = 12288, 24576


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread_module):
    yield


def test_all_block_params_counts_locked_groups() -> None:
    model = build_tiny_llama()
    graph = build_graph(model)
    assert all_block_params(model, graph) == 2 * (ATTN + MLP)
    locked = copy.deepcopy(graph)
    for g in locked.groups.values():
        if g.kind == "heads":
            g.prunable, g.reason = False, "locked for the test"
    assert all_block_params(model, locked) == 2 * (ATTN + MLP)
    # one step: a key/value head with its two query heads (q 16 rows + o 16 cols each, k + v 16 rows)
    assert largest_step(graph, [g for g in graph.prunable() if g.layer is not None]) == 3 * 2048


def test_sparsity_warning_hand_cases() -> None:
    assert sparsity_warning(0.2, 0.2, 100, 10_000, 10_000) is None
    assert sparsity_warning(0.2, 0.19, 100, 10_000, 10_000) is None  # exactly one step short
    msg = sparsity_warning(0.2, 0.18, 100, 10_000, 10_000, "flap")
    assert msg is not None and msg.startswith("flap removed 0.1800") and "coarser" in msg
    msg = sparsity_warning(0.2, 0.1333, 192, 73_728, 49_152, "magnitude")
    assert msg is not None and "66.7%" in msg and "--ignore" in msg


def test_ignored_attention_is_still_in_the_denominator() -> None:
    model = build_tiny_llama()
    with pytest.warns(SparsityWarning, match="66.7%"):
        result = prune(model, MagnitudeConfig(sparsity=0.3, ignore=("*self_attn*",)))
    assert isinstance(result, PruneResult)
    assert result.block_params_before == 2 * (ATTN + MLP)
    # 30 % of each MLP (38 of 128 channels of 192 parameters), measured against all blocks
    removed = 2 * 38 * 192
    assert result.block_params_after == result.block_params_before - removed
    assert result.achieved_sparsity == pytest.approx(removed / (2 * (ATTN + MLP)))
    assert len(result.warnings) == 1 and result.to_dict()["sparsity"]["achieved"] == result.achieved_sparsity


def test_locked_attention_is_still_in_the_denominator() -> None:
    model = build_tiny_llama()
    graph = copy.deepcopy(build_graph(model))
    for g in graph.groups.values():
        if g.kind == "heads":
            g.prunable, g.reason = False, "locked for the test"
    with pytest.warns(SparsityWarning):
        result = prune(model, MagnitudeConfig(sparsity=0.3), graph=graph)
    assert result.block_params_before == 2 * (ATTN + MLP)
    assert result.achieved_sparsity < 0.25  # the engine's own count (MLP + k/v) would say more
    assert result.summary.block_sparsity > result.achieved_sparsity


def test_no_warning_when_the_target_is_met() -> None:
    model = build_tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparsityWarning)
        result = prune(model, MagnitudeConfig(sparsity=0.3))
    assert result.warnings == [] and abs(result.achieved_sparsity - 0.3) * 2 * (ATTN + MLP) <= 3 * 2048


def test_compress_prints_the_warning_and_reports_the_real_share(tiny_llama_dir: Path) -> None:
    from typer.testing import CliRunner

    from prunecli.cli import app

    args = [
        "compress",
        str(tiny_llama_dir),
        "-m",
        "magnitude",
        "-s",
        "0.3",
        "--ignore",
        "*self_attn*",
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"]["blocks_before"] == 2 * (ATTN + MLP)
    assert report["sparsity"]["blocks"] == pytest.approx(2 * 38 * 192 / (2 * (ATTN + MLP)))
    assert len(report["warnings"]) == 1
    assert "warning: magnitude removed 0.1979" in result.stderr


def test_model_without_layers_measures_against_the_whole_model() -> None:
    import torch
    from archs import tiny_cnn

    model = tiny_cnn()
    graph = build_graph(model, (torch.randn(1, 3, 16, 16),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SparsityWarning)
        result = prune(model, MagnitudeConfig(sparsity=0.3), graph=graph)
    assert result.block_params_before == result.summary.params_before
    assert result.achieved_sparsity == pytest.approx(result.summary.model_sparsity)
    assert 0.0 < result.achieved_sparsity < 0.5
