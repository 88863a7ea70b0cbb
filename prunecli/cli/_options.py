"""Options shared by several commands, defined once as ``Annotated`` aliases, and their checks.

Commands declare e.g. ``dtype: DtypeOpt = "auto"``; the default lives in the
signature, the help text and flag names live here.
"""

from __future__ import annotations

from typing import Annotated

import typer

MODEL_PANEL = "Model loading"
DATA_PANEL = "Data"
OUTPUT_PANEL = "Output"

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model to load: a local folder (config.json + safetensors), a .gguf file, "
        "a Hugging Face hub id, or an alias from `prunecli models list`.",
        metavar="MODEL",
        show_default=False,
    ),
]

DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="Weights dtype: auto (the checkpoint's own, from its config.json; float32 for .gguf files "
        "and configs that record none), float32, bfloat16 or float16.",
        metavar="DTYPE",
        rich_help_panel=MODEL_PANEL,
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device",
        help="Torch device to run on: cpu, cuda, cuda:1, mps ...",
        metavar="DEVICE",
        rich_help_panel=MODEL_PANEL,
    ),
]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Allow loading pickle checkpoints (.bin/.pt). Pickles can run code: only for files you trust.",
        rich_help_panel=MODEL_PANEL,
    ),
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Allow modeling code shipped inside the checkpoint to run (transformers' trust_remote_code).",
        rich_help_panel=MODEL_PANEL,
    ),
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print JSON on stdout instead of tables; no progress bars.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
QuietOpt = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="Print only the essential result line; no progress bars.",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
NoVerifyOpt = Annotated[
    bool,
    typer.Option(
        "--no-verify",
        help="Do not reload the saved checkpoint to check that it is the pruned model (faster).",
        rich_help_panel=OUTPUT_PANEL,
    ),
]
TextFieldOpt = Annotated[
    str,
    typer.Option(
        "--text-field",
        help="Field holding the text in JSON-lines files and `hf:` datasets.",
        metavar="FIELD",
        rich_help_panel=DATA_PANEL,
    ),
]
SeqlenOpt = Annotated[
    int,
    typer.Option("--seqlen", min=1, help="Tokens per window.", metavar="L"),
]
MaxWindowsOpt = Annotated[
    int | None,
    typer.Option(
        "--max-windows",
        min=1,
        help="Evaluate at most this many windows (default: all of them).",
        metavar="N",
        show_default=False,
    ),
]


def check_data_source(source: str | None, flag: str) -> None:
    """Fail early when a data source names a local file or folder that does not exist (see the pipeline's)."""
    from prunecli.pipeline import check_data_source as check

    check(source, flag)
