"""Progress reporting without a UI dependency.

Library functions accept ``progress: Progress | None``. The CLI passes a rich-backed
implementation (``prunecli.cli.output``); library users may pass their own or nothing.

Example:
    >>> with resolve(None).task("scoring", total=3) as t:
    ...     for _ in range(3):
    ...         t.advance()
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def update(self, *, description: str | None = None, total: int | None = None) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, n: int = 1) -> None:
        pass

    def update(self, *, description: str | None = None, total: int | None = None) -> None:
        pass

    def __enter__(self) -> _NullTask:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: int | None = None) -> _NullTask:
        return _NullTask()


def resolve(progress: Progress | None) -> Progress:
    return progress if progress is not None else NullProgress()
