"""Prune a real model per layer (FLAP), save it, reload it both ways in fresh processes.

Reports, for ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and for
``prunecli.models.load_model(DIR)``, how many lines each reload printed on stderr (transformers'
"Reading global config value for per-layer attribute" warnings counted apart) and the largest
logit difference against the in-memory pruned model. Fresh processes, because transformers
shows each warning once per process.

Usage::

    python benchmarks/per_layer_reload.py smollm2-135m /tmp/smollm2-flap20
    python benchmarks/per_layer_reload.py gemma3-270m /tmp/gemma3-flap20
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from common import CALIB, HELDOUT

import prunecli
from prunecli.checkpoint import save_checkpoint
from prunecli.data.windows import calibration_windows
from prunecli.methods.flap import FlapConfig
from prunecli.models import load_model

CHILD = r"""
import sys, torch
route, out, ids = sys.argv[1], sys.argv[2], torch.load(sys.argv[3])
if route == "remote":
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
else:
    from prunecli.models import load_model
    m = load_model(out, dtype="float32").model
with torch.no_grad():
    logits = m.eval()(ids).logits
    m.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
torch.save(logits, sys.argv[4])
"""


def main() -> None:
    alias, out = sys.argv[1], Path(sys.argv[2]).absolute()
    loaded = load_model(alias, dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    calib = calibration_windows(tok, CALIB, nsamples=8, seqlen=128)
    prunecli.prune(model, FlapConfig(sparsity=0.2), calib)
    print("per-layer widths:", model.config.is_heterogeneous)
    ids = calibration_windows(tok, HELDOUT, nsamples=2, seqlen=32, seed=1)
    with torch.no_grad():
        want = model(ids).logits
    save_checkpoint(model, tok, out, provenance={"method": "flap"}, overwrite=True)
    torch.save(ids, out.parent / "ids.pt")
    print("auto_map:", json.loads((out / "config.json").read_text())["auto_map"])
    for route in ("remote", "load_model"):
        logits_file = out.parent / f"{route}.pt"
        cmd = [sys.executable, "-c", CHILD, route, str(out), str(out.parent / "ids.pt"), str(logits_file)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in res.stderr.splitlines() if x.strip() and "Loading weights" not in x]
        per_layer = [x for x in lines if "per-layer attribute" in x]
        got = torch.load(logits_file)
        print(
            f"{route}: rc={res.returncode} stderr_lines={len(lines)} per_layer_warnings={len(per_layer)} "
            f"max_abs_diff={float((got - want).abs().max()):.3g}"
        )
        for line in lines[:5]:
            print("   ", line[:200])


if __name__ == "__main__":
    main()
