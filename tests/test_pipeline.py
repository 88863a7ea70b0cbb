"""The library pipeline (`prunecli.compress`), `prunecli run`, recipes with gates and `extends`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

import prunecli
from prunecli.cli import app
from prunecli.errors import GateError, InputError
from prunecli.recipe import check_gates, load_recipe, parse_overrides

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def checkpoint_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a checkpoint except the run records (they hold times and the output path)."""
    skip = ("prunecli.json", "recipe.yaml")
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name not in skip}


def test_python_and_cli_give_byte_identical_checkpoints(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    recipe = {
        "model": str(tiny_llama_dir),
        "method": "wanda-sp",
        "sparsity": 0.3,
        "calib": str(tiny_text_file),
        "nsamples": 4,
        "seqlen": 16,
        "eval_data": str(tiny_text_file),
        "eval_seqlen": 16,
        "max_windows": 2,
        "speed": False,
    }
    with pytest.warns(UserWarning, match="same text"):
        report = prunecli.compress(recipe, output=str(tmp_path / "py"))
    assert isinstance(report, prunecli.Report)
    result = invoke(
        "compress", tiny_llama_dir, "-m", "wanda-sp", "-s", "0.3", "--calib", tiny_text_file, "--nsamples", "4",
        "--seqlen", "16", "--eval-data", tiny_text_file, "--eval-seqlen", "16", "--max-windows", "2",
        "--no-speed", "-o", tmp_path / "cli", "--json", "--quiet",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    cli = json.loads(result.stdout)
    assert result.stderr == ""  # --json --quiet: the document on stdout, no warnings
    py_files, cli_files = checkpoint_bytes(tmp_path / "py"), checkpoint_bytes(tmp_path / "cli")
    py_recipe, cli_recipe = (
        load_recipe(tmp_path / "py" / "recipe.yaml"),
        load_recipe(tmp_path / "cli" / "recipe.yaml"),
    )
    assert py_recipe.pop("output") != cli_recipe.pop("output") and py_recipe == cli_recipe  # only -o differs
    assert py_files == cli_files and "model.safetensors" in py_files

    # the report is the --json output: same keys, same plan, same numbers
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == set(cli)
    for key in ("config", "params", "sparsity", "calibration", "plan", "summary"):
        assert data[key] == cli[key], key
    assert data["perplexity"]["after"] == pytest.approx(cli["perplexity"]["after"], rel=1e-9)
    assert cli["perplexity"]["tokens_per_s_before"] is None  # --no-speed
    # ... and the provenance file's content (the writer adds versions, the time and `verify`)
    prov = json.loads((tmp_path / "py" / "prunecli.json").read_text())
    for key in ("config", "params", "sparsity", "calibration", "plan", "summary", "recipe", "method"):
        assert prov[key] == data[key], key
    assert prov["verify"] == data["verify"] and data["verify"]["check"] == "logits"
    # the saved recipe describes this run, with absolute paths
    saved = load_recipe(tmp_path / "py" / "recipe.yaml")
    assert saved["calib"] == str(tiny_text_file.resolve()) and saved["output"] == str(
        (tmp_path / "py").resolve()
    )


def test_compress_accepts_options_objects_and_refuses_unknown_keys(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    opts = prunecli.CompressOptions(model=str(tiny_llama_dir), method="magnitude", sparsity=0.25)
    report = prunecli.compress(opts, on_warning=lambda message: None)
    assert report.output is None and 0.2 < report.sparsity["blocks"] < 0.3
    with pytest.raises(InputError, match="unknown key 'sparsityy'"):
        prunecli.compress({"model": str(tiny_llama_dir), "method": "magnitude", "sparsityy": 0.2})
    with pytest.raises(InputError, match="not read from a recipe"):
        prunecli.compress(
            {"model": str(tiny_llama_dir), "method": "magnitude", "sparsity": 0.2, "overwrite": True}
        )


def test_gates_pass_and_fail(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = {"model": str(tiny_llama_dir), "method": "magnitude", "sparsity": 0.3}
    report = prunecli.compress({**base, "expect": {"min_block_sparsity": 0.2, "max_seconds": 600}})
    assert [g["passed"] for g in report.gates] == [True, True]
    with pytest.raises(GateError) as err:
        prunecli.compress({**base, "expect": {"min_block_sparsity": 0.5}}, output=str(tmp_path / "g"))
    (failure,) = err.value.failures
    assert failure["gate"] == "min_block_sparsity" and failure["by"] == pytest.approx(0.5 - failure["value"])
    assert err.value.exit_code == 3 and (tmp_path / "g" / "model.safetensors").is_file()  # the result is kept
    # gates that need an evaluation are refused before anything is loaded
    with pytest.raises(InputError, match="max_ppl_ratio needs a perplexity"):
        prunecli.compress({**base, "expect": {"max_ppl_ratio": 2.0}})
    with pytest.raises(InputError, match="unknown gate"):
        prunecli.compress({**base, "expect": {"max_ppl_ratioo": 2.0}})


def test_check_gates_by_hand() -> None:
    report = {
        "perplexity": {
            "before": 10.0,
            "after": 15.0,
            "tokens_per_s_before": 100.0,
            "tokens_per_s_after": 90.0,
        },
        "sparsity": {"blocks": 0.2, "model": 0.15},
        "params": {"after": 1000},
        "seconds": {"total": 12.0},
    }
    got = {
        g["gate"]: g
        for g in check_gates(report, {"max_ppl_ratio": 1.4, "min_speedup": 1.0, "max_params": 1000})
    }
    assert got["max_ppl_ratio"]["value"] == 1.5 and got["max_ppl_ratio"]["by"] == pytest.approx(0.1)
    assert not got["max_ppl_ratio"]["passed"] and "off by 0.1" in got["max_ppl_ratio"]["message"]
    assert got["min_speedup"]["by"] == pytest.approx(0.1) and got["max_params"]["passed"]
    (missing,) = check_gates({"perplexity": None}, {"max_ppl": 20.0})
    assert not missing["passed"] and "not measured" in missing["message"]


def _write_recipes(folder: Path, model: Path, text: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "calib.txt").write_bytes(text.read_bytes())
    (folder / "base.yaml").write_text(
        f"model: {model}\ncalib: data/calib.txt\nnsamples: 4\nseqlen: 16\nseed: 3\nspeed: false\n"
        "expect:\n  max_seconds: 900\n"
    )
    (folder / "wanda.yaml").write_text(
        "extends: base.yaml\nmethod: wanda-sp\nsparsity: 0.3\noutput: ../out/wanda\n"
        "expect:\n  min_block_sparsity: 0.25\n"
    )
    return folder / "wanda.yaml"


def test_run_extends_relative_paths_and_replay(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _write_recipes(tmp_path / "recipes", tiny_llama_dir, tiny_text_file)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # paths are read relative to the recipe, not the current directory
    loaded = load_recipe(recipe)
    assert loaded["calib"] == str((tmp_path / "recipes" / "data" / "calib.txt").resolve())
    assert loaded["expect"] == {"max_seconds": 900.0, "min_block_sparsity": 0.25} and loaded["seed"] == 3

    result = invoke("run", recipe, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    out = tmp_path / "out" / "wanda"
    assert report["output"] == str(out.resolve()) and {g["gate"] for g in report["gates"]} == {
        "max_seconds",
        "min_block_sparsity",
    }
    first = checkpoint_bytes(out)

    # the saved effective recipe replays from another directory, into another folder, byte for byte
    saved = out / "recipe.yaml"
    assert "extends:" not in saved.read_text() and load_recipe(saved)["seed"] == 3
    monkeypatch.chdir(tmp_path)
    result = invoke("run", saved, "--set", "output=replay", "--json")
    assert result.exit_code == 0, result.stderr
    assert checkpoint_bytes(tmp_path / "replay") == first
    again = load_recipe(tmp_path / "replay" / "recipe.yaml")
    assert again.pop("output") == str((tmp_path / "replay").resolve())
    assert again == {k: v for k, v in load_recipe(saved).items() if k != "output"}

    # a failing gate: exit 3, the report on stdout, one line saying which gate and by how much
    result = invoke(
        "run", recipe, "--set", "expect.min_block_sparsity=0.6", "--set", "output=failed", "--json"
    )
    assert result.exit_code == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert (
        len(lines) == 1 and "min_block_sparsity" in lines[0] and "off by" in lines[0] and "hint:" in lines[0]
    )
    assert json.loads(result.stdout)["gates"][1]["passed"] is False


def test_run_set_overrides_and_bad_keys(tmp_path: Path) -> None:
    assert parse_overrides(["sparsity=0.3", "set.metric=WIFV", "expect.max_ppl=50"]) == {
        "sparsity": 0.3,
        "set": {"metric": "WIFV"},
        "expect": {"max_ppl": 50.0},
    }
    with pytest.raises(InputError, match="unknown key"):
        parse_overrides(["sparsityy=0.3"])
    with pytest.raises(InputError, match="only set.FIELD"):
        parse_overrides(["calib.x=1"])
    cyclic = tmp_path / "a.yaml"
    cyclic.write_text("extends: a.yaml\nmethod: magnitude\n")
    with pytest.raises(InputError, match="extends itself"):
        load_recipe(cyclic)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_write_to_the_ignored_out_folder(path: Path) -> None:
    from prunecli.pipeline import resolve_options

    repo = path.parent.parent
    recipe = load_recipe(path)
    if "method" not in recipe:  # the shared base
        return
    opts, _ = resolve_options({"overwrite": True}, {"overwrite"}, path)  # it may have been run here
    assert Path(opts.output).is_relative_to(repo / "out")
    assert "out/" in (repo / ".gitignore").read_text().split()
    assert opts.eval_data == "builtin:heldout" and opts.expect
    assert os.path.isabs(opts.output)


def test_eval_several_models_from_stdin_and_jsonl(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    # compress --json | eval - : the report's output folder is read from stdin
    result = invoke(
        "compress", tiny_llama_dir, "-m", "magnitude", "-s", "0.3", "-o", tmp_path / "m", "--json"
    )
    assert result.exit_code == 0, result.stderr
    args = ["eval", "-", "--data", tiny_text_file, "--seqlen", "16", "--max-windows", "2", "--no-speed"]
    piped = runner.invoke(app, [*map(str, args), "--jsonl"], input=result.stdout)
    assert piped.exit_code == 0, piped.stderr
    (line,) = piped.stdout.splitlines()
    assert json.loads(line)["model"] == str((tmp_path / "m").resolve())

    # names one per line plus an argument: one JSON line each; --json gives one list document
    names = f"{tiny_llama_dir}\n{tmp_path / 'm'}\n"
    piped = runner.invoke(app, [*map(str, args), "--jsonl"], input=names)
    reports = [json.loads(x) for x in piped.stdout.splitlines()]
    assert [r["model"] for r in reports] == [str(tiny_llama_dir), str(tmp_path / "m")]
    assert reports[0]["params"] > reports[1]["params"]
    piped = runner.invoke(app, [*map(str, args), "--json"], input=names)
    assert [r["params"] for r in json.loads(piped.stdout)] == [r["params"] for r in reports]
    piped = runner.invoke(app, [*map(str, args), "--quiet"], input=names)
    assert [x.split("\t")[0] for x in piped.stdout.splitlines()] == [str(tiny_llama_dir), str(tmp_path / "m")]

    # nothing on stdin, or a missing model among several: one line, before any model is loaded
    empty = runner.invoke(app, list(map(str, args)), input="")
    assert empty.exit_code == 2 and "no model to evaluate" in empty.stderr and empty.stdout == ""
    missing = runner.invoke(app, list(map(str, args)), input=f"{tiny_llama_dir}\n{tmp_path / 'nope'}\n")
    assert missing.exit_code == 2 and missing.stdout == "" and len(missing.stderr.strip().splitlines()) == 1


def test_eval_warns_beyond_the_models_maximum_length(tiny_llama_dir: Path, tiny_text_file: Path) -> None:
    result = invoke("eval", tiny_llama_dir, "--data", tiny_text_file, "--seqlen", "300", "--max-windows", "1",
                    "--no-speed", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "exceed the model's maximum length (256)" in result.stderr
    assert json.loads(result.stdout)["seqlen"] == 300


def test_methods_lists_every_method_with_its_set_options() -> None:
    from prunecli.config import get_method, method_names

    result = invoke("methods", "--json")
    assert result.exit_code == 0, result.stderr
    methods = {m["method"]: m for m in json.loads(result.stdout)}
    assert set(methods) == set(method_names())
    flap = {o["name"]: o for o in methods["flap"]["options"]}
    assert (
        flap["metric"]["default"] == get_method("flap")[0]().metric
        and flap["bias_compensation"]["type"] == "bool"
    )
    assert "AAAI 2024" in methods["flap"]["paper"] and methods["flap"]["needs_data"]
    assert methods["magnitude"]["options"] == [] and not methods["magnitude"]["needs_data"]
    assert "sparsity" not in flap  # it has its own flag


def test_ignore_that_matches_nothing_or_lowers_the_sparsity_warns(tiny_llama_dir: Path) -> None:
    seen: list[str] = []
    base = {"model": str(tiny_llama_dir), "method": "magnitude", "sparsity": 0.3}
    report = prunecli.compress({**base, "ignore": ["model.layer.0.*"]}, on_warning=seen.append)
    assert any("'model.layer.0.*' matches no module" in w for w in seen) and report.warnings == seen
    seen.clear()
    report = prunecli.compress({**base, "ignore": ["model.layers.0.*"]}, on_warning=seen.append)
    assert not any("matches no module" in w for w in seen)
    assert any("excluded by --ignore" in w for w in seen) and report.sparsity["blocks"] < 0.25
    assert "trust_remote_code=True" not in (report.load_hint or "")  # nothing saved: no hint


def test_speed_is_measured_interleaved_with_the_dense_model(
    tiny_llama_dir: Path, tiny_text_file: Path
) -> None:
    recipe = {
        "model": str(tiny_llama_dir), "method": "magnitude", "sparsity": 0.5, "eval_data": str(tiny_text_file),
        "eval_seqlen": 32, "max_windows": 2, "expect": {"min_speedup": 0.01},
    }  # fmt: skip
    report = prunecli.compress(recipe)
    ppl = report.perplexity
    assert ppl["tokens_per_s_before"] > 0 and ppl["tokens_per_s_after"] > 0
    assert "interleaved" in ppl["speed_method"] and "median of 5 rounds" in ppl["speed_method"]
    (gate,) = report.gates
    assert gate["passed"] and gate["value"] == pytest.approx(
        ppl["tokens_per_s_after"] / ppl["tokens_per_s_before"]
    )
    with pytest.raises(InputError, match="min_speedup needs the speed"):
        prunecli.compress({**recipe, "speed": False})


def test_compare_throughput_times_every_model_each_round() -> None:
    from conftest import build_tiny_llama

    from prunecli.evaluate import compare_throughput

    a, b = build_tiny_llama(seed=0), build_tiny_llama(seed=1)
    got = compare_throughput({"a": a, "b": b}, seqlen=16, rounds=3)
    assert set(got) == {"a", "b"} and all(len(v["times"]) == 3 for v in got.values())
    assert got["a"]["tokens_per_s"] == pytest.approx(16 / sorted(got["a"]["times"])[1])


def test_inspect_draws_the_kept_widths_per_layer(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    recipe = {
        "model": str(tiny_llama_dir),
        "method": "magnitude",
        "sparsity": 0.3,
        "ignore": ["model.layers.0.*"],
    }
    report = prunecli.compress(recipe, output=str(out), on_warning=lambda message: None)
    assert "trust_remote_code=True" in report.load_hint  # widths differ by layer
    removed = report.plan["removals"]
    heads_gone = len(removed.get("model.layers.1.self_attn:heads", []))
    channels_gone = len(removed.get("model.layers.1.mlp:channels", []))
    data = json.loads(invoke("inspect", out, "--json").stdout)
    widths = data["kept_widths"]
    assert widths["layers"] == [0, 1] and widths["attention heads"][0] == widths["MLP channels"][0] == 1.0
    assert widths["attention heads"][1] == pytest.approx((4 - heads_gone) / 4)
    assert widths["MLP channels"][1] == pytest.approx((128 - channels_gone) / 128) and channels_gone > 0
    human = invoke("inspect", out)
    assert "kept widths per layer" in human.stdout and "MLP channels" in human.stdout
    pytest.importorskip("matplotlib")
    png = tmp_path / "widths.png"
    result = invoke("inspect", out, "--plot", png, "--quiet")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(invoke("inspect", tiny_llama_dir, "--json").stdout)["kept_widths"]["MLP channels"] == [
        1.0,
        1.0,
    ]


def test_cache_list_and_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))  # never the real cache
    entry = tmp_path / "cache" / "gguf" / "tiny-0123"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 1000)
    (entry / "prunecli-cache.json").write_text(json.dumps({"fingerprint": {"source": "/models/tiny.gguf"}}))
    (tmp_path / "cache" / "assembled").mkdir()
    (tmp_path / "cache" / "assembled" / "big.gguf").write_bytes(b"y" * 500)
    (tmp_path / "cache" / "gguf" / ".tiny-0456.tmp").mkdir()  # being written: not an entry

    listed = json.loads(invoke("cache", "list", "--json").stdout)
    names = {e["name"]: e for e in listed["entries"]}
    assert set(names) == {"gguf/tiny-0123", "assembled/big.gguf"}
    assert (
        names["assembled/big.gguf"]["bytes"] == 500
        and names["gguf/tiny-0123"]["source"] == "/models/tiny.gguf"
    )
    assert listed["bytes"] == 500 + names["gguf/tiny-0123"]["bytes"]

    bad = invoke("cache", "clear", "gguf/nope")
    assert bad.exit_code == 2 and "not a cache entry" in bad.stderr and entry.is_dir()
    assert invoke("cache", "clear").exit_code == 2  # neither names nor --all
    result = invoke("cache", "clear", "gguf/tiny-0123", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["removed"][0]["name"] == "gguf/tiny-0123"
    assert not entry.exists() and (tmp_path / "cache" / "assembled" / "big.gguf").is_file()
    assert invoke("cache", "clear", "--all", "-q").stdout.strip() == "500 B"
    assert json.loads(invoke("cache", "list", "--json").stdout)["entries"] == []
