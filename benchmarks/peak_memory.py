"""Peak memory of a `prunecli compress` run per pipeline step: resident, and anonymous only.

Runs the command in this process and samples ``/proc`` every 10 ms from a thread. "rss" is the
resident set (what ``/usr/bin/time -v`` reports as its maximum); "anon" leaves out file-backed
pages (``rss - shared``): the safetensors files a float32 model is mapped from, which the
kernel can drop, so "anon" is the memory the run really holds. Each sample is booked to the
pipeline step (``prunecli.pipeline._Run`` method) the main thread is in.

Usage::

    python benchmarks/peak_memory.py --out docs/benchmarks/peak_memory.json -- \\
        compress smollm2-135m -m flap -s 0.2 --nsamples 8 --seqlen 128 --no-speed --quiet -o /tmp/o
    # with --dtypes float32,bfloat16 (default) the command runs once per dtype (--dtype appended)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path


def measure(args: list[str]) -> dict[str, dict[str, float]]:
    """Run ``prunecli ARGS`` here; ``{step: {"rss_mib", "anon_mib"}}`` peaks plus ``"run"``."""
    import psutil

    import prunecli.pipeline as pipeline
    from prunecli.cli import app

    proc = psutil.Process()
    main = threading.main_thread().ident
    steps = {n for n in vars(pipeline._Run) if n.startswith("_") and not n.startswith("__")}
    peaks: dict[str, list[int]] = {}
    done = threading.Event()

    def step() -> str:
        frame = sys._current_frames().get(main)
        names = [f.name for f in traceback.extract_stack(frame)] if frame is not None else []
        return next((n for n in reversed(names) if n in steps), "other")

    def sample() -> None:
        while not done.is_set():
            mem = proc.memory_info()
            for key in (step(), "run"):
                peak = peaks.setdefault(key, [0, 0])
                peak[0] = max(peak[0], mem.rss)
                peak[1] = max(peak[1], mem.rss - mem.shared)
            time.sleep(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        app(args, standalone_mode=False)
    finally:
        done.set()
        thread.join()
    return {k: {"rss_mib": round(v[0] / 2**20), "anon_mib": round(v[1] / 2**20)} for k, v in peaks.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; '' = run ARGS as given")
    ap.add_argument("--out", default="", help="write the table as JSON here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the prunecli arguments")
    a = ap.parse_args()
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if a.child:
        print(json.dumps(measure(args)))
        return
    results = {}
    for dtype in [d for d in a.dtypes.split(",") if d] or [""]:
        run = [*args, "--dtype", dtype] if dtype else list(args)
        if "-o" in run:  # a fresh output folder per run
            shutil.rmtree(run[run.index("-o") + 1], ignore_errors=True)
        # one process per run: peaks of one run must not carry over into the next
        out = subprocess.run(
            [sys.executable, __file__, "--child", "--", *run], capture_output=True, text=True, check=True
        )
        results[dtype or "as given"] = json.loads(out.stdout.strip().splitlines()[-1])
    order = ["_load", "_calibration", "_prune", "_evaluate", "_save", "run"]
    print(f"{'step':14s}" + "".join(f"{d + ' rss':>18s}{d + ' anon':>18s}" for d in results))
    keys = [k for k in order if any(k in r for r in results.values())]
    for key in keys:
        cells = "".join(
            f"{r.get(key, {}).get('rss_mib', ''):>18}{r.get(key, {}).get('anon_mib', ''):>18}"
            for r in results.values()
        )
        print(f"{key.lstrip('_'):14s}{cells}")
    if a.out:
        record = {"command": "prunecli " + " ".join(args), "unit": "MiB", "peaks": results}
        Path(a.out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
