"""Exports of dense and pruned checkpoints: file sizes, onnxruntime / llama.cpp speed, top-1 agreement.

For each model: ``prunecli.export`` writes ONNX (float32) and GGUF (f32 and q8_0); the top-1
next-token prediction of every export is compared with transformers' on held-out windows of
Austen's *Persuasion*; then prefill throughput (one sequence of ``--prefill`` tokens) is measured
in onnxruntime and llama.cpp, and decode throughput (``--decode`` tokens, one at a time after the
prefill) in llama.cpp, the models interleaved round-robin (median over ``--rounds``) so that
their ratios survive a shared machine's drift.

llama.cpp parts need llama-cpp-python (``CMAKE_ARGS="-DGGML_NATIVE=on" pip install
llama-cpp-python``); without it those columns are empty.

Usage::

    python benchmarks/export.py smollm2-135m out/smollm2-flap-20 out/smollm2-flap-50 \\
        --outdir out/exports --json docs/benchmarks/export.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HELDOUT, table, write_json  # noqa: E402

THREADS = 2


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_run(session: Any, ids: np.ndarray) -> np.ndarray:
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def llama(path: Path, n_ctx: int, logits_all: bool, kv_f32: bool = False) -> Any:
    """A llama.cpp context; ``kv_f32`` keeps the KV cache in float32 (default: llama.cpp's float16)."""
    from prunecli.export import open_llama

    return open_llama(
        path,
        kv_f32=kv_f32,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        logits_all=logits_all,
    )


def export_and_compare(spec: str, outdir: Path, windows: torch.Tensor, has_llama: bool) -> dict[str, Any]:
    """Export one model and measure top-1 agreement of each export with transformers."""
    from prunecli.evaluate import count_parameters
    from prunecli.export import to_gguf, to_onnx
    from prunecli.models import load_model

    lm = load_model(spec, dtype="float32")
    name = Path(spec).name
    row: dict[str, Any] = {"model": name, "params": count_parameters(lm.model)}
    with torch.inference_mode():
        ref = torch.cat([lm.model(input_ids=w[None], use_cache=False).logits[0].argmax(-1) for w in windows])
    ref = ref.numpy()
    files = {
        "onnx": outdir / f"{name}.onnx",
        "gguf_f32": outdir / f"{name}-f32.gguf",
        "gguf_q8_0": outdir / f"{name}-q8_0.gguf",
    }
    t = time.perf_counter()
    rep = to_onnx(lm.model, files["onnx"], overwrite=True)
    row["onnx_export_s"] = time.perf_counter() - t
    row["onnx_verify_diff"] = rep["verify"]["max_abs_diff"]
    for outtype in ("f32", "q8_0"):
        rep = to_gguf(lm.model, lm.tokenizer, files[f"gguf_{outtype}"], outtype=outtype, overwrite=True)
        row["gguf_arch"] = rep["architecture"]
        if rep["verify"].get("check") == "llama.cpp":
            row[f"gguf_{outtype}_verify_diff"] = rep["verify"]["max_abs_diff"]
    for key, path in files.items():
        row[f"{key}_mb"] = path.stat().st_size / 1e6
    del lm
    gc.collect()

    session = ort_session(files["onnx"])
    got = np.concatenate([ort_run(session, w[None].numpy())[0].argmax(-1) for w in windows])
    row["onnx_top1"] = float((got == ref).mean())
    del session
    if has_llama:
        # f32 with an f32 KV cache (the export itself), then llama.cpp's defaults (f16 KV cache)
        for outtype, kv_f32, key in (
            ("f32", True, "gguf_f32_top1"),
            ("f32", False, "gguf_f32_kv16_top1"),
            ("q8_0", False, "gguf_q8_0_top1"),
        ):
            llm = llama(files[f"gguf_{outtype}"], windows.shape[1], logits_all=True, kv_f32=kv_f32)
            preds = []
            for w in windows:
                llm.reset()
                llm.eval(w.tolist())
                preds.append(np.asarray(llm.scores[: len(w)]).argmax(-1))
            llm.close()
            row[key] = float((np.concatenate(preds) == ref).mean())
    row["files"] = {k: str(v) for k, v in files.items()}
    return row


def speed(
    rows: list[dict[str, Any]], prompt: list[int], decode: list[int], rounds: int, has_llama: bool
) -> None:
    """Interleaved prefill/decode timings, median over rounds, written into ``rows``."""
    ids = np.asarray([prompt], dtype=np.int64)
    runners: list[tuple[dict[str, Any], str, Any]] = []
    for row in rows:
        session = ort_session(Path(row["files"]["onnx"]))
        ort_run(session, ids)  # warm-up
        runners.append((row, "onnx", session))
        if has_llama:
            for outtype in ("f32", "q8_0"):
                llm = llama(
                    Path(row["files"][f"gguf_{outtype}"]), len(prompt) + len(decode) + 8, logits_all=False
                )
                llm.eval(prompt[:32])  # warm-up
                llm.reset()
                runners.append((row, f"gguf_{outtype}", llm))
    times: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
    for _ in range(rounds):
        for row, kind, runner in runners:
            if kind == "onnx":
                t = time.perf_counter()
                ort_run(runner, ids)
                pre, dec = time.perf_counter() - t, None
            else:
                runner.reset()
                t = time.perf_counter()
                runner.eval(prompt)
                pre = time.perf_counter() - t
                t = time.perf_counter()
                for token in decode:
                    runner.eval([token])
                dec = time.perf_counter() - t
            times.setdefault((row["model"], kind), []).append((pre, dec))
    for row in rows:
        for kind in ("onnx", "gguf_f32", "gguf_q8_0"):
            samples = times.get((row["model"], kind))
            if not samples:
                continue
            row[f"{kind}_prefill_tok_s"] = len(prompt) / statistics.median(p for p, _ in samples)
            if samples[0][1] is not None:
                row[f"{kind}_decode_tok_s"] = len(decode) / statistics.median(d for _, d in samples)
    for _, kind, runner in runners:
        if kind != "onnx":
            runner.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model specs; the first is the dense reference")
    ap.add_argument("--outdir", type=Path, required=True, help="folder for the exported files")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows for the agreement")
    ap.add_argument("--seqlen", type=int, default=256, help="tokens per agreement window")
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(THREADS)
    from prunecli.data import eval_windows
    from prunecli.models import load_model

    has_llama = importlib.util.find_spec("llama_cpp") is not None
    a.outdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_model(a.models[0]).tokenizer
    windows = eval_windows(tokenizer, str(HELDOUT), seqlen=a.seqlen, max_windows=a.windows)
    text = eval_windows(tokenizer, str(HELDOUT), seqlen=a.prefill + a.decode, max_windows=a.windows + 1)[-1]
    prompt, decode = text[: a.prefill].tolist(), text[a.prefill :].tolist()

    rows = []
    for spec in a.models:
        print(f"exporting {spec}", file=sys.stderr, flush=True)
        rows.append(export_and_compare(spec, a.outdir, windows, has_llama))
    print("timing", file=sys.stderr, flush=True)
    speed(rows, prompt, decode, a.rounds, has_llama)
    dense = rows[0]
    for row in rows:
        for kind in ("onnx", "gguf_f32", "gguf_q8_0"):
            key = f"{kind}_prefill_tok_s"
            if key in row and key in dense:
                row[f"{kind}_prefill_speedup"] = row[key] / dense[key]
    columns = [
        ("model", "model", ""),
        ("params", "params", ","),
        ("gguf_arch", "GGUF arch", ""),
        ("onnx_mb", "ONNX MB", ".0f"),
        ("gguf_f32_mb", "GGUF f32 MB", ".0f"),
        ("gguf_q8_0_mb", "GGUF q8_0 MB", ".0f"),
        ("onnx_top1", "ORT top-1", ".2%"),
        ("gguf_f32_top1", "llama.cpp f32 top-1", ".2%"),
        ("gguf_f32_kv16_top1", "(f16 KV cache)", ".2%"),
        ("gguf_q8_0_top1", "llama.cpp q8_0 top-1", ".2%"),
        ("onnx_prefill_tok_s", "ORT prefill tok/s", ".0f"),
        ("gguf_f32_prefill_tok_s", "llama.cpp f32 prefill tok/s", ".0f"),
        ("gguf_f32_prefill_speedup", "(x dense)", ".2f"),
        ("gguf_f32_decode_tok_s", "llama.cpp f32 decode tok/s", ".1f"),
        ("gguf_q8_0_prefill_tok_s", "llama.cpp q8_0 prefill tok/s", ".0f"),
        ("gguf_q8_0_prefill_speedup", "(x dense)", ".2f"),
        ("gguf_q8_0_decode_tok_s", "llama.cpp q8_0 decode tok/s", ".1f"),
    ]
    md = table(rows, {}, columns)
    print(md)
    if a.json is not None:
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        write_json(
            a.json,
            {
                "args": args,
                "threads": THREADS,
                "agreement_tokens": int(windows.numel()),
                "llama_cpp": has_llama,
                "rows": rows,
                "table": md,
            },
        )


if __name__ == "__main__":
    main()
