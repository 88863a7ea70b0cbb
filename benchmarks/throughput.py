"""Prefill throughput of several checkpoints, measured interleaved in one process.

On a shared machine, throughput drifts over minutes; measuring models in alternation
(round-robin, median over rounds) makes their ratios meaningful.

Usage::

    python benchmarks/throughput.py smollm2-135m out/flap50 out/flap50-r64 --seqlen 512 --rounds 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="model specs; the first is the reference")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from prunecli.evaluate import count_parameters
    from prunecli.models import load_model

    models = {spec: load_model(spec).model for spec in a.models}
    ids = torch.randint(0, 49152, (1, a.seqlen), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {spec: [] for spec in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m(input_ids=ids, use_cache=False)
        for _ in range(a.rounds):
            for spec, m in models.items():
                t = time.perf_counter()
                m(input_ids=ids, use_cache=False)
                times[spec].append(time.perf_counter() - t)
    ref = statistics.median(times[a.models[0]])
    rows = []
    print(f"| model | params | tokens/s | vs {a.models[0]} |\n|---|---|---|---|")
    for spec, m in models.items():
        med = statistics.median(times[spec])
        rows.append(
            {
                "model": spec,
                "params": count_parameters(m),
                "tokens_per_s": a.seqlen / med,
                "speedup": ref / med,
            }
        )
        print(f"| {spec} | {rows[-1]['params']:,} | {a.seqlen / med:.0f} | {ref / med:.2f} |")
    if a.out:
        Path(a.out).write_text(
            json.dumps({"command": " ".join(sys.argv), "rows": rows, "times": times}, indent=1)
        )


if __name__ == "__main__":
    main()
