"""The ``prunecli`` command line: a thin Typer layer over the library.

Each command lives in its own module, checks its options, calls library functions and
prints through :class:`prunecli.cli.output.Output`. Errors from every command are turned
into one line on stderr and an exit code in one place (:mod:`prunecli.cli.errors`).
Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from prunecli.cli import cache_cmd as _cache
from prunecli.cli import compress as _compress
from prunecli.cli import eval_cmd as _eval
from prunecli.cli import export_cmd as _export
from prunecli.cli import graph as _graph
from prunecli.cli import inspect_cmd as _inspect
from prunecli.cli import methods_cmd as _methods
from prunecli.cli import models as _models
from prunecli.cli import recover_cmd as _recover
from prunecli.cli import run_cmd as _run
from prunecli.cli.errors import EXIT_INTERNAL, EXIT_USAGE, report, usage_line

try:  # typer >= 0.22 ships its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # older typer re-uses click itself
    from click.exceptions import ClickException

__all__ = ["app", "main"]


def _is_control_flow(exc: BaseException) -> bool:
    """Exceptions the parser uses to exit or report usage errors (handled by :meth:`_App.main`)."""
    return isinstance(exc, (typer.Exit, typer.Abort, ClickException, SystemExit))


class _App(TyperGroup):
    """Root group: maps every exception to one line and an exit code."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BaseException as exc:  # noqa: BLE001 - this is the one place that reports errors
            if _is_control_flow(exc):
                raise
            raise typer.Exit(report(exc)) from None

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        self.argv = list(sys.argv[1:] if args is None else args)  # `compress --nproc` relaunches with these
        try:
            rv = super().main(
                args=args, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
            code = rv if isinstance(rv, int) else 0
        except ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `prunecli` or `prunecli models`
                text = exc.format_message()  # empty when rich has already printed the help
                if text.strip():
                    sys.stdout.write(text.rstrip("\n") + "\n")
                code = 0
            else:
                ctx = getattr(exc, "ctx", None)
                sys.stderr.write(usage_line(exc.format_message(), getattr(ctx, "command_path", None)) + "\n")
                code = EXIT_USAGE
        except typer.Abort:
            sys.stderr.write("aborted\n")
            code = EXIT_INTERNAL
        if standalone_mode:
            sys.exit(code)
        return code


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("prunecli")
        except PackageNotFoundError:
            v = "unknown (not installed)"
        typer.echo(f"prunecli {v}")
        raise typer.Exit(0)


app = typer.Typer(
    cls=_App,
    name="prunecli",
    help="Structured pruning of transformer LLMs into smaller checkpoints that reload in transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Structured pruning of transformer LLMs into smaller checkpoints that reload in transformers.

    Exit codes: 0 ok, 2 bad input or usage, 3 a recipe gate failed, 1 internal error, 130 interrupted.
    Set PRUNECLI_DEBUG=1 for tracebacks.
    """


app.command("compress", no_args_is_help=True)(_compress.compress)
app.command("eval", no_args_is_help=True)(_eval.eval_model)
app.command("export", no_args_is_help=True)(_export.export)
app.command("graph", no_args_is_help=True)(_graph.graph)
app.command("inspect", no_args_is_help=True)(_inspect.inspect_model)
app.command("recover", no_args_is_help=True)(_recover.recover_model)
app.command("run", no_args_is_help=True)(_run.run_recipe)
app.command("methods")(_methods.list_methods)
app.add_typer(_models.app, name="models")
app.add_typer(_cache.app, name="cache")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code (the ``prunecli`` console script).

    Args:
        argv: arguments without the program name; ``sys.argv[1:]`` when ``None``.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
        prunecli 0.1.0
        0
    """
    command = typer.main.get_command(app)
    return int(command.main(args=argv, prog_name="prunecli", standalone_mode=False) or 0)
