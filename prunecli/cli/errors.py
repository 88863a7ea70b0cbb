"""One place that turns exceptions into a one-line message, a hint and an exit code.

Exit codes: 0 success, 2 bad input or usage (every :class:`prunecli.errors.PruneCliError`
and every command-line parsing error), 1 internal error, 130 interrupted.

Set ``PRUNECLI_DEBUG=1`` to print the full traceback before the one-line message.
"""

from __future__ import annotations

import os
import sys
import traceback

from prunecli.errors import (
    CheckpointError,
    DataError,
    DependencyMissingError,
    ModelNotFoundError,
    OutputExistsError,
    PickleRefusedError,
    PlanError,
    PruneCliError,
    SparsityError,
    UnsupportedModelError,
)

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130

DEBUG_ENV = "PRUNECLI_DEBUG"

# Library exception -> hint used when the exception carries none. Looked up along the
# exception's MRO, so the most specific class wins.
HINTS: dict[type[BaseException], str] = {
    SparsityError: "use a fraction strictly between 0 and 1, e.g. --sparsity 0.2",
    ModelNotFoundError: "pass a folder with config.json, a .gguf file, a hub id, "
    "or an alias from `prunecli models list`",
    DependencyMissingError: "install the missing package with pip",
    PickleRefusedError: "convert the checkpoint to safetensors, or pass --allow-pickle if you trust the file",
    CheckpointError: "re-save the checkpoint with save_pretrained() (safetensors) and try again",
    DataError: "pass a .txt/.jsonl file or a datasets name with enough text (see --text-field)",
    OutputExistsError: "choose another --output folder or pass --overwrite",
    UnsupportedModelError: "run `prunecli graph MODEL --all` to see what can be pruned and why",
    PlanError: "rebuild the plan from the same model it is applied to",
    MemoryError: "lower --nsamples/--seqlen/--max-windows, or use --dtype bfloat16",
}


def debug_enabled() -> bool:
    """Whether ``PRUNECLI_DEBUG`` asks for tracebacks (any value but empty/0/false/no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _hint_for(exc: BaseException) -> str | None:
    hint = getattr(exc, "hint", None)
    if hint:
        return str(hint)
    for cls in type(exc).__mro__:
        if cls in HINTS:
            return HINTS[cls]
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def format_error(exc: BaseException) -> tuple[str, int]:
    """The one-line message and the exit code for ``exc``.

    Args:
        exc: any exception raised while a command ran.

    Returns:
        ``(line, exit_code)``; the line has no trailing newline.

    Example:
        >>> from prunecli.errors import SparsityError
        >>> format_error(SparsityError("sparsity must be strictly between 0 and 1, got 1.5"))[1]
        2
    """
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (nothing was written)", EXIT_INTERRUPTED
    if isinstance(exc, PruneCliError):
        line = f"error: {_one_line(exc.message)}"
        hint = _hint_for(exc)
        if hint:
            line += f" (hint: {_one_line(hint)})"
        return line, int(getattr(exc, "exit_code", EXIT_USAGE))
    if _is_out_of_memory(exc):
        detail = _one_line(str(exc)) or type(exc).__name__
        return f"error: out of memory: {detail} (hint: {HINTS[MemoryError]})", EXIT_INTERNAL
    detail = _one_line(str(exc))
    name = type(exc).__name__
    line = f"internal error: {name}: {detail}" if detail else f"internal error: {name}"
    if not debug_enabled():
        line += f" (set {DEBUG_ENV}=1 for a traceback)"
    return line, EXIT_INTERNAL


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (after its traceback when debugging) and return the exit code.

    Args:
        exc: the exception to report.
    """
    line, code = format_error(exc)
    if debug_enabled() and not isinstance(exc, KeyboardInterrupt):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    return code


def usage_line(message: str, command_path: str | None = None) -> str:
    """One line for a command-line parsing error (wrong option, bad value, missing argument).

    Args:
        message: the parser's message.
        command_path: e.g. ``prunecli compress``; used in the hint.
    """
    where = command_path or "prunecli"
    return f"error: {_one_line(message)} (hint: see `{where} --help`)"
