"""SHRP beside classic head pruning on all-MiniLM-L6-v2, fine-food reviews (label ``score``).

Usage (the defaults are what docs/benchmarks.md records)::

    python benchmarks/encoder.py --out docs/benchmarks/encoder.json

Protocol: the encoder gets a new classifier and is fine-tuned densely (``--dense-steps``);
that is the reference. Every pruned row starts from a copy of it and gets the same extra
fine-tuning budget of ``--budget`` optimiser steps: SHRP spends half of it routing
(balance, then specialisation) and half recovering after pruning; the baselines score, prune
and spend all of it recovering. Settings: 25/50/75% of every layer's heads removed, and the
layer-dropping setting (``--drop-layers`` of 6 layers removed, after the paper's 11 of 12).
Baselines: magnitude (L2 norm of a head's q/k/v rows and output columns), Michel et al.
(iterative gradient importance on the task), FLAP (WIFV fluctuation of the heads' channels at
the output projection over task texts, with its bias compensation).
Columns: test accuracy, macro-F1, accuracy relative to dense, parameters, attention
parameters, FLOPs per example at the mean test length, examples/s relative to dense.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "shared" / "data"
if not DATA.is_dir():
    DATA = Path("/work/shared/data")


def attention_params(model: nn.Module) -> int:
    """Parameters of the q/k/v/output projections of every self-attention."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (".attention." in name + "."):
            total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def flops_per_example(model: nn.Module, seqlen: int) -> int:
    """Multiply-adds x2 of one forward pass over ``seqlen`` tokens (linears + attention scores)."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            rows = 1 if name.endswith(("pooler.dense", "classifier")) else seqlen
            total += 2 * rows * m.in_features * m.out_features
        width = getattr(m, "all_head_size", None)
        if isinstance(width, int) and hasattr(m, "query"):
            total += 2 * 2 * seqlen * seqlen * width  # q k^T and p v
    return total


def magnitude_plan(model, graph, fraction: float, drop: int):
    from prunecli.engine import Plan
    from prunecli.methods._heads import head_sites, lowest_layers, uniform_head_removal
    from prunecli.methods.magnitude import unit_weight_norms

    sites = head_sites(graph, [g for g in graph.groups.values() if g.kind == "heads" and g.prunable])
    scores = {s.group.name: unit_weight_norms(model, s.group) for s in sites}
    if drop:
        layer = torch.stack([scores[s.group.name].pow(2).sum() for s in sites])
        return Plan({}, fingerprint=graph.fingerprint, meta={"drop_layers": lowest_layers(layer, drop)})
    return Plan(uniform_head_removal(scores, sites, fraction), fingerprint=graph.fingerprint)


def flap_plan(model, graph, fraction: float, drop: int, calib: torch.Tensor):
    from prunecli.engine import Plan
    from prunecli.methods._heads import head_sites, lowest_layers, uniform_head_removal
    from prunecli.methods.flap.method import collect_stats
    from prunecli.methods.flap.scoring import bias_delta, channel_metric, unit_scores

    sites = head_sites(graph, [g for g in graph.groups.values() if g.kind == "heads" and g.prunable])
    stats = collect_stats(model, [s.consumer for s in sites], calib)
    scores, raw_sum = {}, []
    for s in sites:
        w = model.get_submodule(s.consumer).weight
        raw = channel_metric("WIFV", w, var=stats[s.consumer].var)
        index = [s.perm[h * s.head_dim : (h + 1) * s.head_dim].tolist() for h in range(s.num_heads)]
        scores[s.group.name] = unit_scores(raw, index, square=True)
        raw_sum.append(raw.sum())
    if drop:
        return Plan(
            {}, fingerprint=graph.fingerprint, meta={"drop_layers": lowest_layers(torch.stack(raw_sum), drop)}
        )
    removals = uniform_head_removal(scores, sites, fraction)
    bias = {}
    for s in sites:
        heads = removals.get(s.group.name, [])
        chans = [c for h in heads for c in s.perm[h * s.head_dim : (h + 1) * s.head_dim].tolist()]
        if chans:
            w = model.get_submodule(s.consumer).weight
            bias[s.consumer] = bias_delta(w, stats[s.consumer].mean, chans).tolist()
    return Plan(removals, bias_updates=bias, fingerprint=graph.fingerprint)


def apply(model, graph, plan) -> None:
    from prunecli.engine import apply_plan
    from prunecli.engine.layers import drop_layers

    apply_plan(model, graph, plan)
    if plan.meta.get("drop_layers"):
        drop_layers(model, plan.meta["drop_layers"])


def row(
    name: str, setting: str, model, test, dense: dict[str, Any] | None, seqlen: int, secs: float
) -> dict[str, Any]:
    from prunecli.evaluate import count_parameters
    from prunecli.tasks import evaluate_task

    m = evaluate_task(model, test)
    r = {
        "method": name,
        "setting": setting,
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "params": count_parameters(model),
        "attention_params": attention_params(model),
        "flops": flops_per_example(model, seqlen),
        "examples_per_s": m["examples_per_s"],
        "layers": model.config.num_hidden_layers,
        "seconds": round(secs, 1),
    }
    if dense is not None:
        r["acc_vs_dense"] = r["accuracy"] / dense["accuracy"]
        r["params_vs_dense"] = r["params"] / dense["params"]
        r["attn_params_removed"] = 1 - r["attention_params"] / dense["attention_params"]
        r["flops_vs_dense"] = r["flops"] / dense["flops"]
        r["speed_vs_dense"] = r["examples_per_s"] / dense["examples_per_s"]
    print(
        f"{name:10s} {setting:8s} acc {r['accuracy']:.4f} f1 {r['macro_f1']:.4f} "
        f"ex/s {r['examples_per_s']:.0f} ({secs:.0f}s)",
        flush=True,
    )
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="all-minilm-l6-v2")
    ap.add_argument("--train", default=str(DATA / "fine_foods_train.jsonl"))
    ap.add_argument("--test", default=str(DATA / "fine_foods_test.jsonl"))
    ap.add_argument("--n-train", type=int, default=1024)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--dense-steps", type=int, default=48)
    ap.add_argument("--budget", type=int, default=12)
    ap.add_argument("--drop-layers", type=int, default=5)
    ap.add_argument("--fractions", default="0.25,0.5,0.75")
    ap.add_argument("--methods", default="shrp,michel,magnitude,flap")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="docs/benchmarks/encoder.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from prunecli import prune
    from prunecli.graph import build_graph
    from prunecli.methods.michel import MichelConfig
    from prunecli.methods.shrp import ShrpConfig
    from prunecli.models import load_model
    from prunecli.tasks import as_classifier, finetune, load_task

    lm = load_model(args.model, dtype="float32")
    train = load_task(
        args.train,
        lm.tokenizer,
        text_field="review",
        label_field="score",
        max_length=args.max_length,
        limit=args.n_train,
    )
    test = load_task(
        args.test,
        lm.tokenizer,
        text_field="review",
        label_field="score",
        max_length=args.max_length,
        limit=args.n_test,
        label_names=train.label_names,
    )
    seqlen = int(round(float(test.attention_mask.sum(dim=1).float().mean())))
    model = as_classifier(lm.model, train.label_names)
    t = time.perf_counter()
    finetune(model, train, steps=args.dense_steps)
    dense = row("dense", "-", model, test, None, seqlen, time.perf_counter() - t)
    rows = [dense]
    # calibration texts for FLAP: task examples with at least 32 tokens, cut to 32
    long_enough = train.attention_mask.sum(dim=1) >= 32
    calib = train.input_ids[long_enough][:32, :32]
    settings = [(f"{float(f):.0%}", float(f), 0) for f in args.fractions.split(",")]
    settings.append((f"drop{args.drop_layers}", 0.0, args.drop_layers))
    dense_graph = build_graph(model)  # copies have the same names and shapes: one trace serves all rows
    for method in args.methods.split(","):
        for label, fraction, drop in settings:
            t = time.perf_counter()
            m = copy.deepcopy(model)
            graph = copy.deepcopy(dense_graph)
            recover = args.budget
            if method == "shrp":
                cfg = ShrpConfig(sparsity=fraction, drop_layers=drop, steps=args.budget // 2)
                prune(m, cfg, task=train, graph=graph)
                recover = args.budget - args.budget // 2
            elif method == "michel":
                prune(m, MichelConfig(sparsity=fraction, drop_layers=drop), task=train, graph=graph)
            else:
                plan = magnitude_plan(m, graph, fraction, drop) if method == "magnitude" else None
                if method == "flap":
                    with torch.no_grad():
                        plan = flap_plan(m, graph, fraction, drop, calib)
                apply(m, graph, plan)
            finetune(m, train, steps=recover, seed=1)
            rows.append(row(method, label, m, test, dense, seqlen, time.perf_counter() - t))
    cols = [
        ("method", "method", ""),
        ("setting", "heads removed / layers dropped", ""),
        ("accuracy", "accuracy", ".4f"),
        ("macro_f1", "macro-F1", ".4f"),
        ("acc_vs_dense", "acc / dense", ".3f"),
        ("attn_params_removed", "attention params removed", ".2f"),
        ("params_vs_dense", "params / dense", ".3f"),
        ("flops_vs_dense", "FLOPs / dense", ".3f"),
        ("speed_vs_dense", "examples/s / dense", ".2f"),
    ]
    print(common.table(rows, vars(args), cols))
    common.write_json(Path(args.out), {"args": vars(args), "mean_test_tokens": seqlen, "rows": rows})


if __name__ == "__main__":
    main()
