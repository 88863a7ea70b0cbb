"""Choose whole-model or layer-sequential offloaded calibration under a memory bound.

:func:`plan_memory` estimates, from the model's config alone (a meta-device build: no weights
read), what each mode needs and picks the cheapest one that fits ``max_memory``:

- ``whole``: every weight in memory, plus one mini-batch of activations (hidden states,
  the MLP's intermediate activations, attention scores) and the statistics;
- ``sequential`` with offloaded weights: the weights outside the blocks (embeddings, final
  norm, LM head), two copies of one block (the one running and the one being written), the
  calibration hidden states entering and leaving a block, and the statistics.

The numbers are estimates of the tensors prunecli allocates; the interpreter, torch and
transformers themselves (about 0.5-1 GB of RSS) come on top and are not counted.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from prunecli.errors import InputError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """``"4GB"`` -> 4_000_000_000 bytes (``GiB``, ``MB``, ``500M`` and plain bytes accepted).

    Example:
        >>> parse_size("4GB"), parse_size("1.5GiB"), parse_size(1024)
        (4000000000, 1610612736, 1024)
    """
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"invalid memory size {text!r}", hint="use a size such as 4GB, 500MB or 12GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_size(n: float) -> str:
    """Bytes in GB with two decimals (``13.48 GB``), or MB below 1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


@dataclasses.dataclass
class MemoryPlan:
    """What :func:`plan_memory` chose, and why.

    Attributes:
        mode: ``whole`` or ``sequential``.
        offload: block weights stay in the checkpoint files (read one block at a time).
        reason: one sentence for the report.
        whole_bytes: estimated peak of the whole-model mode.
        sequential_bytes: estimated peak of the offloaded layer-sequential mode.
        weight_bytes: all weights in the compute dtype.
    """

    mode: str
    offload: bool
    reason: str
    whole_bytes: int
    sequential_bytes: int
    weight_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _cfg(config: Any, *names: str, default: int = 0) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for n in names:
        v = getattr(text, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def estimate(
    config: Any, dtype: torch.dtype, nsamples: int, seqlen: int, batch_tokens: int
) -> dict[str, int]:
    """Byte estimates of both modes for a model of ``config`` (see the module docstring)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from prunecli.calibrate.offload import main_block_list

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    itemsize = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    path, blocks = main_block_list(model)
    block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    outside = params - sum(p.numel() for p in blocks.parameters())
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model", default=1024)
    inter = _cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)
    heads = _cfg(config, "num_attention_heads", "n_head", default=1)
    layers = len(blocks)
    windows = max(1, batch_tokens // max(1, seqlen))
    tokens = windows * seqlen
    # one mini-batch: a few hidden-state copies, the MLP's gate/up/act, attention scores
    transient = tokens * (6 * hidden + 3 * inter) * 4 + windows * heads * seqlen * seqlen * 4
    # statistics: a few float64 vectors per observed channel (heads and MLP channels per layer)
    stats = layers * (hidden + inter) * 8 * 3
    whole = params * itemsize + transient + stats
    calib = 2 * nsamples * seqlen * hidden * itemsize
    sequential = (outside + 2 * block) * itemsize + calib + transient + stats
    return {"weights": params * itemsize, "whole": whole, "sequential": sequential}


def plan_memory(
    config: Any,
    *,
    dtype: torch.dtype,
    max_memory: int | None,
    nsamples: int,
    seqlen: int,
    batch_tokens: int = 8192,
    sequential: bool = False,
    can_offload: bool = True,
) -> MemoryPlan:
    """Pick the calibration mode for ``config`` under ``max_memory`` bytes.

    Args:
        config: the model's transformers config.
        dtype: the compute dtype.
        max_memory: the bound (``None``: no bound; whole-model unless ``sequential``).
        nsamples: calibration windows.
        seqlen: tokens per window.
        batch_tokens: tokens per mini-batch.
        sequential: the user asked for layer-sequential calibration (block weights are then
            read from the checkpoint files whenever they can be).
        can_offload: the weights are safetensors files that can be streamed.

    Raises:
        InputError: not even the offloaded layer-sequential mode fits ``max_memory``.
    """
    est = estimate(config, dtype, nsamples, seqlen, batch_tokens)
    common = dict(whole_bytes=est["whole"], sequential_bytes=est["sequential"], weight_bytes=est["weights"])
    if sequential:
        where = (
            "read from the checkpoint files" if can_offload else "in memory (the weights cannot be streamed)"
        )
        plan = MemoryPlan(
            "sequential", can_offload, f"--sequential was given: block weights {where}", **common
        )
        if max_memory is not None and est["sequential" if can_offload else "whole"] > max_memory:
            raise InputError(
                f"layer by layer the model needs about {fmt_size(est['sequential'])} "
                f"(above --max-memory {fmt_size(max_memory)})",
                hint="raise --max-memory, or lower --nsamples/--seqlen (the calibration activations are kept)",
            )
        return plan
    if max_memory is None:
        return MemoryPlan("whole", False, "no --max-memory bound", **common)
    if est["whole"] <= max_memory:
        why = f"the whole model needs about {fmt_size(est['whole'])}, within --max-memory {fmt_size(max_memory)}"
        return MemoryPlan("whole", False, why, **common)
    if not can_offload:
        raise InputError(
            f"the model needs about {fmt_size(est['whole'])} in memory, above --max-memory {fmt_size(max_memory)}, "
            "and its weights are not safetensors files that can be read one block at a time",
            hint="convert the checkpoint to safetensors or raise --max-memory",
        )
    if est["sequential"] > max_memory:
        raise InputError(
            f"even layer by layer the model needs about {fmt_size(est['sequential'])} "
            f"(above --max-memory {fmt_size(max_memory)})",
            hint="raise --max-memory, or lower --nsamples/--seqlen (the calibration activations are kept)",
        )
    why = (
        f"the whole model needs about {fmt_size(est['whole'])}, above --max-memory {fmt_size(max_memory)}: "
        f"layer by layer with block weights read from the checkpoint files needs about {fmt_size(est['sequential'])}"
    )
    return MemoryPlan("sequential", True, why, **common)
