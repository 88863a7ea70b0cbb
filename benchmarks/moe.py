"""Expert pruning (EASY-EP, REAP, frequency, random) on a MoE derived from SmolLM2-135M.

Usage (the defaults are what docs/benchmarks.md records)::

    python benchmarks/moe.py --out docs/benchmarks/moe.json

The MoE is ``prunecli models moefy smollm2-135m --experts 8 --top-k 6`` (a Mixtral model,
built once and cached in ``--moe-dir``). Each row keeps ``keep`` of every layer's experts
with one method and demonstrations from one domain: Austen (*Emma*) or fine-food reviews
(``fine_foods_train.jsonl``). Held-out perplexity on both domains (*Persuasion*,
``fine_foods_test.jsonl``): a row's demonstrations are in-domain for one column and
out-of-domain for the other. Memory is the pruned model's weight memory (fp32; every row
runs on a copy of the MoE in one process, so a per-row peak RSS would only show the
original). Sizes are small so that the run fits ~15 minutes on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

DEMOS = {"austen": ("austen_emma.txt", "text"), "foods": ("fine_foods_train.jsonl", "review")}
HELDOUT = {"austen": ("austen_persuasion.txt", "text"), "foods": ("fine_foods_test.jsonl", "review")}
METHODS = ("easy-ep", "reap", "frequency", "random-experts")


def build_moe(a: argparse.Namespace) -> Path:
    """The derived MoE checkpoint (built once)."""
    from prunecli.models import load_model
    from prunecli.models.moefy import moefy

    out = Path(a.moe_dir)
    if (out / "config.json").is_file():
        return out
    loaded = load_model("smollm2-135m")
    moe = moefy(loaded.model, a.experts, a.top_k, seed=a.seed)
    moe.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def prune_row(model: Any, tokenizer: Any, spec: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """Prune ``model`` in place with one method and one domain's demonstrations."""
    import prunecli
    from prunecli.config import get_method
    from prunecli.data import calibration_windows

    if spec["method"] == "unpruned":
        return {}
    cls, _ = get_method(spec["method"])
    cfg = cls(
        keep_experts=spec["keep"], nsamples=args["demos"], seqlen=args["demo_seqlen"], seed=args["seed"]
    )
    calib = None
    if cfg.needs_data:
        name, field = DEMOS[spec["domain"]]
        calib = calibration_windows(
            tokenizer,
            str(common.DATA / name),
            nsamples=args["demos"],
            seqlen=args["demo_seqlen"],
            seed=args["seed"],
            text_field=field,
        )
    t = time.perf_counter()
    result = prunecli.prune(model, cfg, calib)
    return {
        "prune_s": time.perf_counter() - t,
        "experts_kept": sorted({v["kept"] for v in result.to_dict()["experts"].values()}),
        "top_k": int(model.config.num_experts_per_tok),
    }


def measure(model: Any, evals: dict[str, torch.Tensor], args: dict[str, Any]) -> dict[str, Any]:
    """Parameters, weight memory, held-out perplexity on both domains, prefill tokens/s."""
    from prunecli.evaluate import count_parameters, perplexity, throughput

    params = count_parameters(model)
    res: dict[str, Any] = {"params": params, "weights_mib": params * 4 / 2**20}
    for domain, w in evals.items():
        res[f"ppl_{domain}"] = perplexity(model, w, batch_size=w.shape[0])
    tp = throughput(model, seqlen=args["eval_seqlen"], batch_size=1, repeats=3, warmup=1)
    res["tokens_per_s"] = tp["tokens_per_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--keeps", default="0.5,0.25")
    ap.add_argument("--demos", type=int, default=2, help="demonstration windows")
    ap.add_argument("--demo-seqlen", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=2, help="held-out windows per domain")
    ap.add_argument("--eval-seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--moe-dir", default="out/smollm2-moe-e8k6")
    ap.add_argument("--out", default="docs/benchmarks/moe.json")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    from prunecli.data import eval_windows
    from prunecli.models import load_model

    t0 = time.perf_counter()
    moe = build_moe(a)
    args = {
        "demos": a.demos,
        "demo_seqlen": a.demo_seqlen,
        "eval_windows": a.eval_windows,
        "eval_seqlen": a.eval_seqlen,
        "seed": a.seed,
    }
    loaded = load_model(str(moe))
    original = loaded.model
    evals = {
        domain: eval_windows(
            loaded.tokenizer,
            str(common.DATA / name),
            seqlen=a.eval_seqlen,
            max_windows=a.eval_windows,
            text_field=field,
        )
        for domain, (name, field) in HELDOUT.items()
    }
    jobs: list[dict[str, Any]] = [{"method": "unpruned", "domain": "-", "keep": 1.0}]
    for keep in (float(k) for k in a.keeps.split(",")):
        for method in METHODS:
            for domain in ("austen", "foods") if method != "random-experts" else ("-",):
                jobs.append({"method": method, "domain": domain, "keep": keep})
    rows = []
    for job in jobs:
        t = time.perf_counter()
        model = copy.deepcopy(original)
        row = {**job, **prune_row(model, loaded.tokenizer, job, args), **measure(model, evals, args)}
        row["wall_s"] = time.perf_counter() - t
        rows.append(row)
        del model
        print(
            f"  {job['method']:<15} {job['domain']:<7} keep={job['keep']:<5} {row['wall_s']:.0f}s",
            file=sys.stderr,
        )
    ref = rows[0]
    for r in rows:
        if "error" not in r and "error" not in ref:
            r["tokens_per_s_rel"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["params_rel"] = r["params"] / ref["params"]
    columns = [
        ("method", "method", ""),
        ("domain", "demos", ""),
        ("keep", "keep", "g"),
        ("ppl_austen", "ppl Persuasion", ".1f"),
        ("ppl_foods", "ppl food reviews", ".1f"),
        ("params", "params", ","),
        ("weights_mib", "weights MiB", ".0f"),
        ("tokens_per_s_rel", "tokens/s vs MoE", ".2f"),
    ]
    print(common.table(rows, {}, columns))
    common.write_json(
        Path(a.out),
        {
            "command": "python benchmarks/moe.py " + " ".join(sys.argv[1:]),
            "moe": {"source": "smollm2-135m", "experts": a.experts, "top_k": a.top_k},
            "args": args | {"keeps": a.keeps},
            "peak_rss_mb": common.peak_rss_mb(),
            "rows": rows,
            "seconds": time.perf_counter() - t0,
        },
    )


if __name__ == "__main__":
    main()
