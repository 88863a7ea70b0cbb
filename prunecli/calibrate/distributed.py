"""Data-parallel calibration over ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Every rank runs its share of the calibration mini-batches (see ``Runner.batches``); before
anyone reads a statistic, each accumulator's summary is gathered from every rank and merged
in rank order, so every rank ends with the same numbers and makes the same plan. Rank 0
writes the outputs.

Launch on one machine::

    prunecli compress smollm2-135m --method flap --sparsity 0.5 --nproc 2 -o out/

or, on several machines, run the same command under ``torchrun`` on each (``--nproc`` is then
not given; torchrun sets the ranks)::

    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --master-addr HOST --master-port 29500 \\
        -m prunecli compress smollm2-135m --method flap --sparsity 0.5 -o out/
"""

from __future__ import annotations

import os
from typing import Any

import torch

from prunecli.calibrate.stats import Accumulator


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def is_main() -> bool:
    """True on rank 0 (and outside a process group)."""
    return rank_world()[0] == 0


def _comm_device() -> torch.device:
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce(obs: dict[Any, Accumulator]) -> None:
    """Replace every accumulator by the merge, in rank order, of all ranks' accumulators.

    Every rank must call this with the same keys in the same order.
    """
    if not active() or not obs:
        return
    world = torch.distributed.get_world_size()
    device = _comm_device()
    for key in list(obs):
        acc = obs[key]
        state = [t.to(device=device, dtype=torch.float64).reshape(-1) for t in acc.state()]
        sizes = torch.tensor([t.numel() for t in state], dtype=torch.long, device=device)
        # ranks that saw nothing send a one-element state: agree on the layout first
        n_parts = torch.tensor([len(state)], dtype=torch.long, device=device)
        all_parts = [torch.zeros_like(n_parts) for _ in range(world)]
        torch.distributed.all_gather(all_parts, n_parts)
        width = max(int(p) for p in all_parts)
        pad_sizes = torch.zeros(width, dtype=torch.long, device=device)
        pad_sizes[: len(state)] = sizes
        all_sizes = [torch.zeros_like(pad_sizes) for _ in range(world)]
        torch.distributed.all_gather(all_sizes, pad_sizes)
        longest = max(int(s.sum()) for s in all_sizes)
        flat = torch.zeros(longest, dtype=torch.float64, device=device)
        if state:
            packed = torch.cat(state)
            flat[: packed.numel()] = packed
        gathered = [torch.zeros_like(flat) for _ in range(world)]
        torch.distributed.all_gather(gathered, flat)
        merged: Accumulator | None = None
        for r in range(world):
            parts, offset = [], 0
            for s in all_sizes[r].tolist():
                if s == 0:
                    continue
                parts.append(gathered[r][offset : offset + s].cpu())
                offset += s
            other = type(acc).from_state(parts)
            if merged is None:
                merged = other
            else:
                merged.merge(other)
        assert merged is not None
        obs[key] = _to_device(merged, acc)


def _to_device(merged: Accumulator, like: Accumulator) -> Accumulator:
    """Keep the merged summary on the device the local one lived on."""
    local = like.state()
    device = local[-1].device if local else torch.device("cpu")
    parts = merged.state()
    return type(merged).from_state([p.to(device) for p in parts])


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment variables, if any.

    Returns:
        True when this process is one of several (``WORLD_SIZE > 1``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = (
            "nccl" if torch.cuda.is_available() and os.environ.get("PRUNECLI_BACKEND") != "gloo" else "gloo"
        )
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return True
