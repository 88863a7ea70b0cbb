"""``--nproc N``: run a command as N processes on this machine, the way ``torchrun`` would.

Each child is ``python -m prunecli <the same arguments, less --nproc>`` with the environment
variables torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), so the child joins the process group through
:func:`prunecli.calibrate.distributed.init_from_env` and, seeing ``WORLD_SIZE``, does not
launch again. Rank 0 writes to this terminal; the other ranks' output is kept aside and shown
only when one of them fails. If any child fails, the others are stopped and the launcher exits
with that child's code after one error line (rank 0's own, or the failing rank's).

On several machines, use torchrun instead (``WORLD_SIZE`` is then set and nothing relaunches)::

    torchrun --nnodes 2 --node-rank R --nproc-per-node 1 --master-addr HOST --master-port 29500 \\
        -m prunecli compress MODEL --method flap --sparsity 0.2 -o out/
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

#: seconds rank 0 is given to report a failure itself when another rank failed first
GRACE_S = 2.0
#: seconds a stopped child is given to exit before it is killed
STOP_S = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def without_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` and ``name=VALUE``.

    Example:
        >>> without_option(["compress", "m", "--nproc", "2", "--json"], "--nproc")
        ['compress', 'm', '--json']
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def worker_env(rank: int, nproc: int, port: int, backend: str) -> dict[str, str]:
    """The environment of child ``rank``: this one plus what torchrun would set."""
    env = dict(os.environ)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        PRUNECLI_BACKEND=backend,
    )
    # the children share this machine's cores (torchrun sets 1; a share keeps a CPU run fast)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def launch(
    argv: Sequence[str], nproc: int, *, backend: str = "gloo", program: Sequence[str] | None = None
) -> int:
    """Run ``python -m prunecli *argv`` (less ``--nproc``) as ``nproc`` ranks and wait for them.

    Args:
        argv: the command's arguments without the program name (``["compress", MODEL, ...]``).
        nproc: number of processes.
        backend: ``torch.distributed`` backend the children use (``gloo`` on CPU, ``nccl``
            with ``--device cuda``: one GPU per rank).
        program: what each child runs before ``argv`` (default ``python -m prunecli``).

    Returns:
        The exit code: 0 when every rank succeeded, else the failing rank's (130 if interrupted).

    Example:
        >>> launch(["compress", "smollm2-135m", "-m", "flap", "-s", "0.2", "-o", "out"], 2)  # doctest: +SKIP
        0
    """
    cmd = [*(program or (sys.executable, "-m", "prunecli")), *without_option(argv, "--nproc")]
    port = free_port()
    sys.stdout.flush()
    sys.stderr.flush()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[IO[bytes] | None] = []
    previous: Any = _on_sigterm()
    try:
        for rank in range(nproc):
            # rank 0 prints on this terminal; the others print nothing unless they fail
            log = None if rank == 0 else tempfile.TemporaryFile()
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=worker_env(rank, nproc, port, backend),
                    stdin=subprocess.DEVNULL,
                    stdout=None if rank == 0 else subprocess.DEVNULL,
                    stderr=log,
                )
            )
        failed = _wait(procs)
        if failed is None:
            return 0
        code = _exit_code(procs[failed].returncode)
        if failed != 0:
            _stop(procs)
            sys.stderr.write(_failure_line(failed, nproc, procs[failed].returncode, logs[failed]) + "\n")
            sys.stderr.flush()
        return code
    except KeyboardInterrupt:
        return 130  # rank 0 got the same Ctrl-C and has said so
    finally:
        _stop(procs)
        for log in logs:
            if log is not None:
                log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _wait(procs: list[subprocess.Popen[bytes]]) -> int | None:
    """Wait for every child; the rank that failed (rank 0 if it fails too, soon after), else ``None``."""
    while True:
        codes = [p.poll() for p in procs]
        bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if bad:
            if bad[0] != 0:
                # rank 0 usually fails too (a peer vanished, or the same bad input): let it
                # print its own line rather than print a second one
                deadline = time.monotonic() + GRACE_S
                while procs[0].poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if procs[0].returncode not in (None, 0):
                    return 0
            return bad[0]
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.1)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    running = [p for p in procs if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + STOP_S
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_code(returncode: int) -> int:
    """A child's exit status as a shell would report it (128 + N when killed by signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def _failure_line(rank: int, nproc: int, returncode: int, log: IO[bytes] | None) -> str:
    """One line for a rank other than 0 that failed: its own error line, marked with its rank."""
    text = ""
    if log is not None:
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        for prefix in ("internal error:", "error:"):
            if line.startswith(prefix):
                return f"{prefix} rank {rank} of {nproc}: {line[len(prefix) :].strip()}"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return (
            f"error: rank {rank} of {nproc} was killed by {name} (hint: out of memory? try a smaller --nproc)"
        )
    last = f": {lines[-1]}" if lines else ""
    return f"error: rank {rank} of {nproc} exited with code {returncode}{last}"


def _on_sigterm() -> Any:
    """Turn SIGTERM into ``SystemExit`` so that the children are stopped too (main thread only)."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None
