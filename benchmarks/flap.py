"""FLAP beside the baselines and Torch-Pruning on SmolLM2-135M.

Usage (the defaults are what docs/benchmarks.md records)::

    python benchmarks/flap.py --out docs/benchmarks/flap.json

Rows: dense, FLAP, wanda-sp, magnitude, random (prunecli), and Torch-Pruning 1.6.1 with
its own magnitude and Taylor importance at the same parameter budget. Torch-Pruning's
head pruning crashes on this grouped-query model (see ../shared/FACTS.md), so its rows
spend the whole budget on MLP channels. Calibration on Austen's *Emma*, perplexity on
*Persuasion* (held out) at sequence lengths 128 (the paper's setting) and 512.
Columns: parameters, perplexity, pruning wall time (calibration + scoring + removal),
peak RSS of the row's process, prefill tokens/s relative to dense.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# paper: LLaMA-7B, WikiText2 perplexity at length 128 (FLAP, Table 2)
PAPER_RATIO = {0.2: 14.62 / 12.62, 0.5: 31.80 / 12.62}


def _prunecli_row(method: str, extra: dict[str, Any] | None = None, recover: bool = False, refit: bool = False):
    def row(sparsity: float, args: dict[str, Any]) -> dict[str, Any]:
        from prunecli.api import prune
        from prunecli.config import get_method

        loaded = common.load_default(args)
        data = common.windows(loaded.tokenizer, args)
        cls, _ = get_method(method)
        options = {"sparsity": sparsity, "round_to": args["round_to"], **(extra or {})}
        if method == "loraprune":
            options.update(args["loraprune"])
        cfg = cls(**options)
        t = time.perf_counter()
        result = prune(loaded.model, cfg, data["calib"] if cfg.needs_data or refit else None, refit=refit)
        seconds = time.perf_counter() - t
        out = {}
        if recover:
            out = _recover(loaded, args)
        out.update(common.measure(loaded.model, data, args))
        out.update(
            load_s=loaded.load_seconds,
            prune_s=seconds,
            block_sparsity=result.summary.block_sparsity,
            model_sparsity=result.summary.model_sparsity,
            phases=result.seconds,
        )
        if "tyr" in result.plan.meta:  # search cost split, fitness per generation, per-layer sparsity
            out["tyr"] = result.plan.meta["tyr"]
        if args.get("save_dir"):
            from prunecli.checkpoint import save_checkpoint

            t = time.perf_counter()
            save_checkpoint(
                loaded.model,
                loaded.tokenizer,
                Path(args["save_dir"]) / f"{method}-{sparsity}",
                provenance={"method": method, "config": cfg.to_dict()},
                overwrite=True,
            )
            out["save_s"] = time.perf_counter() - t
        return out

    return row


def _recover(loaded, args: dict[str, Any]) -> dict[str, Any]:
    """LoRA recovery on a calibration novel (never the held-out one), same budget for all rows."""
    from prunecli.data import calibration_windows
    from prunecli.recover import recover

    r = args["recovery"]
    windows = calibration_windows(
        loaded.tokenizer,
        str(common.DATA / r["data"]),
        nsamples=r["steps"] * r["batch_size"],
        seqlen=r["seqlen"],
        seed=args["seed"],
    )
    t = time.perf_counter()
    log = recover(
        loaded.model, loaded.tokenizer, windows, steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"]
    )
    return {"recover_s": time.perf_counter() - t, "recover_loss": [log["loss_first"], log["loss_last"]]}


def dense_row(sparsity: float, args: dict[str, Any]) -> dict[str, Any]:
    loaded = common.load_default(args)
    data = common.windows(loaded.tokenizer, args)
    out = common.measure(loaded.model, data, args)
    out["load_s"] = loaded.load_seconds
    out["dense_calib_pass_s"] = common.dense_pass_seconds(loaded.model, data["calib"])
    return out


def _tp_row(importance: str):
    """Torch-Pruning 1.6.1, MLP channels only, same parameter budget as the other rows."""

    def row(sparsity: float, args: dict[str, Any]) -> dict[str, Any]:
        import torch_pruning as tp

        from prunecli.engine.apply import block_params
        from prunecli.graph import build_graph

        loaded = common.load_default(args)
        model = loaded.model
        data = common.windows(loaded.tokenizer, args)
        t = time.perf_counter()
        graph = build_graph(model)  # only to count the same block parameters as the other rows
        budget = sparsity * block_params(model, graph)
        mlps = [m for m in model.modules() if hasattr(m, "gate_proj") and hasattr(m, "down_proj")]
        mlp_params = sum(p.numel() for m in mlps for p in m.parameters())
        ratio = min(0.95, budget / mlp_params)
        ignored = [
            m
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and not any(m is x.gate_proj or m is x.up_proj for x in mlps)
        ]
        example = data["calib"][:1, :64]
        imp = (
            tp.importance.MagnitudeImportance(p=2)
            if importance == "magnitude"
            else tp.importance.TaylorImportance()
        )
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=imp,
            pruning_ratio=ratio,
            ignored_layers=ignored,
            output_transform=lambda o: o.logits,
            forward_fn=lambda m, x: m(input_ids=x, use_cache=False),
        )
        if importance == "taylor":
            model.train()
            for i in range(0, min(64, data["calib"].shape[0]), 8):
                batch = data["calib"][i : i + 8]
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
            model.eval()
        pruner.step()
        model.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        out = common.measure(model, data, args)
        out.update(prune_s=seconds, block_sparsity=sparsity, mlp_ratio=ratio)
        return out

    return row


ROWS = {
    "dense": dense_row,
    "flap": _prunecli_row("flap"),
    "wanda-sp": _prunecli_row("wanda-sp"),
    "magnitude": _prunecli_row("magnitude"),
    "random": _prunecli_row("random"),
    "tp-magnitude": _tp_row("magnitude"),
    "tp-taylor": _tp_row("taylor"),
    "cfsp": _prunecli_row("cfsp"),
    "loraprune": _prunecli_row("loraprune"),
    "flap+recovery": _prunecli_row("flap", recover=True),
    "cfsp+recovery": _prunecli_row("cfsp", recover=True),
    "flap+refit": _prunecli_row("flap", refit=True),
    "cfsp+refit": _prunecli_row("cfsp", refit=True),
    "wanda-sp+refit": _prunecli_row("wanda-sp", refit=True),
    "magnitude+refit": _prunecli_row("magnitude", refit=True),
    "tyr": _prunecli_row("tyr"),
}
DEFAULT_ROWS = "dense,flap,wanda-sp,magnitude,random,tp-magnitude,tp-taylor"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, from: {','.join(ROWS)}")
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m or gemma3-270m (or any spec)")
    ap.add_argument("--sparsities", default="0.2,0.5")
    ap.add_argument("--nsamples", type=int, default=256, help="calibration windows (paper: 1024)")
    ap.add_argument("--calib-seqlen", type=int, default=128)
    ap.add_argument("--eval-seqlens", default="128,512")
    ap.add_argument("--eval-windows", default="256,64", help="windows per eval length")
    ap.add_argument("--throughput-seqlen", type=int, default=512)
    ap.add_argument("--round-to", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default="", help="also save each pruned checkpoint here (timed)")
    ap.add_argument("--lp-steps", type=int, default=150, help="LoRAPrune fine-tuning steps")
    ap.add_argument("--lp-prune-every", type=int, default=10)
    ap.add_argument("--recover-steps", type=int, default=80, help="LoRA recovery steps (+recovery rows)")
    ap.add_argument("--recover-data", default="austen_mansfieldpark.txt")
    ap.add_argument("--out", default="docs/benchmarks/flap.json")
    a = ap.parse_args()
    args = {
        "model": a.model,
        "nsamples": a.nsamples,
        "calib_seqlen": a.calib_seqlen,
        "eval_seqlens": [int(x) for x in a.eval_seqlens.split(",")],
        "eval_windows": [int(x) for x in a.eval_windows.split(",")],
        "throughput_seqlen": a.throughput_seqlen,
        "round_to": a.round_to,
        "seed": a.seed,
        "save_dir": a.save_dir,
        "loraprune": {"steps": a.lp_steps, "prune_every": a.lp_prune_every, "seqlen": 128, "batch_size": 2},
        "recovery": {
            "steps": a.recover_steps,
            "batch_size": 2,
            "seqlen": 128,
            "lr": 2e-4,
            "data": a.recover_data,
        },
    }
    rows = a.rows.split(",")
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows: {unknown}; choose from {list(ROWS)}")
    jobs = [("dense", 0.0)] if "dense" in rows else []
    jobs += [(r, float(s)) for s in a.sparsities.split(",") for r in rows if r != "dense"]
    results = common.run_rows(Path(__file__).resolve(), jobs, args)
    dense = next((r for r in results if r["row"] == "dense" and "error" not in r), None)
    for r in results:
        if dense and "error" not in r:
            r["speedup"] = r["tokens_per_s"] / dense["tokens_per_s"]
            for L in args["eval_seqlens"]:
                r[f"ratio{L}"] = r[f"ppl{L}"] / dense[f"ppl{L}"]
            if r["row"] == "flap":
                r["prune_vs_dense_pass"] = r["prune_s"] / dense["dense_calib_pass_s"]
            if r["sparsity"] in PAPER_RATIO:
                r["paper_ratio128"] = PAPER_RATIO[r["sparsity"]]
    cols = [
        ("row", "method", ""),
        ("sparsity", "sparsity", ".1f"),
        ("params", "params", ","),
        *[(f"ppl{L}", f"ppl@{L}", ".2f") for L in args["eval_seqlens"]],
        ("ratio128", "ppl ratio @128", ".2f"),
        ("paper_ratio128", "paper LLaMA-7B ratio", ".2f"),
        ("prune_s", "prune s", ".1f"),
        ("peak_rss_mb", "peak MiB", ".0f"),
        ("speedup", "prefill vs dense", ".2f"),
    ]
    print(common.table(results, args, cols))
    if dense:
        print(f"\ndense forward pass over the calibration windows: {dense['dense_calib_pass_s']:.1f}s")
    common.write_json(Path(a.out), {"args": args, "results": results, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        common.run_worker(ROWS)
    else:
        main()
