"""prunecli: structured compression of transformer LLMs.

The public API is imported lazily so that ``import prunecli`` stays light (no Typer, no
transformers model classes)::

    import prunecli
    loaded = prunecli.load_model("smollm2-135m")
    calib = prunecli.calibration_windows(loaded.tokenizer, "emma.txt", nsamples=128, seqlen=128)
    result = prunecli.prune(loaded.model, prunecli.FlapConfig(sparsity=0.2), calib)

A model larger than memory, layer by layer, its blocks read from the checkpoint files::

    loaded = prunecli.load_model("path/to/llama-7b", offload=True)
    runner = prunecli.Runner(mode="sequential", weights=loaded.weights)
    result = prunecli.prune(loaded.model, prunecli.FlapConfig(sparsity=0.5), calib, runner=runner)
    prunecli.save_checkpoint(loaded.model, loaded.tokenizer, "out", provenance=result.to_dict(),
                             weights=loaded.weights)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "prune": "prunecli.api",
    "compress": "prunecli.pipeline",
    "CompressOptions": "prunecli.pipeline",
    "Report": "prunecli.pipeline",
    "PruneResult": "prunecli.api",
    "build_graph": "prunecli.graph",
    "DependencyGraph": "prunecli.graph",
    "Plan": "prunecli.engine",
    "apply_plan": "prunecli.engine",
    "replay_plan": "prunecli.engine",
    "load_model": "prunecli.models",
    "save_checkpoint": "prunecli.checkpoint",
    "calibration_windows": "prunecli.data",
    "eval_windows": "prunecli.data",
    "perplexity": "prunecli.evaluate",
    "MagnitudeConfig": "prunecli.methods.magnitude",
    "RandomConfig": "prunecli.methods.random",
    "WandaSpConfig": "prunecli.methods.wanda_sp",
    "FlapConfig": "prunecli.methods.flap",
    "CfspConfig": "prunecli.methods.cfsp",
    "LorapruneConfig": "prunecli.methods.loraprune",
    "EasyEpConfig": "prunecli.methods.experts",
    "ReapConfig": "prunecli.methods.experts",
    "FrequencyConfig": "prunecli.methods.experts",
    "RandomExpertsConfig": "prunecli.methods.experts",
    "recover": "prunecli.recover",
    "Runner": "prunecli.calibrate",
    "Observe": "prunecli.calibrate",
    "plan_memory": "prunecli.calibrate.memory",
    "compress_onnx": "prunecli.onnx.compress",
    "build_onnx_graph": "prunecli.onnx.graph",
    "apply_plan_onnx": "prunecli.onnx.apply",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module 'prunecli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
