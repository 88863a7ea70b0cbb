"""``prunecli run``: run a recipe (a YAML file of compress options) and check its gates.

A recipe names the model, method, options, data, evaluation and output, and may carry
gates (``expect: {max_ppl_ratio: 1.4, min_block_sparsity: 0.19, max_seconds: 900}``). A
failed gate exits with code 3 (bad input is 2, an internal error 1) after the report is
printed, with one line saying which gate failed by how much.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecli.cli._options import (
    OUTPUT_PANEL,
    AllowPickleOpt,
    JsonOpt,
    NoVerifyOpt,
    QuietOpt,
    TrustRemoteCodeOpt,
)
from prunecli.cli.output import Output


def run_recipe(
    recipe: Annotated[
        Path,
        typer.Argument(help="The recipe: a YAML file of compress options.", metavar="RECIPE.yaml"),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override a recipe key (repeatable): sparsity=0.3, output=DIR, set.metric=WIFV, "
            "expect.max_ppl_ratio=1.5. Values are YAML; paths are relative to the current directory.",
            metavar="KEY=VALUE",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace the recipe's output folder if it is an existing prunecli checkpoint.",
            rich_help_panel=OUTPUT_PANEL,
        ),
    ] = False,
    no_verify: NoVerifyOpt = False,
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run RECIPE.yaml (compress with its options) and check its `expect:` gates.

    Exit codes: 0 ok and every gate passed, 3 a gate failed, 2 bad input, 1 internal error.
    Paths in a recipe are relative to the recipe file; the effective recipe (absolute paths,
    `extends:` resolved) is saved as recipe.yaml beside the checkpoint and replays from anywhere.

    Examples (the recipes/ folder is in the repository):

      prunecli run recipes/smollm2-magnitude-20.yaml

      prunecli run recipes/smollm2-flap-20.yaml --set sparsity=0.3 --set output=out/flap30 --json

      prunecli run out/recipes/smollm2-flap-20/recipe.yaml --overwrite   # replay a run
    """
    from prunecli.cli.compress import run_compress
    from prunecli.pipeline import resolve_options
    from prunecli.recipe import load_recipe, merge_recipes, parse_overrides

    out = Output(json=json, quiet=quiet)
    effective = merge_recipes(load_recipe(recipe), parse_overrides(list(set_ or [])))
    flags = {
        "overwrite": overwrite,
        "verify": not no_verify,
        "allow_pickle": allow_pickle,
        "trust_remote_code": trust_remote_code,
    }
    opts, config = resolve_options(flags, set(flags), recipe=effective)
    if opts.nproc > 1:
        from prunecli.errors import InputError

        raise InputError(
            "nproc in a recipe run by `prunecli run`",
            hint=f"use `prunecli compress --recipe {recipe}` for data-parallel runs, or torchrun",
        )
    run_compress(opts, config, out)
