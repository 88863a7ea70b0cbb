"""Write a pruned model as a safetensors checkpoint that stock transformers reloads.

The folder is written in a temporary sibling directory and renamed into place at the end,
so a crash or an exception never leaves a half-written checkpoint. See
``docs/checkpoint-format.md`` for the contents.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from prunecli.errors import InputError, OutputExistsError, UnsupportedModelError
from prunecli.models.files import sibling_temp_dir
from prunecli.progress import Progress, resolve

PROVENANCE_FILE = "prunecli.json"
RECIPE_FILE = "recipe.yaml"
MODELING_FILE = "modeling_prunecli.py"

# Auto classes tried, in order, for the auto_map entry of a heterogeneous checkpoint.
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
)


def prunecli_version() -> str:
    """The installed prunecli version (``0+unknown`` when running from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prunecli")
    except PackageNotFoundError:
        return "0+unknown"


def _auto_class_for(base_name: str) -> str:
    from transformers.models.auto import modeling_auto

    for auto_name, mapping_name in _AUTO_CLASSES:
        names = getattr(modeling_auto, mapping_name, {}).values()
        flat = {n for v in names for n in ((v,) if isinstance(v, str) else v)}
        if base_name in flat:
            return auto_name
    return "AutoModel"


def _provenance_json(provenance: dict[str, Any]) -> str:
    import torch
    import transformers

    if not isinstance(provenance, dict):
        raise InputError(f"provenance must be a dict, got {type(provenance).__name__}")
    record = dict(provenance)
    record["prunecli_version"] = prunecli_version()
    record["torch_version"] = torch.__version__
    record["transformers_version"] = transformers.__version__
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        return json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"provenance is not JSON-serialisable: {exc}",
            hint="convert tensors and numpy values to plain lists/floats before saving",
        ) from exc


