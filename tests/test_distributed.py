"""Data-parallel calibration: 2 processes on gloo make the same statistics and plans as 1.

The workers are separate processes (``spawn``) that join a process group through a file in
``tmp_path``; each builds the same tiny random Llama from a fixed seed, runs the calibration
runner and every data method, and writes what it got as JSON. Joins have timeouts, so a hang
in a collective fails the test instead of blocking it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from archs import block_observations, tiny_model
from torch import nn

from prunecli.api import prune
from prunecli.calibrate import Observe, Runner
from prunecli.graph import build_graph
from prunecli.methods.cfsp import CfspConfig, prune_cfsp
from prunecli.methods.flap import FlapConfig, prune_flap
from prunecli.methods.wanda_sp import WandaSpConfig, prune_wanda_sp

REPO_ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
JOIN_TIMEOUT_S = 120
#: 8 windows of 16 tokens, 2 windows per batch: rank 0 runs batches 0 and 2, rank 1 runs 1 and 3
BATCH_TOKENS = 32

CONFIGS = {
    "flap-al-am": FlapConfig(sparsity=0.3),
    "flap-ul-um": FlapConfig(sparsity=0.3, structure="UL-UM", metric="WIFN"),
    "cfsp": CfspConfig(sparsity=0.3, round_to=1),
    "wanda-sp": WandaSpConfig(sparsity=0.3),
    "wanda-sp-pruned": WandaSpConfig(sparsity=0.3, propagation="pruned"),
}
PRUNE = {"flap": prune_flap, "cfsp": prune_cfsp, "wanda-sp": prune_wanda_sp}

#: (mode, windows, seqlen): 4 batches (2 each), 5 batches (3 + 2), 1 batch (rank 1 sees nothing)
STAT_CASES = [
    ("whole", 8, 16),
    ("sequential", 8, 16),
    ("whole", 10, 16),
    ("whole", 2, 16),
    ("sequential", 2, 16),
]


def _calib(n: int = 8, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(1, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    return tiny_model("llama", seed=0, num_hidden_layers=3)


def _key(r: Observe) -> str:
    return f"{r.module}|{r.stat}|{r.site}"


def _results() -> dict[str, Any]:
    """Plans and statistics as JSON-ready values (run in each worker and in the 1-process reference)."""
    model = _model()
    graph = build_graph(model)
    out: dict[str, Any] = {"plans": {}, "stats": []}
    for name, cfg in CONFIGS.items():
        plan = PRUNE[cfg.method](model, graph, cfg, _calib(), runner=Runner(batch_tokens=BATCH_TOKENS))
        out["plans"][name] = {"removals": plan.removals, "bias_updates": plan.bias_updates}
    # the library's verb, on a fresh copy (it prunes in place)
    result = prune(_model(), CONFIGS["flap-al-am"], _calib(), runner=Runner(batch_tokens=BATCH_TOKENS))
    out["plans"]["api"] = {"removals": result.plan.removals, "bias_updates": result.plan.bias_updates}
    reqs = block_observations(model)
    for mode, n, seqlen in STAT_CASES:
        runner = Runner(mode=mode, batch_tokens=BATCH_TOKENS)
        obs = runner.observe(model, reqs, _calib(n, seqlen))
        out["stats"].append(
            {
                "batches": runner.log[-1]["batches"],
                "obs": {_key(r): [t.double().cpu().tolist() for t in obs[r].state()] for r in reqs},
            }
        )
    return out


def _worker(rank: int, store: str, result: str) -> None:
    torch.set_num_threads(1)
    try:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
        )
        try:
            Path(result).write_text(json.dumps(_results()))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        os._exit(1)


def _run_workers(tmp_path: Path) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    store = tmp_path / "store"
    results = [tmp_path / f"rank{r}.json" for r in range(WORLD)]
    procs = [ctx.Process(target=_worker, args=(r, str(store), str(results[r]))) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(10)
    assert not hung, f"{len(hung)} worker(s) still running after {JOIN_TIMEOUT_S} s (a collective hangs?)"
    assert [p.exitcode for p in procs] == [0] * WORLD, [p.exitcode for p in procs]
    return [json.loads(r.read_text()) for r in results]


def _close(a: Any, b: Any, rtol: float) -> bool:
    """Equal to ``rtol`` (entries near zero: ``rtol`` times the largest entry)."""
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if ta.shape != tb.shape:
        return False
    return torch.allclose(ta, tb, rtol=rtol, atol=rtol * float(tb.abs().max()) if tb.numel() else 0.0)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run_workers(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def one_rank() -> dict[str, Any]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _results()
    finally:
        torch.set_num_threads(n)


def test_ranks_make_identical_plans_and_statistics(two_ranks: list[dict[str, Any]]) -> None:
    rank0, rank1 = two_ranks
    # bit for bit: every rank merges the same summaries in the same order
    assert rank0["plans"] == rank1["plans"]
    assert [s["obs"] for s in rank0["stats"]] == [s["obs"] for s in rank1["stats"]]
    # rank 0 ran batches 0, 2, (4); rank 1 ran 1, (3); the last case has one batch for rank 0 only
    assert [s["batches"] for s in rank0["stats"]] == [2, 2, 3, 1, 1]
    assert [s["batches"] for s in rank1["stats"]] == [2, 2, 2, 0, 0]


@pytest.mark.parametrize("name", [*CONFIGS, "api"])
def test_two_process_plan_equals_one_process(
    name: str, two_ranks: list[dict[str, Any]], one_rank: dict[str, Any]
) -> None:
    got, want = two_ranks[0]["plans"][name], one_rank["plans"][name]
    assert got["removals"] == want["removals"]
    assert got["removals"], "the plan removes nothing: the comparison would prove little"
    assert got["bias_updates"].keys() == want["bias_updates"].keys()
    for module, update in want["bias_updates"].items():
        # ranks merge per-rank summaries, one process folds batch by batch: same sums, other order
        assert _close(got["bias_updates"][module], update, rtol=1e-12), module


def test_two_process_statistics_equal_one_process(
    two_ranks: list[dict[str, Any]], one_rank: dict[str, Any]
) -> None:
    for case, got, want in zip(STAT_CASES, two_ranks[0]["stats"], one_rank["stats"], strict=True):
        assert got["batches"] == (want["batches"] + 1) // 2, case  # rank 0's share
        assert got["obs"].keys() == want["obs"].keys()
        for key, parts in want["obs"].items():
            assert len(got["obs"][key]) == len(parts), (case, key)
            for a, b in zip(got["obs"][key], parts, strict=True):
                assert _close(a, b, rtol=1e-12), (case, key)


# ----------------------------------------------------------------------------- the launcher

#: a stand-in for `python -m prunecli`: rank 1 fails at once, rank 0 waits (as in a collective)
FAKE_RANKS = (
    "import os, sys, time\n"
    "rank = int(os.environ['RANK'])\n"
    "assert os.environ['WORLD_SIZE'] == '2' and os.environ['MASTER_ADDR'] == '127.0.0.1'\n"
    "assert '--nproc' not in sys.argv and os.environ['PRUNECLI_BACKEND'] == 'gloo'\n"
    "if rank == int(sys.argv[1]):\n"
    "    print('some noise', file=sys.stderr)\n"
    "    print('error: boom (hint: fix it)', file=sys.stderr)\n"
    "    sys.exit(2)\n"
    "time.sleep(60)\n"
)


def test_launcher_stops_the_others_and_reports_the_failing_rank(capfd: pytest.CaptureFixture[str]) -> None:
    import time

    from prunecli.calibrate.launch import launch, without_option

    assert without_option(["compress", "m", "--nproc", "2", "--nproc=3", "--json"], "--nproc") == [
        "compress",
        "m",
        "--json",
    ]
    program = [sys.executable, "-c", FAKE_RANKS]
    t = time.perf_counter()
    assert launch(["1", "--nproc", "2"], 2, program=program) == 2
    assert time.perf_counter() - t < 30  # rank 0 was stopped, not waited for
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["error: rank 1 of 2: boom (hint: fix it)"]
    # rank 0 fails: its own line is on the terminal already, nothing is added
    assert launch(["0"], 2, program=program) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == ["some noise", "error: boom (hint: fix it)"]


# ----------------------------------------------------------------------------- the command line


def _cli(*args: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "prunecli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=JOIN_TIMEOUT_S,
    )


def test_compress_nproc_2_makes_the_plan_of_nproc_1(
    tiny_llama_dir: Path, tiny_text_file: Path, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from prunecli.checkpoint import PROVENANCE_FILE
    from prunecli.cli import app

    # 80 windows of 128 tokens = 2 mini-batches of 8192 tokens: rank 0 runs one, rank 1 the other
    args = ["--method", "flap", "--sparsity", "0.3", "--calib", tiny_text_file, "--nsamples", "80"]
    args += ["--seqlen", "128", "--json"]
    two = _cli("compress", tiny_llama_dir, *args, "--nproc", "2", "-o", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    report = json.loads(two.stdout)  # one JSON document: rank 1 printed nothing
    assert report["calibration"]["processes"] == 2 and report["output"]
    assert two.stderr.strip() == ""
    one = CliRunner().invoke(
        app, ["compress", str(tiny_llama_dir), *map(str, args), "-o", str(tmp_path / "one")]
    )
    assert one.exit_code == 0, one.stderr
    assert json.loads(one.stdout)["calibration"]["processes"] == 1

    plans = [json.loads((tmp_path / d / PROVENANCE_FILE).read_text())["plan"] for d in ("two", "one")]
    assert plans[0]["removals"] == plans[1]["removals"] and plans[0]["removals"]
    assert plans[0]["bias_updates"].keys() == plans[1]["bias_updates"].keys()
    for module, update in plans[1]["bias_updates"].items():
        assert _close(plans[0]["bias_updates"][module], update, rtol=1e-12), module


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--recover-steps", "5"], "--recover-steps cannot run in 2 processes"),
        (["--method", "loraprune"], "loraprune cannot run in 2 processes"),
    ],
)
def test_nproc_refuses_lora_training_before_loading(
    tiny_llama_dir: Path, tmp_path: Path, extra: list[str], needle: str
) -> None:
    from typer.testing import CliRunner

    from prunecli.cli import app

    args = ["compress", str(tiny_llama_dir), "-m", "flap", "-s", "0.2", "--nproc", "2", *extra]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_nproc_relaunches_with_the_command_line_unless_torchrun_started_it(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import prunecli.calibrate.launch as launch_module
    import prunecli.cli.compress as compress_module
    from prunecli.cli import app

    calls: list[Any] = []
    monkeypatch.setattr(launch_module, "launch", lambda argv, n, **kw: calls.append((argv, n, kw)) or 3)
    monkeypatch.setattr(compress_module, "run_compress", lambda opts, config, out: calls.append(opts.nproc))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["compress", str(tiny_llama_dir), "-m", "wanda-sp", "-s", "0.2", "--nproc", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 3  # the launcher's exit code
    assert calls == [(args, 2, {"backend": "gloo"})]
    # under torchrun (WORLD_SIZE set) this process is one of the ranks: it runs, it does not launch
    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert CliRunner().invoke(app, args).exit_code == 0
    assert calls == [2]
