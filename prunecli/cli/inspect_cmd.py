"""``prunecli inspect``: architecture, shape of the config and where the parameters are."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from prunecli.cli._options import (
    AllowPickleOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    QuietOpt,
    TrustRemoteCodeOpt,
)
from prunecli.cli.output import Output, library_bars_off

# Report field -> config attributes to try, first found wins (names differ across families).
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "heads": ("num_attention_heads", "n_head"),
    "kv_heads": ("num_key_value_heads",),
    "head_dim": ("head_dim",),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
    "experts_per_token": ("num_experts_per_tok", "moe_topk"),
    "vocab": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions"),
    "tied_embeddings": ("tie_word_embeddings",),
}


def inspect_model(
    model: ModelArg,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    allow_pickle: AllowPickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write a PNG bar plot of the kept widths per layer (needs matplotlib).",
            metavar="FILE.png",
            show_default=False,
        ),
    ] = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show MODEL's architecture, config summary, parameters per module kind and kept widths per layer.

    For a pruned checkpoint the kept share of attention heads and MLP channels of every layer is
    drawn as a bar chart (read from its prunecli.json plan); --plot also writes it as a PNG.

    Examples:

      prunecli inspect smollm2-135m

      prunecli inspect out/flap20 --plot widths.png
    """
    if plot is not None and plot.suffix.lower() != ".png":
        from prunecli.errors import InputError

        raise InputError(f"--plot writes a PNG, got {plot}", hint="name the file e.g. widths.png")
    from prunecli.evaluate import count_parameters, parameter_breakdown
    from prunecli.models import load_model

    out = Output(json=json, quiet=quiet)
    with library_bars_off(), out.progress() as progress:
        loaded = load_model(
            model,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            progress=progress,
        )
    m = loaded.model
    report: dict[str, Any] = {
        "model": model,
        "source": str(loaded.source),
        "kind": loaded.kind,
        "architecture": type(m).__name__,
        "config": config_summary(getattr(m, "config", None)),
        "per_layer_config": per_layer_config(getattr(m, "config", None)),
        "parameters": count_parameters(m),
        "parameters_by_kind": dict(parameter_breakdown(m)),
        "dtype": _dtype(m),
        "load_seconds": loaded.load_seconds,
    }
    report["kept_widths"] = kept_widths(report["config"], report["per_layer_config"], loaded.source)
    if plot is not None:
        from prunecli.plot import save_png

        series = {k: v for k, v in report["kept_widths"].items() if k != "layers"}
        report["plot"] = str(save_png(plot, series, f"kept widths per layer: {model}", "kept fraction"))
    out.result(report, lambda console: render_inspect(console, report), quiet_line=report.get("plot"))


# Plan group names: "<...>.layers.<i>.<...>:heads" / ":channels".
_GROUP = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\..*:(heads|channels)$")


def kept_widths(config: dict[str, Any], per_layer: dict[str, dict[str, Any]], source: Any) -> dict[str, list]:
    """Kept share of attention heads and MLP channels per layer.

    The current widths come from the config (global values, per-layer overrides); the removed
    units from the plan in the checkpoint's ``prunecli.json`` (none for an unpruned model).

    Returns:
        ``{"layers": [0, 1, ...], "attention heads": [...], "MLP channels": [...]}`` (a series is
        left out when the config has no such width).
    """
    from prunecli.checkpoint import PROVENANCE_FILE
    from prunecli.models.files import read_json

    n = int(config.get("layers") or 0)
    removed: dict[tuple[int, str], int] = {}
    prov = Path(str(source)) / PROVENANCE_FILE
    if prov.is_file():
        try:
            plan = read_json(prov).get("plan") or {}
        except Exception:  # noqa: BLE001 - a damaged record only loses the chart
            plan = {}
        for name, units in (plan.get("removals") or {}).items():
            m = _GROUP.search(str(name))
            if m and isinstance(units, list):
                key = (int(m.group(1)), m.group(2))
                removed[key] = removed.get(key, 0) + len(units)
    out: dict[str, list] = {"layers": list(range(n))}
    for label, field, kind in (
        ("attention heads", ("heads", "num_attention_heads"), "heads"),
        ("MLP channels", ("intermediate", "intermediate_size"), "channels"),
    ):
        if config.get(field[0]) is None:
            continue
        values = []
        for i in range(n):
            now = int(per_layer.get(str(i), {}).get(field[1], config[field[0]]))
            gone = removed.get((i, kind), 0)
            values.append(now / (now + gone) if now + gone else 1.0)
        out[label] = values
    return out