def _check_shard_size(max_shard_size: int | str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        ok = convert_file_size_to_int(max_shard_size) > 0
    except (ValueError, TypeError, AttributeError):
        ok = False
    if isinstance(max_shard_size, bool) or not ok:
        raise InputError(
            f"invalid max_shard_size {max_shard_size!r}",
            hint="use a size such as 2GB, 500MB or a number of bytes",
        )


def _stock_base_name(model: Any) -> str | None:
    """The first class in ``type(model)``'s MRO that is a stock transformers class."""
    import transformers

    for cls in type(model).__mro__:
        if getattr(transformers, cls.__name__, None) is cls and cls.__name__ != "PreTrainedModel":
            return cls.__name__
    return None


def _implicit_head_dim(model: Any) -> int | None:
    """The attention head size when the config leaves it implicit and it is no longer implicit.

    Qwen2 and Phi-3 configs have no ``head_dim`` field: the model derives it as
    ``hidden_size // num_attention_heads``, which changes once heads are pruned. The attention
    modules keep the true size; return it when it differs from the derived one, so that
    ``config.json`` can state it (the modeling code reads ``getattr(config, "head_dim", ...)``).
    """
    from prunecli.checkpoint.modeling_prunecli import GlobalAccess

    config = model.config
    if config.__dict__.get("head_dim") is not None:
        return None
    dims = {
        m.head_dim
        for m in model.modules()
        if isinstance(getattr(m, "head_dim", None), int) and hasattr(m, "layer_idx")
    }
    if len(dims) != 1:
        return None
    (dim,) = dims
    with GlobalAccess(config):
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden // heads == dim:
        return None
    return dim


def _fix_config_json(path: Path, *, base_name: str, heterogeneous: bool, head_dim: int | None = None) -> None:
    """Point ``architectures`` at the stock class, state an implicit ``head_dim``, and add/remove
    prunecli's ``auto_map`` entry."""
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = [base_name]
    # transformers 5.23's config validation (e.g. LlamaConfig.validate_architecture) reads
    # num_attention_heads globally, so AutoConfig.from_pretrained refuses a heterogeneous
    # config.json unless this switch is saved with it. A uniform config does not need it.
    if heterogeneous:
        config["allow_global_per_layer_attribute_access"] = True
    else:
        config.pop("allow_global_per_layer_attribute_access", None)
    if head_dim is not None:
        config["head_dim"] = head_dim
    auto_map = {
        k: v for k, v in (config.get("auto_map") or {}).items() if not str(v).startswith("modeling_prunecli.")
    }
    if heterogeneous:
        auto_map[_auto_class_for(base_name)] = f"modeling_prunecli.PruneCli{base_name}"
    if auto_map:
        config["auto_map"] = auto_map
    else:
        config.pop("auto_map", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write(
    model: Any,
    tokenizer: Any | None,
    tmp: Path,
    provenance_text: str,
    recipe: dict[str, Any] | None,
    max_shard_size: int | str,
) -> None:
    from prunecli.checkpoint import modeling_prunecli
    from prunecli.models.hf import quiet_transformers

    config = model.config
    heterogeneous = bool(modeling_prunecli.per_layer_overrides(config))
    base_name = _stock_base_name(model)
    if base_name is None:
        if heterogeneous:
            raise UnsupportedModelError(
                f"cannot save per-layer widths for {type(model).__name__}: it is not a transformers class",
                hint="prune to the same widths in every layer (uniform selection)",
            )
        base_name = type(model).__name__
    architectures = getattr(config, "architectures", None)
    try:
        with quiet_transformers(), modeling_prunecli.GlobalAccess(config):
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
    finally:
        config.architectures = architectures  # save_pretrained overwrites it with the class name
    _fix_config_json(
        tmp / "config.json",
        base_name=base_name,
        heterogeneous=heterogeneous,
        head_dim=_implicit_head_dim(model),
    )
    if heterogeneous:
        shutil.copyfile(modeling_prunecli.__file__, tmp / MODELING_FILE)
    else:
        # A model loaded with trust_remote_code copies its modeling file; a uniform one needs none.
        (tmp / MODELING_FILE).unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / PROVENANCE_FILE).write_text(provenance_text, encoding="utf-8")
    if recipe is not None:
        import yaml

        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")


def _same_path(a: str | os.PathLike[str] | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def save_checkpoint(
    model: Any,
    tokenizer: Any | None,
    out_dir: str | os.PathLike[str],
    *,
    provenance: dict[str, Any],
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    progress: Progress | None = None,
) -> Path:
    """Save ``model`` (+ tokenizer, provenance, recipe) as a safetensors checkpoint folder.

    The folder reloads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` when every layer
    has the same widths; when widths differ by layer (``config.per_layer_config``) it also holds
    ``modeling_prunecli.py`` and an ``auto_map`` so that ``from_pretrained(out_dir,
    trust_remote_code=True)`` works, and :func:`prunecli.models.load_model` loads it without
    remote code.

    Args:
        model: a transformers model (possibly pruned in place).
        tokenizer: its tokenizer, or None.
        out_dir: the checkpoint folder to create.
        provenance: JSON-serialisable record of how the model was made (method, config, plan,
            data hash, parameter counts); written to ``prunecli.json`` with the prunecli, torch
            and transformers versions and a UTC ``created`` time added. A ``recipe`` dict in it
            is also written as ``recipe.yaml``.
        overwrite: replace an existing ``out_dir`` (atomically: the old folder is moved aside,
            the new one renamed in, then the old one deleted).
        max_shard_size: shard the weights above this size (``"2GB"``, ``"500MB"`` or bytes).
        progress: progress reporter.

    Returns:
        The absolute path of the checkpoint folder.

    Example:
        >>> save_checkpoint(model, tok, "out", provenance={"method": "flap"})  # doctest: +SKIP
        PosixPath('/abs/out')
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists", hint="pass --overwrite")
    if _same_path(getattr(model, "name_or_path", None), out):
        raise OutputExistsError(
            f"refusing to write over {out}: the model was loaded from it",
            hint="choose another output folder; the input model folder is never modified",
        )
    _check_shard_size(max_shard_size)
    provenance_text = _provenance_json(provenance)
    recipe = provenance.get("recipe") if isinstance(provenance.get("recipe"), dict) else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_dir(out)
    try:
        with resolve(progress).task(f"saving checkpoint to {out}", total=1) as task:
            _write(model, tokenizer, tmp, provenance_text, recipe, max_shard_size)
            _move_into_place(tmp, out, overwrite=overwrite)
            task.advance()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path, *, overwrite: bool) -> None:
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)  # fails if someone created a non-empty out meanwhile
        return
    if not overwrite:
        raise OutputExistsError(f"output folder {out} already exists", hint="pass --overwrite")
    aside = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()
