"""Peak memory of LoRA training (recovery or LoRAPrune) on SmolLM2-135M against inference.

Usage::

    python benchmarks/lora_memory.py recover            # activation checkpointing on (default)
    python benchmarks/lora_memory.py loraprune
    python benchmarks/lora_memory.py recover --no-checkpointing

Prints peak RSS after loading, after one inference forward pass, and after training
(20 steps, batch 2 x 128 tokens from Mansfield Park); run each case in a fresh process.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["recover", "loraprune"])
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    from prunecli.data import calibration_windows

    loaded = common.load_default()
    if a.no_checkpointing:
        type(loaded.model).supports_gradient_checkpointing = False
    windows = calibration_windows(
        loaded.tokenizer, str(common.DATA / "austen_mansfieldpark.txt"), nsamples=2 * a.steps, seqlen=128
    )
    after_load = common.peak_rss_mb()
    with torch.inference_mode():
        loaded.model(input_ids=windows[:2], use_cache=False)
    after_inference = common.peak_rss_mb()
    t = time.perf_counter()
    if a.what == "recover":
        from prunecli.recover import recover

        recover(loaded.model, loaded.tokenizer, windows, steps=a.steps, batch_size=2)
    else:
        from prunecli.api import prune
        from prunecli.methods.loraprune import LorapruneConfig

        cfg = LorapruneConfig(sparsity=0.2, steps=a.steps, prune_every=5, batch_size=2, seqlen=128)
        prune(loaded.model, cfg, windows)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ckpt = "off" if a.no_checkpointing else "on"
    print(
        f"{a.what} (checkpointing {ckpt}): peak MiB after load {after_load:.0f}, "
        f"after inference {after_inference:.0f}, after training {peak:.0f}; {seconds:.1f}s"
    )


if __name__ == "__main__":
    main()
