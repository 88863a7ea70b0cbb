"""``prunecli cache list|clear``: the converted models prunecli keeps in ``$PRUNECLI_CACHE``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import JsonOpt, QuietOpt
from prunecli.cli.output import Output

app = typer.Typer(
    help="prunecli's model cache ($PRUNECLI_CACHE, default ~/.cache/prunecli): GGUF models converted "
    "to safetensors, GGUF files joined from package chunks. Entries are rebuilt on the next load.",
    no_args_is_help=True,
)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


@app.command("list")
def list_cache(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """List the cache entries with their size and the file they were made from."""
    from prunecli.models.cache import cache_entries
    from prunecli.models.gguf import cache_root

    out = Output(json=json, quiet=quiet)
    entries = cache_entries()
    report = {"root": str(cache_root()), "entries": entries, "bytes": sum(e["bytes"] for e in entries)}

    def render(console: Console) -> None:
        table = Table(title=f"prunecli cache: {report['root']}")
        for col in ("name", "size", "made from"):
            table.add_column(col, justify="right" if col == "size" else "left")
        for e in entries:
            table.add_row(e["name"], _size(e["bytes"]), e["source"] or "-")
        console.print(table)
        console.print(f"{len(entries)} entries, {_size(report['bytes'])}", highlight=False)

    out.result(report, render, quiet_line="\n".join(e["name"] for e in entries))


@app.command("clear")
def clear(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Entries to remove, as `prunecli cache list` names them.", metavar="[NAME]..."),
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove cache entries (NAME..., or --all); they are rebuilt when a model needs them again."""
    from prunecli.errors import InputError
    from prunecli.models.cache import clear_cache

    if not names and not all_:
        raise InputError("nothing to clear", hint="name entries (see `prunecli cache list`) or pass --all")
    if names and all_:
        raise InputError("entry names and --all both given", hint="pass one or the other")
    out = Output(json=json, quiet=quiet)
    removed = clear_cache(None if all_ else list(names or []))
    report: dict[str, Any] = {"removed": removed, "bytes": sum(e["bytes"] for e in removed)}
    out.result(
        report,
        lambda console: console.print(
            f"removed {len(removed)} entries, {_size(report['bytes'])} freed", highlight=False
        ),
        quiet_line=_size(report["bytes"]),
    )
