"""Shared pieces of the benchmark scripts: the model, the data, the measurements.

Every row runs in its own subprocess so that its peak memory (``ru_maxrss``) belongs to
that row alone. The parent collects one JSON object per row, prints a table and writes
the JSON file.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CALIB = DATA / "austen_emma.txt"
HELDOUT = DATA / "austen_persuasion.txt"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_default(args: dict[str, Any] | None = None):
    """The benchmark's model (``args["model"]``, default SmolLM2-135M) from its registry package.

    Both built-in decoders (``smollm2-135m``, ``gemma3-270m``) load from an fp32 safetensors
    cache after the first load.
    """
    from prunecli.models import load_model

    return load_model((args or {}).get("model", "smollm2-135m"))


def windows(tokenizer, args: dict[str, Any]) -> dict[str, torch.Tensor]:
    from prunecli.data import calibration_windows, eval_windows

    out = {
        "calib": calibration_windows(
            tokenizer, str(CALIB), nsamples=args["nsamples"], seqlen=args["calib_seqlen"], seed=args["seed"]
        )
    }
    for L, n in zip(args["eval_seqlens"], args["eval_windows"]):
        out[f"eval{L}"] = eval_windows(tokenizer, str(HELDOUT), seqlen=L, max_windows=n)
    return out


@torch.inference_mode()
def dense_pass_seconds(model, calib: torch.Tensor, batch_size: int = 8) -> float:
    """Wall time of one dense forward pass over the calibration windows."""
    t = time.perf_counter()
    for i in range(0, calib.shape[0], batch_size):
        model(input_ids=calib[i : i + batch_size], use_cache=False)
    return time.perf_counter() - t


def measure(model, data: dict[str, torch.Tensor], args: dict[str, Any]) -> dict[str, Any]:
    """Parameters, held-out perplexity at each length, prefill throughput."""
    from prunecli.evaluate import count_parameters, perplexity, throughput

    res: dict[str, Any] = {"params": count_parameters(model)}
    for L in args["eval_seqlens"]:
        res[f"ppl{L}"] = perplexity(model, data[f"eval{L}"], batch_size=4)
    tp = throughput(model, seqlen=args["throughput_seqlen"], batch_size=1, repeats=5, warmup=1)
    res["tokens_per_s"] = tp["tokens_per_s"]
    return res


def run_worker(rows: dict[str, Callable[..., dict[str, Any]]]) -> None:
    """Entry for ``--worker ROW SPARSITY JSONARGS``: run one row, print one JSON line."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    _, row, sparsity, raw = sys.argv[1:5]
    args = json.loads(raw)
    torch.manual_seed(args["seed"])
    result = rows[row](float(sparsity), args)
    result.update({"row": row, "sparsity": float(sparsity), "peak_rss_mb": peak_rss_mb()})
    print("RESULT " + json.dumps(result), flush=True)


def run_rows(script: Path, jobs: list[tuple[str, float]], args: dict[str, Any]) -> list[dict[str, Any]]:
    """Run each (row, sparsity) in a fresh interpreter; return their results in order."""
    results = []
    for row, sparsity in jobs:
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", row, str(sparsity), json.dumps(args)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"row": row, "sparsity": sparsity, "error": " | ".join(tail)})
        else:
            results.append(json.loads(line[len("RESULT ") :]))
        results[-1]["wall_s"] = time.perf_counter() - t
        print(
            f"  {row:<22} s={sparsity:<4} done in {results[-1]['wall_s']:.0f}s", file=sys.stderr, flush=True
        )
    return results


def table(results: list[dict[str, Any]], args: dict[str, Any], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; ``columns`` are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in results:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if "error" in r and key not in ("row", "sparsity"):
                cells.append("error" if key == columns[2][0] else "")
            elif v is None:
                cells.append("–")
            else:
                cells.append(format(v, fmt) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def portable(obj: Any) -> Any:
    """``obj`` with absolute paths under the checkout's parent folder made relative to the
    checkout (``/x/repo/out/a`` -> ``out/a``, ``/x/shared/data`` -> ``../shared/data``), so the
    recorded JSON names no folder of the machine that ran it."""
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(REPO.parent) + os.sep):
        return os.path.relpath(obj, REPO)
    return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(portable(payload), indent=1))
    tmp.replace(path)
