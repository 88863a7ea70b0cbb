"""The output folder: --overwrite replaces only prunecli checkpoints, unwritable outputs fail
before the model loads, and written files follow the umask."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.errors import OutputExistsError, OutputNotWritableError

runner = CliRunner()


def tiny(seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    return LlamaForCausalLM(config).eval()


def compress(*args):
    return runner.invoke(app, ["compress", *map(str, args)])


def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading the model."""
    import prunecli.models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(prunecli.models, "load_model", refuse)


def one_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- library
def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    from prunecli.checkpoint import save_checkpoint

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "prunecli.json").write_text('{"note": "not written by prunecli"}')
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match="not a prunecli checkpoint"):
        save_checkpoint(tiny(), None, out, provenance={}, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_refuses_cwd_home_root_and_ancestors(tmp_path, monkeypatch):
    from prunecli.checkpoint import save_checkpoint

    work = tmp_path / "project" / "run"
    work.mkdir(parents=True)
    (tmp_path / "project" / "sibling").mkdir()
    (tmp_path / "project" / "prunecli.json").write_text('{"prunecli_version": "1"}')  # looks like one
    (work / "prunecli.json").write_text('{"prunecli_version": "1"}')
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "project" / "sibling"))
    for target in (".", work, tmp_path / "project", "/", tmp_path / "project" / "sibling"):
        with pytest.raises(OutputExistsError, match="refusing to replace"):
            save_checkpoint(tiny(), None, target, provenance={}, overwrite=True)
    assert (tmp_path / "project" / "sibling").is_dir() and (work / "prunecli.json").is_file()


def test_overwrite_refuses_the_input_model_and_its_ancestors(tmp_path):
    from prunecli.checkpoint import check_output_dir, save_checkpoint

    src = save_checkpoint(tiny(), None, tmp_path / "models" / "src", provenance={})
    for target in (src, src.parent, tmp_path):
        with pytest.raises(OutputExistsError, match="loaded from"):
            check_output_dir(target, overwrite=True, inputs=(src,))
    with pytest.raises(OutputExistsError, match="loaded from"):
        check_output_dir(tmp_path / "models", overwrite=True, inputs=(src / "model.safetensors",))


def test_overwrite_replaces_a_prunecli_checkpoint(tmp_path):
    import json

    from prunecli.checkpoint import save_checkpoint

    out = save_checkpoint(tiny(0), None, tmp_path / "ckpt", provenance={"run": 1})
    save_checkpoint(tiny(1), None, out, provenance={"run": 2}, overwrite=True)
    assert json.loads((out / "prunecli.json").read_text())["run"] == 2


def test_unwritable_output_is_a_typed_error_before_writing(tmp_path, monkeypatch):
    import prunecli.checkpoint.save as save_mod

    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputNotWritableError, match="not a folder"):
        save_mod.save_checkpoint(tiny(), None, blocker / "out", provenance={})

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(save_mod, "_probe_write", denied)
    with pytest.raises(OutputNotWritableError, match="Permission denied"):
        save_mod.save_checkpoint(tiny(), None, tmp_path / "a" / "b", provenance={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    from prunecli.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        out = save_checkpoint(tiny(), None, tmp_path / "ckpt", provenance={})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_gguf_cache_files_follow_the_umask(tmp_path, monkeypatch):
    import prunecli.models.gguf as gguf_mod

    def convert(gguf, dest):  # like safetensors: a 0600 weight file
        tiny().save_pretrained(dest)

    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_mod, "_convert", convert)
    monkeypatch.setattr(gguf_mod, "_require_gguf_packages", lambda: None)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake")
    old = os.umask(0o022)
    try:
        cache = gguf_mod.ensure_gguf_cache(gguf)
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in cache.iterdir()} == {0o644}


# ----------------------------------------------------------------------------- CLI
def test_cli_overwrite_of_unrelated_folders_is_refused_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    no_loading(monkeypatch)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    base = ("compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "--overwrite", "-o")
    one_error(runner.invoke(app, [*map(str, base), str(mine)]), "not a prunecli checkpoint")
    monkeypatch.chdir(mine)
    one_error(runner.invoke(app, [*map(str, base), "."]), "refusing to replace")
    one_error(runner.invoke(app, [*map(str, base), str(tmp_path)]), "refusing to replace")
    one_error(runner.invoke(app, [*map(str, base), str(tiny_llama_dir)]), "loaded from")
    assert (mine / "notes.txt").read_text() == "keep me" and (tiny_llama_dir / "config.json").is_file()


def test_cli_unwritable_output_exits_2_before_loading(tiny_llama_dir, tmp_path, monkeypatch):
    import prunecli.checkpoint.save as save_mod

    no_loading(monkeypatch)
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    one_error(compress(tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", blocker / "out"), "not a folder")

    def denied(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(save_mod, "_probe_write", denied)
    result = compress(tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", tmp_path / "out")
    one_error(result, "cannot write to", "Permission denied")


def test_cli_reports_the_verify_check(tiny_llama_dir, tmp_path):
    import json

    args = ("compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "--json", "-o")
    result = runner.invoke(app, [*map(str, args), str(tmp_path / "a")])
    assert result.exit_code == 0, result.stderr
    verify = json.loads(result.stdout)["verify"]
    assert verify["check"] == "logits" and verify["max_abs_diff"] == 0.0 and verify["route"] == "stock"
    assert json.loads((tmp_path / "a" / "prunecli.json").read_text())["verify"] == verify
    result = runner.invoke(app, [*map(str, args), str(tmp_path / "b"), "--no-verify"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["verify"]["check"] == "none"
    result = runner.invoke(app, [*map(str, args[:-2]), "-o", str(tmp_path / "c")])
    assert result.exit_code == 0 and "verified: reloaded (stock) logits match" in result.stdout
