"""One output object per command: human (rich), JSON (one object on stdout) or quiet.

Results go to stdout; progress bars and notes go to stderr, so ``--json`` output can be
piped into ``jq`` while bars are shown. Bars appear only in human mode and only when
stderr is a terminal.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichLive

from prunecli.progress import NullProgress, Progress

Mode = Literal["human", "json", "quiet"]


class _RichTask:
    def __init__(self, live: RichLive, task_id: TaskID) -> None:
        self._live = live
        self._id = task_id

    def advance(self, n: int = 1) -> None:
        self._live.advance(self._id, n)

    def update(self, *, description: str | None = None, total: int | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if description is not None:
            kwargs["description"] = description
        if total is not None:
            kwargs["total"] = total
        self._live.update(self._id, **kwargs)


class RichProgress:
    """:class:`prunecli.progress.Progress` drawn with rich bars on a live display.

    Args:
        live: a started ``rich.progress.Progress``.
    """

    def __init__(self, live: RichLive) -> None:
        self._live = live

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[_RichTask]:
        task_id = self._live.add_task(description, total=total)
        yield _RichTask(self._live, task_id)
        # Reached only when the step succeeded: show it as complete even if it under-reported.
        task = next((t for t in self._live.tasks if t.id == task_id), None)
        done = task.total if task is not None and task.total is not None else 1
        self._live.update(task_id, total=done, completed=done)


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats by None so that the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def to_json(data: Any) -> str:
    """Strict JSON (no NaN/Infinity) with paths, tensors' scalars and ``to_dict()`` objects converted."""
    plain = json.loads(json.dumps(data, default=_json_default))
    return json.dumps(_finite(plain), indent=2, allow_nan=False)


class Output:
    """Where a command writes: results on stdout, progress and notes on stderr.

    Args:
        json: print one JSON object on stdout instead of tables.
        quiet: print only the essential line (e.g. the output folder), no progress. With
            ``json`` too: the JSON document on stdout and no warnings on stderr (errors still
            get their one line).

    Example:
        >>> out = Output(json=True)
        >>> out.mode
        'json'
    """

    def __init__(self, *, json: bool = False, quiet: bool = False) -> None:
        self.mode: Mode = "json" if json else ("quiet" if quiet else "human")
        self.quiet = quiet
        # Consoles look up sys.stdout / sys.stderr when they print, so test runners that
        # swap the streams see everything.
        self.console = Console(highlight=False, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False)

    @property
    def human(self) -> bool:
        return self.mode == "human"

    def note(self, message: str) -> None:
        """A short remark on stderr, human mode only (``[dim]`` rich markup allowed)."""
        if self.human:
            self.err.print(message)

    def warn(self, message: str) -> None:
        """A warning on stderr in human and JSON modes (never in quiet mode)."""
        if not self.quiet:
            self.err.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """Progress for library calls: rich bars on stderr, or a no-op outside human mode/terminals."""
        if not self.human or not self.err.is_terminal:
            yield NullProgress()
            return
        live = RichLive(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.err,
        )
        with live:
            yield RichProgress(live)

    def result(
        self,
        data: Any,
        render: Callable[[Console], None] | None = None,
        quiet_line: str | None = None,
    ) -> None:
        """Print the command's result.

        Args:
            data: everything machine-readable (a dict, or a list where a command documents it);
                printed as JSON in JSON mode.
            render: draws the human view on a rich console (human mode).
            quiet_line: the single line printed in quiet mode (nothing when ``None``).
        """
        if self.mode == "json":
            sys.stdout.write(to_json(data) + "\n")
            sys.stdout.flush()
        elif self.mode == "quiet":
            if quiet_line is not None:
                sys.stdout.write(quiet_line + "\n")
                sys.stdout.flush()
        elif render is not None:
            render(self.console)
        else:
            self.console.print_json(to_json(data))


@contextmanager
def library_bars_off() -> Iterator[None]:
    """Silence transformers' own tqdm bars and info logs while a command runs.

    prunecli draws its own bars (or none with ``--json``/``--quiet``); the previous
    settings are restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
