"""Write a pruned model as a safetensors checkpoint that stock transformers reloads.

The folder is written in a temporary sibling directory and renamed into place at the end,
so a crash or an exception never leaves a half-written checkpoint. See
``docs/checkpoint-format.md`` for the contents.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunecli.errors import (
    CheckpointError,
    InputError,
    OutputExistsError,
    OutputNotWritableError,
    UnsupportedModelError,
    VerifyError,
)
from prunecli.models.files import apply_umask, sibling_temp_dir, weight_files
from prunecli.progress import Progress, resolve

PROVENANCE_FILE = "prunecli.json"
RECIPE_FILE = "recipe.yaml"
MODELING_FILE = "modeling_prunecli.py"
# Reload the whole checkpoint to compare outputs when its weights are at most this large;
# above it only the shapes are checked (see ``save_checkpoint(verify_max_bytes=...)``).
VERIFY_MAX_BYTES = 4 * 1024**3

# Auto classes tried, in order, for the auto_map entry of a heterogeneous checkpoint.
_AUTO_CLASSES = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModel", "MODEL_MAPPING_NAMES"),
    ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
    ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
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


def _check_config(model: Any) -> None:
    """Refuse, before anything is written, a model whose config transformers would not reload."""
    from prunecli.models.hf import config_problem

    config = getattr(model, "config", None)
    problem = config_problem(config) if config is not None else None
    if problem:
        raise CheckpointError(
            f"cannot save {type(model).__name__}: transformers' validation refuses its config "
            f"({problem}), so the checkpoint would not reload (nothing was written)",
            hint="fix the config fields it names, or prune to widths the architecture accepts",
        )


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


def _fix_config_json(
    path: Path,
    *,
    base_name: str,
    heterogeneous: bool,
    head_dim: int | None = None,
    remote: bool | None = None,
    modules: dict[str, Any] | None = None,
) -> None:
    """Point ``architectures`` at the stock class, state an implicit ``head_dim``, record the
    module overrides, and add/remove prunecli's ``auto_map`` entry (``remote``: the checkpoint
    needs ``modeling_prunecli.py``; default: when heterogeneous)."""
    remote = heterogeneous if remote is None else remote
    config = json.loads(path.read_text(encoding="utf-8"))
    if modules:
        config["prunecli_modules"] = modules
    else:
        config.pop("prunecli_modules", None)
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
    if remote:
        auto_map[_auto_class_for(base_name)] = f"modeling_prunecli.PruneCli{base_name}"
        config_name = _stock_config_name(base_name)
        if heterogeneous and config_name:
            # validators that read the global widths without transformers' per-layer warnings
            auto_map["AutoConfig"] = f"modeling_prunecli.PruneCli{config_name}"
    if auto_map:
        config["auto_map"] = auto_map
    else:
        config.pop("auto_map", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_streamed(model: Any, weights: Any, tmp: Path, max_shard_size: int | str) -> None:
    """Write the config and the weights of a model whose blocks are offloaded, shard by shard.

    Each tensor is read (pruned and compensated) from ``weights`` when its shard is written;
    a shard ends at a block boundary or at ``max_shard_size``, so at most one shard's tensors
    are in memory. Tied tensors are written once, under their first name, as
    ``save_pretrained`` does.
    """
    from safetensors.torch import save_file
    from transformers.utils.hub import convert_file_size_to_int

    from prunecli.calibrate.offload import main_block_list

    limit = convert_file_size_to_int(max_shard_size)
    model.config.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None and hasattr(model, "can_generate") and model.can_generate():
        generation.save_pretrained(tmp)
    path, _ = main_block_list(model)

    def block_of(name: str) -> str:
        rest = name[len(path) + 1 :] if name.startswith(path + ".") else None
        return rest.split(".", 1)[0] if rest else ""

    seen: set[int] = set()
    shards: list[list[str]] = [[]]
    sizes = [0]
    current = None
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        nbytes = t.numel() * t.element_size()
        blk = block_of(name)
        if shards[-1] and (blk != current or sizes[-1] + nbytes > limit):
            shards.append([])
            sizes.append(0)
        current = blk
        shards[-1].append(name)
        sizes[-1] += nbytes
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        tensors = {}
        for name in names:
            t = state[name]
            tensors[name] = weights.tensor(name) if t.device.type == "meta" else t.detach().cpu().contiguous()
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors
        weight_map.update(dict.fromkeys(names, file))
    if total > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8"
        )


def _stock_config_name(base_name: str) -> str | None:
    """The stock config class of the transformers class ``base_name`` (``LlamaConfig``), or None."""
    import transformers

    config_cls = getattr(getattr(transformers, base_name, None), "config_class", None)
    if isinstance(config_cls, type) and getattr(transformers, config_cls.__name__, None) is config_cls:
        return config_cls.__name__
    return None


def _write(
    model: Any,
    tokenizer: Any | None,
    tmp: Path,
    provenance_text: str,
    recipe: dict[str, Any] | None,
    max_shard_size: int | str,
    weights: Any = None,
) -> tuple[str, bool]:
    """Write everything into ``tmp``; return the stock base class name and whether the folder
    needs ``modeling_prunecli.py`` (the remote-code route)."""
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
            if weights is not None:
                _save_streamed(model, weights, tmp, max_shard_size)
            else:
                model.save_pretrained(tmp, max_shard_size=max_shard_size)
    finally:
        config.architectures = architectures  # save_pretrained overwrites it with the class name
    config_path = tmp / "config.json"
    head_dim = _implicit_head_dim(model)
    _fix_config_json(config_path, base_name=base_name, heterogeneous=heterogeneous, head_dim=head_dim)
    modules: dict[str, Any] = {}
    if _is_transformers_class(base_name):
        heterogeneous, modules = _describe_modules(model, config_path, base_name)
    remote = heterogeneous or bool(modules)
    _fix_config_json(
        config_path,
        base_name=base_name,
        heterogeneous=heterogeneous,
        head_dim=head_dim,
        remote=remote,
        modules=modules,
    )
    if remote:
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
    return base_name, remote


def _is_transformers_class(name: str) -> bool:
    import transformers

    return isinstance(getattr(transformers, name, None), type)


def _reference_model(config_path: Path, base_name: str) -> Any:
    """The model that loading ``config_path``'s folder builds before weights load (meta device)."""
    import torch
    import transformers

    from prunecli.checkpoint import modeling_prunecli
    from prunecli.models.hf import quiet_transformers

    with quiet_transformers():
        config = modeling_prunecli.config_from_pretrained(str(config_path.parent))
        remote = modeling_prunecli.per_layer_overrides(config) or modeling_prunecli.module_overrides(config)
        cls = modeling_prunecli.heterogeneous_class(base_name) if remote else getattr(transformers, base_name)
        with torch.device("meta"):
            return cls(config)


