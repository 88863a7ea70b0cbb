"""Pruning an ONNX export directly: the ONNX path against the PyTorch path on a real model.

The model is exported to ONNX (``prunecli.export.to_onnx``, dynamo, checked in onnxruntime),
then ``prunecli.compress_onnx`` prunes the file with each method (groups from the ONNX graph,
calibration through onnxruntime) and the same method prunes the PyTorch model on the same
calibration windows. Reported per method: parameters after, the perplexity of the pruned ONNX
file in onnxruntime and of the pruned PyTorch model on held-out windows of *Persuasion*,
whether both paths chose the same units, and the seconds the ONNX path took.

Usage::

    python benchmarks/onnx_prune.py smollm2-135m --methods wanda-sp,magnitude,flap --sparsity 0.2 \\
        --outdir out/onnx-prune --json docs/benchmarks/onnx_prune.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CALIB, HELDOUT, table, write_json  # noqa: E402


def token_windows(tokenizer: Any, path: Path, n: int, seqlen: int) -> np.ndarray:
    """``n`` non-overlapping windows of ``seqlen`` tokens from the start of ``path``."""
    ids = tokenizer(path.read_text()[: 40 * n * seqlen], return_tensors="np")["input_ids"][0]
    if len(ids) < n * seqlen:
        raise SystemExit(f"{path} has fewer than {n * seqlen} tokens")
    return ids[: n * seqlen].reshape(n, seqlen).astype(np.int64)


def ort_perplexity(path: Path, windows: np.ndarray) -> float:
    from prunecli.onnx.graph import _session, load_onnx

    session = _session(load_onnx(path))
    nll = []
    for w in windows:
        logits = session.run(["logits"], {"input_ids": w[None], "attention_mask": np.ones_like(w[None])})[0][
            0
        ]
        lo = torch.from_numpy(logits).double()
        nll.append(torch.nn.functional.cross_entropy(lo[:-1], torch.from_numpy(w[1:]), reduction="none"))
    return float(torch.exp(torch.cat(nll).mean()))


def torch_perplexity(model: Any, windows: np.ndarray) -> float:
    nll = []
    with torch.no_grad():
        for w in torch.from_numpy(windows):
            lo = model(input_ids=w[None], use_cache=False).logits[0].double()
            nll.append(torch.nn.functional.cross_entropy(lo[:-1], w[1:], reduction="none"))
    return float(torch.exp(torch.cat(nll).mean()))


def main() -> None:
    import prunecli
    from prunecli.config import get_method
    from prunecli.engine.apply import count_params
    from prunecli.export.onnx_export import to_onnx
    from prunecli.onnx.graph import count_initializer_params, load_onnx

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--methods", default="wanda-sp,magnitude,flap")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=128)
    ap.add_argument("--outdir", type=Path, default=Path("out/onnx-prune"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.outdir.mkdir(parents=True, exist_ok=True)

    lm = prunecli.load_model(args.model, dtype="float32")
    dense_path = args.outdir / "dense.onnx"
    started = time.perf_counter()
    export = to_onnx(lm.model, dense_path, overwrite=True)
    export_s = time.perf_counter() - started
    calib = token_windows(lm.tokenizer, CALIB, args.nsamples, args.seqlen)
    evalw = token_windows(lm.tokenizer, HELDOUT, args.eval_windows, args.eval_seqlen)
    calib_path = args.outdir / "calib.npy"
    np.save(calib_path, calib)

    rows: list[dict[str, Any]] = [
        {
            "row": "dense",
            "params_onnx": count_initializer_params(load_onnx(dense_path)),
            "params_torch": count_params(lm.model),
            "ppl_onnx": ort_perplexity(dense_path, evalw),
            "ppl_torch": torch_perplexity(lm.model, evalw),
            "same_plan": None,
            "seconds": export_s,
        }
    ]
    for method in args.methods.split(","):
        started = time.perf_counter()
        out = args.outdir / f"{method}-{args.sparsity:g}.onnx"
        report = prunecli.compress_onnx(
            dense_path, method, args.sparsity, calib=calib_path, output=out, overwrite=True
        )
        seconds = time.perf_counter() - started
        model = prunecli.load_model(args.model, dtype="float32").model
        cls, _ = get_method(method)
        result = prunecli.prune(model, cls(sparsity=args.sparsity), torch.from_numpy(calib))
        rows.append(
            {
                "row": method,
                "params_onnx": report["params"]["after"],
                "params_torch": count_params(model),
                "ppl_onnx": ort_perplexity(out, evalw),
                "ppl_torch": torch_perplexity(model, evalw),
                "same_plan": report["plan"]["removals"] == result.plan.removals,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)
    columns = [
        ("row", "method", ""),
        ("params_onnx", "ONNX initializer scalars", ","),
        ("params_torch", "PyTorch parameters", ","),
        ("ppl_onnx", "ppl (onnxruntime)", ".2f"),
        ("ppl_torch", "ppl (PyTorch path)", ".2f"),
        ("same_plan", "same units", ""),
        ("seconds", "seconds (ONNX path)", ".1f"),
    ]
    settings = vars(args) | {"outdir": str(args.outdir), "json": str(args.json)}
    print(table(rows, settings, columns))
    if args.json:
        write_json(args.json, {"settings": settings, "export": export, "rows": rows})


if __name__ == "__main__":
    main()