def _dtype(model: Any) -> str | None:
    for p in model.parameters():
        return str(p.dtype).removeprefix("torch.")
    return None


def config_summary(config: Any) -> dict[str, Any]:
    """The sizes that matter for pruning, read from a transformers config (missing ones left out).

    Args:
        config: a ``PretrainedConfig`` (its text sub-config is used for multimodal models) or ``None``.
    """
    if config is None:
        return {}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    summary: dict[str, Any] = {"model_type": getattr(config, "model_type", None)}
    for key, names in CONFIG_FIELDS.items():
        for name in names:
            value = getattr(text, name, None)
            if value is not None:
                summary[key] = value
                break
    if "head_dim" not in summary and summary.get("hidden") and summary.get("heads"):
        summary["head_dim"] = summary["hidden"] // summary["heads"]
    return {k: v for k, v in summary.items() if v is not None}


def per_layer_config(config: Any) -> dict[str, dict[str, Any]]:
    """Per-layer overrides (transformers' ``per_layer_config``) of a heterogeneous model, else ``{}``."""
    if config is None:
        return {}
    raw = config.to_dict().get("per_layer_config") or {}
    return {str(i): dict(v) for i, v in sorted(raw.items(), key=lambda kv: int(kv[0])) if v}


def render_inspect(console: Console, report: dict[str, Any]) -> None:
    """Tables: config summary, per-layer overrides (if any), parameters by module kind."""
    console.print(
        f"[bold]{escape(report['architecture'])}[/]  {report['parameters']:,} parameters, "
        f"{report['dtype']}, loaded as {escape(str(report['kind']))} from {escape(report['source'])}",
        soft_wrap=True,
    )
    cfg = Table(title="config", show_header=False)
    cfg.add_column("field")
    cfg.add_column("value", justify="right")
    for key, value in report["config"].items():
        cfg.add_row(
            key.replace("_", " "),
            f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value),
        )
    console.print(cfg)
    overrides = report["per_layer_config"]
    if overrides:
        keys = sorted({k for v in overrides.values() for k in v})
        layers = Table(title="per-layer config (layers that differ)")
        layers.add_column("layer", justify="right")
        for k in keys:
            layers.add_column(k.replace("_", " "), justify="right")
        for i, values in overrides.items():
            layers.add_row(i, *(str(values.get(k, "")) for k in keys))
        console.print(layers)
    total = report["parameters"]
    params = Table(title="parameters by module kind")
    params.add_column("module kind")
    params.add_column("parameters", justify="right")
    params.add_column("share", justify="right")
    for kind, n in sorted(report["parameters_by_kind"].items(), key=lambda kv: -kv[1]):
        params.add_row(kind, f"{n:,}", f"{n / total:.1%}" if total else "-")
    console.print(params)
    widths = report.get("kept_widths") or {}
    series = {k: v for k, v in widths.items() if k != "layers"}
    if series and widths.get("layers"):
        from prunecli.plot import bar_chart

        console.print("kept widths per layer (share of the original)", highlight=False)
        console.print(bar_chart(series, width=20), markup=False, highlight=False, soft_wrap=True)
    if report.get("plot"):
        console.print(f"plot written to {report['plot']}", markup=False, highlight=False, soft_wrap=True)
