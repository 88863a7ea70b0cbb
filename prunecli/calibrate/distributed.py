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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from prunecli.calibrate.stats import Accumulator, acc_dtype


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


def reduce(obs: dict[Any, Accumulator], device: torch.device | str | None = None) -> None:
    """Replace every accumulator by the merge, in rank order, of all ranks' accumulators.

    Every rank must call this with the same keys in the same order.

    Args:
        obs: key -> this rank's accumulator; the entries of this dict are replaced.
        device: where a merged summary goes when the local one is empty (this rank saw no
            batch, and an empty summary lives on the CPU): the compute device. Others stay
            where the local summary is. ``None``: the CPU.
    """
    if not active() or not obs:
        return
    world = torch.distributed.get_world_size()
    comm = _comm_device()
    for key in list(obs):
        acc = obs[key]
        state = [t.to(device=comm, dtype=torch.float64).reshape(-1) for t in acc.state()]
        sizes = torch.tensor([t.numel() for t in state], dtype=torch.long, device=comm)
        # ranks that saw nothing send a one-element state: agree on the layout first
        n_parts = torch.tensor([len(state)], dtype=torch.long, device=comm)
        all_parts = [torch.zeros_like(n_parts) for _ in range(world)]
        torch.distributed.all_gather(all_parts, n_parts)
        width = max(int(p) for p in all_parts)
        pad_sizes = torch.zeros(width, dtype=torch.long, device=comm)
        pad_sizes[: len(state)] = sizes
        all_sizes = [torch.zeros_like(pad_sizes) for _ in range(world)]
        torch.distributed.all_gather(all_sizes, pad_sizes)
        longest = max(int(s.sum()) for s in all_sizes)
        flat = torch.zeros(longest, dtype=torch.float64, device=comm)
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
        obs[key] = _to_device(merged, acc, device)


def _to_device(merged: Accumulator, like: Accumulator, device: torch.device | str | None) -> Accumulator:
    """The merged summary where the local one lived (``device`` if it was empty), in its accumulation dtype."""
    if like.count > 0:
        target = like.state()[-1].device
    else:
        target = torch.device(device) if device is not None else torch.device("cpu")
    dtype = acc_dtype(target)  # transport is float64; MPS accumulates in float32
    return type(merged).from_state([p.to(device=target, dtype=dtype) for p in merged.state()])


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun (or ``--nproc``) set it; 1 when unset."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def backend_for(device: str | None = None) -> str:
    """``PRUNECLI_BACKEND`` if set, else ``nccl`` for CUDA devices (``None``: when CUDA is there), else ``gloo``."""
    chosen = os.environ.get("PRUNECLI_BACKEND", "").strip()
    if chosen:
        return chosen
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "nccl" if cuda else "gloo"


def init_from_env(device: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables, if any.

    Args:
        device: the compute device; picks the backend (:func:`backend_for`). With NCCL each
            process uses GPU ``LOCAL_RANK``.

    Returns:
        True when this process is one of several (``WORLD_SIZE > 1``).
    """
    if env_world_size() <= 1:
        return False
    if not torch.distributed.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend=backend)
    return True


@contextmanager
def session(device: str | None = None) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group for the body (if ``WORLD_SIZE > 1``) and leave it afterwards.

    Yields:
        ``(rank, world size)``; ``(0, 1)`` for a single process.

    Example:
        >>> with session("cpu") as (rank, world):
        ...     rank, world
        (0, 1)
    """
    joined = not torch.distributed.is_initialized() and init_from_env(device)
    try:
        yield rank_world()
    finally:
        if joined and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