def _true_head_dim(model: Any) -> int | None:
    """The attention head size the model's attention modules use (None when absent or mixed)."""
    dims = set()
    for m in model.modules():
        for attr in ("head_dim", "attention_head_size"):
            value = m.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool):
                dims.add(value)
    return dims.pop() if len(dims) == 1 else None


def _describe_modules(model: Any, config_path: Path, base_name: str) -> tuple[bool, dict[str, Any]]:
    """Make ``config_path`` loadable and list what its stock build gets wrong.

    Builds the model the saved config describes (meta device) and compares it with ``model``,
    module by module: parameter shapes (extra biases included) and numeric attributes (head
    counts, head sizes, ``scaling``, ``in_features`` ...). When the config cannot be built at
    all (a head count that does not divide the hidden size: BERT, GPT-2, OPT; per-layer widths
    a family cannot build), ``per_layer_config`` is dropped and the head count is reset to
    ``hidden_size // head_dim`` so that the config is valid; the overrides then carry the widths.

    Returns:
        ``(heterogeneous, overrides)``: whether ``per_layer_config`` was kept, and the
        ``prunecli_modules`` record (empty when the stock build is already exact).
    """
    from prunecli.checkpoint.modeling_prunecli import GlobalAccess

    data = json.loads(config_path.read_text(encoding="utf-8"))
    data.pop("prunecli_modules", None)
    attribute_map = getattr(type(model.config), "attribute_map", {}) or {}
    hidden_key = attribute_map.get("hidden_size", "hidden_size")
    heads_key = attribute_map.get("num_attention_heads", "num_attention_heads")
    head_dim = _true_head_dim(model)

    def without_per_layer(d: dict[str, Any]) -> dict[str, Any]:
        d = dict(d)
        d.pop("per_layer_config", None)
        d.pop("allow_global_per_layer_attribute_access", None)
        return d

    def valid_heads(d: dict[str, Any]) -> dict[str, Any]:
        d = without_per_layer(d)
        hidden = d.get(hidden_key)
        if isinstance(hidden, int) and head_dim and hidden % head_dim == 0 and heads_key in d:
            d[heads_key] = hidden // head_dim
        return d

    attempts = [data]
    if "per_layer_config" in data:
        attempts.append(without_per_layer(data))
    attempts.append(valid_heads(data))
    first_error: BaseException | None = None
    for attempt in attempts:
        config_path.write_text(json.dumps(attempt, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            reference = _reference_model(config_path, base_name)
        except Exception as exc:  # transformers raises ValueError, validation errors, ...
            first_error = first_error or exc
            continue
        with GlobalAccess(model.config):
            overrides = _module_diff(model, reference)
        return "per_layer_config" in attempt, overrides
    text = str(first_error).strip().splitlines()[0] if first_error and str(first_error).strip() else ""
    raise UnsupportedModelError(
        f"cannot save {type(model).__name__} so that it reloads: its config does not build ({text})",
        hint="prune to widths the architecture's config can describe (uniform selection)",
    )


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _module_diff(model: Any, reference: Any) -> dict[str, Any]:
    """``{module path: {"params": {name: shape | None}, "attrs": {name: number}}}`` where
    ``model`` differs from ``reference``."""
    ref_modules = dict(reference.named_modules())
    params_of: dict[str, dict[str, Any]] = {}
    attrs_of: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        ref = ref_modules.get(name)
        own = dict(mod._parameters)
        own.update({k: v for k, v in mod._buffers.items() if k not in mod._non_persistent_buffers_set})
        if ref is None:
            if any(t is not None for t in own.values()):
                raise UnsupportedModelError(
                    f"cannot save {type(model).__name__}: its module {name} is not built by "
                    f"{type(reference).__name__}"
                )
            continue
        theirs = dict(ref._parameters)
        theirs.update({k: v for k, v in ref._buffers.items() if k not in ref._non_persistent_buffers_set})
        params: dict[str, Any] = {}
        for key in sorted(set(own) | set(theirs)):
            mine, other = own.get(key), theirs.get(key)
            shape = None if mine is None else list(mine.shape)
            if shape != (None if other is None else list(other.shape)):
                params[key] = shape
        params_of[name] = params
        attrs_of[name] = {
            key: value
            for key, value in sorted(vars(mod).items())
            if not key.startswith("_") and _numeric(value) and vars(ref).get(key) != value
        }
    # Attributes count only where shapes differ at or below the module (BERT's self-attention
    # above its resized query/key/value); elsewhere a differing attribute is a stale width the
    # forward does not read (the engine leaves LlamaMLP.intermediate_size as it was).
    resized = [n for n, p in params_of.items() if p]
    out: dict[str, Any] = {}
    for name in params_of:
        prefix = name + "." if name else ""
        attrs = attrs_of[name] if any(n == name or n.startswith(prefix) for n in resized) else {}
        change = {k: v for k, v in (("params", params_of[name]), ("attrs", attrs)) if v}
        if change:
            out[name] = change
    return out


def _same_path(a: str | os.PathLike[str] | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return Path(a).expanduser().resolve() == b.resolve()
    except (OSError, RuntimeError):
        return False


def is_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` is a checkpoint written by prunecli (its ``prunecli.json`` says so).

    Args:
        folder: a path.
    """
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and isinstance(data.get("prunecli_version"), str)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike[str], ...] = (),
) -> Path:
    """Check, before any work, that ``out_dir`` may be written (and replaced, with ``overwrite``).

    An existing ``out_dir`` is replaced only when it is itself a prunecli checkpoint (its
    ``prunecli.json`` was written by prunecli); any other folder or file, the current
    directory, the home folder, a filesystem root, an ancestor of the current directory and
    the input model (or an ancestor of it) are refused. The nearest existing folder on the way
    to ``out_dir`` must accept a new file (a probe file is created and removed).

    Args:
        out_dir: the checkpoint folder to create.
        overwrite: whether an existing checkpoint folder may be replaced.
        inputs: paths the model is read from (a folder or a file); never replaced.

    Returns:
        The absolute path of ``out_dir``.

    Raises:
        OutputExistsError: ``out_dir`` exists and may not be replaced.
        OutputNotWritableError: nothing can be written there.

    Example:
        >>> check_output_dir("out", overwrite=True)  # doctest: +SKIP
        PosixPath('/abs/out')
    """
    out = Path(out_dir).expanduser().absolute()
    real = out.resolve()
    for source in inputs:
        try:
            src = Path(source).expanduser().resolve()
        except (OSError, RuntimeError, TypeError):
            continue
        if _is_within(src, real):
            raise OutputExistsError(
                f"refusing to write over {out}: the model is loaded from "
                + ("it" if src == real else f"inside it ({src})"),
                hint="choose another output folder; the input model folder is never modified",
            )
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output folder {out} already exists", hint="pass --overwrite")
        protected = {Path.home().resolve(), Path(real.anchor)}
        if real in protected or _is_within(Path.cwd().resolve(), real):
            raise OutputExistsError(
                f"refusing to replace {out}: it is the current directory, the home folder, a "
                "filesystem root or an ancestor of the current directory",
                hint="name a new folder for the checkpoint",
            )
        if out.is_symlink() or not out.is_dir():
            raise OutputExistsError(
                f"refusing to replace {out}: it is not a folder", hint="name a new folder for the checkpoint"
            )
        if not is_checkpoint(out):
            raise OutputExistsError(
                f"refusing to replace {out}: it is not a prunecli checkpoint (no {PROVENANCE_FILE} "
                "written by prunecli), and --overwrite only replaces those",
                hint="name a new folder, or delete the existing one yourself",
            )
    check_writable(out)
    return out


def check_writable(out_dir: str | os.PathLike[str]) -> None:
    """Check that a folder can be created at ``out_dir``: the nearest existing ancestor accepts a file.

    Args:
        out_dir: the folder to create (it may exist).

    Raises:
        OutputNotWritableError: the ancestor is not a folder, or creating a file there fails.
    """
    out = Path(out_dir).expanduser().absolute()
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputNotWritableError(
            f"cannot create {out}: {parent} is not a folder", hint="choose another output folder"
        )
    try:
        _probe_write(parent)
    except OSError as exc:
        raise OutputNotWritableError(
            f"cannot write to {parent}: {exc.strerror or exc}",
            hint="choose an output folder on a writable filesystem that you have permission to write",
        ) from exc


def _probe_write(folder: Path) -> None:
    probe = folder / f".prunecli-write-probe-{uuid.uuid4().hex[:8]}"
    with open(probe, "xb"):
        pass
    probe.unlink()


def save_checkpoint(
    model: Any,
    tokenizer: Any | None,
    out_dir: str | os.PathLike[str],
    *,
    provenance: dict[str, Any],
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    verify: bool = True,
    verify_max_bytes: int = VERIFY_MAX_BYTES,
    progress: Progress | None = None,
    weights: Any = None,
    add_files: Callable[[Path], None] | None = None,
) -> Path:
    """Save ``model`` (+ tokenizer, provenance, recipe) as a safetensors checkpoint folder.

    The folder reloads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` (or ``AutoModel``
    for encoders) when the stock class builds the pruned model from its config. Otherwise
    (widths that differ by layer, head sizes a family derives from ``hidden_size / heads``,
    biases a config has no flag for) it also holds ``modeling_prunecli.py`` and an ``auto_map``
    so that ``from_pretrained(out_dir, trust_remote_code=True)`` works, and
    :func:`prunecli.models.load_model` loads it without remote code.

    Before the folder is renamed into place it is verified (``verify=True``): reloaded the way
    its config says and run on a short probe input, its logits (encoders: last hidden state)
    must equal the in-memory model's. Above ``verify_max_bytes`` of weights only the tensor
    shapes are checked against the config (a meta-device build). ``prunecli.json`` records
    which check ran under ``"verify"``: ``{"check": "logits" | "hidden_state" | "shapes" |
    "none", "max_abs_diff": ..., "route": "stock" | "remote-code"}``.

    Args:
        model: a transformers model (possibly pruned in place).
        tokenizer: its tokenizer, or None.
        out_dir: the checkpoint folder to create.
        provenance: JSON-serialisable record of how the model was made (method, config, plan,
            data hash, parameter counts); written to ``prunecli.json`` with the prunecli, torch
            and transformers versions, a UTC ``created`` time and the ``verify`` result added.
            A ``recipe`` dict in it is also written as ``recipe.yaml``.
        overwrite: replace an existing ``out_dir`` that is itself a prunecli checkpoint
            (atomically: the old folder is moved aside, the new one renamed in, then the old one
            deleted); anything else is refused (see :func:`check_output_dir`).
        max_shard_size: shard the weights above this size (``"2GB"``, ``"500MB"`` or bytes).
        verify: reload and compare before publishing the folder.
        verify_max_bytes: reload whole only up to this many bytes of weights.
        progress: progress reporter.
        weights: for a model whose blocks are offloaded (pruned with a
            :class:`prunecli.calibrate.offload.OffloadedWeights` runner), where their pruned
            values are read from: the weights are then written shard by shard, never whole in
            memory, and verification checks the shapes (the model cannot run whole).
        add_files: called with the staging folder before it is published, to add files
            beside the checkpoint (e.g. a plot); they appear atomically with it.

    Returns:
        The absolute path of the checkpoint folder.

    Raises:
        VerifyError: the reloaded checkpoint is not the saved model (nothing is published).

    Example:
        >>> save_checkpoint(model, tok, "out", provenance={"method": "flap"})  # doctest: +SKIP
        PosixPath('/abs/out')
    """
    name_or_path = getattr(model, "name_or_path", None)
    inputs = (name_or_path,) if name_or_path and Path(str(name_or_path)).expanduser().exists() else ()
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs)
    _check_shard_size(max_shard_size)
    _check_config(model)
    provenance_text = _provenance_json(provenance)
    recipe = provenance.get("recipe") if isinstance(provenance.get("recipe"), dict) else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = sibling_temp_dir(out)
    try:
        with resolve(progress).task(f"saving checkpoint to {out}", total=1) as task:
            base_name, remote = _write(
                model, tokenizer, tmp, provenance_text, recipe, max_shard_size, weights
            )
            if add_files is not None:
                add_files(tmp)
            apply_umask(tmp)
            if verify:
                result = verify_checkpoint(
                    model,
                    tmp,
                    base_name,
                    remote=remote,
                    max_bytes=verify_max_bytes if weights is None else -1,
                )
                if weights is not None:
                    result["reason"] = "the model was written block by block and never held whole in memory"
            else:
                result = {"check": "none", "max_abs_diff": None, "reason": "verification turned off"}
            record = json.loads(provenance_text)
            record["verify"] = result
            (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            _move_into_place(tmp, out, overwrite=overwrite)
            task.advance()
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in _WRITE_ERRNOS:
            raise OutputNotWritableError(
                f"cannot write the checkpoint to {out}: {_WRITE_ERRNOS[exc.errno]} (nothing was written)",
                hint="free some space or choose another --output folder on a writable disk",
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# errno of a failed write -> what to tell the user (the message of the OSError itself names a temp file)
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EFBIG: "file too large for the file system",
}


def _probe_inputs(model: Any) -> dict[str, Any]:
    """A short fixed input for ``model``: 8 token ids, or one image for vision models."""
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(0)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = int(getattr(config, "image_size", 32))
        channels = int(getattr(config, "num_channels", 3))
        return {"pixel_values": torch.randn(1, channels, size, size, generator=gen)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 100)
    return {"input_ids": torch.randint(0, vocab, (1, 8), generator=gen)}


def _probe_output(model: Any, inputs: dict[str, Any]) -> tuple[str, Any]:
    import torch

    ref = next(model.parameters())
    moved = {
        k: v.to(ref.device, dtype=ref.dtype) if v.is_floating_point() else v.to(ref.device)
        for k, v in inputs.items()
    }
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(**moved)
    finally:
        model.train(training)
    if getattr(out, "logits", None) is not None:
        return "logits", out.logits.float().cpu()
    if getattr(out, "last_hidden_state", None) is not None:
        return "hidden_state", out.last_hidden_state.float().cpu()
    return "hidden_state", out[0].float().cpu()


def verify_checkpoint(
    model: Any, folder: Path, base_name: str, *, remote: bool, max_bytes: int = VERIFY_MAX_BYTES
) -> dict[str, Any]:
    """Check that ``folder`` reloads as ``model``; return which check ran.

    Always: loading the folder on the meta device with the class the checkpoint claims must
    report no missing, unexpected or resized tensor, and give the in-memory model's shapes.
    Then, when the weights are at most ``max_bytes``: the folder is reloaded (stock class, or
    the ``PruneCli<Base>`` class from ``modeling_prunecli.py`` - the same code the checkpoint
    ships - when it claims remote code), strictly (no missing, unexpected or resized tensors),
    and its output on a probe input must match the in-memory model's.

    Args:
        model: the in-memory model that was saved.
        folder: the written folder.
        base_name: the stock transformers class the checkpoint names.
        remote: whether the checkpoint claims the remote-code route.
        max_bytes: size limit for the reload.

    Returns:
        ``{"check", "max_abs_diff", "route", ...}``.

    Raises:
        VerifyError: a shape, a tensor or the outputs differ.
    """
    import torch

    route = "remote-code" if remote else "stock"
    if not _is_transformers_class(base_name):
        return {"check": "none", "max_abs_diff": None, "route": route, "reason": "not a transformers class"}
    import transformers

    from prunecli.checkpoint import modeling_prunecli
    from prunecli.models.hf import quiet_transformers

    cls = modeling_prunecli.heterogeneous_class(base_name) if remote else getattr(transformers, base_name)
    try:
        # A meta-device load: transformers' own name mapping and shape checks, no weights in memory.
        with quiet_transformers():
            skeleton, info = cls.from_pretrained(folder, device_map="meta", output_loading_info=True)
    except Exception as exc:  # mismatched sizes are a RuntimeError, a bad config a ValueError, ...
        raise VerifyError(
            f"the checkpoint does not load into the model its config.json describes: {_first_line(exc)}",
            hint=_BUG_HINT,
        ) from exc
    _check_loading_info(info)
    built = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    live = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in set(built) | set(live) if built.get(k) != live.get(k))
    if differ:
        k = differ[0]
        raise VerifyError(
            f"the checkpoint reloads with other tensors than the saved model ({len(differ)} differ; "
            f"{k}: saved model {live.get(k)}, reloaded {built.get(k)})",
            hint=_BUG_HINT,
        )
    size = sum(p.stat().st_size for p in weight_files(folder))
    if size > max_bytes:
        return {
            "check": "shapes",
            "max_abs_diff": None,
            "route": route,
            "reason": f"{size} bytes of weights is above the reload limit of {max_bytes}",
        }
    ref_param = next(model.parameters())
    cls = modeling_prunecli.heterogeneous_class(base_name) if remote else getattr(transformers, base_name)
    with quiet_transformers():
        reloaded, info = cls.from_pretrained(folder, dtype=ref_param.dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v)[:3]))}" for k, v in bad.items()
        )
        raise VerifyError(
            f"the checkpoint does not reload as saved ({detail})",
            hint=_BUG_HINT,
        )
    reloaded = reloaded.to(ref_param.device).eval()
    inputs = _probe_inputs(model)
    kind, want = _probe_output(model, inputs)
    _, got = _probe_output(reloaded, inputs)
    del reloaded
    if got.shape != want.shape:
        raise VerifyError(
            f"the reloaded checkpoint's {kind} have shape {tuple(got.shape)}, not {tuple(want.shape)}"
        )
    diff = float((got - want).abs().max()) if want.numel() else 0.0
    scale = float(want.abs().max()) if want.numel() else 0.0
    tol = (1e-4 if ref_param.dtype == torch.float32 else 1e-2) * max(1.0, scale)
    if not diff <= tol:
        raise VerifyError(
            f"the reloaded checkpoint is not the saved model: its {kind} differ by {diff:.3g} "
            f"(tolerance {tol:.3g}) on a probe input",
            hint=_BUG_HINT,
        )
    return {"check": kind, "max_abs_diff": diff, "route": route}


_BUG_HINT = "this is a prunecli bug; please report it (--no-verify writes the folder anyway)"


def _check_loading_info(info: dict[str, Any]) -> None:
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(map(str, sorted(v)[:3]))}" for k, v in bad.items()
        )
        raise VerifyError(f"the checkpoint does not reload as saved ({detail})", hint=_BUG_HINT)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
